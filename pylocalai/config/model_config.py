"""LocalAI-style model configs: YAML files in the models folder, plus loose .gguf files.

A YAML file holds one config or a list of them. Every error names the file and the field; a broken
config is reported and skipped, the others still load. Model names never leave the models folder.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pylocalai.engine import ik_options
from pylocalai.engine.backend import engine_key
from pylocalai.errors import InvalidRequestError

log = logging.getLogger(__name__)

_TRUE = {"true", "1", "yes", "on", "enabled"}
_FALSE = {"false", "0", "no", "off", "disabled"}


class _Loader(yaml.SafeLoader):
    """YAML as LocalAI (Go) reads it: only true/false are booleans (YAML 1.2), so `name: on` or a
    stopword `no` stay strings; boolean fields take yes/no/on/off through _flag."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != "tag:yaml.org,2002:bool"] for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def _scalar_text(v: Any) -> Any:
    """A number or boolean where a string belongs, as Go's YAML decoder reads it into a string field."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return v


def _flag(doc: dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = doc.get(key, default)
    if isinstance(v, bool):
        return v
    if v is None:
        return default
    t = str(v).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ConfigError(f"{where}: field {key!r} must be true or false, got {v!r}", param=key)


class ConfigError(InvalidRequestError):
    """A model config that cannot be used; the message names file and field."""


@dataclass(frozen=True, slots=True)
class TemplateConfig:
    chat: str = ""
    chat_message: str = ""
    completion: str = ""
    edit: str = ""
    function: str = ""
    multimodal: str = ""  # how a message's media and text make its content (LocalAI's default if empty)
    use_tokenizer_template: bool = False
    join_chat_messages_by_character: str | None = None
    reply_prefix: str = ""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """The effect of the `options:` list (LocalAI's llama.cpp table). Defaults are pylocalai's."""

    use_jinja: bool = False
    context_shift: bool = False
    parallel: int | None = None
    rpc_servers: tuple[str, ...] = ()
    slot_prompt_similarity: float = 0.1
    swa_full: bool = False
    cont_batching: bool = True
    check_tensors: bool = False
    warmup: bool = True
    no_op_offload: bool = False
    kv_unified: bool | None = None
    cache_ram: int = 8192  # MiB of host RAM for saved slot states (-1: no limit, 0: off), as llama-server
    n_cache_reuse: int = 0
    fit_params: bool = False
    n_ctx_checkpoints: int = 32  # per slot, for sliding-window and recurrent models (LocalAI's default)
    mmproj_use_gpu: bool = True
    image_min_tokens: int = -1  # -1: the projector's own default
    image_max_tokens: int = -1
    # ik_llama.cpp's own knobs (pylocalai.engine.ik_options), as (Llama keyword, value) pairs
    engine: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    model_path: Path
    backend: str = "llama-cpp"
    source: str = "<default>"  # the YAML file (or the .gguf) this came from
    context_size: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    mmap: bool = True
    mlock: bool = False
    f16: bool = False
    stopwords: tuple[str, ...] = ()
    system_prompt: str = ""
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attention: str = "auto"
    batch: int = 512
    roles: dict[str, str] = field(default_factory=dict)
    template: TemplateConfig = TemplateConfig()
    options: EngineOptions = EngineOptions()
    parameters: dict[str, Any] = field(default_factory=dict)  # request defaults (temperature, ...)
    description: str = ""
    mmproj: Path | None = None  # multimodal projector (images, audio), inside the models folder
    alias: str = ""  # another model's name: requests for this one are served by that one
    disabled: bool = False  # configured, but requests for it are refused (403)
    known_usecases: tuple[str, ...] = ()  # declared (chat, completion, edit, embeddings, ...); added to the guessed
    embeddings: bool = False

    @property
    def loose_file(self) -> bool:
        """A .gguf in the folder with no config of its own."""
        return self.source == self.name and self.name.lower().endswith(".gguf")

    def has_usecase(self, usecase: str) -> bool:
        """LocalAI's usecases: the declared ones, and those guessed from the templates. A config with
        no template at all renders chats with the GGUF's own, so it is a chat model too."""
        if usecase in self.known_usecases:
            return True
        t = self.template
        if usecase == "chat":
            no_template = not (t.chat or t.chat_message or t.completion or t.edit)
            return not self.embeddings and bool(t.chat or t.chat_message or t.use_tokenizer_template or no_template)
        if usecase == "completion":
            return bool(self.template.completion)
        if usecase == "edit":
            return bool(self.template.edit)
        return usecase == "embeddings" and self.embeddings

    @property
    def uses_jinja(self) -> bool:
        """Render chats with the model's own jinja template (llama.cpp's chat library)."""
        t = self.template
        return t.use_tokenizer_template or self.options.use_jinja or not (t.chat or t.chat_message)


# ---------------------------------------------------------------- options

OPTION_ALIASES = {
    "jinja": "use_jinja",
    "n_parallel": "parallel",
    "grpc_servers": "rpc_servers",
    "fit": "fit_params",
    "fit_target": "fit_params_target",
    "fit_ctx": "fit_params_min_ctx",
    "cache_reuse": "n_cache_reuse",
    "sps": "slot_prompt_similarity",
    "mmproj_offload": "mmproj_use_gpu",
    "continuous_batching": "cont_batching",
    "unified_kv": "kv_unified",
    "ctx_checkpoints": "n_ctx_checkpoints",
}
_BOOL_OPTIONS = {"use_jinja", "context_shift", "swa_full", "cont_batching", "check_tensors", "warmup",
                 "no_op_offload", "kv_unified", "fit_params", "mmproj_use_gpu"}
# options LocalAI documents that have no engine effect in pylocalai: rejected when set to anything but
# their no-op value, with the reason (never silently ignored)
_NO_FIT = "fitting to device memory is not implemented; set gpu_layers and context_size"
_UNSUPPORTED: dict[str, tuple[str | None, str]] = {
    "n_cache_reuse": ("0", "KV-shifting chunk reuse is not implemented (the longest common prefix is reused)"),
    "fit_params_target": (None, _NO_FIT),
    "fit_params_min_ctx": (None, _NO_FIT),
}


def _bool(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}", param="options")


def parse_options(items: list[Any], where: str, env: dict[str, str] | None = None) -> EngineOptions:
    """`options:` entries are "key:value" (split on the first colon only) or a bare "key" (= true)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    for raw in items:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: options entries must be strings, got {raw!r}", param="options")
        key, sep, value = raw.partition(":")
        key = OPTION_ALIASES.get(key.strip(), key.strip())
        value = value.strip() if sep else "true"
        at = f"{where}: option {raw!r}"
        if key in _BOOL_OPTIONS:
            if key == "fit_params" and _bool(value, at):
                raise ConfigError(f"{at}: {_NO_FIT}", param="options")
            values[key] = _bool(value, at)
        elif key == "parallel":
            values[key] = _int(value, at, lo=1)
        elif key == "rpc_servers":
            values[key] = tuple(s.strip() for s in value.split(",") if s.strip())
        elif key in ("image_min_tokens", "image_max_tokens"):
            values[key] = _int(value, at, lo=-1)
        elif key == "cache_ram":
            values[key] = _int(value, at, lo=-1)
        elif key == "n_ctx_checkpoints":
            values[key] = _int(value, at, lo=0)
        elif key == "slot_prompt_similarity":
            values[key] = _float(value, at, lo=0.0, hi=1.0)
        elif key in _UNSUPPORTED:
            noop, why = _UNSUPPORTED[key]
            if noop is None or value != noop:
                raise ConfigError(f"{at}: {why}", param="options")
            values[key] = 0
        else:
            try:
                knobs = ik_options.parse_option(key, value)
            except InvalidRequestError as exc:
                raise ConfigError(f"{at}: {exc}", param="options") from None
            if knobs is None:
                raise ConfigError(f"{where}: unknown option {key!r} in {raw!r}", param="options")
            engine.update(knobs)
    if "parallel" not in values and env.get("LLAMACPP_PARALLEL"):
        values["parallel"] = _int(env["LLAMACPP_PARALLEL"], "LLAMACPP_PARALLEL", lo=1)
    if "rpc_servers" not in values and env.get("LLAMACPP_GRPC_SERVERS"):
        values["rpc_servers"] = tuple(s.strip() for s in env["LLAMACPP_GRPC_SERVERS"].split(",") if s.strip())
    return EngineOptions(**values, engine=tuple(sorted(engine.items())))


def _int(value: Any, where: str, lo: int | None = None) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if lo is not None and out < lo:
        raise ConfigError(f"{where}: must be at least {lo}, got {out}")
    return out


def _float(value: Any, where: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise ConfigError(f"{where}: must be within [{lo}, {hi}], got {out}")
    return out


# ---------------------------------------------------------------- configs

_PARAM_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "typical_p", "repeat_penalty",
               "repeat_last_n", "frequency_penalty", "presence_penalty", "ignore_eos", "logit_bias", "n_keep"}


def safe_model_file(models_dir: Path, name: str, where: str) -> Path:
    """Resolve a file name inside the models folder; `..` and absolute paths are refused."""
    if not name or os.path.isabs(name) or any(part == ".." for part in Path(name).parts):
        raise ConfigError(f"{where}: model file {name!r} must be a relative path inside the models folder",
                          param="model")
    # normalized, not resolved: a symlink the admin placed in the models folder is fine
    root = Path(os.path.abspath(models_dir))
    path = Path(os.path.normpath(root / name))
    if root not in path.parents:
        raise ConfigError(f"{where}: model file {name!r} escapes the models folder", param="model")
    return path


def parse_config(doc: Any, models_dir: Path, source: str, env: dict[str, str] | None = None) -> ModelConfig:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a model config must be a mapping, got {type(doc).__name__}")
    name = _scalar_text(doc.get("name"))
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: field 'name' is required and must be a non-empty string", param="name")
    where = f"{source} ({name})"
    disabled = _flag(doc, "disabled", False, where)
    alias = _scalar_text(doc.get("alias"))
    if alias is not None and alias != "":  # an empty alias is none, as in LocalAI
        if not isinstance(alias, str) or not alias.strip():
            raise ConfigError(f"{where}: field 'alias' must be the name of another model", param="alias")
        return ModelConfig(name=name.strip(), model_path=Path(), source=source, alias=alias.strip(), disabled=disabled)
    usecases = doc.get("known_usecases") or []
    if isinstance(usecases, str):
        usecases = [usecases]
    if not isinstance(usecases, list) or not all(isinstance(u, str) for u in usecases):
        raise ConfigError(f"{where}: field 'known_usecases' must be a list of names", param="known_usecases")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: field 'parameters' must be a mapping", param="parameters")
    model_file = params.get("model")
    if not isinstance(model_file, str):
        raise ConfigError(f"{where}: field 'parameters.model' (the .gguf file) is required", param="parameters.model")
    backend = doc.get("backend") or "llama-cpp"
    if not isinstance(backend, str):
        raise ConfigError(f"{where}: field 'backend' must be a string", param="backend")
    tmpl = doc.get("template") or {}
    if not isinstance(tmpl, dict):
        raise ConfigError(f"{where}: field 'template' must be a mapping", param="template")
    template = TemplateConfig(
        **{k: _template_text(models_dir, tmpl.get(k), f"{where}: template.{k}")
           for k in ("chat", "chat_message", "completion", "edit", "function", "multimodal")},
        use_tokenizer_template=_flag(tmpl, "use_tokenizer_template", False, f"{where}: template"),
        join_chat_messages_by_character=tmpl.get("join_chat_messages_by_character"),
        reply_prefix=str(tmpl.get("reply_prefix") or ""),
    )
    opts = doc.get("options") or []
    if not isinstance(opts, list):
        raise ConfigError(f"{where}: field 'options' must be a list of 'key:value' strings", param="options")
    stop = doc.get("stopwords") or []
    if isinstance(stop, list):
        stop = [_scalar_text(s) for s in stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ConfigError(f"{where}: field 'stopwords' must be a list of strings", param="stopwords")
    roles = doc.get("roles") or {}
    if not isinstance(roles, dict):
        raise ConfigError(f"{where}: field 'roles' must be a mapping", param="roles")
    flash = str(doc.get("flash_attention", "auto")).lower()
    flash = {"enabled": "on", "true": "on", "disabled": "off", "false": "off"}.get(flash, flash)
    if flash not in ("auto", "on", "off"):
        raise ConfigError(f"{where}: field 'flash_attention' must be auto, on or off", param="flash_attention")
    options = parse_options(opts, where, env)
    if options.engine and engine_key(backend) != ik_options.IK_ENGINE:
        first = options.engine[0][0]
        raise ConfigError(f"{where}: option {first!r} is an ik_llama.cpp option; set backend: ik-llama-cpp "
                          f"to use it (backend is {backend!r})", param="options")
    mmproj = doc.get("mmproj")
    if mmproj is not None and not isinstance(mmproj, str):
        raise ConfigError(f"{where}: field 'mmproj' must be a file name in the models folder", param="mmproj")
    return ModelConfig(
        name=name.strip(),
        mmproj=safe_model_file(models_dir, mmproj, f"{where}: mmproj") if mmproj else None,
        model_path=safe_model_file(models_dir, model_file, where),
        backend=backend,
        source=source,
        context_size=_opt_int(doc, "context_size", where),
        threads=_opt_int(doc, "threads", where),
        gpu_layers=_opt_int(doc, "gpu_layers", where),
        mmap=_flag(doc, "mmap", True, where),
        mlock=_flag(doc, "mmlock" if "mmlock" in doc else "mlock", False, where),
        f16=_flag(doc, "f16", False, where),
        stopwords=tuple(stop),
        system_prompt=str(doc.get("system_prompt") or ""),
        cache_type_k=str(doc.get("cache_type_k") or "f16"),
        cache_type_v=str(doc.get("cache_type_v") or "f16"),
        flash_attention=flash,
        batch=_opt_int(params, "batch", where) or _opt_int(doc, "batch", where) or 512,
        roles={str(k): str(v) for k, v in roles.items()},
        template=template,
        options=options,
        parameters={k: v for k, v in params.items() if k in _PARAM_KEYS},
        description=str(doc.get("description") or ""),
        disabled=disabled,
        known_usecases=_usecases(usecases),
        embeddings=_flag(doc, "embeddings", False, where),
    )


def _usecases(names: list[str]) -> tuple[str, ...]:
    """LocalAI's usecase names (FLAG_CHAT or chat; `llm` is chat, completion and edit). Those this
    server does not serve (vision, tts, rerank, ...) are kept, and match no endpoint here."""
    out: set[str] = set()
    for name in names:
        n = name.strip().lower().removeprefix("flag_")
        out.update(("chat", "completion", "edit") if n == "llm" else (n,))
    return tuple(sorted(out))


def _opt_int(doc: dict[str, Any], key: str, where: str) -> int | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ConfigError(f"{where}: field {key!r} must be an integer", param=key)
    return _int(v, f"{where}: field {key!r}")


def _template_text(models_dir: Path, value: Any, where: str) -> str:
    """A template is its text, or the name of `<models>/<name>.tmpl`."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string")
    if "\n" not in value and "{{" not in value and len(value) < 256:
        candidate = models_dir / f"{value}.tmpl"
        if candidate.is_file() and models_dir.resolve() in candidate.resolve().parents:
            return candidate.read_text(encoding="utf-8")
    return value


