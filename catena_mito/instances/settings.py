"""The instance modes of ``label`` and the settings each one reads.

``connected_components`` (Catena's method, pytorch_connectomics' ``binary_connected``):
connected components of the thresholded foreground, small objects removed.
``contour`` and ``distance``: seeds (:mod:`catena_mito.instances.seeds`), numbered by
exact connected components with seeds under ``thres_small_seeds`` voxels dropped, grown
into the foreground mask (:mod:`catena_mito.instances.grow`). With
``unseeded_components`` (the default) every connected component of the foreground that
holds no grown voxel — no seed voxel (a thin piece all contour, a sliver cut by the
volume's face) or only seeds dropped by size — is an object of its own, numbered after
the seed ids (each component's first voxel in C order); without it such components stay
0, as in pytorch_connectomics' ``bc_watershed``. Voxels of a seeded component beyond
``grow_distance`` stay 0 either way. Objects under ``thres_small_instances`` voxels are
removed, the rest renumbered ``1..n`` in the order of their ids (seeded objects by seed
id, then the unseeded components), which no block shape or shard count changes. ``auto`` is ``contour`` when there is a contour prediction (an explicit
``input_contour_path``, or the foreground array lists ``contour`` in ``catena_targets``),
else ``connected_components``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from catena_mito.errors import ConfigError

CONNECTED_COMPONENTS = "connected_components"
CONTOUR = "contour"
DISTANCE = "distance"
MODES = (CONNECTED_COMPONENTS, CONTOUR, DISTANCE)
#: The attribute listing the targets a predict run wrote (on the foreground array).
TARGETS_ATTR = "catena_targets"

#: LabelConfig fields each mode reads beyond the connected-components ones.
MODE_FIELDS: dict[str, tuple[str, ...]] = {
    CONNECTED_COMPONENTS: (),
    CONTOUR: ("input_contour_path", "thres_seed", "thres_contour", "thres_small_seeds", "grow_distance",
              "unseeded_components"),
    DISTANCE: ("seed_distance", "thres_small_seeds", "grow_distance", "unseeded_components"),
}


@dataclass(frozen=True)
class InstanceSettings:
    """Everything that decides the instances, beyond the block plan (voxels, nm, z y x)."""

    mode: str
    thres_foreground: float
    thres_small_instances: int
    connectivity: int
    thres_seed: float = 0.0
    thres_contour: float = 1.0
    thres_small_seeds: int = 0
    grow_distance: int = 0
    seed_distance: float = 0.0
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unseeded_components: bool = True

    @classmethod
    def from_config(cls, config: Any, mode: str, resolution: Sequence[float] | None) -> InstanceSettings:
        """The settings of ``mode`` from a :class:`~catena_mito.config.LabelConfig`."""
        if mode == DISTANCE and resolution is None:
            raise ConfigError("instance_mode 'distance' measures seed_distance in nm, but the input has no "
                              "'resolution' attribute; add it to the prediction (z, y, x nm)")
        return cls(mode=mode, thres_foreground=float(config.thres_foreground),
                   thres_small_instances=int(config.thres_small_instances),
                   connectivity=int(config.connectivity), thres_seed=float(config.thres_seed),
                   thres_contour=float(config.thres_contour),
                   thres_small_seeds=int(config.thres_small_seeds), grow_distance=int(config.grow_distance),
                   seed_distance=float(config.seed_distance),
                   unseeded_components=bool(config.unseeded_components),
                   resolution=tuple(float(r) for r in (resolution or (1.0, 1.0, 1.0))))  # type: ignore[arg-type]

    def description(self) -> dict[str, Any]:
        """The settings that change values in this mode, for a run description."""
        out: dict[str, Any] = {"mode": self.mode, "thres_small_seeds": self.thres_small_seeds,
                               "grow_distance": self.grow_distance,
                               "unseeded_components": self.unseeded_components}
        if self.mode == CONTOUR:
            out |= {"thres_seed": self.thres_seed, "thres_contour": self.thres_contour}
        else:
            out |= {"seed_distance": self.seed_distance, "resolution": list(self.resolution)}
        return out


def resolve_mode(requested: str, contour_given: bool, foreground_attrs: Mapping[str, Any]) -> str:
    """The mode ``auto`` stands for (see the module docstring); others are returned as they are."""
    if requested != "auto":
        return requested
    targets = foreground_attrs.get(TARGETS_ATTR) or []
    if contour_given or (isinstance(targets, (list, tuple)) and CONTOUR in targets):
        return CONTOUR
    return CONNECTED_COMPONENTS


def check_unused_fields(config: Any, mode: str, requested: str) -> None:
    """Refuse a setting the resolved mode does not read (changed from its default)."""
    used = set(MODE_FIELDS[mode])
    for name in sorted({f for fields in MODE_FIELDS.values() for f in fields} - used):
        default = type(config).model_fields[name].default
        if getattr(config, name) != default:
            why = f" (instance_mode auto resolved to {mode!r})" if requested == "auto" else ""
            raise ConfigError(f"{name}={getattr(config, name)!r} is not used by instance_mode {mode!r}{why}; "
                              f"remove it, or choose a mode that uses it")
