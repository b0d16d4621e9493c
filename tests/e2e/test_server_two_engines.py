"""One server, one model on each engine (llama.cpp and ik_llama.cpp), both loaded and answering at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.test_server_openai import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(engine: Any, ik_engine: Any, tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("models")
    (d / "smollm2.gguf").symlink_to(smollm2_path)
    for name, backend in (("on-llama", "llama-cpp"), ("on-ik", "ik-llama-cpp")):
        (d / f"{name}.yaml").write_text(json.dumps({
            "name": name, "backend": backend, "parameters": {"model": "smollm2.gguf", "temperature": 0.0},
            "context_size": 512, "options": ["parallel:2"],
        }))
    s = Server(d, "--max-loaded-models", "2")
    yield s
    s.stop()


def test_both_engines_serve_at_the_same_time(server: Server) -> None:
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    answers: dict[str, list[str]] = {}

    async def stream(name: str) -> None:
        body = {"model": name, "messages": question, "max_tokens": 12, "stream": True}
        parts: list[str] = []
        async with httpx.AsyncClient(timeout=120) as client, \
                client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"]
                    if delta:
                        parts.append(delta[0]["delta"].get("content") or "")
        answers[name] = parts

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name in ("on-llama", "on-ik"):
                nursery.start_soon(stream, name)

    trio.run(main)
    for name in ("on-llama", "on-ik"):
        assert "Paris" in "".join(answers[name]), (name, answers[name])
    loaded = server.ready()["loaded"]  # both stay loaded, each on its own engine
    assert loaded["on-llama"]["engine"] == "llama_cpp" and loaded["on-ik"]["engine"] == "ik_llama_cpp"
