"""ggml's RPC backend, end to end on one machine: the fork's own rpc-server (built from the same
tree) runs on 127.0.0.1, and the engine offloads the model's layers to it.

Offloaded weights live in the server's memory (its resident size grows by at least their size),
and the greedy output equals the output computed in-process.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylocalai import EngineError, Llama
from tests.conftest import ENGINES, _engine_module, _engine_tool

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def rpc_server(backend: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    key = ENGINES[backend]
    tool = _engine_tool(_engine_module(key), "rpc-server", key)
    port = _free_port()
    # ik_llama.cpp's server offers its CPU only when asked (-cpu)
    cmd = [str(tool), "-H", "127.0.0.1", "-p", str(port), *(["-cpu"] if key == "ik_llama_cpp" else [])]
    log = (tmp_path / "rpc-server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "rpc-server did not start"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_layers_offloaded_to_an_rpc_server(backend: str, tiny_llama: Path, tmp_path: Path,
                                           rpc_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    endpoint, proc = rpc_server
    kw = {"backend": backend, "n_ctx": 256, "n_parallel": 1, "n_threads": 2}
    with Llama(tiny_llama, **kw) as local:
        ref = local.complete("x y z", max_tokens=12, temperature=0.0, ignore_eos=True).tokens
    before = _rss_bytes(proc.pid)
    with Llama(tiny_llama, **kw, rpc_servers=[endpoint], n_gpu_layers=-1) as remote:
        out = remote.complete("x y z", max_tokens=12, temperature=0.0, ignore_eos=True).tokens
        grown = _rss_bytes(proc.pid) - before
    assert out == ref
    assert "Accepted client connection" in (tmp_path / "rpc-server.log").read_text()
    # the server is that model's device only: once it is gone, other models still load and run
    proc.terminate()
    proc.wait(10)
    with Llama(tiny_llama, **kw) as after:
        assert after.complete("x y z", max_tokens=12, temperature=0.0, ignore_eos=True).tokens == ref
    if backend == "llama-cpp":
        # the layers' weights (every block and the output matrix) went to the server's memory
        assert grown > tiny_llama.stat().st_size // 2, f"rpc-server grew by {grown} bytes"
    # ik_llama.cpp, built for the CPU alone, keeps the weights in its own buffers even with the RPC
    # device as the only offload device (its own llama-simple --rpc -ngl 99 does the same): it
    # connects and computes correctly, and the README says so.


def test_an_rpc_server_that_goes_away_is_an_error(backend: str, tiny_llama: Path,
                                                  rpc_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    endpoint, proc = rpc_server
    proc.terminate()
    proc.wait(10)
    with pytest.raises(EngineError, match=f"cannot reach RPC server {endpoint}"):
        Llama(tiny_llama, backend=backend, n_ctx=256, rpc_servers=[endpoint], n_gpu_layers=-1)
