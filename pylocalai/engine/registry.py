"""Model name -> loaded model. Lazy loading (once, concurrent first requests wait for the same
load), at most N loaded (least recently used unloaded first, never one in use), idle unload."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import trio

from pylocalai.config.model_config import ModelCatalog, ModelConfig
from pylocalai.engine.backend import engine_key
from pylocalai.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    PylocalaiError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineDefaults:
    """Server-wide defaults a model config may override."""

    threads: int | None = None
    context_size: int = 4096
    parallel: int = 4
    gpu_layers: int = -1


@dataclass
class LoadedModel:
    config: ModelConfig
    llm: Any  # pylocalai.model.Llama
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    files: tuple[tuple[int, int, int] | None, ...] = ()  # _file_ids when it was loaded
    retired: bool = False  # its config or file changed, or it went away: closed once the last user leaves


class ModelRegistry:
    def __init__(self, catalog: ModelCatalog, defaults: EngineDefaults, *, max_loaded: int = 1,
                 idle_unload_s: float | None = None) -> None:
        self.catalog = catalog
        self.defaults = defaults
        self.max_loaded = max(1, max_loaded)
        self.idle_unload_s = idle_unload_s
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, trio.Event] = {}
        self._load_errors: dict[str, PylocalaiError] = {}
        _check_backends(catalog)

    async def reload(self, catalog: ModelCatalog) -> None:
        """Serve a new catalog (the models folder changed). A loaded model whose config changed or
        went away, or whose model file was replaced, is unloaded: at once when idle, else when its
        last request ends. (A model still loading is checked when its load ends: see _get.)"""
        _check_backends(catalog)
        self.catalog = catalog
        self._load_errors.clear()
        idle: list[LoadedModel] = []
        for name, entry in list(self._loaded.items()):  # all bookkeeping first: no await in this loop
            if catalog.get(name) == entry.config and _file_ids(entry.config) == entry.files:
                continue
            del self._loaded[name]
            entry.retired = True
            if entry.in_use == 0:
                idle.append(entry)
        for entry in idle:
            log.info("unloading model %s: its config or file changed", entry.config.name)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(entry.llm.close)

    # ------------------------------------------------------------ names

    def names(self) -> list[str]:
        return self.catalog.names()

    def resolve(self, requested: str | None, bearer: str | None = None, usecase: str | None = None) -> ModelConfig:
        """Body `model`, else a bearer token naming a model, else the only model there is, else (as
        LocalAI) the first configured model, by name, with the endpoint's usecase (chat, completion,
        edit, embeddings). An alias is served by its target; a disabled model is refused (403)."""
        if requested:
            cfg = self.catalog.get(requested)
            if cfg is None:
                raise ModelNotFoundError(f"model {requested!r} not found. To see available models, call GET /v1/models",
                                         param="model")
            return self._usable(cfg)
        if bearer and (cfg := self.catalog.get(bearer)) is not None:
            return self._usable(cfg)
        names = self.catalog.names()
        if len(names) == 1:
            return self._usable(self.catalog.configs[names[0]])
        if not names:
            raise ModelNotFoundError("no model is configured", param="model")
        if usecase is not None:
            for name in names:
                cfg = self.catalog.configs[name]
                if not (cfg.alias or cfg.disabled or cfg.loose_file) and cfg.has_usecase(usecase):
                    return cfg
        raise InvalidRequestError("'model' is required when several models are configured"
                                  + (f" and none is configured for {usecase}" if usecase else ""), param="model")

    def _usable(self, cfg: ModelConfig) -> ModelConfig:
        if cfg.alias:
            target = self.catalog.get(cfg.alias)
            if target is None:  # the catalog checks aliases; this is a config changed since
                raise ModelNotFoundError(f"model {cfg.name!r} is an alias of {cfg.alias!r}, which is not configured",
                                         param="model")
            if cfg.disabled:
                raise PermissionDeniedError(f"model {cfg.name!r} is disabled", param="model")
            cfg = target
        if cfg.disabled:
            raise PermissionDeniedError(f"model {cfg.name!r} is disabled", param="model")
        return cfg

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def loaded_status(self) -> dict[str, dict[str, Any]]:
        """Per loaded model: slots, activity and scheduler counters (for /readyz and tests)."""
        out = {}
        for name, e in self._loaded.items():
            sched = e.llm.scheduler
            out[name] = {"engine": engine_key(e.config.backend), "n_slots": sched.n_slots, "active_slots": sched.active_slots, "queued": sched.queued,
                         "n_ctx_seq": sched.n_ctx_seq, "in_use": e.in_use, "steps": sched.stats.steps,
                         "max_seqs_per_step": sched.stats.max_seqs_per_step, "graphs_reused": sched.graphs_reused,
                         "engine_time_s": round(sched.stats.engine_time_s, 3),
                         "checkpoints_saved": sched.stats.checkpoints_saved,
                         "checkpoints_restored": sched.stats.checkpoints_restored,
                         "prefix_dropped": sched.stats.prefix_dropped,
                         "ram_saved": sched.stats.ram_saved, "ram_restored": sched.stats.ram_restored,
                         "ram_bytes": sched.stats.ram_bytes}
        return out

    def model_stats(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Per loaded model: its engine, and its scheduler's counters and slot gauges (for /metrics)."""
        out = {}
        for name, e in self._loaded.items():
            sched = e.llm.scheduler
            st = sched.stats
            values: dict[str, Any] = {f.name: getattr(st, f.name) for f in fields(st)}
            values["finish_reasons"] = dict(st.finish_reasons)  # one C-level copy: the engine thread adds to it
            values.update(active_slots=sched.active_slots, queued=sched.queued, n_slots=sched.n_slots)
            out[name] = (engine_key(e.config.backend), values)
        return out

    # ------------------------------------------------------------ loading

    @asynccontextmanager
    async def use(self, cfg: ModelConfig) -> AsyncIterator[LoadedModel]:
        """The loaded model for cfg, held in use (never unloaded) until the block ends."""
        entry = await self._get(cfg)
        entry.in_use += 1
        entry.last_used = time.monotonic()
        try:
            yield entry
        finally:
            entry.in_use -= 1
            entry.last_used = time.monotonic()
            if entry.retired and entry.in_use == 0:
                with trio.CancelScope(shield=True):
                    log.info("unloading model %s: its config changed", entry.config.name)
                    await trio.to_thread.run_sync(entry.llm.close)

    async def _get(self, cfg: ModelConfig) -> LoadedModel:
        while True:
            if (entry := self._loaded.get(cfg.name)) is not None:
                return entry
            if (event := self._loading.get(cfg.name)) is not None:
                await event.wait()
                if (err := self._load_errors.get(cfg.name)) is not None:
                    raise err
                continue
            event = self._loading[cfg.name] = trio.Event()
            self._load_errors.pop(cfg.name, None)
            try:
                await self._make_room()
                files = await trio.to_thread.run_sync(_file_ids, cfg)
                llm = await trio.to_thread.run_sync(self._load_sync, cfg)
                entry = LoadedModel(cfg, llm, files=files)
                if self.catalog.get(cfg.name) != cfg or await trio.to_thread.run_sync(_file_ids, cfg) != files:
                    entry.retired = True  # reloaded meanwhile: serve the request that asked, then close
                    return entry
                self._loaded[cfg.name] = entry
                return entry
            except PylocalaiError as exc:
                self._load_errors[cfg.name] = exc
                raise
            finally:
                del self._loading[cfg.name]
                event.set()

    def _load_sync(self, cfg: ModelConfig) -> Any:
        from pylocalai.model import Llama

        d = self.defaults
        o = cfg.options
        parallel = o.parallel or d.parallel
        if not o.cont_batching:
            parallel = 1
        ctx = cfg.context_size or d.context_size
        unified = bool(o.kv_unified)
        log.info("loading model %s from %s", cfg.name, cfg.model_path)
        if not cfg.model_path.is_file():
            raise ModelNotFoundError(f"model {cfg.name!r}: file {cfg.model_path.name} is missing from the models folder",
                                     param="model")
        if cfg.mmproj is not None and not cfg.mmproj.is_file():
            raise ModelNotFoundError(f"model {cfg.name!r}: projector file {cfg.mmproj.name} is missing from the models folder",
                                     param="model")
        t0 = time.monotonic()
        llm = Llama(
            cfg.model_path, backend=cfg.backend,
            n_ctx=ctx if unified else ctx * parallel,  # context_size is per request
            n_batch=cfg.batch, n_ubatch=cfg.batch,
            n_threads=cfg.threads or d.threads, n_parallel=parallel,
            flash_attn=cfg.flash_attention, cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v,
            kv_unified=unified, swa_full=o.swa_full, n_gpu_layers=d.gpu_layers if cfg.gpu_layers is None else cfg.gpu_layers,
            use_mmap=cfg.mmap, use_mlock=cfg.mlock, check_tensors=o.check_tensors, op_offload=not o.no_op_offload,
            rpc_servers=list(o.rpc_servers), slot_prompt_similarity=o.slot_prompt_similarity,
            n_ctx_checkpoints=o.n_ctx_checkpoints, cache_ram=o.cache_ram,
            context_shift=o.context_shift, warmup=o.warmup, mmproj=cfg.mmproj, mmproj_use_gpu=o.mmproj_use_gpu,
            image_min_tokens=o.image_min_tokens, image_max_tokens=o.image_max_tokens, **dict(o.engine),
        )
        log.info("loaded model %s in %.2f s", cfg.name, time.monotonic() - t0)
        return llm

    async def _make_room(self) -> None:
        while len(self._loaded) + len(self._loading) > self.max_loaded:
            idle = [e for e in self._loaded.values() if e.in_use == 0]
            if not idle:
                return  # everything is busy: allow the extra model rather than fail the request
            victim = min(idle, key=lambda e: e.last_used)
            await self.unload(victim.config.name)

    async def unload(self, name: str) -> None:
        entry = self._loaded.pop(name, None)
        if entry is not None:
            log.info("unloading model %s", name)
            await trio.to_thread.run_sync(entry.llm.close)

    async def unload_idle(self) -> None:
        if self.idle_unload_s is None:
            return
        now = time.monotonic()
        for entry in list(self._loaded.values()):
            if entry.in_use == 0 and now - entry.last_used > self.idle_unload_s:
                await self.unload(entry.config.name)

    async def close(self) -> None:
        for name in list(self._loaded):
            await self.unload(name)


def _check_backends(catalog: ModelCatalog) -> None:
    """Configs naming an engine this install lacks become config errors."""
    for name, cfg in list(catalog.configs.items()):
        try:
            engine_key(cfg.backend)
        except InvalidRequestError as exc:
            catalog.errors.append(f"{cfg.source}: field 'backend': {exc}")
            del catalog.configs[name]


def _file_ids(cfg: ModelConfig) -> tuple[tuple[int, int, int] | None, ...]:
    """(inode, mtime, size) of the model's files: a reinstall that replaced one shows here."""
    out: list[tuple[int, int, int] | None] = []
    for path in (cfg.model_path, cfg.mmproj):
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        out.append((st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None)
    return tuple(out)
