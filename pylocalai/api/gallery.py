"""LocalAI's model-gallery API: list what the galleries offer, install or delete a model as a
background job, and poll or cancel that job. Errors are in the OpenAI shape, as LocalAI's are."""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, current_app, request

from pylocalai.api.serving import read_json
from pylocalai.errors import InvalidRequestError
from pylocalai.gallery.install import parse_gallery
from pylocalai.gallery.service import GalleryService
from pylocalai.gallery.sources import resolve_url

bp = Blueprint("gallery", __name__)


def service() -> GalleryService:
    svc: GalleryService = current_app.config["PYLOCALAI_GALLERY"]
    return svc


def _nursery() -> trio.Nursery:
    nursery: trio.Nursery = current_app.config["PYLOCALAI_NURSERY"]
    return nursery


def _job_ref(job_id: str) -> dict[str, str]:
    return {"uuid": job_id, "status": f"{request.host_url.rstrip('/')}/models/jobs/{job_id}"}


@bp.post("/models/apply")
async def apply() -> dict[str, Any]:
    job = service().start_apply(_nursery(), await read_json())
    return _job_ref(job.uuid)


@bp.post("/models/delete/<name>")
async def delete(name: str) -> dict[str, Any]:
    job = service().start_delete(_nursery(), name)
    return _job_ref(job.uuid)


@bp.get("/models/jobs/<job_id>")
async def job_status(job_id: str) -> dict[str, Any]:
    return service().job(job_id).to_json()


@bp.post("/models/jobs/<job_id>/cancel")
async def job_cancel(job_id: str) -> dict[str, Any]:
    return service().cancel(job_id).to_json()


@bp.get("/models/jobs")
async def jobs() -> dict[str, Any]:
    return {k: j.to_json() for k, j in service().jobs.items()}


@bp.get("/models/available")
async def available() -> list[dict[str, Any]]:
    return await service().available()


@bp.get("/models/galleries")
async def galleries() -> list[dict[str, Any]]:
    return [g.to_json() for g in service().galleries]


@bp.post("/models/galleries")
async def add_gallery() -> list[dict[str, Any]]:
    svc = service()
    gallery = parse_gallery(await read_json())
    for url in (gallery.url, *gallery.mirrors):  # local galleries are the admin's to configure
        resolve_url(url, {}, allow_file=False)
    svc.add_gallery(gallery)
    return [g.to_json() for g in svc.galleries]


@bp.delete("/models/galleries")
async def remove_gallery() -> list[dict[str, Any]]:
    body = await read_json()
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("'name' of the gallery to remove is required", param="name")
    svc = service()
    svc.remove_gallery(name)
    return [g.to_json() for g in svc.galleries]
