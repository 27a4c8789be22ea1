"""Each window computed once: windows owned by one block, overlaps exchanged in fixed point.

The sliding windows are those of the whole-volume grid (:class:`~catena_mito.inference.
WindowGrid`); the blocks tile the same grid (voxels, z, y, x). A window is *owned* by the
block that contains its start, so a sharded run computes every window exactly once. A
window reaches past the end of its block by at most ``H = patch - 1`` voxels per axis (in
practice ``patch - stride``), which is never more than one block (``H <= block_shape`` is
required)::

    axis:    block k                  block k + 1
          |-------------------------|-------------------------|
          [s ... owned starts ...]
          [======= window ========]=====>|  spill: H voxels into block k + 1
          |         core            | halo |

Two phases, each through the one block runner:

``windows``  per block: run the owned windows and sum their weighted probabilities, in
             integers, over the block's core and its halo; store 8 *pieces* per block:
             kind ``(kz, ky, kx)`` in {0, 1}^3 is the part that lands on block
             ``position + kind`` (``000`` = the block's own core).
``blend``    per block at ``g``: add piece ``k`` of block ``g - k`` for every kind ``k``,
             divide by the weight sum, encode, write the output chunks.

**Why integers.** Window ``w`` adds ``Qw · Qp`` to every voxel it covers, where
``Qp = round(p · 2^PROB_BITS)`` (the model's float32 probability, rounded once) and ``Qw``
is an integer Gaussian weight. Sums of integers do not depend on their order or grouping,
so the result is bitwise the same however windows are grouped into blocks, batches and
shards, which float sums cannot promise. ``Qw = qz ⊗ qy ⊗ qx`` is separable, each factor
``q[i] = max(1, round(2^WEIGHT_BITS · exp(-(i - (p-1)/2)^2 / (2 σ^2))))`` with
``σ = 0.125 · p`` (MONAI's Gaussian; the floor of 1 keeps every covered voxel defined),
so the weight sum at a voxel is ``Dz[z] · Dy[y] · Dx[x]`` with ``D[v] = Σ_s q[v - s]``
over the window starts ``s`` covering ``v``: a function of the geometry alone, the same in
every block. The output is ``Σ Qw·Qp / (2^PROB_BITS · Σ Qw)`` in float64, then float32:
within ``2^-(PROB_BITS+1)`` of the float weighted mean, beside float32 rounding.

Limits: ``patch`` in ``(0, 2^20)``, and at most :data:`MAX_OVERLAP` windows over a voxel
(the int64 sums would overflow): strides of at least a tenth of the patch per axis are
always fine.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catena_mito.blockwise import signals
from catena_mito.blockwise.geometry import Block, BlockGrid, Coord, Roi
from catena_mito.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

#: Bits of the per-axis integer weights (the window weight has 3 × this many).
WEIGHT_BITS = 10
#: Bits of the fixed-point probabilities.
PROB_BITS = 24
#: Most windows over one voxel: ``MAX_OVERLAP · 2^(3·WEIGHT_BITS + PROB_BITS) < 2^63``.
MAX_OVERLAP = 2 ** (63 - 3 * WEIGHT_BITS - PROB_BITS) - 1
SIGMA_SCALE = 0.125
#: Every piece kind, ``(kz, ky, kx)``: 1 on an axis = the spill into the next block there.
KINDS: tuple[Coord, ...] = tuple(itertools.product((0, 1), repeat=3))  # type: ignore[assignment]


def axis_weights(patch: int) -> np.ndarray:
    """The integer Gaussian weight of one axis of a window (int64, >= 1)."""
    sigma = max(SIGMA_SCALE * patch, 1e-6)
    x = np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0
    return np.maximum(1, np.rint(2.0**WEIGHT_BITS * np.exp(-0.5 * (x / sigma) ** 2))).astype(np.int64)


def window_weights(patch: Sequence[int]) -> np.ndarray:
    """``qz ⊗ qy ⊗ qx`` (int64, shape ``patch``)."""
    q = [axis_weights(p) for p in patch]
    return q[0][:, None, None] * q[1][None, :, None] * q[2][None, None, :]


def kind_name(kind: Sequence[int]) -> str:
    return "".join(str(int(k)) for k in kind)


@dataclass(frozen=True)
class Exchange:
    """The ownership plan of a window grid over a block grid (both voxels, z, y, x).

    Raises :class:`ConfigError` when a window could spill beyond the next block
    (``block_shape`` below ``patch - stride`` or so) or when too many windows overlap.
    """

    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    patch: Coord
    blocks: BlockGrid
    halo: Coord = field(init=False)
    den_axes: tuple[np.ndarray, np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    @classmethod
    def of(cls, window_grid: Any, blocks: BlockGrid) -> Exchange:
        if tuple(window_grid.volume_shape) != tuple(blocks.volume_shape):
            raise ValueError(f"window grid {window_grid.volume_shape} and blocks {blocks.volume_shape} differ")
        starts = tuple(tuple(window_grid.starts(a)) for a in range(3))
        return cls(starts, tuple(window_grid.patch_size), blocks)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        shape, b = self.blocks.volume_shape, self.blocks.block_shape
        halo, den, overlap = [], [], 1
        for a in range(3):
            p, starts = self.patch[a], np.asarray(self.starts[a], dtype=np.int64)
            # the spill past each block's end of its last owned window (the last block: none)
            owner = starts // b[a]
            ends = starts + p
            inner = owner < self.blocks.grid_shape[a] - 1
            h = int(max(0, (ends[inner] - (owner[inner] + 1) * b[a]).max(initial=0)))
            if h > b[a]:
                raise ConfigError(
                    f"block_shape {list(b)}: windows of patch_size {list(self.patch)} would reach "
                    f"{h} voxels past their block in axis {'zyx'[a]}, beyond the next block; "
                    f"use a block_shape of at least {p} in that axis (or window_sharing: recompute)")
            halo.append(h)
            q = axis_weights(p)
            d = np.zeros(shape[a], dtype=np.int64)
            count = np.zeros(shape[a] + 1, dtype=np.int64)
            for s in starts:
                d[s : s + p] += q
            np.add.at(count, starts, 1)
            np.add.at(count, ends, -1)
            overlap *= int(np.cumsum(count).max())
            den.append(d)
        if overlap > MAX_OVERLAP:
            raise ConfigError(
                f"stride too small for patch_size {list(self.patch)}: up to {overlap} windows overlap "
                f"one voxel, more than the {MAX_OVERLAP} that window_sharing: exchange sums exactly; "
                "use a larger stride (or window_sharing: recompute)")
        object.__setattr__(self, "halo", tuple(halo))
        object.__setattr__(self, "den_axes", tuple(den))

    # -- geometry ---------------------------------------------------------------------------

    def owned_windows(self, block: Block, within: Roi | None = None) -> list[Roi]:
        """The windows ``block`` owns (start in its write region), in global C order;
        with ``within``, only those that intersect it."""
        per_axis = []
        for a in range(3):
            lo, hi = block.write_roi.begin[a], block.write_roi.end[a]
            s = [x for x in self.starts[a] if lo <= x < hi]
            if within is not None:
                s = [x for x in s if x < within.end[a] and x + self.patch[a] > within.begin[a]]
            per_axis.append(s)
        return [Roi((z, y, x), self.patch) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]

    def extent(self, block: Block) -> Roi:
        """The block's core and halo: every voxel its owned windows can reach."""
        begin = block.write_roi.begin
        end = [min(v, e + h) for v, e, h in zip(self.blocks.volume_shape, block.write_roi.end, self.halo)]
        return Roi.from_bounds(begin, end)

    def read_roi(self, windows: Sequence[Roi]) -> Roi | None:
        """The union of ``windows`` (None when there are none): what a block reads."""
        if not windows:
            return None
        return Roi.from_bounds([min(w.begin[a] for w in windows) for a in range(3)],
                               [max(w.end[a] for w in windows) for a in range(3)])

    def piece_roi(self, block: Block, kind: Sequence[int]) -> Roi | None:
        """Where piece ``kind`` of ``block`` lands (absolute voxels), or None when there is
        no such neighbour or nothing spills there."""
        target = self.blocks.block_at([g + k for g, k in zip(block.grid_position, kind)])
        if target is None or any(k and h == 0 for k, h in zip(kind, self.halo)):
            return None
        t = target.write_roi
        end = [t.begin[a] + (min(self.halo[a], t.shape[a]) if kind[a] else t.shape[a]) for a in range(3)]
        return Roi.from_bounds(t.begin, end)

    def sources(self, block: Block) -> list[tuple[Block, Coord]]:
        """``(source block, kind)`` of every piece that lands on ``block`` (its own core first)."""
        out = []
        for kind in KINDS:
            src = self.blocks.block_at([g - k for g, k in zip(block.grid_position, kind)])
            if src is not None and self.piece_roi(src, kind) is not None:
                out.append((src, kind))
        return out

    def pieces_of(self, block: Block) -> list[tuple[Coord, Roi]]:
        """``(kind, region)`` of every piece ``block`` produces."""
        return [(k, r) for k in KINDS if (r := self.piece_roi(block, k)) is not None]

    def weight_sum(self, roi: Roi) -> np.ndarray:
        """``Σ Qw`` over the windows covering each voxel of ``roi`` (int64; exact)."""
        dz, dy, dx = (d[roi.begin[a] : roi.end[a]] for a, d in enumerate(self.den_axes))
        return dz[:, None, None] * dy[None, :, None] * dx[None, None, :]

    # -- the two phases ---------------------------------------------------------------------

    def partial(self, runner: Any, block: Block, data: np.ndarray | None, read_roi: Roi | None,
                windows: Sequence[Roi]) -> dict[Coord, np.ndarray]:
        """The pieces ``(T, *piece shape)`` int64 of ``block`` from ``windows`` (owned by it),
        run on the runner's device; ``data`` is the preprocessed ``read_roi``."""
        ext = self.extent(block)
        n_targets = len(runner.targets)
        if not windows:
            acc = np.zeros((n_targets, *ext.shape), dtype=np.int64)
        else:
            acc = runner.accumulate(data, read_roi, windows, ext, window_weights(self.patch), PROB_BITS)
        return {kind: acc[(slice(None), *roi.to_slices(ext))] for kind, roi in self.pieces_of(block)}

    def blend(self, block: Block, pieces: Iterable[tuple[Coord, np.ndarray]], into_first: bool = False) -> np.ndarray:
        """Float32 probabilities ``(T, *write shape)`` of ``block`` from the pieces landing
        on it (``(kind, array)``, every one of :meth:`sources`).

        A piece covering the whole block that owns its (writable, int64) memory, as
        :func:`decode_piece` returns them, is summed into in place rather than copied;
        ``into_first``: so is the first piece (the block's core), which the caller no
        longer needs (a view of the sums its windows just made)."""
        roi = block.write_roi
        num: np.ndarray | None = None
        rest = []
        for i, (_kind, piece) in enumerate(pieces):
            if num is None and tuple(piece.shape[1:]) == tuple(roi.shape) and (
                    _owned_int64(piece) or (into_first and i == 0 and piece.dtype == np.int64
                                            and piece.flags.writeable)):
                num = piece
            else:
                rest.append(piece)
        for piece in rest:
            if num is None:
                num = np.zeros((piece.shape[0], *roi.shape), dtype=np.int64)
            num[(slice(None), *(slice(0, s) for s in piece.shape[1:]))] += piece
        if num is None:  # pragma: no cover - every block has its own core
            raise ValueError(f"no pieces for block {block.index}")
        # Σ Qw = Dz·Dy·Dx < MAX_OVERLAP · 2^(3·WEIGHT_BITS) < 2^53, so its float64 products
        # (and the power-of-two scale) are exact: the same value as the int64 product.
        dz, dy, dx = (d[roi.begin[a] : roi.end[a]].astype(np.float64) for a, d in enumerate(self.den_axes))
        den = ((dz * float(2**PROB_BITS))[:, None] * dy[None, :])[:, :, None] * dx[None, None, :]
        if num.shape[0] == 1:  # the quotient into den's memory: one float64 volume, not three
            np.divide(num[0], den, out=den)
            return den.astype(np.float32)[None]
        return (num / den).astype(np.float32)


