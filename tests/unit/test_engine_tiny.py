"""The compiled engines and the Python API on a tiny random-weight llama GGUF (no downloads).

Every test that takes `llm` or `tool_llm` runs once per engine (llama.cpp and ik_llama.cpp).

Random weights give meaningless text, so these assert invariants: counts, finish reasons, shapes,
determinism, grammar conformance, and that streamed text equals the detokenized tokens.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from pylocalai import ContextLengthError, EngineError, InvalidRequestError, Llama

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(backend: str, tiny_llama: Path) -> Iterator[Llama]:
    with Llama(tiny_llama, backend=backend, n_ctx=512, n_batch=64, n_ubatch=64, n_parallel=4, n_threads=2) as m:
        yield m


def wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_model_metadata(llm: Llama) -> None:
    info = llm.info
    assert info["architecture"] == "llama"
    assert info["n_layer"] == 2
    assert info["n_vocab"] > 1000
    assert info["n_params"] > 0 and info["size_bytes"] > 0
    assert info["bos"] >= 0 and info["eos"] >= 0
    assert info["eos"] in info["eog_tokens"]
    assert "<|im_start|>" in info["chat_template"]
    assert info["recurrent"] is False
    # per-sequence KV (the default): each of the 4 slots owns a quarter, rounded up to llama.cpp's padding
    assert llm.n_ctx_seq * 4 == llm.n_ctx >= 512


def test_tokenize_detokenize_round_trip(llm: Llama) -> None:
    text = "Hello world, ünïcödé €"
    toks = llm.tokenize(text, add_special=False)
    assert toks and all(isinstance(t, int) for t in toks)
    assert llm.detokenize(toks) == text
    with_bos = llm.tokenize(text)
    assert with_bos[0] == llm.info["bos"] and with_bos[1:] == toks


def test_detokenize_rejects_ids_outside_the_vocabulary(llm: Llama) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.detokenize([10**7])


def test_max_tokens_and_usage(llm: Llama) -> None:
    out = llm.complete("Once upon a time", max_tokens=7, temperature=0.0, ignore_eos=True)
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == 7 == len(out.tokens)
    assert out.usage.prompt_tokens == len(llm.tokenize("Once upon a time"))


def test_greedy_is_deterministic(llm: Llama) -> None:
    a = llm.complete("The sky is", max_tokens=16, temperature=0.0, ignore_eos=True)
    b = llm.complete("The sky is", max_tokens=16, temperature=0.0, ignore_eos=True)
    assert a.tokens == b.tokens


def test_seeded_sampling_is_reproducible_and_seed_matters(llm: Llama) -> None:
    kw: dict[str, Any] = {"max_tokens": 24, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "ignore_eos": True}
    a = llm.complete("x", seed=1, **kw)
    b = llm.complete("x", seed=1, **kw)
    c = llm.complete("x", seed=2, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_streamed_text_equals_detokenized_tokens(llm: Llama) -> None:
    # random weights pick byte tokens too: multi-byte characters get split across tokens
    for seed in range(3):
        chunks = list(llm.generate("é", max_tokens=48, temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, ignore_eos=True))
        tokens = [t for c in chunks for t in c.tokens]
        # (detokenize() would drop the first token's leading space, as at the start of a text)
        raw = b"".join(llm.token_to_piece(t) for t in tokens)
        assert "".join(c.text for c in chunks) == raw.decode("utf-8", errors="replace")
        assert all("\ufffd" not in c.text for c in chunks) or "\ufffd" in raw.decode("utf-8", errors="replace")
        assert chunks[-1].finish_reason == "length"


def test_logit_bias_forces_a_token(llm: Llama) -> None:
    target = llm.tokenize(" banana", add_special=False)[0]
    out = llm.complete("x", max_tokens=3, temperature=0.0, logit_bias={target: 100.0}, ignore_eos=True)
    assert out.tokens == (target,) * 3


HOT: dict[str, Any] = {"max_tokens": 24, "temperature": 2.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "ignore_eos": True}


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}], ids=["top_k", "top_p", "min_p"])
def test_truncation_samplers_that_keep_one_token_give_greedy(llm: Llama, cut: dict[str, float]) -> None:
    greedy = llm.complete("x y z", max_tokens=24, temperature=0.0, ignore_eos=True).tokens
    free = [llm.complete("x y z", seed=s, **HOT).tokens for s in range(3)]
    assert all(t != greedy for t in free)  # at temperature 2 the seeds really do draw other tokens
    # top_k 1, top_p 0 and min_p 1 each keep only the most likely token, whatever the seed and temperature
    assert [llm.complete("x y z", seed=s, **{**HOT, **cut}).tokens for s in range(3)] == [greedy] * 3


def test_typical_p_truncates_before_the_draw(llm: Llama) -> None:
    free = {llm.complete("x y z", seed=s, **HOT).tokens for s in range(3)}
    assert len(free) == 3
    # a tiny typical mass keeps one candidate (the most "typical", not necessarily the most likely): the seed no longer matters
    typical = {llm.complete("x y z", seed=s, **{**HOT, "typical_p": 1e-6}).tokens for s in range(3)}
    assert len(typical) == 1


def _favoured(llm: Llama) -> tuple[int, int, dict[int, float]]:
    """Two tokens (not in the prompt "x y z") biased so that plain greedy repeats the first one forever."""
    a, b = 1000, 2000
    assert not {a, b} & (set(llm.tokenize("x y z")) | set(llm.info["eog_tokens"]))
    return a, b, {a: 10.0, b: 9.0}


def test_presence_and_frequency_penalties_stop_repeats_within_the_window(llm: Llama) -> None:
    a, b, bias = _favoured(llm)
    kw: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "logit_bias": bias}
    assert llm.complete("x y z", **kw).tokens == (a,) * 16
    for penalty in ("presence_penalty", "frequency_penalty"):
        out = llm.complete("x y z", **kw, **{penalty: 1000.0}).tokens
        assert out[:2] == (a, b)  # the favourite once, then the runner-up, then other tokens
        assert len(set(out)) == 16, penalty
        # a window of 4 tokens: the favourite comes back once it has left the window (t0 = a, t5 = a again)
        windowed = llm.complete("x y z", **kw, **{penalty: 1000.0, "repeat_last_n": 4}).tokens
        assert windowed[0] == windowed[5] == a, penalty
        for i, tok in enumerate(windowed):
            assert tok not in windowed[max(0, i - 4) : i], (penalty, i)


def test_repeat_penalty_and_a_zero_window(llm: Llama) -> None:
    a, b, bias = _favoured(llm)
    kw: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "logit_bias": bias}
    out = llm.complete("x y z", **kw, repeat_penalty=1000.0).tokens
    assert out[:2] == (a, b) and out.count(a) == 1  # the favourite's logit is divided down after one use
    # repeat_last_n 0 turns every penalty off
    assert llm.complete("x y z", **kw, repeat_penalty=1000.0, presence_penalty=1000.0, repeat_last_n=0).tokens == (a,) * 8


def test_logprobs(llm: Llama) -> None:
    out = llm.complete("x", max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    assert len(out.logprobs) == 4
    for lp in out.logprobs:
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token  # greedy picks the most likely token
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_grammar_constrains_output(llm: Llama) -> None:
    out = llm.complete("Answer:", grammar='root ::= ("yes" | "no") "."', max_tokens=10, temperature=1.0, seed=3)
    assert out.text in ("yes.", "no.")
    assert out.finish_reason == "stop"


def test_json_schema_grammar_gives_valid_json(engine: Any, llm: Llama) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    gbnf = engine.json_schema_to_grammar(json.dumps(schema))
    out = llm.complete("{", grammar=gbnf, max_tokens=40, temperature=0.0)
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(out.text)["n"], int)


def test_bad_grammar_is_a_request_error(llm: Llama) -> None:
    with pytest.raises(InvalidRequestError):
        llm.complete("x", grammar="root ::= (", max_tokens=2)
    assert llm.complete("x", max_tokens=1).usage.completion_tokens == 1  # still serving


def test_prompt_longer_than_context(llm: Llama) -> None:
    with pytest.raises(ContextLengthError, match=str(llm.n_ctx_seq)):
        llm.complete([1] * (llm.n_ctx_seq + 10), max_tokens=1)


def test_stop_string_spanning_tokens_is_cut(llm: Llama) -> None:
    ref = llm.complete("abc", max_tokens=40, temperature=0.0, ignore_eos=True)
    pieces = [llm.token_to_piece(t).decode("utf-8", "replace") for t in ref.tokens]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2 and "\ufffd" not in pieces[i - 1] + pieces[i])
    stop = pieces[i - 1][-2:] + pieces[i][:2]
    out = llm.complete("abc", max_tokens=40, temperature=0.0, stop=[stop], ignore_eos=True)
    assert out.finish_reason == "stop" and out.stop_sequence == stop
    assert stop not in out.text
    assert ref.text.startswith(out.text)
    assert out.text == ref.text[: ref.text.index(stop)]


@pytest.fixture
def raw_session(llm: Llama) -> Iterator[Any]:
    """A session of its own on the tiny model (the Llama's is its engine thread's), greedy on seq 0 and 1."""
    sess = llm._engine.Session(llm._model, {**llm._ctx_params, "n_ctx": 512, "n_seq_max": 2})
    yield sess
    del sess


def _single_steps(sess: Any, seqs: list[int], first: list[int], n: int) -> list[tuple]:
    """n plain steps of the sequences, each feeding back its sampled token: the rows they gave."""
    rows: list[tuple] = []
    tokens, pos = list(first), [1] * len(seqs)
    for _ in range(n):
        status, got = sess.step(np.array(tokens, np.int32), np.array(pos, np.int32), np.array(seqs, np.int32),
                                np.ones(len(seqs), np.uint8))
        assert status == 0
        rows.extend(got)
        tokens = [r[1] for r in got]
        pos = [p + 1 for p in pos]
    return rows


def _fresh(sess: Any, seqs: list[int], first: list[int], **sampling: Any) -> None:
    """Each sequence empty but for its first token at position 0 (no sample), a new greedy sampler."""
    for seq, tok in zip(seqs, first, strict=True):
        sess.seq_rm(seq, -1, -1)
        sess.set_sampler(seq, {"temperature": 0.0, "ignore_eos": True, **sampling}, np.zeros(0, np.int32))
        assert sess.step(np.array([tok], np.int32), np.array([0], np.int32), np.array([seq], np.int32),
                         np.zeros(1, np.uint8))[0] == 0


def test_a_multi_step_run_gives_the_rows_of_single_steps(raw_session: Any) -> None:
    seqs, first = [0, 1], [300, 400]
    _fresh(raw_session, seqs, first)
    want = _single_steps(raw_session, seqs, first, 12)
    _fresh(raw_session, seqs, first)
    status, steps, rows, error = raw_session.run(np.array(first, np.int32), np.ones(2, np.int32),
                                                 np.array(seqs, np.int32), np.array([12, 30], np.int32),
                                                 np.zeros(2, np.uint8), 64)
    # step by step, one row per sequence in order; ended by seq 0's remaining 12 tokens
    assert (status, steps, error) == (0, 12, None) and rows == want
    assert raw_session.seq_pos_max(0) == raw_session.seq_pos_max(1) == 12  # positions 0..12 decoded


def test_a_multi_step_run_ends_at_a_stop_string_at_eog_and_at_an_interrupt(llm: Llama, raw_session: Any) -> None:
    def run(max_steps: int, stop_on_eog: int = 0) -> tuple:
        return raw_session.run(np.array([300], np.int32), np.ones(1, np.int32), np.zeros(1, np.int32),
                               np.array([100], np.int32), np.array([stop_on_eog], np.uint8), max_steps)

    _fresh(raw_session, [0], [300])
    ref = _single_steps(raw_session, [0], [300], 20)
    # a stop string whose last byte comes with the 7th token's piece
    end = len(b"".join(r[3] for r in ref[:7]))
    stop = b"".join(r[3] for r in ref)[max(0, end - 3) : end].decode("utf-8", "replace")
    assert stop and "\ufffd" not in stop and stop.encode() not in b"".join(r[3] for r in ref[:6])
    _fresh(raw_session, [0], [300], stop=[stop])
    status, steps, rows, _ = run(64)
    assert (status, steps) == (0, 7) and rows == ref[:7]

    # every token forced to end-of-generation: a caller that stops on it gets one step, one that
    # ignores it (ignore_eos) the steps it asked for
    eos = llm.info["eos"]
    _fresh(raw_session, [0], [300], logit_bias=[(eos, 100.0)], ignore_eos=False)
    status, steps, rows, _ = run(64, stop_on_eog=1)
    assert (status, steps) == (0, 1) and rows[0][1] == eos and rows[0][2] is True
    _fresh(raw_session, [0], [300], logit_bias=[(eos, 100.0)], ignore_eos=False)
    assert run(5, stop_on_eog=0)[1] == 5

    # an interrupt before the call: exactly one step; cleared: as many as asked
    _fresh(raw_session, [0], [300])
    raw_session.interrupt()
    assert run(64)[1] == 1
    raw_session.clear_interrupt()
    _fresh(raw_session, [0], [300])
    assert run(9)[1] == 9


def test_a_request_taken_whole_runs_many_steps_per_call_and_matches_the_streamed_one(llm: Llama) -> None:
    stats = llm.scheduler.stats
    for with_stop in (False, True):
        kw: dict[str, Any] = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True}
        streamed = [t for c in llm.generate("alpha beta", **kw) for t in c.tokens]
        if with_stop:  # a stop string that ends the answer midway, spanning two tokens
            pieces = [llm.token_to_piece(t).decode("utf-8", "replace") for t in streamed]
            i = next(i for i in range(8, len(pieces)) if len(pieces[i - 1]) >= 2 and pieces[i] and "\ufffd" not in pieces[i - 1] + pieces[i])
            kw["stop"] = [pieces[i - 1][-2:] + pieces[i][:1]]
        calls, steps, decoded = stats.multi_step_calls, stats.steps, stats.tokens_decoded
        out = llm.complete("alpha beta", **kw)
        n_prompt = out.usage.prompt_tokens - out.usage.cached_tokens
        if with_stop:
            assert out.finish_reason == "stop" and 8 <= len(out.tokens) < 40
            assert tuple(streamed[: len(out.tokens)]) == out.tokens
        else:
            assert out.tokens == tuple(streamed)
        # the prompt's step, then one run of the other steps (a stop string may end a run early:
        # the engine watches for the stop's last bytes, the scheduler for the stop in the text)
        assert 1 <= stats.multi_step_calls - calls <= (2 if with_stop else 1)
        assert stats.steps - steps >= len(out.tokens)
        # ... that ended where the answer did: no token decoded beyond its last but one
        assert stats.tokens_decoded - decoded == n_prompt + len(out.tokens) - 1


def test_concurrent_generations_share_batches_and_match_solo(llm: Llama) -> None:
    prompts = ["alpha", "beta gamma", "delta", "epsilon zeta eta"]
    solo = [llm.complete(p, max_tokens=24, temperature=0.0, ignore_eos=True).tokens for p in prompts]
    llm.worker.call(lambda: setattr(llm.scheduler.stats, "max_seqs_per_step", 0))  # count this run's batching only
    results: dict[int, tuple[int, ...]] = {}
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = llm.complete(prompts[i], max_tokens=24, temperature=0.0, ignore_eos=True).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == solo
    assert llm.scheduler.stats.max_seqs_per_step >= 2


def test_requests_taken_whole_beside_a_stream_match_their_solo_answers(llm: Llama) -> None:
    # whole requests run several steps per call until a stream joins; then every step is single,
    # and the runs resume once it ends: no answer may change with that
    kw: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
    jobs = [("whole", "alpha", 48), ("stream", "beta gamma", 12), ("whole", "delta", 30)]
    solo = [llm.complete(p, max_tokens=n, **kw).tokens for _, p, n in jobs]
    calls = llm.scheduler.stats.multi_step_calls
    results: dict[int, tuple[int, ...]] = {}

    def work(i: int) -> None:
        kind, prompt, n = jobs[i]
        if kind == "stream":
            time.sleep(0.02)  # joins while the whole requests run
            results[i] = tuple(t for c in llm.generate(prompt, max_tokens=n, **kw) for t in c.tokens)
        else:
            results[i] = llm.complete(prompt, max_tokens=n, **kw).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(jobs))] == solo
    assert llm.scheduler.stats.multi_step_calls > calls


def test_decode_steps_of_one_shape_reuse_the_graph(llm: Llama) -> None:
    # llama.cpp skips rebuilding the compute graph when a step has the previous step's shape (one
    # token for each of the same sequences): the server's steady state. A step that broke it (a
    # context call between steps, a changed sampler set) would rebuild every time and run slower.
    before = llm.scheduler.graphs_reused
    if before < 0:
        assert llm.engine_name == "ik_llama_cpp", "only ik_llama.cpp keeps no count"
        return
    llm.complete("alpha", max_tokens=24, temperature=0.0, ignore_eos=True)
    solo = llm.scheduler.graphs_reused - before
    assert solo >= 20  # 23 decode steps after the prompt: the first builds, the rest reuse

    # three sequences decoding together: hold the engine thread while they are submitted, so that all
    # three start in one step; after their prompts every step has the same shape
    gate = threading.Event()
    holder = threading.Thread(target=llm.worker.call, args=(gate.wait,))
    holder.start()
    threads = [threading.Thread(target=llm.complete, args=(p,), kwargs={"max_tokens": 24, "temperature": 0.0, "ignore_eos": True})
               for p in ("alpha", "beta", "gamma")]
    for t in threads:
        t.start()
    wait_until(lambda: llm.worker._inbox.qsize() == 3)
    before = llm.scheduler.graphs_reused
    steps = llm.scheduler.stats.steps
    gate.set()
    for t in [holder, *threads]:
        t.join()
    # the prompt step(s) and the first decode build; the rest reuse, because the scheduler gave the
    # three consecutive sequence ids (scattered ones split every step in two decodes of two shapes)
    assert llm.scheduler.graphs_reused - before >= (llm.scheduler.stats.steps - steps) - 4


def test_leaving_a_stream_early_frees_the_slot(llm: Llama) -> None:
    gen = llm.generate("x", max_tokens=400, temperature=0.0, ignore_eos=True)
    first = next(gen)
    assert first.text or first.tokens
    assert llm.scheduler.active_slots >= 1
    gen.close()
    wait_until(lambda: llm.scheduler.active_slots == 0)


def test_async_generate_and_cancellation(llm: Llama) -> None:
    async def main() -> tuple[str, int]:
        parts = []
        async for chunk in llm.agenerate("x", max_tokens=5, temperature=0.0, ignore_eos=True):
            parts.append(chunk)
        with trio.move_on_after(0.05):
            async for _ in llm.agenerate("x", max_tokens=100000, temperature=0.0, ignore_eos=True):
                pass
        return "".join(c.text for c in parts), parts[-1].usage.completion_tokens  # type: ignore[union-attr]

    text, n = trio.run(main)
    assert n == 5
    wait_until(lambda: llm.scheduler.active_slots == 0)


def test_chat_template_renders_messages(llm: Llama) -> None:
    r = llm.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert r["prompt"] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# A Hermes-style template that renders tools and tool calls, so llama.cpp's chat library derives
# the call format (and the grammar that forces it) from the template itself.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. Tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
To call one, reply with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# enum arguments and bounded strings keep a random-weight model's answer short (a free string can
# run on until max_tokens, depending on the engine's last-bit logits)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                          "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
DAY = {"type": "function", "function": {"name": "get_day", "description": "Day",
       "parameters": {"type": "object", "properties": {"off": {"enum": [0, 1]}}, "required": ["off"]}}}


@pytest.fixture(scope="module")
def tool_llm(backend: str, tiny_qwen: Path) -> Iterator[Llama]:
    with Llama(tiny_qwen, backend=backend, n_ctx=1024, n_batch=64, n_ubatch=64, n_parallel=2, n_threads=2,
               chat_template=TOOL_TEMPLATE) as m:
        yield m


def test_template_with_tools_renders_them(tool_llm: Llama) -> None:
    r = tool_llm.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[WEATHER])
    assert '"name": "get_weather"' in r["prompt"]
    assert r["prompt"].endswith("<|im_start|>assistant\n")
    assert "<tool_call>" in r["preserved_tokens"]


def test_required_tool_choice_forces_a_parsed_call(tool_llm: Llama) -> None:
    res = tool_llm.chat([{"role": "user", "content": "Weather in Paris?"}], [WEATHER], tool_choice="required",
                        max_tokens=120, temperature=0.0)
    assert res.finish_reason == "tool_calls", res.raw_text
    call = res.tool_calls[0]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert call["id"]
    assert not res.message.get("content")


def test_named_tool_choice_picks_that_function(tool_llm: Llama) -> None:
    res = tool_llm.chat([{"role": "user", "content": "?"}], [WEATHER, TIME],
                        tool_choice={"type": "function", "function": {"name": "get_time"}},
                        max_tokens=200, temperature=0.0)
    assert [c["function"]["name"] for c in res.tool_calls] == ["get_time"], res.raw_text
    assert res.finish_reason == "tool_calls"


def test_parallel_forced_calls_are_a_list(tool_llm: Llama) -> None:
    res = tool_llm.chat([{"role": "user", "content": "?"}], [DAY, TIME], tool_choice="required",
                        parallel_tool_calls=True, max_tokens=120, temperature=0.0)
    # greedy random weights repeat calls until max_tokens: the finished ones are kept
    assert len(res.tool_calls) >= 2, res.raw_text
    assert res.raw_text.lstrip().startswith("[")
    assert {c["function"]["name"] for c in res.tool_calls} <= {"get_day", "get_time"}
    assert len({c["id"] for c in res.tool_calls}) == len(res.tool_calls)


def test_tool_results_reach_the_template(tool_llm: Llama) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    prompt = tool_llm.apply_chat_template(messages, tools=[WEATHER])["prompt"]
    if tool_llm.engine_name == "ik_llama_cpp":
        # ik's chat library hands a template the arguments as the JSON string the client sent;
        # llama.cpp's turns them into an object for templates that expect one (as this one does)
        assert '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}' in prompt
    else:
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_unknown_named_tool_is_a_request_error(tool_llm: Llama) -> None:
    with pytest.raises(InvalidRequestError, match="nope"):
        tool_llm.chat([{"role": "user", "content": "?"}], [WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})


def test_json_schema_response_format_through_chat(tool_llm: Llama) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    res = tool_llm.chat([{"role": "user", "content": "?"}], json_schema=schema, max_tokens=40, temperature=0.0)
    assert res.finish_reason == "stop", res.raw_text
    assert isinstance(json.loads(res.message["content"])["ok"], bool)


def test_embeddings_are_pooled_and_normalized(llm: Llama) -> None:
    e = llm.embed(["hello", "a longer sentence here"])
    assert e.shape == (2, llm.info["n_embd"])
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(e[0], e[1])
    again = llm.embed("hello")
    assert np.allclose(again[0], e[0], atol=1e-5)


def test_unknown_sampling_parameter_is_named(llm: Llama) -> None:
    with pytest.raises(InvalidRequestError, match="temprature"):
        llm.complete("x", temprature=0.5)


def test_auto_tool_choice_uses_a_lazy_grammar_and_parses_the_native_syntax(tool_llm: Llama) -> None:
    from pylocalai.engine.chat import parse_answer, plan_chat

    plan = plan_chat(tool_llm, [{"role": "user", "content": "What time is it?"}], tools=[TIME], tool_choice="auto")
    # the grammar engages only once the model writes the template's call marker
    assert plan.sampling["grammar_lazy"] is True and plan.sampling["grammar_kind"] == "tool_calls"
    assert any("<tool_call>" in t[1] for t in plan.sampling["grammar_triggers"])
    # what a model following the template writes is read back by llama.cpp's parser
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    msg = parse_answer(tool_llm, plan, text)
    assert msg["content"].strip() == "Let me check."
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"]) == {"tz": "UTC"}
    assert call["id"].startswith("call_")
    # a partial call while streaming: no content leak of the marker, the name appears once complete
    partial = parse_answer(tool_llm, plan, 'Let me check.\n<tool_call>\n{"name": "get_ti', is_partial=True)
    assert "<tool_call>" not in (partial.get("content") or "")


def test_auto_tool_choice_may_answer_in_text(tool_llm: Llama) -> None:
    res = tool_llm.chat([{"role": "user", "content": "Hello"}], [TIME], tool_choice="auto", max_tokens=8, temperature=0.0)
    assert res.tool_calls == [] and res.finish_reason in ("stop", "length")
    assert res.message["content"] == res.raw_text


def test_a_user_grammar_replaces_the_templates_grammar_setup(tool_llm: Llama) -> None:
    # a schema makes the template's output-format grammar (with its generation-prompt prefill);
    # the caller's own grammar must then apply from the first generated token
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    res = tool_llm.chat([{"role": "user", "content": "?"}], json_schema=schema, grammar='root ::= "yes"',
                        max_tokens=5, temperature=0.0)
    assert res.raw_text == "yes"


def test_close_frees_the_model_at_once(backend: str, tiny_llama: Path) -> None:
    import gc
    import weakref

    gc.disable()  # only reference counting: the model must go at close(), not at a later collection
    try:
        llm = Llama(tiny_llama, backend=backend, n_ctx=256, n_parallel=1, n_threads=2)
        assert llm.complete("x", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        info = llm.info
        native = weakref.ref(llm._model)
        llm.close()
        assert native() is None  # the native model (and its context) are gone
        assert llm.info == info  # what was read at load stays readable
        with pytest.raises(EngineError, match="closed"):
            llm.tokenize("x")
        with pytest.raises(EngineError, match="closed"):
            llm.complete("x", max_tokens=1)
    finally:
        gc.enable()