@dataclass
class ModelCatalog:
    """Every model the server knows: configs by name, loose .gguf files by file name."""

    models_dir: Path
    configs: dict[str, ModelConfig] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted(self.configs)

    def get(self, name: str) -> ModelConfig | None:
        return self.configs.get(name)


def load_catalog(models_dir: str | os.PathLike[str], env: dict[str, str] | None = None) -> ModelCatalog:
    root = Path(models_dir)
    catalog = ModelCatalog(root)
    if not root.is_dir():
        return catalog
    referenced: set[Path] = set()
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
            continue
        try:
            docs = load_yaml(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            catalog.errors.append(f"{path.name}: not valid YAML: {exc}")
            continue
        except OSError as exc:  # removed or renamed while the folder was read
            catalog.errors.append(f"{path.name}: cannot be read: {exc.strerror or exc}")
            continue
        for i, doc in enumerate(docs if isinstance(docs, list) else [docs]):
            source = path.name if not isinstance(docs, list) else f"{path.name}[{i}]"
            try:
                cfg = parse_config(doc, root, source, env)
            except ConfigError as exc:
                catalog.errors.append(str(exc))
                continue
            if cfg.name in catalog.configs:
                catalog.errors.append(f"{source}: model name {cfg.name!r} is already defined in {catalog.configs[cfg.name].source}")
                continue
            catalog.configs[cfg.name] = cfg
            if not cfg.alias:
                referenced.add(cfg.model_path)
    for path in sorted(root.glob("*.gguf")):
        full = Path(os.path.abspath(path))
        if full not in referenced and path.name not in catalog.configs:
            catalog.configs[path.name] = ModelConfig(name=path.name, model_path=full, source=path.name)
    for name, cfg in list(catalog.configs.items()):
        if not cfg.alias:
            continue
        target = catalog.configs.get(cfg.alias)
        if target is None or target.alias:
            why = "is not a configured model" if target is None else "is an alias itself"
            catalog.errors.append(f"{cfg.source} ({cfg.name}): field 'alias': {cfg.alias!r} {why}")
            del catalog.configs[name]
    for err in catalog.errors:
        log.error("model config skipped: %s", err)
    return catalog
