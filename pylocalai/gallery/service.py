"""The server's gallery: configured galleries, their cached indexes, and install/delete jobs that run
in the background (one at a time, off the event loop) with LocalAI's job status shape."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from pylocalai.errors import InvalidRequestError, NotFoundError, PylocalaiError
from pylocalai.gallery.install import (
    Gallery,
    GalleryFile,
    delete_model,
    entry_summary,
    installed,
    is_local_gallery,
    load_index,
    parse_files,
    pick_entry,
    plan_install,
    run_install,
    safe_name,
)
from pylocalai.gallery.sources import DownloadCancelled, is_url, resolve_url

log = logging.getLogger(__name__)

INDEX_TTL_S = 600.0
MAX_FINISHED_JOBS = 1000


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""  # pragma: no cover


@dataclass
class Job:
    uuid: str
    element: str
    deletion: bool = False
    processed: bool = False
    message: str = "waiting"
    progress: float = 0.0
    file_name: str = ""
    file_size: str = ""
    downloaded_size: str = ""
    error: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "deletion": self.deletion, "file_name": self.file_name, "processed": self.processed,
            "message": self.message, "progress": round(self.progress, 2), "file_size": self.file_size,
            "downloaded_size": self.downloaded_size, "gallery_element_name": self.element,
            "cancelled": self.cancelled, "cancellable": not self.processed and not self.deletion,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class GalleryService:
    def __init__(self, models_dir: Path, galleries: list[Gallery], *,
                 on_change: Callable[[], Awaitable[None]] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.models_dir = models_dir
        self.galleries = list(galleries)
        self.env = dict(os.environ if env is None else env)
        self.on_change = on_change
        self.jobs: dict[str, Job] = {}
        self._indexes: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._lock = trio.Lock()  # one install or delete at a time, as LocalAI's job queue
        self._stopping = False

    # ------------------------------------------------------------ galleries and indexes

    def add_gallery(self, gallery: Gallery) -> None:
        if any(g.name == gallery.name for g in self.galleries):
            raise InvalidRequestError(f"a gallery named {gallery.name!r} is already configured", param="name")
        self.galleries.append(gallery)

    def remove_gallery(self, name: str) -> None:
        before = len(self.galleries)
        self.galleries = [g for g in self.galleries if g.name != name]
        if len(self.galleries) == before:
            raise NotFoundError(f"no gallery named {name!r}", param="name")
        self._indexes.pop(name, None)

    async def indexes(self, *, strict: bool = False) -> list[tuple[Gallery, list[dict[str, Any]]]]:
        """Every gallery's entries (cached for INDEX_TTL_S). A gallery that cannot be read is logged
        and left out, or raised when strict."""
        out = []
        for g in self.galleries:
            cached = self._indexes.get(g.name)
            if cached is None or time.monotonic() - cached[0] > INDEX_TTL_S:
                try:
                    entries = await trio.to_thread.run_sync(load_index, g, self.env)
                except PylocalaiError as exc:
                    if strict:
                        raise
                    log.warning("%s", exc.message)
                    continue
                cached = self._indexes[g.name] = (time.monotonic(), entries)
            out.append((g, cached[1]))
        return out

    async def available(self) -> list[dict[str, Any]]:
        indexes = await self.indexes()
        return await trio.to_thread.run_sync(lambda: [  # a stat per entry: off the event loop
            entry_summary(g, e, installed(self.models_dir, str(e["name"]))) for g, entries in indexes for e in entries])

    # ------------------------------------------------------------ jobs

    def _new_job(self, element: str, deletion: bool = False) -> Job:
        finished = [j for j in self.jobs.values() if j.processed]
        for old in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self.jobs[old.uuid]
        job = Job(str(uuid.uuid4()), element, deletion=deletion)
        self.jobs[job.uuid] = job
        return job

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"could not find any status for ID {job_id}", param="uuid")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.processed:
            raise InvalidRequestError(f"job {job_id} has already finished", param="uuid")
        if job.deletion:
            raise InvalidRequestError(f"job {job_id} is a deletion and cannot be cancelled", param="uuid")
        job.cancelled = True
        return job

    def start_apply(self, nursery: trio.Nursery, body: dict[str, Any], *, keep_installed: bool = False,
                    trusted: bool = False) -> Job:
        """Validate a POST /models/apply body and start its job. keep_installed: a model whose
        config is already in the folder is left as it is (the models named at start). trusted: the
        body comes from the server's settings, not an API caller, so it may name local files."""
        gid, url, name = body.get("id"), body.get("url"), body.get("name")
        for key, v in (("id", gid), ("url", url), ("name", name), ("variant", body.get("variant"))):
            if v is not None and not isinstance(v, str):
                raise InvalidRequestError(f"'{key}' must be a string", param=key)
        if not gid and not url:
            raise InvalidRequestError("give the gallery model's 'id' (gallery@name or name), or a config 'url'",
                                      param="id")
        if gid and not url and is_url(gid):
            body = {**body, "id": None, "url": gid}  # an id that is a URL: a config or model file to fetch
            gid, url = None, body["url"]
        if name:
            safe_name(name)
        overrides = body.get("overrides")
        if overrides is not None and not isinstance(overrides, dict):
            raise InvalidRequestError("'overrides' must be an object", param="overrides")
        if url:
            resolve_url(url, {}, allow_file=trusted)
        parse_files(body.get("files"), "request", local_ok=trusted)
        job = self._new_job(name or gid or url or "")
        nursery.start_soon(self._apply, job, body, keep_installed, trusted)
        return job

    def start_delete(self, nursery: trio.Nursery, name: str) -> Job:
        safe_name(name)
        job = self._new_job(name, deletion=True)
        nursery.start_soon(self._delete, job, name)
        return job

    async def _apply(self, job: Job, body: dict[str, Any], keep_installed: bool, trusted: bool) -> None:
        async with self._lock:
            try:
                if job.cancelled:
                    raise DownloadCancelled("cancelled before it started")
                job.message = f"processing model: {job.element}"
                entry: dict[str, Any] | None = None
                gallery, entry_local = "", False
                if body.get("id"):
                    indexes = await self.indexes(strict=len(self.galleries) == 1)
                    found = pick_entry(indexes, body["id"], body.get("variant"))
                    entry, gallery, entry_local = found.entry, found.gallery.name, is_local_gallery(found.gallery)
                plan = await trio.to_thread.run_sync(lambda: plan_install(
                    self.models_dir, name=body.get("name"), entry=entry, url=body.get("url") or "",
                    overrides=body.get("overrides"), files=body.get("files"), gallery=gallery, env=self.env,
                    trusted=trusted, entry_local=entry_local))
                job.element = plan.name
                if keep_installed and installed(self.models_dir, plan.name):
                    job.progress, job.message = 100.0, "completed"
                    log.info("%s is already installed", plan.name)
                    return

                def progress(f: GalleryFile, i: int, done: int, total: int | None) -> None:
                    job.file_name = f.filename
                    job.downloaded_size = human_bytes(done)
                    job.file_size = human_bytes(total)
                    pct = 100.0 * done / total if total else 0.0
                    job.progress = (100.0 * i + pct) / len(plan.files)
                    job.message = f"processing file: {f.filename}. Total: {job.file_size or '?'}. Current: {job.downloaded_size}"

                await trio.to_thread.run_sync(lambda: run_install(
                    self.models_dir, plan, env=self.env, progress=progress,
                    cancelled=lambda: job.cancelled or self._stopping))
                job.progress, job.message = 100.0, "completed"
                if self.on_change is not None:
                    await self.on_change()
            except DownloadCancelled:
                job.message = "cancelled"
            except PylocalaiError as exc:
                job.error, job.message = exc.message, f"error: {exc.message}"
                log.warning("gallery install of %s failed: %s", job.element, exc.message)
            except Exception as exc:
                job.error, job.message = str(exc), f"error: {exc}"
                log.exception("gallery install of %s failed", job.element)
            finally:
                job.processed = True

    def stop(self) -> None:
        """The server is shutting down: running downloads end at their next read (their partial
        files stay for the next start), so shutdown does not wait for a whole download."""
        self._stopping = True

    async def _delete(self, job: Job, name: str) -> None:
        async with self._lock:
            try:
                job.message = f"deleting model: {name}"
                removed = await trio.to_thread.run_sync(delete_model, self.models_dir, name)
                log.info("deleted model %s: %s", name, ", ".join(removed))
                if self.on_change is not None:
                    await self.on_change()
                job.progress, job.message = 100.0, "completed"
            except PylocalaiError as exc:
                job.error, job.message = exc.message, f"error: {exc.message}"
            except Exception as exc:
                job.error, job.message = str(exc), f"error: {exc}"
                log.exception("deleting %s failed", name)
            finally:
                job.processed = True
