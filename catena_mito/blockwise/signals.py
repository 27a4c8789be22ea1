"""Clean stop on SIGTERM (node drain, preemption, ``kubectl delete``, Slurm time limit).

:func:`install` (called by the CLI) sets a handler for SIGTERM. Inside a block loop
(:func:`stoppable`), the handler only records the request: the loop finishes or abandons
the current block (a block is never marked done without its data), waits for the writes
in flight, and raises :class:`~catena_mito.errors.Stopped`, which the CLI turns into exit
code 143. Outside a loop (loading a model, planning), the handler raises ``Stopped`` at
once. A second SIGTERM exits immediately.

A handler is needed even for a prompt default exit: the kernel does not deliver a signal
whose action is the default to PID 1 of a PID namespace, which the CLI is in a container
started without an init.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from catena_mito.errors import Stopped

log = logging.getLogger(__name__)

_requested = threading.Event()
_depth = 0
_lock = threading.Lock()


def _handler(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _requested.is_set():
        os.write(2, f"catena-mito: second {name}, exiting now\n".encode())
        os._exit(Stopped.exit_code)
    _requested.set()
    if _depth == 0:
        raise Stopped(f"stopped by {name}")
    os.write(2, f"catena-mito: {name} received; stopping after the blocks in flight\n".encode())


def install() -> None:
    """Handle SIGTERM as described above (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    return _requested.is_set()


def raise_if_requested(where: str = "") -> None:
    if _requested.is_set():
        raise Stopped("stopped by SIGTERM" + (f" {where}" if where else ""))


def reset() -> None:
    """Forget a stop request (tests, and library users running several jobs)."""
    _requested.clear()


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """A section in which SIGTERM only requests a stop (the block loop polls for it)."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
