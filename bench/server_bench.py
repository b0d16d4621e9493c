#!/usr/bin/env python3
"""pylocalai's server side by side with llama.cpp's own llama-server, under the same load.

Both servers run on 127.0.0.1 with the same model, threads, context, parallel slots and sampling
(temperature 0, seed 42, `ignore_eos` so every answer has exactly the requested length). llama-server
is built from the same third_party/llama.cpp tree as pylocalai's engine. When the llama-cpp-python
server is installed (`import llama_cpp.server` works) it joins as a third column.

Scenarios, each run on every server in turn (A/B/A/B...), repeated; figures are medians over the
repeats with their min-max, and ratios pylocalai / llama-server:
- c1, c4, c8: 1, 4, 8 concurrent clients, streaming chat completions of 128 tokens
  (TTFT p50/p95, per-stream decode tok/s, aggregate output tok/s, errors);
- whole: one client, non-streamed chat completions of the same length, one after another (output
  tok/s = completion tokens / request time, request time p50);
- prefix: a shared ~1,500-token system prompt; TTFT of the first (cold) request vs the warm ones;
- prefill: one ~2,000-token prompt (prefill tok/s = prompt tokens / TTFT);
- revisit: more conversations than slots (twice as many, each with its own ~800-token notes),
  visited one after another, then each again with a new question: the slots have moved on by then,
  so a revisit is fast only where the server kept its state elsewhere (both keep slot states in
  host RAM: pylocalai's and llama-server's cache_ram);
- endpoints (pylocalai alone): every scenario above again on /v1/messages and /v1/responses, each
  compared with the same scenario on chat completions.

Output: a JSON file, a PNG plot, and a Markdown table on stdout.

  python bench/server_bench.py --model default --model gemma3-270m --threads 2 --repeats 3
  python bench/server_bench.py --smoke      # one short scenario, to keep the harness working
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
SEED = 42
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works, step by step.",
    "Write a long letter from a sailor to his family at home.",
    "Describe a walk through a busy market in a large old city.",
    "Write a detailed guide to growing tomatoes in a small garden.",
    "Tell the history of a fictional kingdom over five hundred years.",
    "Write a long poem about the sea, the wind and the stars.",
    "Describe how a city library is organised and who works there.",
]
WORDS = (
    "time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye",
    "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem",
    "fact", "river", "mountain", "garden", "kitchen", "window", "engine", "market", "letter", "story",
    "music", "paper", "water", "light", "stone", "forest", "winter", "summer", "harbour", "bridge", "castle",
    "village", "teacher", "doctor", "farmer", "painter", "sailor", "soldier", "student", "writer",
)


# ---------------------------------------------------------------------------------------------
# servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_tool(name: str) -> Path:
    import pylocalai._engines.llama_cpp as eng

    path = Path(eng.__file__).parent / "bin" / "llama_cpp" / name
    if not path.is_file():
        sys.exit(f"{path} is missing: build with PYLOCALAI_BUILD_TOOLS=ON (the default)")
    return path


def have_llama_cpp_python() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("llama_cpp.server") is not None
    except ModuleNotFoundError:
        return False


@dataclass
class Settings:
    model: Path
    threads: int
    ctx: int
    parallel: int


class Server:
    """One server process on 127.0.0.1; `name` is its column in the results."""

    name = ""
    model_name = "bench"
    endpoints = ("chat",)

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    health_path = "/health"

    def request_extra(self) -> dict[str, Any]:
        """Fields this server needs in every request body to run the same sampling as the others."""
        return {}

    def start(self, timeout: float = 300.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + self.health_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class PylocalaiServer(Server):
    name = "pylocalai"
    endpoints = ("chat", "messages", "responses")
    health_path = "/readyz"

    def command(self) -> list[str]:
        s = self.settings
        models = self.workdir / "models"
        models.mkdir(exist_ok=True)
        link = models / s.model.name
        if not link.exists():
            link.symlink_to(s.model.resolve())
        # LocalAI's context_size is per request (each slot gets that much); llama-server's -c is the whole cache
        per_slot = s.ctx // s.parallel
        (models / "bench.yaml").write_text(
            f"name: {self.model_name}\nparameters:\n  model: {s.model.name}\ncontext_size: {per_slot}\n")
        return [sys.executable, "-m", "pylocalai.cli", "serve", "--address", f"127.0.0.1:{self.port}",
                "--models-path", str(models), "--threads", str(s.threads), "--context-size", str(per_slot),
                "--parallel", str(s.parallel), "--data-path", str(self.workdir / "data"), "--log-level", "warning"]


class LlamaServer(Server):
    name = "llama-server"

    def command(self) -> list[str]:
        s = self.settings
        return [str(engine_tool("llama-server")), "-m", str(s.model), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", str(s.threads), "-tb", str(s.threads), "-c", str(s.ctx), "-np", str(s.parallel),
                "--seed", str(SEED), "-a", self.model_name]


class LlamaCppPythonServer(Server):
    name = "llama-cpp-python"
    health_path = "/v1/models"

    def command(self) -> list[str]:
        s = self.settings
        # interrupt_requests off: its default silently truncates concurrent streams
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(s.model), "--model_alias", self.model_name,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(s.threads),
                "--n_threads_batch", str(s.threads), "--n_ctx", str(s.ctx), "--seed", str(SEED),
                "--interrupt_requests", "False"]

    def request_extra(self) -> dict[str, Any]:
        # It has no ignore_eos: a fixed-length answer comes from banning the end-of-generation tokens. Its
        # repeat_penalty defaults to 1.1 where the other servers' default is 1.0 (none).
        return {"repeat_penalty": 1.0, "logit_bias": {str(t): -1e4 for t in eog_tokens(self.settings.model)}}


def eog_tokens(model: Path) -> list[int]:
    """The model's end-of-generation token ids, read by the llama.cpp engine (vocabulary only)."""
    import pylocalai._engines.llama_cpp as eng

    return [int(t) for t in eng.Model(str(model), {"vocab_only": True}).info["eog_tokens"]]


