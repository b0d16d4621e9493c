#!/usr/bin/env python3
"""pylocalai's engines side by side with each fork's own llama-bench, built from the same tree.

Measures, for each model and each engine (llama.cpp, ik_llama.cpp; --engine picks), with the same
threads:
- prefill tok/s of a 512-token prompt (llama-bench pp512 vs pylocalai: submit -> first token),
- single-stream decode tok/s over 128 tokens (llama-bench tg128 vs pylocalai: first -> last token),
- aggregate decode tok/s of pylocalai with 1, 4 and 8 concurrent sequences (continuous batching),
  beside the fork's own llama-batched-bench decoding the same number of sequences (its S_TG),
- single-stream decode taken whole (complete(): the caller is not woken for each token), paired
  with llama-bench's tg like the streamed figure,
- single-stream decode again once another (live) thread has computed an embedding, as a ratio to
  plain decode: ~1 since pylocalai sets libgomp's wait policy and lets such a thread's OpenMP team
  go (about 0.33 before; see pylocalai/_engines).
Runs alternate llama-bench / pylocalai, and the engines alternate repeat by repeat (A B, then B A);
each figure is the median over repeats with min-max, and the ratios pylocalai / the fork's
llama-bench are reported (of the medians, and paired: the median of each repeat's own ratio), plus
pylocalai's ik_llama.cpp engine / its llama.cpp engine. Settings are the same on both sides of each
ratio: both engines run with flash attention, each fork's default (ik's kernel takes several sequences in
one cache since pylocalai's patch 0005), and its tools are given the same setting.
Results go to a JSON file and a table on stdout.

  python bench/engine_bench.py --model default --model gemma3-270m --threads 2 --repeats 3
  python bench/engine_bench.py --model host-bound --threads 1 --n-gen 256   # a GPU's regime, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


ENGINES = {"llama_cpp": "llama-cpp", "ik_llama_cpp": "ik-llama-cpp"}  # module -> backend name
# the context settings pylocalai uses per engine, given to that fork's llama-bench as well
FLASH_ATTN = {"llama_cpp": "auto", "ik_llama_cpp": "on"}  # ik's "auto" is on too
BENCH_ARGS = {"llama_cpp": [], "ik_llama_cpp": ["-fa", "1"]}


def tool_path(engine: str, name: str) -> Path:
    import importlib

    eng = importlib.import_module(f"pylocalai._engines.{engine}")
    path = Path(eng.__file__).parent / "bin" / engine / name
    if not path.is_file():
        sys.exit(f"{path} is missing: build with PYLOCALAI_BUILD_TOOLS=ON (the default)")
    return path


LLAMA_BENCH_REPS = 3  # llama-bench's -r: its figures are the mean over this many repetitions


def ngl_args(n_gpu_layers: int | None) -> list[str]:
    """The tools' -ngl for pylocalai's n_gpu_layers (None: each side's default, every layer on a GPU
    build; negative: all)."""
    return [] if n_gpu_layers is None else ["-ngl", str(999 if n_gpu_layers < 0 else n_gpu_layers)]


def llama_bench(engine: str, model: Path, threads: int, n_prompt: int, n_gen: int,
                n_gpu_layers: int | None = None) -> tuple[float, float]:
    """(pp tok/s, tg tok/s) from one llama-bench invocation (its own mean of LLAMA_BENCH_REPS repetitions)."""
    cmd = [str(tool_path(engine, "llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(n_prompt),
           "-n", str(n_gen), "-r", str(LLAMA_BENCH_REPS), "-o", "json", *BENCH_ARGS[engine], *ngl_args(n_gpu_layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == n_prompt and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == n_gen and r["n_prompt"] == 0)
    return float(pp), float(tg)


def ours_single(llm: Any, rng: np.random.Generator, n_prompt: int, n_gen: int, reps: int = LLAMA_BENCH_REPS) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one request at a time: a fresh random prompt, greedy, fixed
    length. Like llama-bench, each figure is the mean rate over `reps` repetitions."""
    n_vocab = llm.info["n_vocab"]
    pps: list[float] = []
    for _ in range(reps):
        # prefill: a prompt no slot has cached, one sampled token
        prompt = [int(t) for t in rng.integers(100, n_vocab - 100, size=n_prompt)]
        t0 = time.perf_counter()
        llm.complete(prompt, max_tokens=1, temperature=0.0)
        pps.append(n_prompt / (time.perf_counter() - t0))
        clean(llm)
    return statistics.fmean(pps), ours_decode(llm, rng, n_gen, reps)


