"""The ComfyUI servers the gateway drives (COMFYUI_URLS, or COMFYUI_URL for one), and the Temporal task queues
that place jobs on them.

A job's `run_prompt` waits in Temporal, on the shared queue `<queue>.comfyui` (any backend) or on
`<queue>.comfyui.tag.<tag>` (a backend with that tag), until a backend's worker has a free slot and polls it:
a job is placed when a slot frees up, not at submit. Each backend also polls its own queue `<queue>.<id>`,
where a job goes back to the backend that already has its prompt (and where jobs from before the fleet run).
No I/O here: the workflow imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from app.settings import Settings

# The id COMFYUI_URL's one backend has always had: jobs rows and histories name it.
SINGLE_BACKEND_ID = "comfyui-1"
_NAME = re.compile(r"[a-z0-9-]{1,32}")
_TAG = re.compile(r"[a-z0-9-]{1,32}")
# The shared queue's suffix: no backend may be named so, since a backend's own queue is `<queue>.<id>`.
_SHARED = "comfyui"


@dataclass(frozen=True)
class Backend:
    id: str
    url: str
    slots: int
    tags: tuple[str, ...] = ()

    def capacity(self, prefetch: int) -> int:
        """Prompts the gateway keeps on this ComfyUI at once: one running per slot, `prefetch` more per slot
        waiting in ComfyUI's own queue so that the GPU never waits for the gateway between two prompts."""
        return self.slots * (1 + prefetch)

    @property
    def public_url(self) -> str:
        return without_credentials(self.url)


def without_credentials(url: str) -> str:
    """The URL without its user and password (`user:password@`), for answers, job errors and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def valid_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    parts = urlsplit(url)
    if parts.query or parts.fragment or "?" in url or "#" in url:
        # The gateway appends ComfyUI's paths (/prompt, /ws) to the URL: a query would end up in front of them.
        raise ValueError("must not have a query or fragment (credentials go in user:password@)")
    return url.rstrip("/")


def valid_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise ValueError(f"tag {tag!r} must be 1 to 32 of a-z, 0-9 and -")
    return tag


def parse_backends(text: str, default_slots: int) -> list[Backend]:
    """COMFYUI_URLS: `name=url[;slots=N][;tags=a+b]`, comma-separated. Errors name the entry, never its URL
    (which may hold credentials)."""
    backends: list[Backend] = []
    for number, entry in enumerate((item.strip() for item in text.split(",") if item.strip()), start=1):
        name, sep, rest = entry.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(f"entry {number} must be name=url with a name of 1 to 32 of a-z, 0-9 and -")
        if name == _SHARED:
            raise ValueError(f"the name {_SHARED} is the shared queue's; give the backend another")
        url, *options = [part.strip() for part in rest.split(";")]
        slots, tags = default_slots, ()
        for option in options:
            key, _, value = option.partition("=")
            if key == "slots" and value.isdigit() and 1 <= int(value) <= 64:
                slots = int(value)
            elif key == "tags" and value:
                tags = tuple(valid_tag(tag) for tag in value.split("+"))
            else:
                raise ValueError(f"backend {name}: unknown option {key!r} (slots=1..64 or tags=a+b)")
        try:
            url = valid_url(url)
        except ValueError as error:
            raise ValueError(f"backend {name}: the URL {error}") from None
        if any(backend.id == name for backend in backends):
            raise ValueError(f"backend {name} is listed twice")
        backends.append(Backend(id=name, url=url, slots=slots, tags=tags))
    if not backends:
        raise ValueError("names no backend")
    return backends


def configured_backends(settings: Settings) -> list[Backend]:
    if settings.comfyui_urls:
        return parse_backends(settings.comfyui_urls, settings.max_concurrency)
    return [Backend(id=SINGLE_BACKEND_ID, url=settings.comfyui_url, slots=settings.max_concurrency)]


def backend_task_queue(settings: Settings, backend_id: str) -> str:
    """The backend's own queue: a job pinned to it (its prompt is there), and every job from before the fleet."""
    return own_task_queue(settings.temporal_task_queue, backend_id)


def own_task_queue(task_queue: str, backend_id: str) -> str:
    return f"{task_queue}.{backend_id}"


def shared_task_queue(task_queue: str) -> str:
    """Where a job's prompt waits for any backend's slot."""
    return f"{task_queue}.{_SHARED}"


def tag_task_queue(task_queue: str, tag: str) -> str:
    """Where a job that asks for `tag` waits for a slot of a backend with that tag."""
    return f"{task_queue}.{_SHARED}.tag.{tag}"


def placement_queue(task_queue: str, tag: str | None) -> str:
    return tag_task_queue(task_queue, tag) if tag else shared_task_queue(task_queue)


def served_queues(settings: Settings, backend: Backend) -> list[str]:
    """Every queue a backend's worker polls for prompts: the shared one, one per tag, its own."""
    main = settings.temporal_task_queue
    return [shared_task_queue(main), *(tag_task_queue(main, tag) for tag in backend.tags),
            backend_task_queue(settings, backend.id)]
