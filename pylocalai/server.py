"""create_app(settings) -> QuartTrio: the HTTP server over the model registry."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from quart import g, request
from quart_trio import QuartTrio

from pylocalai.api import errors_openai
from pylocalai.api.anthropic import bp as anthropic_bp
from pylocalai.api.gallery import bp as gallery_bp
from pylocalai.api.openai import bp as openai_bp
from pylocalai.api.openai_text import bp as openai_text_bp
from pylocalai.api.response_store import ResponseStore
from pylocalai.api.responses import bp as responses_bp
from pylocalai.api.system import HttpMetrics
from pylocalai.api.system import bp as system_bp
from pylocalai.config.model_config import ModelCatalog, ModelConfig, load_catalog
from pylocalai.engine.registry import EngineDefaults, ModelRegistry
from pylocalai.errors import AuthenticationError, PylocalaiError
from pylocalai.gallery.install import Gallery
from pylocalai.gallery.service import GalleryService, Job
from pylocalai.gallery.sources import is_url

log = logging.getLogger(__name__)

OPEN_PATHS = {"/healthz", "/readyz"}
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ServerSettings:
    models_path: Path = Path("models")
    api_keys: tuple[str, ...] = ()
    defaults: EngineDefaults = EngineDefaults()
    max_loaded_models: int = 1
    idle_unload_s: float | None = None
    watch_s: float = 2.0  # how often the models folder is checked for added, changed or removed files; 0: never
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    default_model: Path | None = field(default=None)  # served when the models folder holds no model
    data_path: Path = Path("data")  # stored responses (SQLite)
    responses_retention: int = 10000  # stored responses kept, newest first
    galleries: tuple[Gallery, ...] = ()  # model galleries for /models/apply and /models/available
    preload_models: tuple[dict[str, Any], ...] = ()  # /models/apply bodies run at start (PRELOAD_MODELS)
    startup_models: tuple[str, ...] = ()  # gallery names or model-file URLs installed at start if missing


def build_catalog(settings: ServerSettings) -> ModelCatalog:
    catalog = load_catalog(settings.models_path)
    if not catalog.configs and settings.default_model is not None:
        catalog.configs[DEFAULT_MODEL_NAME] = ModelConfig(
            name=DEFAULT_MODEL_NAME, model_path=settings.default_model, source="<default model>",
        )
    return catalog


def startup_apply_body(model: str) -> dict[str, Any]:
    """`pylocalai serve NAME|URL`: a gallery model, or a model file (or gallery config) by URL."""
    return {"url": model} if is_url(model) else {"id": model}


def create_app(settings: ServerSettings) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["RESPONSE_TIMEOUT"] = None  # long streams must not be cut at Quart's 60 s default
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    catalog = build_catalog(settings)
    reg = ModelRegistry(catalog, settings.defaults, max_loaded=settings.max_loaded_models,
                        idle_unload_s=settings.idle_unload_s)
    app.config["PYLOCALAI_REGISTRY"] = reg
    app.config["PYLOCALAI_READY"] = True
    keys = [k.encode() for k in settings.api_keys if k]
    http_metrics = app.config["PYLOCALAI_HTTP_METRICS"] = HttpMetrics()

    @app.before_request
    async def _start_clock() -> None:
        g.pylocalai_t0 = time.perf_counter()

    @app.after_request
    async def _count(resp: Any) -> Any:
        t0 = getattr(g, "pylocalai_t0", None)
        if t0 is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
            http_metrics.observe(request.method, rule, resp.status_code, time.perf_counter() - t0)
        return resp

    @app.before_request
    async def _auth() -> None:
        if request.method == "OPTIONS" or request.path in OPEN_PATHS or not keys:
            return
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not any(hmac.compare_digest(given.encode(), k) for k in keys):
            raise AuthenticationError("An authentication key is required (Authorization: Bearer or x-api-key)")

    @app.errorhandler(PylocalaiError)
    async def _app_error(exc: PylocalaiError) -> tuple[dict[str, Any], int, dict[str, str]]:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else {}
        return errors_openai.error_body(exc), errors_openai.STATUS[exc.kind], headers

    def _route_error(message: str, status: int) -> tuple[dict[str, Any], int]:
        # in the shape of the protocol the path belongs to: Anthropic's under /v1/messages, else OpenAI's
        if request.path.startswith(("/v1/messages", "/messages")):
            etype = "not_found_error" if status == 404 else "invalid_request_error"
            return {"type": "error", "error": {"type": etype, "message": message}}, status
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}, status

    @app.errorhandler(404)
    async def _not_found(exc: Exception) -> tuple[dict[str, Any], int]:
        return _route_error(f"Resource not found: {request.path}", 404)

    @app.errorhandler(405)
    async def _bad_method(exc: Exception) -> tuple[dict[str, Any], int]:
        return _route_error(f"Method {request.method} is not allowed on {request.path}", 405)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        log.exception("unhandled error on %s", request.path)
        return {"error": {"message": f"internal error: {exc}", "type": "server_error", "param": None,
                          "code": "server_error"}}, 500

    @app.after_request
    async def _close_after_unread_body(resp: Any) -> Any:
        # An error answered before the request body was read (a failed key, a wrong route, a body too
        # large) leaves the rest of that body in the connection, and hypercorn then stops reading it:
        # the client's next request on the same connection would hang. Closing it makes clients
        # (the OpenAI and Anthropic SDKs keep connections) open a fresh one.
        if resp.status_code >= 400 and (request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "")):
            resp.headers["Connection"] = "close"
        return resp

    if settings.cors_origins:
        @app.after_request
        async def _cors(resp: Any) -> Any:
            origin = request.headers.get("Origin")
            if origin and ("*" in settings.cors_origins or origin in settings.cors_origins):
                resp.headers["Access-Control-Allow-Origin"] = origin
                resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, x-api-key, anthropic-version"
                resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            return resp

    @app.get("/healthz")
    async def _healthz() -> tuple[str, int]:
        return "", 200

    startup_jobs: list[Job] = []  # the PRELOAD_MODELS and MODEL arguments' install jobs

    @app.get("/readyz")
    async def _readyz() -> tuple[dict[str, Any], int]:
        installing = [j.element for j in startup_jobs if not j.processed]
        if installing:  # LocalAI installs these before it serves; we serve, and say we are not ready
            return {"status": "starting", "reason": f"installing models: {', '.join(installing)}"}, 503
        return {"status": "ready", "models": reg.names(), "loaded": reg.loaded_status(),
                "config_errors": reg.catalog.errors}, 200

    reload_lock = trio.Lock()  # the watcher and gallery jobs: the newest folder state is applied last

    async def _reload_models() -> None:
        async with reload_lock:
            await reg.reload(await trio.to_thread.run_sync(build_catalog, settings))

    gallery = GalleryService(settings.models_path, list(settings.galleries), on_change=_reload_models)
    app.config["PYLOCALAI_GALLERY"] = gallery

    app.register_blueprint(openai_bp)
    app.register_blueprint(openai_text_bp)
    app.register_blueprint(anthropic_bp)
    app.register_blueprint(responses_bp)
    app.register_blueprint(gallery_bp)
    app.register_blueprint(system_bp)
    response_store = ResponseStore(settings.data_path / "responses.sqlite3", max_items=settings.responses_retention)
    recovered = response_store.recover()
    if recovered:
        log.warning("%d stored responses were interrupted by a restart and are marked failed", recovered)
    app.config["PYLOCALAI_RESPONSE_STORE"] = response_store
    app.config["PYLOCALAI_RESPONSE_RUNS"] = {}

    @app.while_serving
    async def _lifespan() -> Any:
        async with trio.open_nursery() as nursery:
            app.config["PYLOCALAI_NURSERY"] = nursery  # background responses and gallery jobs run here
            for body, keep in [*((b, False) for b in settings.preload_models),
                               *((startup_apply_body(m), True) for m in settings.startup_models)]:
                try:
                    job = gallery.start_apply(nursery, body, keep_installed=keep, trusted=True)
                    startup_jobs.append(job)
                    log.info("preloading %s (job %s)", job.element, job.uuid)
                except PylocalaiError as exc:
                    log.error("preload entry %r skipped: %s", body, exc.message)
            if settings.idle_unload_s:
                nursery.start_soon(_idle_unloader, reg, settings.idle_unload_s)
            if settings.watch_s > 0:
                nursery.start_soon(_watch_models, settings, reg, _reload_models)
            yield
            gallery.stop()
            nursery.cancel_scope.cancel()
        await reg.close()
        response_store.close()

    app.asgi_app = _without_trailing_slash(app.asgi_app)  # type: ignore[method-assign]
    return app


def _without_trailing_slash(asgi_app: Any) -> Any:
    """LocalAI strips trailing slashes before routing: /v1/models/ is /v1/models."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") in ("http", "websocket") and len(path) > 1 and path.endswith("/"):
            stripped = path.rstrip("/") or "/"
            scope = {**scope, "path": stripped, "raw_path": stripped.encode()}
        await asgi_app(scope, receive, send)
    return app