# ---------------------------------------------------------------------------------------------
# load generator: streaming requests over real HTTP

@dataclass
class Result:
    ok: bool
    ttft: float = math.nan            # request sent -> first generated text
    t_first: float = math.nan         # absolute times of the first and last text event
    t_last: float = math.nan
    tokens: int = 0                   # output tokens, from the usage the server reports
    prompt_tokens: int = 0
    finish_reason: str = ""
    error: str = ""

    @property
    def decode_tps(self) -> float:
        if self.tokens < 2 or not self.t_last > self.t_first:
            return math.nan
        return (self.tokens - 1) / (self.t_last - self.t_first)


def request_body(endpoint: str, model: str, system: str | None, user: str, max_tokens: int,
                 extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    common = {"model": model, "stream": True, "temperature": 0.0, "ignore_eos": True, **(extra or {})}
    if endpoint == "chat":
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return "/v1/chat/completions", {**common, "messages": msgs, "max_tokens": max_tokens, "seed": SEED,
                                        "stream_options": {"include_usage": True}}
    if endpoint == "messages":
        body = {**common, "messages": [{"role": "user", "content": user}], "max_tokens": max_tokens}
        if system:
            body["system"] = system
        return "/v1/messages", body
    if endpoint == "responses":
        body = {**common, "input": user, "max_output_tokens": max_tokens, "store": False}
        if system:
            body["instructions"] = system
        return "/v1/responses", body
    raise ValueError(endpoint)


def read_event(endpoint: str, data: dict[str, Any], res: Result) -> bool:
    """Update res from one SSE payload; True when it carried generated text."""
    if endpoint == "chat":
        if data.get("usage"):
            res.tokens = int(data["usage"].get("completion_tokens") or 0)
            res.prompt_tokens = int(data["usage"].get("prompt_tokens") or 0)
        if "error" in data:
            res.error = str(data["error"])[:200]
        for c in data.get("choices") or []:
            res.finish_reason = c.get("finish_reason") or res.finish_reason
        return any((c.get("delta") or {}).get("content") for c in data.get("choices") or [])
    if endpoint == "messages":
        kind = data.get("type")
        if kind == "message_start":
            res.prompt_tokens = int(data["message"]["usage"].get("input_tokens") or 0)
        elif kind == "message_delta":
            res.tokens = int((data.get("usage") or {}).get("output_tokens") or 0)
        elif kind == "error":
            res.error = str(data.get("error"))[:200]
        return kind == "content_block_delta" and bool((data.get("delta") or {}).get("text"))
    kind = data.get("type")
    if kind in ("response.completed", "response.incomplete"):
        usage = data["response"].get("usage") or {}
        res.tokens = int(usage.get("output_tokens") or 0)
        res.prompt_tokens = int(usage.get("input_tokens") or 0)
    elif kind in ("error", "response.failed"):
        res.error = json.dumps(data)[:200]
    return kind == "response.output_text.delta" and bool(data.get("delta"))


async def one_request(client: httpx.AsyncClient, base: str, endpoint: str, model: str, system: str | None,
                      user: str, max_tokens: int, extra: dict[str, Any] | None = None) -> Result:
    path, body = request_body(endpoint, model, system, user, max_tokens, extra)
    res = Result(ok=False)
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", base + path, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            # read to the end of the body, past [DONE]: the connection stays reusable and httpx's stream
            # generators finish instead of being left open
            async with aclosing(resp.aiter_lines()) as lines:
                async for line in lines:
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        continue
                    now = time.perf_counter()
                    if read_event(endpoint, json.loads(payload), res):
                        if math.isnan(res.t_first):
                            res.t_first = now
                            res.ttft = now - t0
                        res.t_last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    if not res.tokens and res.finish_reason == "length":
        res.tokens = max_tokens  # a stream without usage (llama-cpp-python): "length" means max_tokens were made
    if not res.error and res.tokens != max_tokens:
        res.error = f"got {res.tokens} of {max_tokens} tokens"
    res.ok = not res.error
    return res


async def whole_request(client: httpx.AsyncClient, base: str, model: str, user: str, max_tokens: int,
                        extra: dict[str, Any] | None = None) -> tuple[Result, float]:
    """One non-streamed chat completion: (result, seconds from sending it to the whole answer)."""
    path, body = request_body("chat", model, None, user, max_tokens, extra)
    body["stream"] = False
    body.pop("stream_options", None)
    res = Result(ok=False)
    t0 = time.perf_counter()
    try:
        resp = await client.post(base + path, json=body)
        latency = time.perf_counter() - t0
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
            return res, math.nan
        answer = resp.json()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res, math.nan
    usage = answer.get("usage") or {}
    res.tokens = int(usage.get("completion_tokens") or 0)
    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if res.tokens != max_tokens:
        res.error = f"got {res.tokens} of {max_tokens} tokens"
    res.ok = not res.error
    return res, latency


async def run_load(base: str, endpoint: str, model: str, jobs: list[tuple[str | None, str]], concurrency: int,
                   max_tokens: int, time_limit: float, extra: dict[str, Any] | None = None) -> tuple[list[Result], float]:
    """Run `jobs` (system, user) with `concurrency` clients; returns results in job order and wall time."""
    results: list[Result] = [Result(ok=False, error="not run (time limit)") for _ in jobs]
    queue = iter(range(len(jobs)))
    # a fresh connection per request, for every server alike: a pooled one that the server has just
    # closed (llama-server ends keep-alive connections after a few requests) fails the next request
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit), limits=limits) as client:
        async def worker() -> None:
            for i in queue:
                system, user = jobs[i]
                results[i] = await one_request(client, base, endpoint, model, system, user, max_tokens, extra)

        t0 = time.perf_counter()
        with trio.move_on_after(time_limit):
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)
        wall = time.perf_counter() - t0
    return results, wall


