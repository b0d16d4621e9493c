"""Smoke run of bench/server_bench.py: one short scenario against pylocalai and llama-server.

It keeps the harness working (servers start, the load generator reads both wire formats, the JSON
and the plot are written); it asserts no speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import import_or_missing
from tests.ggufgen import ROOT

pytestmark = pytest.mark.e2e


def test_server_bench_smoke(llama_server: Path, smollm2_path: Path, tmp_path: Path) -> None:
    import_or_missing("matplotlib")
    out, png = tmp_path / "server.json", tmp_path / "server.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "server_bench.py"), "--smoke", "--model", str(smollm2_path),
         "--threads", "2", "--ctx", "2048", "--llama-cpp-python", "no", "--out", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    [res] = doc["results"]
    assert res["servers"] == ["pylocalai", "llama-server"]
    per = res["scenarios"]["c1"]["per_server"]
    for name in ("pylocalai", "llama-server"):
        m = per[name]
        assert m["errors"]["max"] == 0, m["error_samples"]
        assert m["requests"]["median"] == 2
        # every request streamed exactly the 16 tokens asked for, at a positive rate
        assert m["aggregate_tps"]["median"] > 0 and m["decode_tps_p50"]["median"] > 0
        assert len(m["ttfts"]) == 2 and all(t > 0 for t in m["ttfts"])
    assert res["scenarios"]["c1"]["ratios_pylocalai_over"]["llama-server"]["aggregate_tps"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| c1 per-stream decode tok/s |" in proc.stdout
