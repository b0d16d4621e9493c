"""Generate tiny random-weight GGUF models for fast unit tests.

Real models are hundreds of megabytes and slow to load; the tests only need
files that the engine accepts and can run a forward pass on.  The models made
here have random weights (so their output is gibberish) but real hyperparameter
keys, real tensor names/shapes and a real tokenizer, which is exactly what the
loader, the tokenizer, the sampler and the batching code exercise.

Three architectures are provided because the engine treats them differently:

* ``llama``  - a plain transformer with a KV cache (positions can be cut back).
* ``rwkv6``  - a recurrent model whose state cannot be rewound to a prefix.
* ``gemma3`` - sliding-window attention: old positions leave the cache of most layers.

For multimodal tests, ``write_tiny_mmproj`` writes a matching vision projector
(a CLIP encoder plus a LLaVA "mlp" projector, loaded by llama.cpp's libmtmd)
and ``write_png`` makes test images without an imaging library.

The tokenizer is copied from llama.cpp's ``models/ggml-vocab-llama-spm.gguf``
(a vocab-only GGUF shipped with the engine source), so no download is needed.

Run ``python tests/ggufgen.py OUTDIR`` to write the models for manual use.
"""
from __future__ import annotations

import functools
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_GGUF_PY = ROOT / "third_party" / "llama.cpp" / "gguf-py"
# Prefer the gguf-py that matches the vendored engine, so the key and tensor
# names we write are the ones this engine version reads.  An installed `gguf`
# package is only a fallback (e.g. for an sdist without third_party/).
if _GGUF_PY.is_dir() and str(_GGUF_PY) not in sys.path:
    sys.path.insert(0, str(_GGUF_PY))

import gguf  # noqa: E402

VOCAB_SPM = ROOT / "third_party" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}

_FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------

class _RawValue(bytes):
    """An already-serialized GGUF value (payload after the type tag).

    Re-packing a 32k-entry vocab item by item through GGUFWriter costs ~0.5 s;
    copying its bytes verbatim is instant and also guarantees every token,
    score and type round-trips bit-exactly.
    """


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can emit `_RawValue` payloads unchanged."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if isinstance(val, _RawValue):
            return (self._pack("I", vtype) if add_vtype else b"") + bytes(val)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


_SCALAR_SIZE: dict[int, int] = {
    gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8, gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8,
}


def _skip_value(buf: bytes, off: int, vtype: int) -> tuple[int, int]:
    """Return (end offset, element count) of the GGUF value of ``vtype`` at ``off``."""
    if vtype in _SCALAR_SIZE:
        return off + _SCALAR_SIZE[vtype], 1
    if vtype == gguf.GGUFValueType.STRING:
        (n,) = struct.unpack_from("<Q", buf, off)
        return off + 8 + n, 1
    if vtype == gguf.GGUFValueType.ARRAY:
        sub, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if sub in _SCALAR_SIZE:
            return off + count * _SCALAR_SIZE[sub], count
        for _ in range(count):
            off, _n = _skip_value(buf, off, sub)
        return off, count
    raise ValueError(f"unknown GGUF value type {vtype}")