async def count_prompt_tokens(server: Server, system: str | None, user: str) -> int:
    """The prompt tokens of a chat request, from a non-streamed answer's usage: for a server whose streams
    carry no usage (llama-cpp-python). Run after the timed request, so its prompt is cached by then."""
    _, body = request_body("chat", server.model_name, system, user, 1, server.request_extra())
    body["stream"] = False
    body.pop("stream_options", None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        resp = await client.post(server.base + "/v1/chat/completions", json=body)
    resp.raise_for_status()
    return int(resp.json()["usage"]["prompt_tokens"])


def pct(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    k = (len(vals) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def load_metrics(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        "aggregate_tps": sum(r.tokens for r in ok) / wall if wall > 0 else math.nan,
        "ttft_p50": pct([r.ttft for r in ok], 0.5),
        "ttft_p95": pct([r.ttft for r in ok], 0.95),
        "decode_tps_p50": pct([r.decode_tps for r in ok], 0.5),
        "prompt_tokens_p50": pct([float(r.prompt_tokens) for r in ok], 0.5),
        "ttfts": [r.ttft for r in ok],
        "wall_s": wall,
    }


# ---------------------------------------------------------------------------------------------
# scenarios: each returns one repeat's metrics for one server

def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(rng.choice(WORDS) + ("." if i % 12 == 11 else ""))
    return " ".join(out)


@dataclass
class Scenario:
    name: str
    run: Callable[[Server, int], Any]     # (server, repeat index) -> awaitable of metrics
    servers: str = "all"                  # "all" or "pylocalai"
    headline: list[str] = field(default_factory=list)


def make_scenarios(args: argparse.Namespace) -> list[Scenario]:
    n_tok = args.n_gen
    limit = args.time_limit

    def concurrency(c: int, endpoint: str = "chat", n_req: int | None = None):
        async def run(server: Server, rep: int) -> dict[str, Any]:
            n = n_req or max(args.requests_per_client * c, c)
            # a new prompt every time (numbered): servers reuse only what real traffic shares, the
            # chat template's preamble, never a whole prompt cached from an earlier run
            jobs = [(None, f"Task {endpoint}-{c}-{rep}-{i}. {PROMPTS[i % len(PROMPTS)]}") for i in range(n)]
            res, wall = await run_load(server.base, endpoint, server.model_name, jobs, c, n_tok, limit,
                                       server.request_extra())
            return load_metrics(res, wall)
        return run

    def whole():
        async def run(server: Server, rep: int) -> dict[str, Any]:
            # one client, one request at a time, answers taken whole: what a server does between two
            # tokens that nobody is waiting for
            got: list[tuple[Result, float]] = []
            async with httpx.AsyncClient(timeout=httpx.Timeout(limit)) as client:
                for i in range(max(args.requests_per_client, 2)):
                    user = f"Task whole-{rep}-{i}. {PROMPTS[i % len(PROMPTS)]}"
                    got.append(await whole_request(client, server.base, server.model_name, user, n_tok,
                                                   server.request_extra()))
            ok = [(r, t) for r, t in got if r.ok]
            return {"errors": len(got) - len(ok), "error_samples": sorted({r.error for r, _ in got if not r.ok})[:3],
                    "latency_p50": pct([t for _, t in ok], 0.5),
                    "output_tps_p50": pct([r.tokens / t for r, t in ok], 0.5),
                    "prompt_tokens_p50": pct([float(r.prompt_tokens) for r, _ in ok], 0.5)}
        return run

    def prefix(endpoint: str = "chat"):
        async def run(server: Server, rep: int) -> dict[str, Any]:
            # a system prompt no server has seen (new per repeat and endpoint), then warm requests that share it
            system = (f"Session {rep} ({endpoint}). You are a helpful assistant. Background notes follow. "
                      + words(args.prefix_words, 1000 + rep))
            jobs = [(system, f"Task {i}. {PROMPTS[i % len(PROMPTS)]}") for i in range(1 + args.prefix_warm)]
            res, _ = await run_load(server.base, endpoint, server.model_name, jobs, 1, 8, limit, server.request_extra())
            cold, warm = res[0], [r for r in res[1:] if r.ok]
            if cold.ok and not cold.prompt_tokens:
                cold.prompt_tokens = await count_prompt_tokens(server, *jobs[0])
            return {"errors": sum(not r.ok for r in res), "error_samples": sorted({r.error for r in res if not r.ok})[:3],
                    "prompt_tokens": cold.prompt_tokens, "ttft_cold": cold.ttft if cold.ok else math.nan,
                    "ttft_warm_p50": pct([r.ttft for r in warm], 0.5),
                    "warm_over_cold": pct([r.ttft for r in warm], 0.5) / cold.ttft if cold.ok else math.nan}
        return run

    def prefill(endpoint: str = "chat"):
        async def run(server: Server, rep: int) -> dict[str, Any]:
            user = f"Request {rep} ({endpoint}). Summarise these notes: " + words(args.prefill_words, 2000 + rep)
            res, _ = await run_load(server.base, endpoint, server.model_name, [(None, user)], 1, 1, limit, server.request_extra())
            r = res[0]
            if r.ok and not r.prompt_tokens:
                r.prompt_tokens = await count_prompt_tokens(server, None, user)
            return {"errors": int(not r.ok), "error_samples": [r.error] if not r.ok else [],
                    "prompt_tokens": r.prompt_tokens, "ttft": r.ttft,
                    "prefill_tps": r.prompt_tokens / r.ttft if r.ok and r.ttft > 0 else math.nan}
        return run

    def revisit(endpoint: str = "chat"):
        async def run(server: Server, rep: int) -> dict[str, Any]:
            notes = [f"Conversation {rep}-{k} ({endpoint}). You are a helpful assistant. Notes follow. "
                     + words(args.revisit_words, 3000 + 97 * rep + k) for k in range(2 * args.parallel)]
            first = [(n, f"Task 0. {PROMPTS[0]}") for n in notes]
            again = [(n, f"Task 1. {PROMPTS[1]}") for n in notes]
            cold, _ = await run_load(server.base, endpoint, server.model_name, first, 1, 8, limit, server.request_extra())
            warm, _ = await run_load(server.base, endpoint, server.model_name, again, 1, 8, limit, server.request_extra())
            ok = [r for r in cold + warm if r.ok]
            c, w = pct([r.ttft for r in cold if r.ok], 0.5), pct([r.ttft for r in warm if r.ok], 0.5)
            return {"errors": len(cold) + len(warm) - len(ok),
                    "error_samples": sorted({r.error for r in cold + warm if not r.ok})[:3],
                    "ttft_first_p50": c, "ttft_revisit_p50": w, "revisit_over_first": w / c if c > 0 else math.nan}
        return run

    if args.smoke:
        return [Scenario("c1", concurrency(1, n_req=2), headline=["aggregate_tps", "ttft_p50", "decode_tps_p50"])]
    scenarios = []
    for c in args.concurrency:
        scenarios.append(Scenario(f"c{c}", concurrency(c),
                                  headline=["aggregate_tps", "ttft_p50", "ttft_p95", "decode_tps_p50", "errors"]))
    scenarios.append(Scenario("whole", whole(), headline=["output_tps_p50", "latency_p50", "errors"]))
    prefix_head, prefill_head = ["ttft_cold", "ttft_warm_p50", "warm_over_cold", "prompt_tokens"], ["prefill_tps", "ttft", "prompt_tokens"]
    scenarios.append(Scenario("prefix", prefix(), headline=prefix_head))
    scenarios.append(Scenario("prefill", prefill(), headline=prefill_head))
    scenarios.append(Scenario("revisit", revisit(), headline=["ttft_first_p50", "ttft_revisit_p50", "revisit_over_first"]))
    for ep in ("messages", "responses"):  # the same scenarios on the other protocols, pylocalai alone
        for c in args.concurrency:
            scenarios.append(Scenario(f"{ep}-c{c}", concurrency(c, endpoint=ep), servers="pylocalai",
                                      headline=["aggregate_tps", "ttft_p50", "decode_tps_p50", "errors"]))
        scenarios.append(Scenario(f"{ep}-prefix", prefix(ep), servers="pylocalai", headline=prefix_head))
        scenarios.append(Scenario(f"{ep}-prefill", prefill(ep), servers="pylocalai", headline=prefill_head))
    return scenarios


# ---------------------------------------------------------------------------------------------
# driver

def summary(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def bench_model(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(model=model, threads=args.threads, ctx=args.ctx, parallel=args.parallel)
    workdir = Path(tempfile.mkdtemp(prefix="pylocalai-serverbench-"))
    kinds: list[type[Server]] = [PylocalaiServer, LlamaServer]
    if args.llama_cpp_python == "yes" or (args.llama_cpp_python == "auto" and have_llama_cpp_python()):
        kinds.append(LlamaCppPythonServer)
    servers = [k(settings, workdir) for k in kinds]
    scenarios = make_scenarios(args)
    if args.scenarios:
        unknown = set(args.scenarios) - {s.name for s in scenarios}
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(s.name for s in scenarios)}")
        scenarios = [s for s in scenarios if s.name in args.scenarios]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {srv.name: [] for srv in servers} for s in scenarios}
    try:
        for srv in servers:
            print(f"  starting {srv.name} on {srv.base}", file=sys.stderr, flush=True)
            srv.start()
            # warm-up: load the model (pylocalai loads lazily), page weights in, build graphs
            res, _ = trio.run(run_load, srv.base, "chat", srv.model_name, [(None, PROMPTS[0])], 1, 16, args.time_limit)
            if not res[0].ok:
                raise RuntimeError(f"{srv.name} warm-up failed: {res[0].error}\n{srv.log_tail()}")
        for sc in scenarios:
            for rep in range(args.repeats):
                order = servers if rep % 2 == 0 else servers[::-1]      # A/B, then B/A: no server always goes first
                for srv in order:
                    if sc.servers != "all" and srv.name != sc.servers:
                        continue
                    metrics = trio.run(sc.run, srv, rep)
                    raw[sc.name][srv.name].append(metrics)
                    head = " ".join(f"{k}={metrics[k]:.3g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                                    for k in sc.headline if k in metrics)
                    print(f"  {model.name} {sc.name} rep {rep + 1}/{args.repeats} {srv.name}: {head}", file=sys.stderr, flush=True)
    finally:
        for srv in servers:
            srv.stop()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    out: dict[str, Any] = {"model": model.name, "servers": [s.name for s in servers], "scenarios": {}}
    for sc in scenarios:
        per_server: dict[str, Any] = {}
        for name, reps in raw[sc.name].items():
            if not reps:
                continue
            keys = [k for k, v in reps[0].items() if isinstance(v, (int, float))]
            per_server[name] = {k: summary([r[k] for r in reps]) for k in keys}
            per_server[name]["error_samples"] = sorted({e for r in reps for e in r.get("error_samples", [])})[:3]
            if "ttfts" in reps[0]:
                per_server[name]["ttfts"] = [t for r in reps for t in r["ttfts"]]
        ratios: dict[str, Any] = {}
        for other, theirs in per_server.items():
            if other == "pylocalai" or "pylocalai" not in per_server:
                continue
            ratios[other] = {k: per_server["pylocalai"][k]["median"] / theirs[k]["median"]
                             for k in sc.headline
                             if k in theirs and theirs[k]["median"] not in (0, 0.0) and not math.isnan(theirs[k]["median"])}
        out["scenarios"][sc.name] = {"per_server": per_server, "ratios_pylocalai_over": ratios}
    # the other protocols vs chat completions: the same scenario on the same server
    over: dict[str, Any] = {}
    for name, scn in out["scenarios"].items():
        ep, _, base = name.partition("-")
        a = scn.get("per_server", {}).get("pylocalai")
        b = out["scenarios"].get(base, {}).get("per_server", {}).get("pylocalai")
        if ep not in ("messages", "responses") or not (a and b):
            continue
        over[name] = {}
        for key, kind in OVERHEAD_KEYS[base.rstrip("0123456789")]:
            x, y = a[key]["median"], b[key]["median"]
            over[name][key] = {"endpoint": x, "chat": y,
                               **({"ratio": x / y} if kind == "ratio" else {"delta_ms": 1000 * (x - y)})}
    out["endpoint_overhead_vs_chat"] = over
    out["targets"] = targets(out)
    return out


# per scenario kind, what the other protocols are compared on: a rate as a ratio, a time as a difference
OVERHEAD_KEYS = {"c": [("aggregate_tps", "ratio"), ("decode_tps_p50", "ratio"), ("ttft_p50", "delta")],
                 "prefix": [("ttft_cold", "delta"), ("ttft_warm_p50", "delta")],
                 "prefill": [("prefill_tps", "ratio"), ("ttft", "delta")]}
OVERHEAD_LABELS = {"aggregate_tps": "aggregate tok/s", "decode_tps_p50": "per-stream decode tok/s",
                   "ttft_p50": "TTFT p50 ms", "ttft_cold": "cold TTFT ms", "ttft_warm_p50": "warm TTFT ms",
                   "prefill_tps": "prefill tok/s", "ttft": "TTFT ms"}


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """The project's targets, each with the measured value and whether it is met."""
    sc = res["scenarios"]
    t: dict[str, Any] = {}

    def med(scn: str, server: str, key: str) -> float:
        return sc.get(scn, {}).get("per_server", {}).get(server, {}).get(key, {}).get("median", math.nan)

    if "c1" in sc:
        v = med("c1", "pylocalai", "decode_tps_p50") / med("c1", "llama-server", "decode_tps_p50")
        t["single_stream_decode >= 0.97x"] = {"value": v, "met": v >= 0.97}
        d = 1000 * (med("c1", "pylocalai", "ttft_p50") - med("c1", "llama-server", "ttft_p50"))
        t["ttft_p50 <= llama-server + 5 ms"] = {"value_ms": d, "met": d <= 5.0}
    for c in (4, 8):
        if f"c{c}" in sc:
            v = med(f"c{c}", "pylocalai", "aggregate_tps") / med(f"c{c}", "llama-server", "aggregate_tps")
            t[f"aggregate_c{c} >= 1.0x"] = {"value": v, "met": v >= 1.0}
    if "prefix" in sc:
        v = med("prefix", "pylocalai", "warm_over_cold")
        t["warm_prefix_ttft <= 0.3x cold"] = {"value": v, "met": v <= 0.3}
    return t


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


ROWS = [  # (scenario, key, label, scale, digits)
    ("c1", "decode_tps_p50", "c1 per-stream decode tok/s", 1, 1),
    ("c1", "ttft_p50", "c1 TTFT p50 ms", 1000, 1),
    ("c1", "aggregate_tps", "c1 aggregate tok/s", 1, 1),
    ("c4", "aggregate_tps", "c4 aggregate tok/s", 1, 1),
    ("c4", "ttft_p50", "c4 TTFT p50 ms", 1000, 1),
    ("c4", "ttft_p95", "c4 TTFT p95 ms", 1000, 1),
    ("c4", "decode_tps_p50", "c4 per-stream decode tok/s", 1, 1),
    ("c8", "aggregate_tps", "c8 aggregate tok/s", 1, 1),
    ("c8", "ttft_p50", "c8 TTFT p50 ms", 1000, 0),
    ("c8", "ttft_p95", "c8 TTFT p95 ms", 1000, 0),
    ("c8", "decode_tps_p50", "c8 per-stream decode tok/s", 1, 1),
    ("whole", "output_tps_p50", "non-streamed: output tok/s (tokens / request time)", 1, 1),
    ("whole", "latency_p50", "non-streamed: request time p50 ms", 1000, 1),
    ("prefix", "ttft_cold", "shared prefix: cold TTFT ms", 1000, 1),
    ("prefix", "ttft_warm_p50", "shared prefix: warm TTFT ms", 1000, 1),
    ("prefix", "warm_over_cold", "shared prefix: warm / cold", 1, 3),
    ("prefill", "prefill_tps", "prefill tok/s (one long prompt)", 1, 1),
    ("revisit", "ttft_first_p50", "revisit: first visit TTFT p50 ms", 1000, 1),
    ("revisit", "ttft_revisit_p50", "revisit: TTFT p50 ms of a conversation the slots left", 1000, 1),
    ("revisit", "revisit_over_first", "revisit: revisit / first visit", 1, 3),
]


def table(res: dict[str, Any]) -> str:
    servers = res["servers"]
    lines = [f"**{res['model']}**", "",
             "| metric | " + " | ".join(servers) + " | " + " | ".join(f"pylocalai ÷ {s}" for s in servers[1:]) + " |",
             "|---" * (1 + 2 * len(servers) - 1) + "|"]
    sc = res["scenarios"]
    for scn, key, label, scale, digits in ROWS:
        if scn not in sc:
            continue
        per = sc[scn]["per_server"]
        cells = [fmt(per.get(s, {}).get(key, {}), scale, digits) for s in servers]
        rat = []
        for s in servers[1:]:
            a, b = per.get("pylocalai", {}).get(key, {}), per.get(s, {}).get(key, {})
            rat.append(f"{a['median'] / b['median']:.2f}" if a and b and b.get("n") and b["median"] else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
    errs = {s: sum(int(v["per_server"].get(s, {}).get("errors", {}).get("max", 0) or 0) for v in sc.values())
            for s in servers}
    lines.append("| errors (worst repeat, all scenarios) | " + " | ".join(str(errs[s]) for s in servers)
                 + " | " + " | ".join("" for _ in servers[1:]) + " |")
    if res.get("endpoint_overhead_vs_chat"):
        lines += ["", "pylocalai's other protocols vs its chat completions (same scenario):", "",
                  "| scenario | metric | this protocol | chat completions | ratio or Δ |", "|---|---|---|---|---|"]
        for name, keys in res["endpoint_overhead_vs_chat"].items():
            if not all(isinstance(o, dict) for o in keys.values()):
                continue  # a result file from before this comparison covered every scenario
            per = sc[name]["per_server"]["pylocalai"]
            base = sc[name.partition("-")[2]]["per_server"]["pylocalai"]
            for key, o in keys.items():
                scale = 1000 if key.startswith("ttft") else 1
                cmp = f"{o['ratio']:.3f}" if "ratio" in o else f"{o['delta_ms']:+.1f} ms"
                lines.append(f"| {name} | {OVERHEAD_LABELS[key]} | {fmt(per[key], scale)} | {fmt(base[key], scale)} | {cmp} |")
    if res.get("targets"):
        lines += ["", "Targets: " + "; ".join(
            f"{k}: {v.get('value', v.get('value_ms')):.3g}{' ms' if 'value_ms' in v else ''} "
            f"{'met' if v['met'] else 'MISSED'}" for k, v in res["targets"].items())]
    return "\n".join(lines)


def report(doc: dict[str, Any]) -> str:
    m, st = doc["machine"], doc["settings"]
    head = (f"{m['cpu']}, {m['cpus']} CPUs; threads={st['threads']}, slots={st['parallel']}, ctx={st['ctx']} "
            f"(per slot {st['ctx'] // st['parallel']}); {st['n_gen']} output tokens; median (min–max) over "
            f"{st['repeats']} alternating repeats")
    return "\n\n".join([head, *(table(r) for r in doc["results"])]) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    colors = {"pylocalai": "#1f77b4", "llama-server": "#ff7f0e", "llama-cpp-python": "#2ca02c"}
    fig, axes = plt.subplots(len(results), 3, figsize=(16, 4.6 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        sc = res["scenarios"]
        conc = sorted(int(k[1:]) for k in sc if k.startswith("c") and k[1:].isdigit())
        ax = row[0]
        for name in res["servers"]:
            pts = [(c, sc[f"c{c}"]["per_server"][name]["aggregate_tps"]) for c in conc if name in sc[f"c{c}"]["per_server"]]
            if not pts:
                continue
            xs = [c for c, _ in pts]
            med = [s["median"] for _, s in pts]
            err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=4, label=name, color=colors.get(name))
        ax.set_title(f"{res['model']}: aggregate output tok/s")
        ax.set_xlabel("concurrent clients")
        ax.set_xticks(conc)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        ax = row[1]
        data, labels, cols = [], [], []
        for c in conc:
            for name in res["servers"]:
                per = sc[f"c{c}"]["per_server"].get(name)
                if per and per.get("ttfts"):
                    data.append([1000 * t for t in per["ttfts"]])
                    labels.append(f"c{c}\n{name}")
                    cols.append(colors.get(name, "gray"))
        if data:
            parts = ax.boxplot(data, patch_artist=True, showfliers=True)
            for patch, col in zip(parts["boxes"], cols):
                patch.set_facecolor(col)
                patch.set_alpha(0.6)
            ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
            ax.set_yscale("log")
        ax.set_title("time to first token (ms, log scale)")
        ax.grid(alpha=0.3, axis="y")
        ax = row[2]
        for name in res["servers"]:
            pts = [(c, sc[f"c{c}"]["per_server"][name]["decode_tps_p50"]) for c in conc if name in sc[f"c{c}"]["per_server"]]
            if pts:
                ax.plot([c for c, _ in pts], [s["median"] for _, s in pts], marker="o", label=name, color=colors.get(name))
        ax.set_title("per-stream decode tok/s (p50)")
        ax.set_xlabel("concurrent clients")
        ax.set_xticks(conc)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    m = doc["machine"]
    fig.suptitle(f"pylocalai vs llama-server — {m['cpus']} CPUs, {doc['settings']['threads']} threads, "
                 f"{doc['settings']['parallel']} slots, {m['platform']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a .gguf path, 'default' or 'gemma3-270m' (repeatable)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--parallel", type=int, default=4, help="slots on every server")
    ap.add_argument("--ctx", type=int, default=16384, help="whole KV cache; each slot gets ctx / parallel")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prefix-words", type=int, default=1340, help="shared system prompt length (~1,500 tokens)")
    ap.add_argument("--prefix-warm", type=int, default=4, help="warm requests after the cold one")
    ap.add_argument("--revisit-words", type=int, default=700, help="notes per conversation in revisit (~800 tokens)")
    ap.add_argument("--prefill-words", type=int, default=1800, help="long prompt length (~2,000 tokens)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per run; requests left over are errors")
    ap.add_argument("--scenarios", nargs="+", metavar="NAME",
                    help="run only these scenarios (c1 c4 c8 prefix prefill messages-c1 ...); default: all")
    ap.add_argument("--llama-cpp-python", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--smoke", action="store_true", help="one short scenario, one repeat (CI keeps the harness working)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' work folder and logs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "server.png")
    ap.add_argument("--report", type=Path, metavar="JSON", help="print the tables of an earlier result file and exit")
    args = ap.parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        print(report(doc))
        return 0
    if args.smoke:
        args.repeats, args.n_gen, args.time_limit = 1, 16, 120.0
    from pylocalai.models import resolve_model_path

    models = [resolve_model_path(m) for m in (args.model or ["default"])]
    results = [bench_model(m, args) for m in models]
    doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"},
           "machine": machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=True))
    plot(doc, args.plot)
    print("\n" + report(doc))
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
