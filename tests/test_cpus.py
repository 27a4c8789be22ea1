"""available_cpus: the affinity mask capped by the cgroup CPU quota, read from fake files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catena_mito.blockwise import cpus
from catena_mito.blockwise.cpus import affinity_cpus, available_cpus, cgroup_cpu_quota


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A 16-CPU affinity mask, an empty cgroup root and a /proc/self/cgroup stand-in."""
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 16)
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")
    return root, proc


def test_no_cgroup_files_means_the_affinity_mask(machine):
    root, proc = machine
    assert cgroup_cpu_quota(root, proc) is None
    assert available_cpus(root, proc) == 16


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", 16),
        ("400000 100000", 4),
        ("150000 100000", 2),  # 1.5 CPUs let two threads run
        ("50000 100000", 1),  # half a CPU: still one thread
        ("10000 100000", 1),
        ("3200000 100000", 16),  # a quota above the mask does not add CPUs
        ("200000 50000", 4),
        ("garbage", 16),
        ("", 16),
    ],
)
def test_cgroup_v2_cpu_max(machine, cpu_max, expected):
    root, proc = machine
    write(root / "cpu.max", cpu_max)
    assert available_cpus(root, proc) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("-1", "100000", 16), ("400000", "100000", 4), ("250000", "100000", 3), ("x", "100000", 16)],
)
@pytest.mark.parametrize("controller", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_cfs_quota(machine, controller, quota, period, expected):
    root, proc = machine
    proc.write_text(f"4:{controller}:/\n0::/\n")
    write(root / controller / "cpu.cfs_quota_us", quota)
    write(root / controller / "cpu.cfs_period_us", period)
    assert available_cpus(root, proc) == expected


def test_v2_nested_limits_the_smallest_wins(machine):
    """A process in a child cgroup: its own level, and every parent, may set a quota."""
    root, proc = machine
    proc.write_text("0::/kubepods/pod1/ctr\n")
    write(root / "cpu.max", "max 100000")
    write(root / "kubepods" / "cpu.max", "max 100000")
    write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000")
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(root, proc) == 3.0
    assert available_cpus(root, proc) == 3
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "120000 100000")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.2)
    assert available_cpus(root, proc) == 2


def test_v1_nested_limits(machine):
    root, proc = machine
    proc.write_text("3:cpuset:/\n2:cpu,cpuacct:/slurm/job_7\n0::/\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    write(root / "cpu,cpuacct" / "slurm" / "job_7" / "cpu.cfs_quota_us", "200000")
    write(root / "cpu,cpuacct" / "slurm" / "job_7" / "cpu.cfs_period_us", "100000")
    assert available_cpus(root, proc) == 2


def test_a_host_path_the_container_does_not_see_falls_back_to_the_mount_root(machine):
    # Without a cgroup namespace /proc/self/cgroup names the host's path, and the
    # container's own cgroup is what is mounted at the root.
    root, proc = machine
    proc.write_text("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n")
    write(root / "cpu.max", "200000 100000")
    assert available_cpus(root, proc) == 2


def test_the_affinity_mask_caps_a_larger_quota(machine, monkeypatch):
    root, proc = machine
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 3)
    write(root / "cpu.max", "800000 100000")
    assert available_cpus(root, proc) == 3


def test_an_unreadable_proc_file_is_no_limit(machine, tmp_path):
    root, _ = machine
    assert available_cpus(root, tmp_path / "missing") == 16


def test_affinity_follows_sched_getaffinity(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert affinity_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 5})
        assert affinity_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert affinity_cpus() == 1


def test_this_machine():
    n = available_cpus()
    assert 1 <= n <= (os.cpu_count() or 1)
