"""Health (ComfyUI and Temporal reachability) and what this gateway can do."""

from __future__ import annotations

import time
from datetime import datetime
from importlib.metadata import version

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from api.openapi import answers_with
from api.rate_limits import limit_principal
from app.comfy.backends import configured_backends
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.comfy.models import installed_models
from app.errors import ErrorCode
from app.models import CamelModel, OutputFormat
from app.templates.store import list_latest_templates

router = APIRouter(tags=["health"])

GATEWAY_VERSION = version("comfyui-gateway")


class ComfyUIReachability(CamelModel):
    reachable: bool
    url: str


class TemporalReachability(CamelModel):
    reachable: bool


class TemporalHealth(TemporalReachability):
    address: str


class HealthReport(CamelModel):
    ok: bool = Field(description="Temporal answers and at least one ComfyUI backend does")
    version: str
    comfyui: ComfyUIReachability = Field(
        description="whether any backend answers; `url` is the first backend's (GET /backends tells each)")
    backends: dict[str, ComfyUIReachability] = Field(description="backend id → whether it answers, and its URL")
    temporal: TemporalHealth
    uptime: float = Field(description="seconds since the API started")
    checked_at: datetime = Field(description="when the background probe last looked (about once a second)")


class Workers(CamelModel):
    queues: dict[str, bool] = Field(description="task queue → whether a worker polls it")


class ReadinessReport(CamelModel):
    ready: bool = Field(description="a worker polls the job queue and each ComfyUI's queue")
    temporal: TemporalReachability
    workers: Workers
    checked_at: datetime = Field(description="when the background probe last looked (about once a second)")


class Capabilities(CamelModel):
    workflows: list[str]
    max_size: int
    max_batch: int
    formats: list[str]
    output_formats: list[OutputFormat] = Field(description="what a job's `outputFormat` may be")
    storage_provider: str


@router.get("/health", response_model=HealthReport, responses={
    503: {"model": HealthReport, "description": "ComfyUI or Temporal does not answer"}})
async def health(request: Request, settings: SettingsDep) -> JSONResponse:
    backends = configured_backends(settings)
    probe = request.app.state.probes.latest
    report = HealthReport(
        ok=probe.healthy,
        version=GATEWAY_VERSION,
        comfyui=ComfyUIReachability(reachable=any(probe.comfyui.values()), url=backends[0].public_url),
        backends={backend.id: ComfyUIReachability(reachable=probe.comfyui[backend.id], url=backend.public_url)
                  for backend in backends},
        temporal=TemporalHealth(reachable=probe.temporal, address=settings.temporal_address),
        uptime=round(time.monotonic() - request.app.state.started_at, 3),
        checked_at=probe.checked_at,
    )
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.ok else 503)


@router.get("/ready", response_model=ReadinessReport, responses={
    503: {"model": ReadinessReport, "description": "no worker polls one of the queues, or Temporal does not answer"}})
async def ready(request: Request) -> JSONResponse:
    """503 until a worker polls the job queue and each ComfyUI's queue: only then can a job run."""
    probe = request.app.state.probes.latest
    report = ReadinessReport(
        ready=probe.ready,
        temporal=TemporalReachability(reachable=probe.temporal),
        workers=Workers(queues=probe.workers),
        checked_at=probe.checked_at,
    )
    return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.ready else 503)


# /health and /ready are public (load balancers, orchestrators); what follows needs a caller.
@router.get("/capabilities", response_model=Capabilities, dependencies=[Depends(limit_principal)])
def capabilities(session: SessionDep, settings: SettingsDep) -> Capabilities:
    return Capabilities(
        workflows=[template.template_id for template in list_latest_templates(session)],
        max_size=settings.max_image_size,
        max_batch=settings.max_batch_size,
        formats=["binary", "base64"],
        output_formats=list(OutputFormat),
        storage_provider=settings.storage_provider.value,
    )


class Models(CamelModel):
    checkpoints: list[str]
    loras: list[str]
    vae: list[str]
    controlnet: list[str]
    upscale_models: list[str]


@router.get("/models", response_model=Models, dependencies=[Depends(limit_principal)])
@answers_with(ErrorCode.COMFYUI_UNREACHABLE, ErrorCode.COMFYUI_PROTOCOL_ERROR)
async def models(request: Request) -> Models:
    """The models ComfyUI can load, so clients can pick valid values for a template's fields."""
    client = ComfyClient(request.app.state.probes.answering_backend().url, request.app.state.http)
    try:
        return Models(**await request.app.state.comfyui_answers.get("models", lambda: installed_models(client)))
    except ComfyError as error:
        raise ApiError(error.code, error.message, error.details) from error
