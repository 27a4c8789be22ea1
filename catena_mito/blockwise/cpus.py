"""How many CPUs this process may really use, for sizing thread pools.

``os.cpu_count()`` is the node's CPU count. In a Kubernetes pod with ``limits.cpu: 4``
on a 64-core node it says 64, and a pool of 64 threads then fights over 4 CPUs of CFS
quota (throttling, not speed). Two mechanisms restrict a process, and both are read:

- the CPU affinity mask (``os.sched_getaffinity``): Slurm's task/affinity and cgroup
  cpusets, ``taskset``, ``docker --cpuset-cpus``;
- the cgroup CPU bandwidth quota: what ``limits.cpu`` and ``docker --cpus`` set. cgroup v2
  ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``; cgroup v1 holds
  ``cpu.cfs_quota_us`` (-1 for none) and ``cpu.cfs_period_us``. A quota of 1.5 CPUs
  allows 2 threads to run (ceil). Limits nest, so every level from this process's own
  cgroup up to the root is read and the smallest quota wins.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

#: Where the cgroup file systems are mounted.
CGROUP_ROOT = "/sys/fs/cgroup"
#: This process's cgroup membership (``hierarchy:controllers:path`` lines).
PROC_SELF_CGROUP = "/proc/self/cgroup"
#: cgroup v1 mount points of the cpu controller, by distribution habit.
_V1_CPU_DIRS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroup_paths(proc_self_cgroup: str | os.PathLike[str]) -> dict[str, str]:
    """``{"v2": path}`` and/or ``{"v1": path}`` of the cpu controller, from /proc/self/cgroup."""
    text = _read(Path(proc_self_cgroup))
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            out["v2"] = path
        elif "cpu" in controllers.split(","):
            out["v1"] = path
    return out


def _levels(base: Path, own: str | None) -> list[Path]:
    """``base/own``, its parents, ..., ``base``; just ``base`` when ``own`` is not under it
    (a container that sees its own cgroup at the mount root, not the host's path)."""
    if own:
        parts = [p for p in own.split("/") if p and p not in (".", "..")]
        leaf = base.joinpath(*parts)
        if parts and leaf.is_dir():
            return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [base]


def _quota_v2(directory: Path) -> Fraction | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return Fraction(quota, period) if quota > 0 and period > 0 else None


def _quota_v1(directory: Path) -> Fraction | None:
    quota_text = _read(directory / "cpu.cfs_quota_us")
    period_text = _read(directory / "cpu.cfs_period_us")
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return Fraction(quota, period) if quota > 0 and period > 0 else None


def _quotas(cgroup_root: str | os.PathLike[str], proc_self_cgroup: str | os.PathLike[str]) -> list[Fraction]:
    root = Path(cgroup_root)
    own = _own_cgroup_paths(proc_self_cgroup)
    quotas = [q for d in _levels(root, own.get("v2")) if (q := _quota_v2(d)) is not None]
    for name in _V1_CPU_DIRS:
        base = root / name
        if base.is_dir():
            quotas += [q for d in _levels(base, own.get("v1")) if (q := _quota_v1(d)) is not None]
            break
    return quotas


def cgroup_cpu_quota(
    cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
    proc_self_cgroup: str | os.PathLike[str] = PROC_SELF_CGROUP,
) -> float | None:
    """The CPU bandwidth limit of this process in CPUs (e.g. 1.5), or None if unlimited.

    Reads cgroup v2 ``cpu.max`` and cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``
    under ``cgroup_root`` (a parameter so tests can point it at fake files), at every
    level from this process's cgroup (``proc_self_cgroup``) up to the root; the smallest
    limit wins. Files that are missing or unreadable count as no limit.
    """
    quotas = _quotas(cgroup_root, proc_self_cgroup)
    return float(min(quotas)) if quotas else None


def available_cpus(
    cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
    proc_self_cgroup: str | os.PathLike[str] = PROC_SELF_CGROUP,
) -> int:
    """The number of CPUs this process may use: its affinity mask, capped by the cgroup
    CPU quota rounded up; at least 1. Use it instead of ``os.cpu_count()`` to size
    thread and process pools."""
    cpus = affinity_cpus()
    quotas = _quotas(cgroup_root, proc_self_cgroup)
    if quotas:
        cpus = min(cpus, math.ceil(min(quotas)))  # exact: Fraction, not float
    return max(1, cpus)
