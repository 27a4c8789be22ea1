"""Progress that reads well in a terminal, in ``kubectl logs`` and in Slurm output files.

With a TTY on stderr: a tqdm bar. Without one (a pod, a batch job, a pipe): a plain,
timestamped log line at most every :data:`DEFAULT_INTERVAL` seconds
(``$CATENA_PROGRESS_INTERVAL`` overrides) and one at the end: blocks done / total, rate,
ETA. No carriage returns. ``--quiet`` (log level WARNING) silences both.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("catena_mito.progress")

DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "CATENA_PROGRESS_INTERVAL"


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts blocks of one loop; use as a context manager and call :meth:`update`."""

    def __init__(self, total: int, desc: str, unit: str = "block"):
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.count = 0
        self._start = time.monotonic()
        self._last = self._start
        self._interval = _interval()
        enabled = log.isEnabledFor(logging.INFO) and self.total > 0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr,
                             mininterval=0.5, dynamic_ncols=True)
        self._lines = enabled and self._bar is None

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self._lines and now - self._last >= self._interval and self.count < self.total:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self._start)
        rate = self.count / elapsed
        pct = 100.0 * self.count / self.total if self.total else 100.0
        text = f"{self.desc}: {self.count}/{self.total} {self.unit}s ({pct:.1f}%), {rate:.2f} {self.unit}s/s"
        if 0 < self.count < self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.count) / rate)}"
        return text + f", {_duration(elapsed)} elapsed"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            self._lines = False
            log.info("%s", self.line())

    def __exit__(self, *exc: object) -> None:
        self.close()
