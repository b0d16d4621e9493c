"""The models folder is watched: a config or model file added, edited or removed while the server
runs is served (or not) without a restart, as LocalAI rescans its folder."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.test_server_openai import Server

pytestmark = pytest.mark.e2e


def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the server did not notice the change"
        time.sleep(0.1)


def test_configs_and_files_come_and_go_while_serving(engine: Any, tiny_llama: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    s = Server(models, "--watch", "0.2")
    try:
        def listed() -> list[str]:
            return [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]

        shutil.copy(tiny_llama, models / "tiny.gguf")
        eventually(lambda: "tiny.gguf" in listed())  # a loose model file
        cfg = {"name": "t", "parameters": {"model": "tiny.gguf"}, "context_size": 256}
        (models / "t.yaml").write_text(yaml.safe_dump(cfg))
        eventually(lambda: listed() == ["t"])  # now configured: the file is its model
        body = {"model": "t", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert s.ready()["loaded"]["t"]["n_ctx_seq"] == 256
        (models / "t.yaml").write_text(yaml.safe_dump({**cfg, "context_size": 512}))  # edited in place
        eventually(lambda: "t" not in s.ready()["loaded"])  # its loaded model had the old config
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert s.ready()["loaded"]["t"]["n_ctx_seq"] == 512
        (models / "t.yaml").write_text("name: t\nparameters: {}\n")  # broken: reported, not served
        eventually(lambda: any("t.yaml" in e for e in s.ready()["config_errors"]))
        assert "t" not in listed()
        (models / "t.yaml").unlink()
        (models / "tiny.gguf").unlink()
        eventually(lambda: listed() in ([], ["smollm2-135m-instruct"]))  # the default model, if installed
    finally:
        s.stop()
