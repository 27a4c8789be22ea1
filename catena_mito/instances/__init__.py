"""Instances from network outputs: the modes of ``label`` (see :mod:`.settings`).

One module per concept: :mod:`.threshold` (exact probability thresholds),
:mod:`.components` (connected components of a block), :mod:`.seeds` (the seed rules and
their halos), :mod:`.grow` (geodesic seed growth and its halo), :mod:`.settings` (the
modes and what each reads), :mod:`.whole` (a whole volume in memory, for callers such as
``evaluate``). The block-wise jobs are in :mod:`catena_mito.label`.
"""

from __future__ import annotations

from catena_mito.instances.settings import InstanceSettings
from catena_mito.instances.whole import instances_whole_volume

__all__ = ["InstanceSettings", "instances_whole_volume"]
