"""The ComfyUI servers the gateway drives, and the Temporal task queue that serialises work on each.

Each backend gets its own task queue whose worker runs at most MAX_CONCURRENCY prompts at a time, so jobs
beyond that wait durably in Temporal instead of in ComfyUI's in-memory queue. Today one backend comes from
COMFYUI_URL; routing among several fits here without changing the workflow or the activities.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.settings import Settings


@dataclass(frozen=True)
class Backend:
    id: str
    url: str


def configured_backends(settings: Settings) -> list[Backend]:
    return [Backend(id="comfyui-1", url=settings.comfyui_url)]


def backend_task_queue(settings: Settings, backend_id: str) -> str:
    return f"{settings.temporal_task_queue}.{backend_id}"
