"""ik_llama.cpp's own knobs: one table for the Python API (`Llama(..., repack_tensors=True)`) and the
YAML `options:` list (`- rtr`, `- amb:512`), with the checks that turn a knob that cannot work into
a clear error instead of a silent no-op."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pylocalai.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class Knob:
    name: str  # Llama(...) keyword = engine parameter
    level: str  # "model" (applied at load) or "context"
    kind: type  # bool, int or float
    aliases: tuple[str, ...]  # YAML option spellings besides the name (ik's own command-line names)
    needs: str = ""  # "gpu": only has an effect when layers can live off the CPU
    help: str = ""


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("repack_tensors", "model", bool, ("rtr", "run_time_repack"),
         help="repack quantized weights into row-interleaved CPU layouts at load"),
    Knob("use_thp", "model", bool, ("thp",), help="transparent huge pages for the weights (Linux)"),
    Knob("merge_qkv", "model", bool, ("mqkv",), help="merge separate Q, K, V weights into one matrix"),
    Knob("merge_up_gate_exps", "model", bool, ("muge",), help="merge MoE up and gate expert weights"),
    Knob("validate_quants", "model", bool, ("vq", "validate_quantized"),
         help="check quantized weights for NaN/Inf at load"),
    Knob("mla", "model", int, (), help="MLA weight preparation for DeepSeek-style models (0-3)"),
    Knob("n_cpu_moe", "model", int, ("cpu_moe", "ncmoe"), needs="gpu",
         help="keep the MoE experts of the first N layers in CPU memory"),
    Knob("mla_attn", "context", int, (), help="MLA attention variant for DeepSeek-style models (0-3)"),
    Knob("attn_max_batch", "context", int, ("amb",),
         help="split attention so that one K*Q product stays under this many MiB; 0 off"),
    Knob("fused_moe_up_gate", "context", bool, ("fmoe", "fused_moe"), help="fused MoE up/gate experts"),
    Knob("fused_up_gate", "context", bool, ("fug",), help="fused up * act(gate) in dense FFNs"),
    Knob("fused_mmad", "context", bool, ("fmad",), help="fused multiply + multi-add"),
    Knob("grouped_expert_routing", "context", bool, ("ger",), help="grouped expert routing (MoE)"),
    Knob("rope_cache", "context", bool, ("rcache",), help="compute RoPE sin/cos once per graph"),
    Knob("graph_reuse", "context", bool, ("gr",), help="reuse the compute graph between token steps"),
    Knob("min_experts", "context", int, (), help="smart expert reduction: keep at least this many experts"),
    Knob("thresh_experts", "context", float, (), help="smart expert reduction: drop experts below this share"),
    Knob("only_active_experts", "context", bool, ("ooae",), needs="gpu",
         help="upload only the experts a batch uses (hybrid CPU/GPU)"),
    Knob("k_cache_hadamard", "context", bool, ("khad",), help="Hadamard transform on the K cache"),
    Knob("v_cache_hadamard", "context", bool, ("vhad",), help="Hadamard transform on the V cache"),
)}

# YAML spelling -> knob name. `ser:MIN,THRESH` is ik's combined smart-expert-reduction option.
ALIASES: dict[str, str] = {a: k.name for k in KNOBS.values() for a in (k.name, *k.aliases)}
# the MoE architectures whose ik loader can merge the experts' up and gate weights
MERGE_UP_GATE_ARCHITECTURES = frozenset({
    "bailingmoe2", "dbrx", "deepseek2", "dots1", "glm4moe", "hunyuan-moe", "llama4", "mimo2", "minimax-m2",
    "gpt-oss", "qwen2moe", "qwen35moe", "qwen3moe", "qwen3next", "step35",
})
# the architectures whose ik graph builds a RoPE cache (build_qwen3, build_gemma3, build_deepseek2)
ROPE_CACHE_ARCHITECTURES = frozenset({"qwen3", "gemma3", "deepseek2"})
MLA_ARCHITECTURES = frozenset({"deepseek2", "glm-dsa", "mistral4"})  # ik: is_mla_attn
IK_ENGINE = "ik_llama_cpp"


def convert(name: str, value: Any) -> Any:
    """A knob's value in its type; bools accept the usual YAML/CLI spellings."""
    kind = KNOBS[name].kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise InvalidRequestError(f"{name} expects true or false, got {value!r}", param=name)
    try:
        if isinstance(value, bool):
            raise ValueError  # noqa: TRY004 - one message for every value that is not a number
        out = kind(str(value).strip()) if isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{name} expects {'an integer' if kind is int else 'a number'}, "
                                  f"got {value!r}", param=name) from None
    if out < 0:
        raise InvalidRequestError(f"{name} must not be negative, got {value!r}", param=name)
    return out


def parse_option(key: str, value: str) -> dict[str, Any] | None:
    """The knobs one YAML `options:` entry sets, or None when the key is not an ik knob."""
    if key == "ser":
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2:
            raise InvalidRequestError(f"ser expects MIN,THRESH (e.g. ser:4,0.5), got {value!r}", param="ser")
        return {"min_experts": convert("min_experts", parts[0]), "thresh_experts": convert("thresh_experts", parts[1])}
    name = ALIASES.get(key)
    if name is None:
        return None
    converted = convert(name, value)
    if name == "mla":  # ik's -mla sets the load-time preparation and the attention variant together
        return {"mla": converted, "mla_attn": converted}
    return {name: converted}