def folder_state(folder: Path, also: Iterable[Path] = ()) -> tuple[tuple[str, int, int, int, int], ...]:
    """What a change to the models folder shows in: its configs, templates and model files (and
    `also`: the model files configs name in subfolders) by name, inode, modification and change
    times and size. Dot-files (the gallery's records) and partial downloads are left aside."""
    try:
        paths = [Path(e.path) for e in os.scandir(folder)
                 if not e.name.startswith(".") and e.name.lower().endswith((".yaml", ".yml", ".gguf", ".tmpl"))]
    except OSError:
        paths = []
    out = []
    for path in {*paths, *also}:
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
    return tuple(sorted(out))


async def _watch_models(settings: ServerSettings, reg: ModelRegistry, reload: Any) -> None:
    """LocalAI rescans the models folder when it changes: a config or model file added, edited or
    removed is served (or no longer) without a restart."""
    def state() -> tuple[tuple[str, int, int, int, int], ...]:
        named = [p for c in reg.catalog.configs.values() for p in (c.model_path, c.mmproj)
                 if p is not None and not c.alias]
        return folder_state(settings.models_path, named)

    seen = await trio.to_thread.run_sync(state)
    while True:
        await trio.sleep(settings.watch_s)
        now = await trio.to_thread.run_sync(state)
        if now != seen:
            seen = now
            log.info("the models folder changed: reloading its configs")
            try:
                await reload()
            except Exception:  # the server keeps serving what it has; the next change tries again
                log.exception("reloading the models folder failed")


async def _idle_unloader(reg: ModelRegistry, idle_unload_s: float) -> None:
    while True:
        await trio.sleep(max(1.0, idle_unload_s / 4))
        await reg.unload_idle()
