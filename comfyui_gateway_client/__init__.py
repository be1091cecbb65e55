"""A Python client of the gateway's REST API, blocking (`GatewayClient`) and asyncio (`AsyncGatewayClient`).

    from comfyui_gateway_client import GatewayClient

    with GatewayClient("http://127.0.0.1:3000", api_key="...") as gateway:
        job = gateway.generate("solid_color", width=64, height=64, color=255)
        gateway.download_outputs(job.job_id, "out")

It talks to the API only (never the database), and returns its own models of the API's answers.
"""

from comfyui_gateway_client.aio import AsyncGatewayClient
from comfyui_gateway_client.config import InvalidGatewayUrl
from comfyui_gateway_client.errors import (
    AuthFailed,
    Conflict,
    Forbidden,
    GatewayError,
    GatewayUnreachable,
    InvalidRequest,
    JobFailed,
    NotFound,
    OutputCorrupted,
    TryLater,
)
from comfyui_gateway_client.models import (
    Batch,
    BatchStatus,
    Event,
    Job,
    JobStatus,
    OutputFile,
    Workflow,
    WorkflowSummary,
)
from comfyui_gateway_client.sync import GatewayClient

__all__ = [
    "AsyncGatewayClient", "AuthFailed", "Batch", "BatchStatus", "Conflict", "Event", "Forbidden", "GatewayClient",
    "GatewayError", "GatewayUnreachable", "InvalidGatewayUrl", "InvalidRequest", "Job", "JobFailed", "JobStatus",
    "NotFound", "OutputCorrupted", "OutputFile", "TryLater", "Workflow", "WorkflowSummary",
]