@functools.lru_cache(maxsize=4)
def _tokenizer_kv(vocab_path: str) -> tuple[tuple[str, gguf.GGUFValueType, _RawValue, int], ...]:
    """Return every ``tokenizer.*`` field of a vocab GGUF as (key, type, raw payload, count).

    This walks the GGUF KV section directly instead of using gguf.GGUFReader:
    the reader builds a numpy view per string and takes ~3 s on the 32k-token
    SPM vocab, which would dominate test time.  Keeping the serialized payload
    preserves each field's exact GGUF types (string array, float32 scores,
    int32 token types, uint32 ids, bools).  Cached per process.
    """
    buf = Path(vocab_path).read_bytes()
    magic, version, _n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    if magic != gguf.GGUF_MAGIC or version < 2:
        raise ValueError(f"{vocab_path}: not a little-endian GGUF v2+ file")
    off = 24
    out: list[tuple[str, gguf.GGUFValueType, _RawValue, int]] = []
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, off)
        key = buf[off + 8:off + 8 + klen].decode("utf-8")
        (vtype,) = struct.unpack_from("<I", buf, off + 8 + klen)
        start = off + 12 + klen
        off, count = _skip_value(buf, start, vtype)
        if key.startswith("tokenizer."):
            out.append((key, gguf.GGUFValueType(vtype), _RawValue(buf[start:off]), count))
    return tuple(out)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab_path: Path, chat_template: str | None) -> int:
    """Copy the tokenizer into ``writer`` and return the vocabulary size.

    The vocab size is what the token embedding and output matrices must match,
    so it is derived from the copied token list rather than hard-coded.
    """
    n_vocab = 0
    for key, vtype, raw, count in _tokenizer_kv(str(vocab_path)):
        if key == gguf.Keys.Tokenizer.CHAT_TEMPLATE and chat_template is not None:
            continue  # replaced below
        writer.add_key_value(key, raw, vtype)
        if key == gguf.Keys.Tokenizer.LIST:
            n_vocab = count
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if n_vocab == 0:
        raise ValueError(f"{vocab_path}: no {gguf.Keys.Tokenizer.LIST} field")
    return n_vocab


# ---------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------

# (bytes per 32-element block, std of the integer codes we draw)
_QUANT_BLOCK: dict[gguf.GGMLQuantizationType, tuple[int, float]] = {
    gguf.GGMLQuantizationType.Q8_0: (34, float(np.sqrt((255**2 - 1) / 12))),  # codes -127..127
    gguf.GGMLQuantizationType.Q4_0: (18, float(np.sqrt((15**2 - 1) / 12))),   # codes -7..7
}


