"""``predict --phase all`` with ``window_sharing: exchange``: each block's windows and its
blend in one pass, the pieces that stay in this process kept in memory.

The two phases of :mod:`catena_mito.exchange` store every piece, each block's own core
included, and read them all back in the blend: a round trip through the store of about
twice a block's int64 sums, which on a CPU node cost about a fifth of the model's own time
(``bench/predict.py`` figure 2). When one process runs both phases of its shard, a block's
blend can follow its own windows at once: every piece landing on block ``g`` comes from
``g`` itself or from a lower block (by the contiguous assignment, of the same or a lower
shard), which this pass computed earlier or another process computed. Per block, in the
shard's (C) order, through the one block runner::

    read      preprocess the inputs of the block's own windows; the pieces landing on it
              from blocks outside this pass (lower shards, blocks done by an earlier run):
              their stored files, else their overlap computed here (as the blend phase does)
    compute   own windows → int64 sums (core + spills); keep the spills later blocks of
              this pass take from memory; blend the core with every piece landing here
              → encode
    write     store the spills not kept in memory → windows marker → output chunks →
              (runner) output marker

Where the spill of block ``g`` onto block ``c = g + kind`` goes:

* ``c`` in another shard: stored, before ``g``'s windows marker (that shard's blend waits
  for the marker, then reads it, as after the windows phase);
* ``c`` in this shard and done already: nowhere, nobody needs it;
* ``c`` in this shard, to do, at most :attr:`OnePass.reach` blocks after ``g``: kept in
  memory until ``c``'s compute takes it; further: stored, and read back by ``c``'s compute
  once ``g``'s write has stored it.

``reach`` is the number of blocks whose spills fit in :data:`HOLD_BLOCKS` blocks' worth of
int64 sums, so what this pass keeps in memory is bounded by a few blocks whatever the
volume's size (the z spills of a wide volume, needed a whole layer of blocks later, are
stored).

The integers are the same however a piece travels, so the output is bitwise that of the
two phases run apart. The windows marker of a block lists the kinds it did not store
(``held``): a run killed mid-pass has lost those, and the next ``--phase all`` computes the
overlaps again from the same windows (``--phase blend`` alone refuses, as for any missing
piece). A block of the pass whose windows an earlier run stored whole (a ``--phase
windows`` marker, which lists nothing ``held``) is only blended, as by ``--phase blend``:
its own core and spills are read back, its windows not run again; for the blocks after it
it is a block outside the pass.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catena_mito.blockwise.geometry import Block, Coord
from catena_mito.blockwise.runner import BlockSteps
from catena_mito.errors import StorageError
from catena_mito.exchange import Exchange, PieceStore, kind_name

#: What spills a pass keeps in memory at most, in blocks' worth of int64 sums (all targets).
HOLD_BLOCKS = 2
OWN: Coord = (0, 0, 0)

#: ``fetch(block, [(source, kind), ...])`` → ``(got, missing)``: the pieces read from the
#: store as ``(kind, array)``, and ``(kind, source, windows, read roi, data)`` of those to
#: compute here (see predict's blend phase).
Fetch = Callable[[Block, Sequence[tuple[Block, Coord]]], tuple[list, list]]


@dataclass
class _Made:
    """What the compute of one block of this pass left for later blocks."""

    #: spills kept in memory, by kind: (consumer block index, int64 array)
    held: dict[Coord, tuple[int, np.ndarray]]
    #: kinds the block's write stores
    stored: set[Coord]
    written: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class OnePass:
    """The steps of one pass over this shard's blocks (see the module docstring).

    ``shard``: the indices of this shard's blocks; ``todo``: those not done when the pass
    starts (a block done meanwhile by another process of the same shard is handled: its
    pieces are then fetched like those of any block outside the pass); ``stored``: those of
    ``todo`` whose pieces an earlier run stored whole, only blended here. ``prepared(block,
    within)`` → ``(windows, read roi, preprocessed data)`` of the windows ``block`` owns;
    ``overlap(missing)`` → ``[(kind, piece)]`` computed from ``fetch``'s missing entries;
    ``finish(block, probabilities)`` → the encoded output; ``write_output(block, values)``
    writes its chunks; ``mark_windows(block, info)`` (None: no markers) records the
    windows of a block done, after its stored pieces landed.
    """

    def __init__(self, exchange: Exchange, runner: Any, pieces: PieceStore, *, shard: Collection[int],
                 todo: Collection[int], prepared: Callable[..., tuple], fetch: Fetch,
                 overlap: Callable[[list], list], finish: Callable[[Block, np.ndarray], Any],
                 write_output: Callable[[Block, Any], None],
                 mark_windows: Callable[[Block, Mapping[str, Any]], None] | None,
                 stored: Collection[int] = (), hold_blocks: int | None = None):
        self.ex, self.runner, self.pieces = exchange, runner, pieces
        self.shard = set(shard)
        self.todo = self.shard & set(todo)
        #: blocks of the pass whose windows run here (the others of ``todo`` are only blended)
        self.computing = self.todo - set(stored)
        self.prepared, self.fetch, self.overlap = prepared, fetch, overlap
        self.finish, self.write_output, self.mark_windows = finish, write_output, mark_windows
        self.reach = reach(exchange, HOLD_BLOCKS if hold_blocks is None else hold_blocks)
        grid = exchange.blocks.grid_shape
        #: blocks between a block and the last one its spills land on
        self.span = grid[1] * grid[2] + grid[2] + 1
        self.made: dict[int, _Made] = {}  # touched by compute (the calling thread) only

    def steps(self) -> BlockSteps:
        return BlockSteps(read=self.read, compute=self.compute, write=self.write)

    # -- where pieces go --------------------------------------------------------------------

    def _consumer(self, block: Block, kind: Coord) -> Block | None:
        return self.ex.blocks.block_at([g + k for g, k in zip(block.grid_position, kind)])

    def _in_pass(self, index: int) -> bool:
        """Whether the windows of block ``index`` run in this pass (their pieces come from it)."""
        return index in self.computing  # a subset of the shard

    def _route(self, block: Block, consumer: Block) -> str:
        if consumer.index not in self.shard:
            return "store"
        if consumer.index not in self.todo:
            return "drop"
        return "hold" if consumer.index - block.index <= self.reach else "store"

    # -- the steps --------------------------------------------------------------------------

    def read(self, block: Block) -> tuple:
        computing = self._in_pass(block.index)
        own = self.prepared(block) if computing else None
        outside = [(src, kind) for src, kind in self.ex.sources(block)
                   if not self._in_pass(src.index) and (kind != OWN or not computing)]
        got, missing = self.fetch(block, outside) if outside else ([], [])
        return own, got, missing

    def compute(self, block: Block, data: tuple) -> tuple:
        own, got, missing = data
        self._forget(block.index)
        if own is None:  # windows stored whole by an earlier run: the blend alone
            landing = [*got, *self.overlap(missing)]
            for src, kind in self.ex.sources(block):
                if self._in_pass(src.index):
                    landing.extend(self._take(block, src, kind))
            return None, None, self.finish(block, self.ex.blend(block, landing))
        windows, roi, x = own
        parts = self.ex.partial(self.runner, block, x, roi, windows)  # views of one int64 array
        made = _Made(held={}, stored=set())
        for kind, piece in parts.items():
            if kind == OWN:
                continue
            consumer = self._consumer(block, kind)
            assert consumer is not None  # piece_roi only makes pieces for existing neighbours
            route = self._route(block, consumer)
            if route == "hold":  # a copy, so the block's whole int64 array is freed
                made.held[kind] = (consumer.index, np.array(piece, copy=True))
            elif route == "store":
                made.stored.add(kind)
        landing = [(OWN, parts[OWN]), *got, *self.overlap(missing)]
        for src, kind in self.ex.sources(block):
            if kind != OWN and self._in_pass(src.index):
                landing.extend(self._take(block, src, kind))
        self.made[block.index] = made
        values = self.finish(block, self.ex.blend(block, landing, into_first=True))
        return {k: parts[k] for k in made.stored}, made, values

    def write(self, block: Block, result: tuple) -> dict[str, Any]:
        stored, made, values = result
        if made is None:  # only blended: its pieces and windows marker are an earlier run's
            self.write_output(block, values)
            return {"write_offset": list(block.write_roi.offset), "write_shape": list(block.write_roi.shape)}
        try:
            self.pieces.put(block.index, stored)
            if self.mark_windows is not None:
                held = [kind_name(k) for k, _ in self.ex.pieces_of(block) if k not in stored]
                self.mark_windows(block, {"pieces": len(stored), "held": held})
        except BaseException as e:
            made.error = e
            raise
        finally:
            made.written.set()
        self.write_output(block, values)
        return {"write_offset": list(block.write_roi.offset), "write_shape": list(block.write_roi.shape)}

    # -- pieces of this pass ----------------------------------------------------------------

    def _take(self, block: Block, src: Block, kind: Coord) -> list[tuple[Coord, np.ndarray]]:
        """Piece ``kind`` of ``src`` (a block of this pass) for ``block``."""
        made = self.made.get(src.index)
        if made is not None and kind in made.held:
            return [(kind, made.held.pop(kind)[1])]
        if made is not None and kind in made.stored:
            made.written.wait()
            if made.error is not None:
                raise StorageError(f"the pieces of block {src.index} could not be stored: {made.error}")
            try:
                return [(kind, self.pieces.get(src.index, kind))]
            except StorageError:
                pass  # removed meanwhile (another process completed the run): computed below
        # Not computed by this pass (another process of this shard did the block meanwhile):
        # as for a block outside the pass.
        got, missing = self.fetch(block, [(src, kind)])
        return [*got, *self.overlap(missing)]

    def _forget(self, index: int) -> None:
        """Drop what no block from ``index`` on can take: spills held for a block this pass
        skipped (done meanwhile), and records of blocks whose spills all landed before."""
        for src in list(self.made):
            made = self.made[src]
            for kind in [k for k, (consumer, _) in made.held.items() if consumer < index]:
                del made.held[kind]
            if src + self.span < index:
                del self.made[src]


def reach(exchange: Exchange, hold_blocks: int) -> int:
    """How many blocks ahead a pass keeps a spill in memory: the most blocks whose spills
    (a block's int64 sums beyond its core) fit in ``hold_blocks`` blocks' worth of sums."""
    first = exchange.blocks.block_at((0, 0, 0))
    assert first is not None
    core = math.prod(first.write_roi.shape)
    spill = math.prod(exchange.extent(first).shape) - core
    return max(1, hold_blocks * core // spill) if spill > 0 else max(1, hold_blocks)