def _owned_int64(a: np.ndarray) -> bool:
    return a.dtype == np.int64 and a.flags.owndata and a.flags.writeable and a.flags.c_contiguous


# --- storing pieces -------------------------------------------------------------------------


def encode_piece(piece: np.ndarray) -> bytes:
    """A small JSON header line and the Blosc-compressed int64 values (fixed-point sums
    have many zero high bytes: byte shuffle + LZ4 shrinks them several-fold, quickly)."""
    from numcodecs import Blosc

    piece = np.ascontiguousarray(piece, dtype=np.int64)
    header = json.dumps({"shape": list(piece.shape), "dtype": "int64"}).encode()
    return header + b"\n" + Blosc(cname="lz4", clevel=1, shuffle=Blosc.SHUFFLE).encode(piece)


def decode_piece(blob: bytes) -> np.ndarray:
    """The int64 piece of :func:`encode_piece`'s bytes (a fresh, writable array)."""
    from numcodecs import Blosc

    header, _, body = blob.partition(b"\n")
    meta = json.loads(header)
    out = np.empty(meta["shape"], dtype=meta["dtype"])
    Blosc().decode(body, out=out)
    return out


class PieceStore:
    """Where the pieces of one run live: files ``<url>/<block>/<kind>.blosc`` (one writer
    each: the block's own), or a dict in memory (``url=None``, single-process TIFF)."""

    def __init__(self, url: str | None, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.options = dict(storage_options or {})
        self.memory: dict[tuple[int, str], bytes] = {}

    def _url(self, index: int, kind: Sequence[int]) -> str:
        from catena_mito import storage

        return storage.join_url(self.url, str(int(index)), f"{kind_name(kind)}.blosc")

    def put(self, index: int, pieces: Mapping[Coord, np.ndarray]) -> None:
        from catena_mito import storage

        for kind, piece in pieces.items():
            blob = encode_piece(piece)
            if self.url is None:
                self.memory[(index, kind_name(kind))] = blob
            else:
                storage.write_bytes(self._url(index, kind), blob, self.options)

    def get(self, index: int, kind: Sequence[int]) -> np.ndarray:
        """Raises :class:`StorageError` when the piece is missing (never zeros)."""
        from catena_mito import storage

        if self.url is None:
            try:
                return decode_piece(self.memory[(index, kind_name(kind))])
            except KeyError:
                raise StorageError(f"piece {kind_name(kind)} of block {index} is missing") from None
        return decode_piece(storage.read_bytes(self._url(index, kind), self.options))

    def remove(self) -> None:
        from catena_mito import storage

        if self.url is None:
            self.memory.clear()
            return
        try:
            storage.remove(self.url, self.options)
        except OSError as e:  # another process of the same shard is removing them too
            log.warning("could not remove the pieces at %s: %s", storage.redact_url(self.url), e)


def gather(exchange: Exchange, block: Block, get: Callable[[Block, Coord], np.ndarray]) -> list[tuple[Coord, np.ndarray]]:
    """Every piece landing on ``block``, fetched with ``get(source, kind)``."""
    out = []
    for src, kind in exchange.sources(block):
        signals.raise_if_requested("while reading the pieces of a block")
        out.append((kind, get(src, kind)))
    return out


def nbytes_per_block(exchange: Exchange, targets: int) -> int:
    """The int64 bytes one block's pieces take before compression (for --dry-run)."""
    ext = [min(b + h, v) for b, h, v in zip(exchange.blocks.block_shape, exchange.halo, exchange.blocks.volume_shape)]
    return 8 * targets * math.prod(ext)



def whole_volume_predict(runner: Any, volume: np.ndarray, patch: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """The exchange algorithm in one block over a whole preprocessed volume (z, y, x float32):
    probabilities ``(T, z, y, x)``, the reference a block-wise, sharded run equals bitwise."""
    from catena_mito.inference import WindowGrid

    volume = np.asarray(volume, dtype=np.float32)
    blocks = BlockGrid(volume.shape, volume.shape)
    ex = Exchange.of(WindowGrid(volume.shape, patch, stride), blocks)
    block = blocks.block(0)
    core = ex.partial(runner, block, volume, Roi.from_shape(volume.shape), ex.owned_windows(block))[(0, 0, 0)]
    return ex.blend(block, [((0, 0, 0), core)])
