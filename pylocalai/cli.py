"""`pylocalai serve` runs the LocalAI-compatible server; `pylocalai run MODEL "prompt"` streams a
completion to the terminal; `pylocalai models` lists what a models folder offers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from collections.abc import Sequence

from pylocalai.errors import PylocalaiError


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
    from pylocalai.models import default_model_path
    from pylocalai.server import ServerSettings, create_app

    try:
        default_model = default_model_path()
    except ModelNotFoundError:
        default_model = None
    settings = ServerSettings(
        models_path=Path(args.models_path),
        api_keys=tuple(k.strip() for k in (args.api_keys or "").split(",") if k.strip()),
        defaults=EngineDefaults(threads=args.threads, context_size=args.context_size, parallel=args.parallel),
        max_loaded_models=args.max_loaded_models,
        idle_unload_s=args.idle_unload,
        cors_origins=tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip()),
        max_body_bytes=args.upload_limit * 1024 * 1024,
        default_model=default_model,
        data_path=Path(args.data_path),
        responses_retention=args.responses_retention,
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
    srv.add_argument("--cors-origins", default=_env("LOCALAI_CORS_ALLOW_ORIGINS"), help="comma list, or *")
    srv.add_argument("--upload-limit", type=int, default=_int_env("LOCALAI_UPLOAD_LIMIT") or 32, help="request body limit, MB")
    srv.add_argument("--data-path", default=_env("LOCALAI_DATA_PATH", default="data"),
                     help="folder for stored responses (LOCALAI_DATA_PATH)")
    srv.add_argument("--responses-retention", type=int, default=10000, help="stored responses kept (newest first)")
    srv.add_argument("--log-level", default=_env("LOCALAI_LOG_LEVEL", default="info"),
                     choices=["debug", "info", "warning", "error"])
    srv.set_defaults(func=_serve)
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