def ours_decode(llm: Any, rng: np.random.Generator, n_gen: int, reps: int = LLAMA_BENCH_REPS) -> float:
    """Single-stream decode tok/s from a 1-token prompt (llama-bench's tg starts from an empty cache),
    first to last token, the mean rate over `reps` repetitions."""
    n_vocab = llm.info["n_vocab"]
    tgs: list[float] = []
    for _ in range(reps):
        stamps: list[float] = []
        for chunk in llm.generate([int(rng.integers(100, n_vocab - 100))], max_tokens=n_gen, temperature=0.0, ignore_eos=True):
            if chunk.tokens:
                stamps.extend([time.perf_counter()] * len(chunk.tokens))
        tgs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        clean(llm)
    return statistics.fmean(tgs)


def ours_decode_whole(llm: Any, rng: np.random.Generator, n_gen: int, reps: int = LLAMA_BENCH_REPS) -> float:
    """Single-stream decode tok/s of a request taken whole (complete(): no consumer woken per token),
    as llama-bench's tg counts it: n_gen tokens from a 1-token prompt are n_gen decodes, timed from
    submission to the answer. The mean rate over `reps` repetitions."""
    n_vocab = llm.info["n_vocab"]
    tgs: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = llm.complete([int(rng.integers(100, n_vocab - 100))], max_tokens=n_gen, temperature=0.0, ignore_eos=True)
        tgs.append(len(out.tokens) / (time.perf_counter() - t0))
        clean(llm)
    return statistics.fmean(tgs)


def ours_decode_beside_another_thread(llm: Any, rng: np.random.Generator, n_gen: int) -> float:
    """Single-stream decode while another live thread has computed too (an embedding run from the
    caller's thread, as the server's embeddings route does): a thread that runs a graph gets an
    OpenMP team of its own, and while two lived libgomp's barriers stopped spinning (see
    pylocalai/_engines). The thread ends after, so the other measurements see it gone."""
    computed, done = threading.Event(), threading.Event()

    def other() -> None:
        try:
            llm.embed("The other thread computes an embedding once.")
        finally:
            computed.set()
            done.wait()

    t = threading.Thread(target=other, daemon=True)
    t.start()
    computed.wait()
    try:
        return ours_decode(llm, rng, n_gen)
    finally:
        done.set()
        t.join()


def ours_aggregate(llm: Any, rng: np.random.Generator, n_seqs: int, n_gen: int) -> float:
    """Aggregate decode tok/s of n_seqs concurrent greedy generations, counted as llama-batched-bench
    counts its S_TG: the tokens decoded once every sequence has its prompt in (its first token out),
    over the time from then to the last token. Prefill stays out of it, as it does of single-stream
    decode."""
    n_vocab = llm.info["n_vocab"]
    prompts = [[int(t) for t in rng.integers(100, n_vocab - 100, size=8)] for _ in range(n_seqs)]
    stamps: list[list[float]] = [[] for _ in range(n_seqs)]
    barrier = threading.Barrier(n_seqs)

    def work(i: int) -> None:
        barrier.wait()
        for chunk in llm.generate(prompts[i], max_tokens=n_gen, temperature=0.0, ignore_eos=True):
            if chunk.tokens:
                stamps[i].extend([time.perf_counter()] * len(chunk.tokens))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_seqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(s[0] for s in stamps)   # every sequence is decoding from here on
    end = max(s[-1] for s in stamps)
    decoded = sum(sum(1 for t in s if t > start) for s in stamps)
    return decoded / (end - start)


