"""The default thread count: physical cores of the allowed CPUs, capped by a cgroup CPU quota."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pylocalai.engine import cpus
from pylocalai.engine.cpus import cgroup_cpu_limit, default_threads, physical_cores


def _topology(root: Path, siblings: dict[int, str]) -> None:
    """cpu -> its thread_siblings_list, in a fake /sys."""
    for cpu, text in siblings.items():
        topo = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(f"{text}\n")


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


SMT_4X2 = {0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"}  # 4 cores, 2 threads each


def test_siblings_of_one_core_count_once(tmp_path: Path) -> None:
    _topology(tmp_path, SMT_4X2)
    assert physical_cores(range(8), tmp_path) == 4
    assert physical_cores([0, 4], tmp_path) == 1  # an affinity mask holding both siblings of core 0
    assert physical_cores([0, 1, 4], tmp_path) == 2


def test_cpus_without_siblings_are_cores_each(tmp_path: Path) -> None:
    _topology(tmp_path, {0: "0", 1: "1", 2: "2-3", 3: "2-3"})
    assert physical_cores([0, 1, 2, 3], tmp_path) == 3


def test_without_a_readable_topology_every_cpu_counts(tmp_path: Path) -> None:
    assert physical_cores([0, 1, 2], tmp_path) == 3


def test_cgroup_v2_quota_rounds_up_to_whole_cpus(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1  # half a CPU still gets one thread


def test_cgroup_v2_limit_of_a_parent_applies(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "0::/system.slice/app.service\n")
    _write(tmp_path, "sys/fs/cgroup/system.slice/cpu.max", "300000 100000\n")
    _write(tmp_path, "sys/fs/cgroup/system.slice/app.service/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3
    _write(tmp_path, "sys/fs/cgroup/system.slice/app.service/cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2  # the tighter of the two


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    base = "sys/fs/cgroup/cpu,cpuacct/docker/abc/"
    _write(tmp_path, base + "cpu.cfs_quota_us", "400000\n")
    _write(tmp_path, base + "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path) == 4
    _write(tmp_path, base + "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None


def test_default_is_physical_cores_capped_by_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "_allowed_cpus", lambda: list(range(8)))
    _topology(tmp_path, SMT_4X2)
    assert default_threads(tmp_path) == 4
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")  # docker run --cpus 2
    assert default_threads(tmp_path) == 2
    monkeypatch.setattr(cpus, "_allowed_cpus", lambda: [3])
    assert default_threads(tmp_path) == 1


@pytest.mark.engine
def test_a_model_without_threads_computes_with_the_default(engine: Any, tiny_llama: Path) -> None:
    from pylocalai import Llama

    with Llama(tiny_llama, n_ctx=256, n_parallel=1) as llm:
        assert llm.n_threads == (default_threads(), default_threads())
    with Llama(tiny_llama, n_ctx=256, n_parallel=1, n_threads=1, n_threads_batch=2) as llm:
        assert llm.n_threads == (1, 2)
        assert llm.complete("Hello", max_tokens=3, temperature=0.0, ignore_eos=True).usage.completion_tokens == 3
