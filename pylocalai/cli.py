"""`pylocalai serve` runs the LocalAI-compatible server; `pylocalai run MODEL "prompt"` streams a
completion to the terminal; `pylocalai models` lists what a models folder offers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pylocalai.errors import InvalidRequestError, PylocalaiError


def _run(args: argparse.Namespace) -> int:
    from pylocalai.model import Llama
    from pylocalai.models import resolve_model_path

    path = resolve_model_path(args.model)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed, "stop": args.stop or None}
    with Llama(path, n_ctx=args.ctx_size, n_threads=args.threads, n_parallel=1) as llm:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        stream = (llm.chat_stream([{"role": "user", "content": prompt}], **sampling) if args.chat
                  else llm.generate(prompt, **sampling))
        out = sys.stdout
        for chunk in stream:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
            if chunk.finish_reason is not None:
                out.write("\n")
                if args.verbose and chunk.usage is not None:
                    print(f"[{chunk.finish_reason}: {chunk.usage.prompt_tokens} prompt + "
                          f"{chunk.usage.completion_tokens} generated tokens]", file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    """`pylocalai models list | install ID | delete NAME` on a models folder, without a server."""
    from pylocalai.config.model_config import load_catalog
    from pylocalai.gallery import install as gi
    from pylocalai.server import startup_apply_body

    folder = Path(args.models_path)
    galleries = gi.parse_galleries(args.galleries)

    def indexes() -> list[tuple[gi.Gallery, list[dict[str, Any]]]]:
        out = []
        for g in galleries:
            try:
                out.append((g, gi.load_index(g)))
            except PylocalaiError as exc:
                print(f"pylocalai: gallery {g.name}: {exc}", file=sys.stderr)
        return out

    if args.action == "list":
        catalog = load_catalog(folder)
        print(f"models in {folder}: " + (", ".join(catalog.names()) or "none"))
        for err in catalog.errors:
            print(f"  config error: {err}")
        for g, entries in indexes():
            print(f"gallery {g.name} ({len(entries)} models):")
            for e in entries:
                mark = "*" if gi.installed(folder, str(e["name"])) else " "
                lines = str(e.get("description") or "").strip().splitlines()
                print(f" {mark} {g.name}@{e['name']}  {lines[0][:80] if lines else ''}".rstrip())
        return 0
    if args.action == "delete":
        removed = gi.delete_model(folder, args.name)
        print(f"deleted {args.name}: {', '.join(removed)}")
        return 0
    body = startup_apply_body(args.name)
    if "url" in body:
        plan = gi.plan_install(folder, name=args.as_name, url=body["url"], trusted=True)
    else:
        found = gi.pick_entry(indexes(), args.name, args.variant)
        plan = gi.plan_install(folder, name=args.as_name, entry=found.entry, gallery=found.gallery.name,
                               entry_local=gi.is_local_gallery(found.gallery))
    last = [0.0]

    def progress(f: gi.GalleryFile, i: int, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= 1 or done == total:
            last[0] = now
            pct = f" {100 * done / total:.0f}%" if total else ""
            print(f"  {f.filename}: {done / 1e6:.1f} MB{pct}", file=sys.stderr)

    path = gi.run_install(folder, plan, progress=progress)
    print(f"installed {plan.name}: {path}")
    return 0


def _env(*names: str, default: str | None = None) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return default


def _serve(args: argparse.Namespace) -> int:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from pylocalai.engine.registry import EngineDefaults
    from pylocalai.errors import ModelNotFoundError
    from pylocalai.gallery.install import parse_galleries
    from pylocalai.models import default_model_path
    from pylocalai.server import ServerSettings, create_app

    try:
        default_model = default_model_path()
    except ModelNotFoundError:
        default_model = None
    galleries = parse_galleries(args.galleries)
    preload = _preload_bodies(args.preload_models)
    settings = ServerSettings(
        models_path=Path(args.models_path),
        api_keys=tuple(k.strip() for k in (args.api_keys or "").split(",") if k.strip()),
        defaults=EngineDefaults(threads=args.threads, context_size=args.context_size, parallel=args.parallel),
        max_loaded_models=args.max_loaded_models,
        idle_unload_s=args.idle_unload,
        watch_s=args.watch,
        cors_origins=tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip()),
        max_body_bytes=args.upload_limit * 1024 * 1024,
        default_model=default_model,
        data_path=Path(args.data_path),
        responses_retention=args.responses_retention,
        galleries=tuple(galleries),
        preload_models=tuple(preload),
        startup_models=(*args.models, *(_env("LOCALAI_MODELS") or "").replace(",", " ").split()),
    )
    app = create_app(settings)
    host, _, port = args.address.rpartition(":")
    config = Config()
    config.bind = [f"{host or '0.0.0.0'}:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    reg = app.config["PYLOCALAI_REGISTRY"]
    logging.getLogger("pylocalai").info("serving %s on http://%s", ", ".join(reg.names()) or "no models", config.bind[0])
    for err in reg.catalog.errors:
        print(f"pylocalai: config error: {err}", file=sys.stderr)
    trio.run(serve, app, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pylocalai", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="run the OpenAI/LocalAI-compatible HTTP server")
    srv.add_argument("models", nargs="*", metavar="MODEL",
                     help="gallery models (gallery@name) or model-file URLs (huggingface://owner/repo/file.gguf, "
                          "https://...) to install at start when missing (LOCALAI_MODELS)")
    srv.add_argument("--address", default=_env("LOCALAI_ADDRESS", "ADDRESS", default="127.0.0.1:8080"),
                     help="host:port to listen on (LOCALAI_ADDRESS)")
    srv.add_argument("--models-path", default=_env("LOCALAI_MODELS_PATH", "MODELS_PATH", default="models"),
                     help="folder of .gguf files and YAML model configs (LOCALAI_MODELS_PATH)")
    srv.add_argument("--api-keys", default=_env("LOCALAI_API_KEY", "API_KEY"), help="comma list of accepted keys (API_KEY)")
    srv.add_argument("--threads", type=int, default=_int_env("LOCALAI_THREADS", "THREADS"), help="CPU threads per model")
    srv.add_argument("--context-size", type=int, default=_int_env("LOCALAI_CONTEXT_SIZE", "CONTEXT_SIZE") or 4096,
                     help="context per request when a config sets none (CONTEXT_SIZE)")
    srv.add_argument("--parallel", type=int, default=_int_env("LLAMACPP_PARALLEL") or 4,
                     help="sequences decoded together per model when its config sets none (LLAMACPP_PARALLEL)")
    srv.add_argument("--max-loaded-models", type=int, default=_int_env("LOCALAI_MAX_ACTIVE_BACKENDS") or 1,
                     help="models kept loaded; least recently used is unloaded first (LOCALAI_MAX_ACTIVE_BACKENDS)")
    srv.add_argument("--idle-unload", type=float, default=None, metavar="SECONDS", help="unload a model idle this long")
    srv.add_argument("--watch", type=float, default=2.0, metavar="SECONDS",
                     help="check the models folder this often for added, changed or removed configs and models "
                          "(0: never)")
    srv.add_argument("--cors-origins", default=_env("LOCALAI_CORS_ALLOW_ORIGINS"), help="comma list, or *")
    srv.add_argument("--upload-limit", type=int, default=_int_env("LOCALAI_UPLOAD_LIMIT") or 32, help="request body limit, MB")
    srv.add_argument("--data-path", default=_env("LOCALAI_DATA_PATH", default="data"),
                     help="folder for stored responses (LOCALAI_DATA_PATH)")
    srv.add_argument("--responses-retention", type=int, default=10000, help="stored responses kept (newest first)")
    srv.add_argument("--galleries", default=_env("LOCALAI_GALLERIES", "GALLERIES"),
                     help='model galleries, a JSON list of {"name", "url", "mirrors"} (LOCALAI_GALLERIES); '
                          "default: LocalAI's gallery")
    srv.add_argument("--preload-models", default=_env("LOCALAI_PRELOAD_MODELS", "PRELOAD_MODELS"),
                     help="JSON list of /models/apply bodies installed at start (PRELOAD_MODELS)")
    srv.add_argument("--log-level", default=_env("LOCALAI_LOG_LEVEL", default="info"),
                     choices=["debug", "info", "warning", "error"])
    srv.set_defaults(func=_serve)
    mdl = sub.add_parser("models", help="list, install or delete models in a models folder (galleries)")
    mdl.add_argument("--models-path", default=_env("LOCALAI_MODELS_PATH", "MODELS_PATH", default="models"))
    mdl.add_argument("--galleries", default=_env("LOCALAI_GALLERIES", "GALLERIES"),
                     help="JSON list of {name, url, mirrors} (LOCALAI_GALLERIES)")
    msub = mdl.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="the folder's models and the galleries' (* = installed)")
    ins = msub.add_parser("install", help="install a gallery model (NAME or GALLERY@NAME), or a model file or "
                                          "gallery config by URL (huggingface://owner/repo/file.gguf, https://...)")
    ins.add_argument("name")
    ins.add_argument("--as", dest="as_name", default=None, help="install under this name")
    ins.add_argument("--variant", default=None, help="one of the entry's variants")
    dele = msub.add_parser("delete", help="remove a model's config and the files only it uses")
    dele.add_argument("name")
    mdl.set_defaults(func=_models)
    run = sub.add_parser("run", help="stream a completion of a prompt to the terminal")
    run.add_argument("model", help="path to a .gguf file, or 'default' for the bundled SmolLM2-135M-Instruct")
    run.add_argument("prompt", nargs="?", help="prompt text (read from stdin when absent)")
    run.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    run.add_argument("-n", "--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--top-k", type=int, default=40)
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--stop", action="append", help="stop string (repeatable)")
    run.add_argument("-c", "--ctx-size", type=int, default=4096)
    run.add_argument("-t", "--threads", type=int, default=None)
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
    return p


def _preload_bodies(text: str | None) -> list[dict[str, Any]]:
    if not text or not text.strip():
        return []
    try:
        bodies = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"--preload-models: not valid JSON: {exc}") from None
    if not isinstance(bodies, list) or not all(isinstance(b, dict) for b in bodies):
        raise InvalidRequestError("--preload-models: expected a JSON list of /models/apply bodies")
    return bodies


def _int_env(*names: str) -> int | None:
    v = _env(*names)
    return int(v) if v and v.strip().isdigit() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None) or ("info" if getattr(args, "verbose", False) else "warning")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except PylocalaiError as exc:
        print(f"pylocalai: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