def batched_bench(engine: str, model: Path, threads: int, n_gen: int, concurrency: list[int], n_ctx: int,
                  n_gpu_layers: int | None = None) -> dict[int, float]:
    """The fork's own llama-batched-bench: S_TG (aggregate decode tok/s) for each sequence count, with
    the same 8-token prompts, context, batch sizes and flash-attention setting as pylocalai's runs."""
    cmd = [str(tool_path(engine, "llama-batched-bench")), "-m", str(model), "-t", str(threads), "-c", str(n_ctx),
           "-b", "512", "-ub", "512", "-npp", "8", "-ntg", str(n_gen), "-npl", ",".join(map(str, concurrency)),
           "-fa", FLASH_ATTN[engine], *ngl_args(n_gpu_layers)]
    for attempt in range(2):
        # in a scratch directory: ik_llama.cpp's build of it writes ./llama.log
        with tempfile.TemporaryDirectory(prefix="batched-bench-") as scratch:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800, cwd=scratch)
        speeds: dict[int, float] = {}
        # its Markdown table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        for line in (out.stdout + out.stderr).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10 and cells[0].isdigit():
                speeds[int(cells[2])] = float(cells[7])
        missing = set(concurrency) - set(speeds)
        if not missing:
            return speeds
        # llama.cpp's tool logs through a background thread; once (a CI run, 2 busy cores) it exited 0
        # having printed nothing at all, not even the model load: that run is made again, once
        if attempt == 0 and not (out.stdout + out.stderr).strip():
            continue
        break
    raise RuntimeError(f"llama-batched-bench gave no row for {sorted(missing)}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def clean(llm: Any) -> None:
    """Drop the prompt caches that finished requests left in their slots, so each measurement starts
    from an empty KV cache as llama-bench's do. (On ik_llama.cpp, whose sequences share one cache,
    cached prompts of idle slots widen every other sequence's attention: see README.)"""
    llm.worker.call(llm.scheduler.drop_idle_caches)


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


class EngineRun:
    """One engine on one model, measured repeat by repeat so that the engines can alternate (engine A,
    engine B, then B, A, ...) and a slow spell of the machine hits both alike. Each repeat loads the
    model afresh and closes it after: with both engines' models resident in one process, the ik
    engine's decode ran 5-24 % slower on this VM than with its model alone."""

    def __init__(self, engine: str, model: Path, threads: int, n_prompt: int, n_gen: int, concurrency: list[int],
                 n_gpu_layers: int | None = None) -> None:
        self.engine, self.model, self.threads, self.n_gpu_layers = engine, model, threads, n_gpu_layers
        self.n_prompt, self.n_gen, self.concurrency = n_prompt, n_gen, concurrency
        self.rng = np.random.default_rng(0)
        self.ref_pp: list[float] = []
        self.ref_tg: list[float] = []
        self.our_pp: list[float] = []
        self.our_tg: list[float] = []
        self.our_tg_beside: list[float] = []  # single-stream decode once another thread has computed
        self.our_tg_whole: list[float] = []  # single-stream decode, the answer taken whole (complete())
        self.agg: dict[int, list[float]] = {c: [] for c in concurrency}
        self.ref_agg: dict[int, list[float]] = {c: [] for c in concurrency}
        # per-sequence KV: each of the max(concurrency) slots gets room for the prompt and the generation
        self.n_ctx = max(concurrency) * 1024 * ((n_prompt + n_gen) // 1024 + 1)
        self.info: dict[str, Any] = {}

    def open(self) -> Any:
        from pylocalai import Llama

        gpu = {} if self.n_gpu_layers is None else {"n_gpu_layers": self.n_gpu_layers}
        llm = Llama(self.model, backend=ENGINES[self.engine], n_ctx=self.n_ctx, n_batch=512, n_ubatch=512,
                    n_threads=self.threads, n_parallel=max(self.concurrency), flash_attn=FLASH_ATTN[self.engine], **gpu)
        self.info = {k: llm.info[k] for k in ("architecture", "description", "n_params", "size_bytes")}
        ours_single(llm, self.rng, 64, 8, reps=1)  # warm-up: page the weights in, build the graphs
        return llm

    def repeat(self, label: str) -> None:
        """One repeat: llama-bench, then pylocalai single-stream, then batched-bench, then pylocalai batched."""
        with self.open() as llm:
            self._measure(llm, label)

    def _measure(self, llm: Any, label: str) -> None:
        pp, tg = llama_bench(self.engine, self.model, self.threads, self.n_prompt, self.n_gen, self.n_gpu_layers)
        self.ref_pp.append(pp)
        self.ref_tg.append(tg)
        clean(llm)
        pp, tg = ours_single(llm, self.rng, self.n_prompt, self.n_gen)
        self.our_pp.append(pp)
        self.our_tg.append(tg)
        self.our_tg_whole.append(ours_decode_whole(llm, self.rng, self.n_gen))
        for c, v in batched_bench(self.engine, self.model, self.threads, self.n_gen, self.concurrency, self.n_ctx,
                                  self.n_gpu_layers).items():
            self.ref_agg[c].append(v)
        for c in self.concurrency:
            clean(llm)
            self.agg[c].append(ours_aggregate(llm, self.rng, c, self.n_gen))
        clean(llm)
        self.our_tg_beside.append(ours_decode_beside_another_thread(llm, self.rng, self.n_gen))
        print(f"  {self.model.name} [{self.engine}] {label}: llama-bench pp {self.ref_pp[-1]:.1f} "
              f"tg {self.ref_tg[-1]:.1f} | pylocalai pp {self.our_pp[-1]:.1f} tg {self.our_tg[-1]:.1f} | agg "
              + " ".join(f"{c}:{self.agg[c][-1]:.1f}" for c in self.concurrency) + " | llama-batched-bench agg "
              + " ".join(f"{c}:{self.ref_agg[c][-1]:.1f}" for c in self.concurrency)
              + f" | tg beside another computing thread {self.our_tg_beside[-1]:.1f} | tg taken whole "
              f"{self.our_tg_whole[-1]:.1f}", file=sys.stderr, flush=True)

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {
            "engine": self.engine,
            "info": self.info,
            "llama_bench": {"pp": summary(self.ref_pp), "tg": summary(self.ref_tg)},
            "llama_batched_bench": {"aggregate": {str(c): summary(v) for c, v in self.ref_agg.items()}},
            "pylocalai": {"pp": summary(self.our_pp), "tg": summary(self.our_tg),
                          "tg_beside_another_thread": summary(self.our_tg_beside),
                          "tg_whole": summary(self.our_tg_whole),
                          "aggregate": {str(c): summary(v) for c, v in self.agg.items()}},
        }
        ours, batched = res["pylocalai"], res["llama_batched_bench"]["aggregate"]
        res["ratios"] = {
            "pp": ours["pp"]["median"] / res["llama_bench"]["pp"]["median"],
            "tg": ours["tg"]["median"] / res["llama_bench"]["tg"]["median"],
            **{f"aggregate_{c}_vs_single": ours["aggregate"][str(c)]["median"] / ours["tg"]["median"]
               for c in self.concurrency},
            **{f"aggregate_{c}_vs_batched_bench": ours["aggregate"][str(c)]["median"] / batched[str(c)]["median"]
               for c in self.concurrency},
            # each repeat's pylocalai figure over the llama-bench figure measured just before it: on a
            # machine whose speed drifts, the median of these pairs is steadier than a ratio of medians
            "pp_paired": statistics.median(a / b for a, b in zip(self.our_pp, self.ref_pp, strict=True)),
            "tg_paired": statistics.median(a / b for a, b in zip(self.our_tg, self.ref_tg, strict=True)),
            # decode with no consumer woken per token (complete()), paired the same way
            "tg_whole_paired": statistics.median(a / b for a, b in zip(self.our_tg_whole, self.ref_tg, strict=True)),
            # decode once another thread has computed too, over plain decode in the same repeat (~1)
            "tg_beside_another_thread": statistics.median(
                a / b for a, b in zip(self.our_tg_beside, self.our_tg, strict=True)),
            # the fork's own batching gain, the ceiling the engine's kernels allow on this machine
            **{f"batched_bench_{c}_vs_1": batched[str(c)]["median"] / batched["1"]["median"]
               for c in self.concurrency if "1" in batched},
        }
        return res


def bench_model(engines: list[str], model: Path, threads: int, repeats: int, n_prompt: int, n_gen: int,
                concurrency: list[int], n_gpu_layers: int | None = None) -> dict[str, Any]:
    runs = [EngineRun(e, model, threads, n_prompt, n_gen, concurrency, n_gpu_layers) for e in engines]
    for r in range(repeats):
        for run in runs if r % 2 == 0 else runs[::-1]:  # engine A then B, then B then A
            run.repeat(f"repeat {r + 1}/{repeats}")
    per = {run.engine: run.result() for run in runs}
    res: dict[str, Any] = {"model": model.name, "engines": per}
    if "ik_llama_cpp" in per and "llama_cpp" in per:
        ik, up = per["ik_llama_cpp"]["pylocalai"], per["llama_cpp"]["pylocalai"]
        res["ik_vs_llama_cpp"] = {k: ik[k]["median"] / up[k]["median"] for k in ("pp", "tg")}
    return res


def gpu_names() -> list[str]:
    """The machine's NVIDIA GPUs (none where nvidia-smi is missing or finds none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


HOST_BOUND = "host-bound"


def host_bound_model(folder: Path | None = None) -> Path:
    """A tiny random-weight llama where a token costs about 1 ms on one CPU thread (4 layers, 256 wide,
    a 32,000-token vocabulary), written once with gguf-py (the tests' generator, fixed seed).

    Run with --threads 1 it puts the engine where a GPU puts it: short steps, and a spare core for
    the Python around them, whose share of each token is then as large as on a GPU (SmolLM2 on an
    H100: 1.1 ms a step). So the host work per token can be measured, and improved, without a GPU."""
    path = (folder or Path(tempfile.gettempdir())) / "pylocalai-bench-host-bound.gguf"
    if not path.exists():
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from tests.ggufgen import write_tiny_llama

        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        write_tiny_llama(tmp, n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, dtype="f32", vocab_dtype="q8_0")
        os.replace(tmp, path)  # whole or not at all, should two runs write it at once
    return path


def resolve(name: str) -> Path:
    if name == HOST_BOUND:
        return host_bound_model()
    from pylocalai.models import resolve_model_path

    return resolve_model_path(name)


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help=f"a .gguf path, 'default', 'gemma3-270m' or '{HOST_BOUND}' (see host_bound_model; repeatable)")
    ap.add_argument("--engine", action="append", choices=list(ENGINES),
                    help="engine(s) to measure (repeatable; default: every engine this install built)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--n-gpu-layers", type=int, default=None,
                    help="layers to offload on a GPU build, the same for every side (-1: all; default: each "
                         "side's own default, which is all layers)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = ap.parse_args(argv)
    from pylocalai.engine.backend import available_engines

    engines = args.engine or [e for e in ENGINES if e in available_engines()]
    results = [bench_model(engines, resolve(m), args.threads, args.repeats, args.n_prompt, args.n_gen,
                           args.concurrency, args.n_gpu_layers) for m in args.model]
    doc = {"threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "n_gpu_layers": args.n_gpu_layers,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
                       "gpus": gpu_names()},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"\nthreads={args.threads}; median (min-max) of {args.repeats} alternating runs; tok/s")
    print("| model | engine | llama-bench pp | pylocalai pp | ratio | llama-bench tg | pylocalai tg | ratio | "
          + " | ".join(f"agg x{c}" for c in args.concurrency) + " | agg x4 / single | paired pp / tg | tg beside another thread | tg taken whole, paired |")
    print("|---" * (8 + len(args.concurrency) + 4) + "|")
    for res in results:
        for engine, r in res["engines"].items():
            a = r["pylocalai"]["aggregate"]
            print(f"| {res['model']} | {engine} | {fmt(r['llama_bench']['pp'])} | {fmt(r['pylocalai']['pp'])} | "
                  f"{r['ratios']['pp']:.3f} | {fmt(r['llama_bench']['tg'])} | {fmt(r['pylocalai']['tg'])} | "
                  f"{r['ratios']['tg']:.3f} | " + " | ".join(fmt(a[str(c)]) for c in args.concurrency)
                  + f" | {r['ratios'].get('aggregate_4_vs_single', float('nan')):.2f} | "
                  f"{r['ratios']['pp_paired']:.3f} / {r['ratios']['tg_paired']:.3f} | "
                  f"{r['ratios']['tg_beside_another_thread']:.3f} | {fmt(r['pylocalai']['tg_whole'])}, "
                  f"{r['ratios']['tg_whole_paired']:.3f} |")
    print("\nAggregate decode (continuous batching) vs the fork's own llama-batched-bench (S_TG), same sequences:")
    print("| model | engine | " + " | ".join(f"batched-bench x{c}" for c in args.concurrency)
          + " | " + " | ".join(f"pylocalai / batched-bench x{c}" for c in args.concurrency) + " | batched-bench x4 / x1 |")
    print("|---" * (2 + 2 * len(args.concurrency) + 1) + "|")
    for res in results:
        for engine, r in res["engines"].items():
            b = r["llama_batched_bench"]["aggregate"]
            print(f"| {res['model']} | {engine} | " + " | ".join(fmt(b[str(c)]) for c in args.concurrency) + " | "
                  + " | ".join(f"{r['ratios'][f'aggregate_{c}_vs_batched_bench']:.2f}" for c in args.concurrency)
                  + f" | {r['ratios'].get('batched_bench_4_vs_1', float('nan')):.2f} |")
    for res in results:
        if "ik_vs_llama_cpp" in res:
            x = res["ik_vs_llama_cpp"]
            print(f"{res['model']}: pylocalai ik_llama_cpp / llama_cpp engine: prefill {x['pp']:.3f}, decode {x['tg']:.3f}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
