"""How many threads ggml computes with when the user gives none: the physical cores this process may
run on, and no more than its container's CPU quota.

Not every logical CPU: ggml's threads wait for each other at a barrier after every op, spinning
(see pylocalai._engines), so two threads on the siblings of one core, or more threads than a cgroup
quota lets run at once, hold the others up at every op. llama.cpp's own tools default to the
physical cores for the same reason. A container's quota (`docker run --cpus 2` on a 32-core host)
does not show in the CPU count or the affinity mask, only in its cgroup's cpu.max (v2) or
cpu.cfs_quota_us (v1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path


def default_threads(root: Path = Path("/")) -> int:
    """Physical cores among the CPUs this process may use, capped by its cgroup CPU quota; at least 1.
    `root` stands for the file system root (tests point it at a fake /sys and /proc)."""
    cpus = _allowed_cpus()
    n = physical_cores(cpus, root)
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: Iterable[int], root: Path = Path("/")) -> int:
    """Distinct cores among `cpus`: one per set of SMT siblings the kernel lists (as llama.cpp counts
    physical cores); the number of CPUs where that list cannot be read."""
    cpus = list(cpus)
    cores: set[str] = set()
    for cpu in cpus:
        siblings = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cgroup_cpu_limit(root: Path = Path("/")) -> int | None:
    """The CPU quota of this process's cgroup and its ancestors, rounded up to whole CPUs; None
    without one (or where it cannot be read)."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: "0::/path", cpu.max = "<quota|max> <period>"
            for d in _ancestors(root / "sys" / "fs" / "cgroup", path):
                limit = _ratio(d / "cpu.max")
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us (-1: none) / cpu.cfs_period_us
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for d in _ancestors(root / "sys" / "fs" / "cgroup" / mount, path):
                    limit = _ratio(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
                    if limit is not None:
                        limits.append(limit)
    return max(1, math.ceil(min(limits))) if limits else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup's directory and its parents up to the mount point (inside a container the path is
    often "/", or one the container cannot see: then the mount point itself is its cgroup)."""
    parts = [p for p in path.strip().split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _ratio(quota_file: Path, period_file: Path | None = None) -> float | None:
    try:
        if period_file is None:
            quota, _, period = quota_file.read_text().strip().partition(" ")
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        if quota in ("max", "-1") or not period:
            return None
        q, p = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None