def split(engine_key: str, knobs: Mapping[str, Any], *, has_gpu: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the knobs for an engine and split them into (model params, context params)."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise InvalidRequestError(f"unknown engine option(s) {', '.join(unknown)}; ik_llama.cpp's are: "
                                  f"{', '.join(sorted(KNOBS))}", param=unknown[0])
    if knobs and engine_key != IK_ENGINE:
        name = min(knobs)
        raise InvalidRequestError(f"{name} is an ik_llama.cpp option; select that engine with "
                                  f"backend: ik-llama-cpp", param=name)
    model: dict[str, Any] = {}
    context: dict[str, Any] = {}
    for name, value in knobs.items():
        knob = KNOBS[name]
        value = convert(name, value)
        if knob.needs == "gpu" and not has_gpu and value:
            raise InvalidRequestError(f"{name} only matters when layers are offloaded to a GPU, and this "
                                      f"build of ik_llama.cpp has only the CPU backend", param=name)
        (model if knob.level == "model" else context)[name] = value
    for name in ("mla", "mla_attn"):
        if name in knobs and not 0 <= knobs[name] <= 3:
            raise InvalidRequestError(f"{name} must be 0, 1, 2 or 3", param=name)
    for name in ("min_experts", "thresh_experts"):
        if name in knobs:
            # ik's graph builder has its smart-expert-reduction call commented out in this version
            raise InvalidRequestError(f"{name} (smart expert reduction, ser) has no effect in this ik_llama.cpp "
                                      f"version: its graph no longer applies it", param=name)
    if knobs.get("merge_up_gate_exps") and knobs.get("fused_moe_up_gate") is False:
        # ik's unfused MoE path asserts that no merged tensor exists
        raise InvalidRequestError("merge_up_gate_exps needs fused_moe_up_gate (on by default)",
                                  param="merge_up_gate_exps")
    return model, context


def free_huge_page_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of reserved, free huge pages (HugePages_Free x Hugepagesize); 0 where unknown."""
    fields: dict[str, int] = {}
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key.strip()] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return fields.get("HugePages_Free", 0) * fields.get("Hugepagesize", 0) * 1024


def check_load(model_knobs: Mapping[str, Any], model_params: dict[str, Any], file_size: int) -> None:
    """Load-time knobs and the model parameters they need (the Llama call fills model_params)."""
    if model_knobs.get("repack_tensors"):
        # ik repacks weights it has read into its own buffers, never those of a read-only mapping
        # (its -rtr switch turns mmap off the same way)
        model_params["use_mmap"] = False
    if model_knobs.get("use_thp"):
        if not model_params.get("use_mmap", True):
            raise InvalidRequestError("use_thp loads the weights through huge-page mappings, which needs "
                                      "use_mmap (and no repack_tensors)", param="use_thp")
        free = free_huge_page_bytes()
        if free < file_size:
            raise InvalidRequestError(
                f"use_thp maps the weights into reserved huge pages (MAP_HUGETLB), but only "
                f"{free // 2**20} MiB are free (HugePages_Free in /proc/meminfo) for a "
                f"{file_size // 2**20} MiB model; reserve more with sysctl vm.nr_hugepages", param="use_thp")


def check_model(knobs: Mapping[str, Any], info: Mapping[str, Any], *, flash_attn: bool = False) -> None:
    """Knobs that the loaded model cannot use: a clear error rather than silently nothing."""
    arch = str(info.get("architecture", ""))
    if knobs.get("attn_max_batch") and flash_attn and arch not in MLA_ARCHITECTURES:
        # ik splits the K*Q product of its plain attention, which flash attention never forms
        raise InvalidRequestError("attn_max_batch splits attention computed without flash attention: set "
                                  "flash_attention off to use it (or use it with an MLA model)", param="attn_max_batch")
    for name in ("mla", "mla_attn"):
        if knobs.get(name) and arch not in MLA_ARCHITECTURES:
            raise InvalidRequestError(f"{name} applies to models with multi-head latent attention "
                                      f"({', '.join(sorted(MLA_ARCHITECTURES))}); this model is {arch}",
                                      param=name)
    if knobs.get("rope_cache") and arch not in ROPE_CACHE_ARCHITECTURES:
        raise InvalidRequestError(f"rope_cache applies to {', '.join(sorted(ROPE_CACHE_ARCHITECTURES))} models in "
                                  f"ik_llama.cpp; this model is {arch}", param="rope_cache")
    try:
        n_expert = int(dict(info.get("metadata") or {}).get(f"{arch}.expert_count", 0))
    except ValueError:
        n_expert = 0
    for name in ("merge_up_gate_exps", "grouped_expert_routing"):
        if knobs.get(name) and n_expert == 0:
            raise InvalidRequestError(f"{name} applies to mixture-of-experts models; this model has no "
                                      f"experts", param=name)
    if knobs.get("merge_up_gate_exps") and arch not in MERGE_UP_GATE_ARCHITECTURES:
        raise InvalidRequestError(f"merge_up_gate_exps: ik_llama.cpp merges expert weights for "
                                  f"{', '.join(sorted(MERGE_UP_GATE_ARCHITECTURES))}; this model is {arch}",
                                  param="merge_up_gate_exps")
    if knobs.get("grouped_expert_routing") and arch != "bailingmoe2":
        raise InvalidRequestError(f"grouped_expert_routing applies to bailingmoe2 models in ik_llama.cpp; this "
                                  f"model is {arch}", param="grouped_expert_routing")