class _Tensors:
    """Random-tensor factory bound to one writer and one RNG.

    Shapes are given in numpy order, i.e. reversed ggml ``ne``: a numpy array
    of shape (n_vocab, n_embd) becomes ggml ne = {n_embd, n_vocab}.
    """

    def __init__(self, writer: gguf.GGUFWriter, seed: int) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, data: np.ndarray, dtype: str = "f32") -> None:
        """Add float ``data`` stored as f32 or f16."""
        np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
        self.writer.add_tensor(name, np.ascontiguousarray(data, dtype=np_dtype))

    def random(self, name: str, shape: tuple[int, ...], dtype: str = "f32", scale: float = 0.02) -> None:
        """Zero-mean random tensor with standard deviation ``scale``.

        A small scale keeps activations bounded through a few layers.  For
        quantized types the integer codes are drawn directly (uniform,
        symmetric) with one shared block scale, instead of quantizing floats:
        gguf.quants would take ~0.25 s per 32000 x 64 matrix.
        """
        qtype = _DTYPES[dtype]
        if qtype not in _QUANT_BLOCK:
            self.add(name, self.rng.standard_normal(shape, dtype=np.float32) * scale, dtype)
            return
        block_bytes, code_std = _QUANT_BLOCK[qtype]
        if shape[-1] % 32:
            raise ValueError(f"{name}: last dim {shape[-1]} must be a multiple of 32 for {dtype}")
        n_blocks = int(np.prod(shape)) // 32
        d = np.full((n_blocks, 1), scale / code_std, dtype=np.float16).view(np.uint8)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            qs = self.rng.integers(-127, 128, size=(n_blocks, 32), dtype=np.int8).view(np.uint8)
        else:  # Q4_0: two 4-bit codes per byte, value = (code - 8) * d, codes 1..15
            lo = self.rng.integers(1, 16, size=(n_blocks, 16), dtype=np.uint8)
            hi = self.rng.integers(1, 16, size=(n_blocks, 16), dtype=np.uint8)
            qs = lo | (hi << np.uint8(4))
        raw = np.concatenate([d, qs], axis=1).reshape(*shape[:-1], shape[-1] // 32 * block_bytes)
        # uint8 data + raw_dtype: the writer converts the byte shape to the element shape
        self.writer.add_tensor(name, raw, raw_dtype=qtype)

    def const(self, name: str, shape: tuple[int, ...], value: float) -> None:
        """Constant F32 tensor (norm weights = 1, biases = 0, lerp mixes)."""
        self.add(name, np.full(shape, value, dtype=np.float32))


def _finish(writer: gguf.GGUFWriter) -> None:
    """Write header, KV data and tensors, then close (no progress bar: no tqdm needed)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


# ---------------------------------------------------------------------------
# llama
# ---------------------------------------------------------------------------

def _transformer_writer(path: Path, arch: str, dtype: str, n_ctx_train: int, n_embd: int, n_layer: int,
                        n_ff: int, n_head: int, n_head_kv: int, rms_eps: float) -> _Writer:
    """A writer with the hyperparameters every transformer here shares."""
    w = _Writer(path, arch)
    w.add_name(f"tiny-{arch}-test")
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(rms_eps)
    return w


def write_tiny_llama(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    seed: int = 0,
    chat_template: str | None = CHATML,
    dtype: str = "f32",
    vocab_dtype: str = "q4_0",
    tie_embeddings: bool = False,
    vocab_path: str | Path = VOCAB_SPM,
    n_expert: int = 0,
    n_expert_used: int = 2,
    arch: str = "llama",
    raw_tensors: dict[str, tuple[int, np.ndarray]] | None = None,
) -> Path:
    """Write a tiny random ``llama`` model (GQA transformer with KV cache).

    ``n_expert > 0`` makes the FFN a mixture of experts (Mixtral-style: a router plus stacked
    gate/up/down expert weights, ``n_expert_used`` experts per token). ``arch="qwen3"`` writes the
    same transformer as Qwen3 (per-head RMS norms on Q and K), ``arch="qwen3moe"`` its MoE variant.
    ``raw_tensors`` replaces named layer tensors by raw rows of a ggml type that gguf-py does not
    know (e.g. ik_llama.cpp's IQ4_KS = 144): name -> (type id, uint8 array of shape (rows, row bytes)).
    ``dtype`` applies to the per-layer matrices.  ``vocab_dtype`` applies to the
    two n_vocab x n_embd matrices, which dominate the file size (32000 x 64:
    8 MB each in F32, 2.2 MB in Q8_0, 1.2 MB in Q4_0); Q4_0 keeps the file
    around 3 MB while the layer weights stay exact floats.
    ``tie_embeddings`` omits ``output.weight`` (llama.cpp then reuses
    ``token_embd``), which exercises that loader path and halves the size.
    ``n_head_kv < n_head`` so grouped-query attention is exercised.
    """
    _check_dtype(dtype)
    _check_dtype(vocab_dtype)
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be divisible by n_head and n_head by n_head_kv")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head dimension must be even for RoPE")

    path = Path(path)
    if arch not in ("llama", "qwen3", "qwen3moe"):
        raise ValueError(f"arch must be llama, qwen3 or qwen3moe, got {arch!r}")
    if (arch == "qwen3moe") != bool(n_expert) and arch != "llama":
        raise ValueError("qwen3moe needs n_expert > 0 (and qwen3 none)")
    w = _transformer_writer(path, arch, dtype, n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv, 1e-5)
    w.add_rope_dimension_count(head_dim)  # llama requires n_rot == head_dim
    w.add_rope_freq_base(10000.0)
    n_vocab = _add_tokenizer(w, Path(vocab_path), chat_template)
    w.add_vocab_size(n_vocab)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(n_ff)

    t = _Tensors(w, seed)
    t.random("token_embd.weight", (n_vocab, n_embd), vocab_dtype, scale=1.0)
    t.const("output_norm.weight", (n_embd,), 1.0)
    if not tie_embeddings:
        t.random("output.weight", (n_vocab, n_embd), vocab_dtype)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.const(p + "attn_norm.weight", (n_embd,), 1.0)
        if p + "attn_q.weight" in (raw_tensors or {}):
            w.add_tensor(p + "attn_q.weight", raw_tensors[p + "attn_q.weight"][1], raw_dtype=gguf.GGMLQuantizationType.I8)
        else:
            t.random(p + "attn_q.weight", (n_head * head_dim, n_embd), dtype)
        t.random(p + "attn_k.weight", (n_head_kv * head_dim, n_embd), dtype)
        t.random(p + "attn_v.weight", (n_head_kv * head_dim, n_embd), dtype)
        t.random(p + "attn_output.weight", (n_embd, n_head * head_dim), dtype)
        if arch in ("qwen3", "qwen3moe"):
            t.const(p + "attn_q_norm.weight", (head_dim,), 1.0)
            t.const(p + "attn_k_norm.weight", (head_dim,), 1.0)
        t.const(p + "ffn_norm.weight", (n_embd,), 1.0)
        if n_expert:
            t.random(p + "ffn_gate_inp.weight", (n_expert, n_embd), "f32", scale=1.0)
            t.random(p + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd), dtype)
            t.random(p + "ffn_up_exps.weight", (n_expert, n_ff, n_embd), dtype)
            t.random(p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff), dtype)
        else:
            t.random(p + "ffn_gate.weight", (n_ff, n_embd), dtype)
            t.random(p + "ffn_up.weight", (n_ff, n_embd), dtype)
            t.random(p + "ffn_down.weight", (n_embd, n_ff), dtype)
    _finish(w)
    if raw_tensors:
        _retype(path, {name: (type_id, n_embd) for name, (type_id, _) in raw_tensors.items()})
    return path


def write_tiny_gemma3(
    path: str | Path,
    *,
    n_layer: int = 6,
    n_swa: int = 16,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    seed: int = 0,
    vocab_path: str | Path = VOCAB_SPM,
) -> Path:
    """Write a tiny random ``gemma3`` model: sliding-window attention (``n_swa`` positions) in five of
    every six layers, full attention in the sixth, per-head Q/K norms and post-norms, tied embeddings.

    llama.cpp keeps only about the last ``n_swa + n_ubatch`` positions in the sliding-window layers'
    cache, so the oldest cached positions of a long sequence are gone there: what prefix reuse must
    respect. All weights are f32, so a reused prefix and a fresh evaluation agree to rounding."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be divisible by n_head and n_head by n_head_kv")
    head_dim = n_embd // n_head
    path = Path(path)
    w = _transformer_writer(path, "gemma3", "f32", n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv, 1e-6)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(n_swa)
    n_vocab = _add_tokenizer(w, Path(vocab_path), CHATML)
    w.add_vocab_size(n_vocab)

    t = _Tensors(w, seed)
    t.random("token_embd.weight", (n_vocab, n_embd), "f32", scale=0.1)
    t.const("output_norm.weight", (n_embd,), 1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            t.const(p + norm + ".weight", (n_embd,), 1.0)
        t.const(p + "attn_q_norm.weight", (head_dim,), 1.0)
        t.const(p + "attn_k_norm.weight", (head_dim,), 1.0)
        t.random(p + "attn_q.weight", (n_head * head_dim, n_embd), "f32", scale=0.2)
        t.random(p + "attn_k.weight", (n_head_kv * head_dim, n_embd), "f32", scale=0.2)
        t.random(p + "attn_v.weight", (n_head_kv * head_dim, n_embd), "f32", scale=0.2)
        t.random(p + "attn_output.weight", (n_embd, n_head * head_dim), "f32", scale=0.2)
        t.random(p + "ffn_gate.weight", (n_ff, n_embd), "f32", scale=0.2)
        t.random(p + "ffn_up.weight", (n_ff, n_embd), "f32", scale=0.2)
        t.random(p + "ffn_down.weight", (n_embd, n_ff), "f32", scale=0.2)
    _finish(w)
    return path


def _retype(path: Path, types: dict[str, tuple[int, int]]) -> None:
    """Rewrite the type id and row length of tensors written as raw bytes, in place."""
    reader = gguf.GGUFReader(path, "r+")
    for tensor in reader.tensors:
        if tensor.name in types:
            type_id, ne0 = types[tensor.name]
            parts = tensor.field.parts
            parts[3][0] = ne0  # dims (ggml order): the row length, in values instead of bytes
            parts[4][0] = type_id
    reader.data.flush()


# ---------------------------------------------------------------------------
# rwkv6
# ---------------------------------------------------------------------------

def write_tiny_rwkv6(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    head_size: int = 64,  # ggml's CUDA kernel takes 64 or 128 (as real RWKV6 models have) and aborts on others
    n_ff: int = 128,
    time_mix_extra_dim: int = 8,
    time_decay_extra_dim: int = 16,
    rescale_every_n_layers: int = 0,
    n_ctx_train: int = 1048576,
    seed: int = 0,
    chat_template: str | None = CHATML,
    dtype: str = "f32",
    vocab_dtype: str = "q4_0",
    vocab_path: str | Path = VOCAB_SPM,
) -> Path:
    """Write a tiny random ``rwkv6`` model (recurrent, fixed-size state).

    Keys and shapes follow llama.cpp ``src/models/rwkv6.cpp`` (and
    ``conversion/rwkv.py``, which writes real RWKV6 files): ``head_count`` is 0
    because RWKV has no attention heads (so head_count_kv is 0 too and the
    grouped-head path is skipped), ``token_shift_count`` must be 2, and the
    five time-mix lerps are stored fused as ``time_mix_lerp_fused``.  The
    SPM vocab is used instead of the RWKV "world" tokenizer, which llama.cpp
    accepts since vocab loading is architecture independent.
    """
    _check_dtype(dtype)
    _check_dtype(vocab_dtype)
    if n_embd % head_size:
        raise ValueError("n_embd must be divisible by head_size")
    n_head = n_embd // head_size

    path = Path(path)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.RWKV6]
    w = _Writer(path, arch)
    w.add_name("tiny-rwkv6-test")
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(0)  # required by llama.cpp, unused (no attention)
    w.add_layer_norm_eps(1e-5)
    w.add_rescale_every_n_layers(rescale_every_n_layers)
    w.add_wkv_head_size(head_size)
    w.add_time_mix_extra_dim(time_mix_extra_dim)
    w.add_time_decay_extra_dim(time_decay_extra_dim)
    w.add_token_shift_count(2)
    n_vocab = _add_tokenizer(w, Path(vocab_path), chat_template)
    w.add_vocab_size(n_vocab)

    t = _Tensors(w, seed)
    t.random("token_embd.weight", (n_vocab, n_embd), vocab_dtype, scale=1.0)
    t.const("token_embd_norm.weight", (n_embd,), 1.0)
    t.const("token_embd_norm.bias", (n_embd,), 0.0)
    t.const("output_norm.weight", (n_embd,), 1.0)
    t.const("output_norm.bias", (n_embd,), 0.0)
    t.random("output.weight", (n_vocab, n_embd), vocab_dtype)

    # The small "LoRA-like" time-mix/decay matrices and per-head tensors are
    # kept F32 like the converter does (they feed tanh/exp and the WKV op).
    for i in range(n_layer):
        p = f"blk.{i}."
        for norm in ("attn_norm", "attn_norm_2", "time_mix_ln"):
            t.const(p + norm + ".weight", (n_embd,), 1.0)
            t.const(p + norm + ".bias", (n_embd,), 0.0)
        # ne {n_embd, extra*5} and {extra, n_embd, 5}
        t.random(p + "time_mix_w1.weight", (time_mix_extra_dim * 5, n_embd))
        t.random(p + "time_mix_w2.weight", (5, n_embd, time_mix_extra_dim))
        # lerp mixes are in [0, 1] in trained models; 0.5 = average with x_prev
        t.const(p + "time_mix_lerp_x.weight", (1, 1, n_embd), 0.5)
        t.const(p + "time_mix_lerp_fused.weight", (5, 1, 1, n_embd), 0.5)
        # ne {head_size, n_head}: per-channel "bonus" for the current token
        t.random(p + "time_mix_first.weight", (n_head, head_size), scale=0.5)
        # decay w = exp(-exp(d)); d in [-6, -1] gives w in (0.69, 0.998) as in real models
        t.add(p + "time_mix_decay.weight", np.linspace(-6.0, -1.0, n_embd, dtype=np.float32))
        t.random(p + "time_mix_decay_w1.weight", (time_decay_extra_dim, n_embd))
        t.random(p + "time_mix_decay_w2.weight", (n_embd, time_decay_extra_dim))
        for name in ("key", "value", "receptance", "gate", "output"):
            t.random(p + f"time_mix_{name}.weight", (n_embd, n_embd), dtype)
        t.const(p + "channel_mix_lerp_k.weight", (1, 1, n_embd), 0.5)
        t.const(p + "channel_mix_lerp_r.weight", (1, 1, n_embd), 0.5)
        t.random(p + "channel_mix_key.weight", (n_ff, n_embd), dtype)        # ne {n_embd, n_ff}
        t.random(p + "channel_mix_value.weight", (n_embd, n_ff), dtype)      # ne {n_ff, n_embd}
        t.random(p + "channel_mix_receptance.weight", (n_embd, n_embd), dtype)
    _finish(w)
    return path


# ---------------------------------------------------------------------------
# mmproj: CLIP vision encoder + LLaVA "mlp" projector (llama.cpp libmtmd)
# ---------------------------------------------------------------------------

# OpenAI CLIP preprocessing constants (what real LLaVA-1.5 mmproj files carry)
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def write_tiny_mmproj(
    path: str | Path,
    *,
    n_embd_text: int = 64,
    image_size: int = 28,
    patch_size: int = 14,
    n_embd: int = 32,
    n_head: int = 4,
    n_ff: int = 64,
    n_layer: int = 2,
    class_token: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny random LLaVA-style multimodal projector (``clip.projector_type = "mlp"``).

    libmtmd loads it with ``mtmd_init_from_file(mmproj, text_model, params)``; ``n_embd_text``
    must equal the text model's ``n_embd`` (64 for ``write_tiny_llama``'s default), otherwise
    mtmd refuses the pair ("mismatch between text model (n_embd = ...) and mmproj").

    Token count: every image yields ``(image_size // patch_size) ** 2`` embeddings (4 with the
    defaults), each of ``n_embd_text`` floats.  The count is fixed: mtmd first resizes any image
    to ``image_size`` x ``image_size`` (aspect kept, bicubic, padded with RGB (122, 116, 104)),
    then normalizes it with ``CLIP_IMAGE_MEAN``/``CLIP_IMAGE_STD``.  No text is added around an
    image for this projector type: the ``<__media__>`` marker becomes exactly that one image
    chunk of 4 tokens.

    ``class_token=True`` adds ``v.class_embd`` like a real CLIP; the count stays the same, but
    this engine version's llava graph appends the class token *after* the patches
    (``ggml_concat(inp, class_embd, 1)``) and then drops row 0, so the output is patches
    1..n-1 followed by the class token, whose embedding hardly depends on the image (not at
    all with ``n_layer=1``).  Hence the default is no class token: each output token is then
    one image patch, row-major from the top-left, and every token differs between images.

    Encoder depth: the llava graph (``tools/mtmd/models/llava.cpp``) uses the penultimate layer,
    i.e. it runs only ``n_layer - 1`` blocks; all ``n_layer`` blocks must still be in the file.
    The default 2 thus runs one real attention + FFN block; ``n_layer=1`` runs none (patch
    embedding + position embedding + layer norms + projector only).

    Weights: the encoder uses the usual 0.02 scale (norms 1, biases 0); the patch embedding and
    the two projector matrices use 1/sqrt(fan_in), so that different images give clearly
    different embeddings of magnitude ~1, like the text model's token embeddings.  Everything is
    F32 (``v.class_embd`` must be F32 anyway: it is concatenated with F32 activations).
    """
    if image_size % patch_size or image_size < patch_size:
        raise ValueError("image_size must be a positive multiple of patch_size")
    if n_embd % n_head:
        raise ValueError("n_embd must be divisible by n_head")
    if n_layer < 1:
        raise ValueError("n_layer must be >= 1 (the llava graph runs n_layer - 1 of them)")
    n_patches = (image_size // patch_size) ** 2
    n_pos = n_patches + (1 if class_token else 0)

    path = Path(path)
    w = gguf.GGUFWriter(path, "clip")  # general.architecture of every mmproj (gguf MODEL_ARCH.MMPROJ)
    w.add_type("mmproj")
    w.add_name("tiny-llava-mmproj-test")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")  # PROJECTOR_TYPE_MLP in tools/mtmd/clip-impl.h
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)  # legacy key, not read any more
    # all of these are required by clip.cpp load_hparams (u32 / f32 types are asserted)
    w.add_vision_image_size(image_size)
    w.add_vision_patch_size(patch_size)
    w.add_vision_embedding_length(n_embd)
    w.add_vision_feed_forward_length(n_ff)
    w.add_vision_projection_dim(n_embd_text)
    w.add_vision_block_count(n_layer)
    w.add_vision_head_count(n_head)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean(list(CLIP_IMAGE_MEAN))  # float32 arrays of >= 3 values
    w.add_vision_image_std(list(CLIP_IMAGE_STD))
    w.add_vision_use_gelu(False)  # FFN activation = gelu_quick, as in OpenAI CLIP

    t = _Tensors(w, seed)
    # conv2d kernel, ggml ne {patch, patch, 3, n_embd} (= PyTorch Conv2d weight layout)
    t.random("v.patch_embd.weight", (n_embd, 3, patch_size, patch_size),
             scale=1.0 / np.sqrt(3 * patch_size * patch_size))
    if class_token:
        t.random("v.class_embd", (n_embd,))
    t.random("v.position_embd.weight", (n_pos, n_embd))  # ne {n_embd, n_pos}
    t.const("v.pre_ln.weight", (n_embd,), 1.0)
    t.const("v.pre_ln.bias", (n_embd,), 0.0)
    for i in range(n_layer):
        p = f"v.blk.{i}."
        for norm in ("ln1", "ln2"):
            t.const(p + norm + ".weight", (n_embd,), 1.0)
            t.const(p + norm + ".bias", (n_embd,), 0.0)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t.random(p + name + ".weight", (n_embd, n_embd))
            t.const(p + name + ".bias", (n_embd,), 0.0)
        # correctly named (ffn_up ne {n_embd, n_ff}); clip.cpp swaps up/down when
        # ffn_down's ne[0] == n_embd (legacy files), which only n_ff == n_embd would trigger
        t.random(p + "ffn_up.weight", (n_ff, n_embd))
        t.const(p + "ffn_up.bias", (n_ff,), 0.0)
        t.random(p + "ffn_down.weight", (n_embd, n_ff))
        t.const(p + "ffn_down.bias", (n_embd,), 0.0)
    t.const("v.post_ln.weight", (n_embd,), 1.0)
    t.const("v.post_ln.bias", (n_embd,), 0.0)
    # LLaVA-1.5 projector: Linear(n_embd -> n_embd_text), GELU, Linear(n_embd_text -> n_embd_text);
    # mtmd takes the output width from mm.2.weight's ne[1]
    t.random("mm.0.weight", (n_embd_text, n_embd), scale=1.0 / np.sqrt(n_embd))
    t.const("mm.0.bias", (n_embd_text,), 0.0)
    t.random("mm.2.weight", (n_embd_text, n_embd_text), scale=1.0 / np.sqrt(n_embd_text))
    t.const("mm.2.bias", (n_embd_text,), 0.0)
    _finish(w)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: str | Path | None, pixels: np.ndarray) -> bytes:
    """Encode ``pixels`` (uint8, shape (height, width, 3) RGB or (height, width, 4) RGBA) as PNG.

    Returns the PNG bytes and also writes them to ``path`` unless it is None.  Plain zlib +
    struct (8-bit, no filtering, no interlace), so tests need no imaging library; stb_image,
    which llama.cpp's mtmd uses to decode images, reads it.
    """
    px = np.asarray(pixels)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] not in (3, 4) or 0 in px.shape[:2]:
        raise ValueError(f"pixels must be a uint8 (height, width, 3 or 4) array, got {px.dtype} {px.shape}")
    height, width, channels = px.shape
    color_type = 2 if channels == 3 else 6  # truecolor / truecolor with alpha
    rows = np.ascontiguousarray(px).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)  # filter 0 per row
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
    if path is not None:
        Path(path).write_bytes(png)
    return png


def main(argv: list[str]) -> int:
    """CLI: ``python tests/ggufgen.py OUTDIR`` writes tiny-llama.gguf, tiny-rwkv6.gguf and tiny-mmproj.gguf."""
    if len(argv) != 1:
        print("usage: python tests/ggufgen.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for p in (write_tiny_llama(out / "tiny-llama.gguf"), write_tiny_rwkv6(out / "tiny-rwkv6.gguf"),
              write_tiny_mmproj(out / "tiny-mmproj.gguf")):
        print(f"{p}  {p.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
