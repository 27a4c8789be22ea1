"""Give the C heap's free pages back to the system between blocks (glibc only).

A block job allocates and frees the same few large arrays per block (inputs read ahead,
int64 sums, outputs). glibc serves arrays above its mmap threshold with ``mmap`` and
returns them at once, but raises that threshold to the size of every such array freed, so
from the second block on those arrays come from the heap, and its free pages stay resident:
the peak RSS then grows with the number of blocks a process has seen (``bench/predict.py``
figure 4: +80 MiB from 256³ to 512³) though the live data do not. ``malloc_trim(0)`` after a
block hands the free pages back (``madvise``), which keeps memory bounded by a block's
working set. Fixing the threshold instead (``MALLOC_MMAP_THRESHOLD_``) would do the same but
makes PyTorch's CPU convolutions page-fault every buffer on every call: twice as slow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():  # the C function, or None where the C library has none (musl, macOS)
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the C heap's free pages to the system, where the C library can (cheap: a few
    milliseconds; call it between blocks, not per window)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
