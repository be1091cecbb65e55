"""Health (ComfyUI and Temporal reachability) and what this gateway can do."""

from __future__ import annotations

import time
from importlib.metadata import version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from app.comfy.backends import configured_backends
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.comfy.models import installed_models
from app.models import CamelModel
from app.templates.store import list_latest_templates

router = APIRouter(tags=["health"])

GATEWAY_VERSION = version("comfyui-gateway")


class Capabilities(CamelModel):
    workflows: list[str]
    max_size: int
    max_batch: int
    formats: list[str]
    storage_provider: str


@router.get("/health")
async def health(request: Request, settings: SettingsDep) -> JSONResponse:
    """From the probe refreshed in the background about once a second (api/probes.py)."""
    probe = request.app.state.probes.latest
    backend = configured_backends(settings)[0]
    body = {
        "ok": probe.healthy,
        "version": GATEWAY_VERSION,
        "comfyui": {"reachable": probe.comfyui[backend.id], "url": backend.url},
        "temporal": {"reachable": probe.temporal, "address": settings.temporal_address},
        "uptime": round(time.monotonic() - request.app.state.started_at, 3),
        "checkedAt": probe.checked_at.isoformat(),
    }
    return JSONResponse(body, status_code=200 if probe.healthy else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """503 until a worker polls the job queue and each ComfyUI's queue: only then can a job run."""
    probe = request.app.state.probes.latest
    body = {
        "ready": probe.ready,
        "temporal": {"reachable": probe.temporal},
        "workers": {"queues": probe.workers},
        "checkedAt": probe.checked_at.isoformat(),
    }
    return JSONResponse(body, status_code=200 if probe.ready else 503)


@router.get("/capabilities", response_model=Capabilities)
def capabilities(session: SessionDep, settings: SettingsDep) -> Capabilities:
    return Capabilities(
        workflows=[template.template_id for template in list_latest_templates(session)],
        max_size=settings.max_image_size,
        max_batch=settings.max_batch_size,
        formats=["binary", "base64"],
        storage_provider=settings.storage_provider.value,
    )


class Models(CamelModel):
    checkpoints: list[str]
    loras: list[str]
    vae: list[str]
    controlnet: list[str]
    upscale_models: list[str]


@router.get("/models", response_model=Models)
async def models(request: Request, settings: SettingsDep) -> Models:
    """The models ComfyUI can load, so clients can pick valid values for a template's fields."""
    client = ComfyClient(configured_backends(settings)[0].url, request.app.state.http)
    try:
        return Models(**await request.app.state.comfyui_answers.get("models", lambda: installed_models(client)))
    except ComfyError as error:
        raise ApiError(error.code, error.message, error.details) from error
