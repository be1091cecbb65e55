"""HTTP + WebSocket client for one ComfyUI server, as its protocol is recorded in shared/comfyui/PROTOCOL.md.

Every transport failure becomes a `ComfyError`: connection refused or timeouts → COMFYUI_UNREACHABLE
(retryable); `POST /prompt` 400 → VALIDATION_ERROR with ComfyUI's node errors; anything else unexpected
→ COMFYUI_PROTOCOL_ERROR.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from app.comfy.backends import without_credentials
from app.comfy.errors import ComfyError, classify_prompt_rejection
from app.comfy.health import BackendHealth
from app.errors import ErrorCode

_STREAM_CHUNK = 256 * 1024
# ComfyUI validates a prompt before it answers the post: a large graph takes a while, and a post given up on
# while ComfyUI still validates would be queued all the same.
_POST_PROMPT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


def _not_as_recorded(method: str, path: str, what: str) -> ComfyError:
    return ComfyError(ErrorCode.COMFYUI_PROTOCOL_ERROR, f"ComfyUI answered {method} {path} with {what}", {})


@dataclass(frozen=True)
class QueueSnapshot:
    running: list[str]
    pending: list[str]  # in execution order

    def position(self, prompt_id: str) -> int | None:
        """0 while running, n for the n-th pending prompt, None when not queued at all."""
        if prompt_id in self.running:
            return 0
        if prompt_id in self.pending:
            return self.pending.index(prompt_id) + 1
        return None


@dataclass(frozen=True)
class WsEvent:
    """A text WebSocket message: `{"type": ..., "data": {...}}`."""

    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class WsBinary:
    """A binary frame: a big-endian uint32 event type (1 = preview image), a uint32 image format
    (1 = JPEG, 2 = PNG), then the payload."""

    event_type: int
    image_format: int
    payload: bytes


@dataclass(frozen=True)
class DownloadedFile:
    size: int
    sha256: str
    content_type: str


def _parsed(response: httpx.Response, method: str, path: str) -> Any:
    """The JSON body; anything else (a proxy's HTML page, say) is not ComfyUI answering as recorded."""
    try:
        return response.json()
    except ValueError:
        raise _not_as_recorded(method, path, f"a body that is not JSON ({response.headers.get('content-type')})") from None


def parse_ws_message(raw: str | bytes) -> WsEvent | WsBinary:
    if isinstance(raw, bytes):
        if len(raw) < 8:
            raise ComfyError(ErrorCode.COMFYUI_PROTOCOL_ERROR, "binary WebSocket frame shorter than its header")
        event_type, image_format = struct.unpack(">II", raw[:8])
        return WsBinary(event_type, image_format, raw[8:])
    try:
        message = json.loads(raw)
        return WsEvent(str(message.get("type")), message.get("data") or {})
    except (ValueError, AttributeError):
        raise ComfyError(ErrorCode.COMFYUI_PROTOCOL_ERROR, "a WebSocket message that is not a JSON event") from None


class ComfyClient:
    """`health`, when given, hears of every call that reached ComfyUI and every one that did not."""

    def __init__(self, base_url: str, http: httpx.AsyncClient, health: BackendHealth | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # What errors name: they reach job errors, warnings and logs, and must not carry the URL's credentials.
        self.display_url = without_credentials(self.base_url)
        self._http = http
        self._health = health

    @property
    def health(self) -> BackendHealth | None:
        return self._health

    def _unreachable(self, exc: Exception) -> ComfyError:
        # Whether ComfyUI may have received the request: a post that never connected was surely not queued.
        sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | ConnectionRefusedError)
        return self._down(ComfyError(
            ErrorCode.COMFYUI_UNREACHABLE,
            f"ComfyUI at {self.display_url} is unreachable: {type(exc).__name__}",
            {"url": self.display_url, "requestSent": sent},
        ))

    def _down(self, error: ComfyError) -> ComfyError:
        if self._health is not None:
            self._health.failed(error.message)
        return error

    def _answered(self) -> None:
        if self._health is not None:
            self._health.answered()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, f"{self.base_url}{path}", **kwargs)
        except (httpx.TransportError, OSError) as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 500:
            raise self._down(ComfyError(
                ErrorCode.COMFYUI_UNREACHABLE,
                f"ComfyUI answered {method} {path} with HTTP {response.status_code}",
                {"url": self.display_url, "status": response.status_code},
            ))
        self._answered()
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise ComfyError(
                ErrorCode.COMFYUI_PROTOCOL_ERROR,
                f"ComfyUI answered {method} {path} with HTTP {response.status_code}",
                {"status": response.status_code},
            )
        return _parsed(response, method, path)

    # --- introspection ---------------------------------------------------------------------------

    async def system_stats(self) -> dict[str, Any]:
        return await self._json("GET", "/system_stats")

    async def queue_remaining(self) -> int:
        """The prompts ComfyUI has, running and pending (GET /prompt): a cheap count, without GET /queue's graphs."""
        body = await self._json("GET", "/prompt")
        try:
            remaining = body["exec_info"]["queue_remaining"]
        except (KeyError, TypeError):
            raise _not_as_recorded("GET", "/prompt", "no exec_info.queue_remaining") from None
        if not isinstance(remaining, int):
            raise _not_as_recorded("GET", "/prompt", "a queue_remaining that is no count")
        return remaining

    async def object_info(self, class_type: str | None = None) -> dict[str, Any]:
        return await self._json("GET", f"/object_info/{class_type}" if class_type else "/object_info")

    # --- prompts -----------------------------------------------------------------------------------

    async def post_prompt(
        self, prompt: dict[str, Any], *, prompt_id: str, client_id: str, extra_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = {"prompt": prompt, "prompt_id": prompt_id, "client_id": client_id, "extra_data": extra_data or {}}
        response = await self._request("POST", "/prompt", json=body, timeout=_POST_PROMPT_TIMEOUT)
        if response.status_code == 400:
            try:
                payload = response.json()
            except ValueError:
                payload = response.text
            raise classify_prompt_rejection(400, payload)
        if response.status_code != 200:
            raise ComfyError(
                ErrorCode.COMFYUI_PROTOCOL_ERROR, f"POST /prompt answered HTTP {response.status_code}", {}
            )
        return _parsed(response, "POST", "/prompt")

    async def queue(self) -> QueueSnapshot:
        body = await self._json("GET", "/queue")
        try:
            # Each item is [number, prompt_id, prompt, extra_data, outputs_to_execute].
            running = [item[1] for item in body.get("queue_running", [])]
            pending = [item[1] for item in sorted(body.get("queue_pending", []), key=lambda item: item[0])]
        except (AttributeError, IndexError, KeyError, TypeError):
            raise _not_as_recorded("GET", "/queue", "a queue of another shape") from None
        return QueueSnapshot(running=running, pending=pending)

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's history entry, or None while it is pending, running or unknown."""
        body = await self._json("GET", f"/history/{prompt_id}")
        entry = body.get(prompt_id) if isinstance(body, dict) else body
        if not isinstance(body, dict) or not isinstance(entry, dict | None):
            raise _not_as_recorded("GET", f"/history/{prompt_id}", "a history of another shape")
        return entry

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """Prompt-scoped when `prompt_id` is given: ComfyUI ignores it unless that prompt is running."""
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else {})

    async def delete_from_queue(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", json={"delete": prompt_ids})

    # --- files -------------------------------------------------------------------------------------

    async def download(self, *, filename: str, subfolder: str, folder_type: str, destination: Path) -> DownloadedFile:
        """Stream `/view` into `destination`, hashing as it goes; never holds the whole file in memory. A file
        that cannot be written raises OSError, which is the gateway's trouble, not ComfyUI's."""
        params = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        where = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._http.stream("GET", f"{self.base_url}/view", params=params) as response:
                if response.status_code >= 500:
                    raise self._down(ComfyError(
                        ErrorCode.COMFYUI_UNREACHABLE,
                        f"ComfyUI answered GET /view for {subfolder}/{filename} with HTTP {response.status_code}",
                        {"url": self.display_url, "status": response.status_code},
                    ))
                self._answered()
                if response.status_code == 404:
                    raise ComfyError(
                        ErrorCode.COMFYUI_PROTOCOL_ERROR,
                        f"ComfyUI has no output file {subfolder}/{filename} ({folder_type})", where,
                    )
                if response.status_code != 200:
                    raise ComfyError(
                        ErrorCode.COMFYUI_PROTOCOL_ERROR,
                        f"ComfyUI refused to serve the output file {subfolder}/{filename} (HTTP {response.status_code})",
                        {**where, "status": response.status_code},
                    )
                content_type = response.headers.get("content-type", "application/octet-stream").split(";")[0]
                with open(destination, "wb") as sink:
                    async for chunk in response.aiter_bytes(_STREAM_CHUNK):
                        sink.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                    sink.flush()
                    os.fsync(sink.fileno())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return DownloadedFile(size=size, sha256=digest.hexdigest(), content_type=content_type)

    async def upload_image(
        self, *, name: str, data: bytes, content_type: str, subfolder: str = "", overwrite: bool = False
    ) -> str:
        """Upload to ComfyUI's input folder; returns the name to put in the graph (ComfyUI may rename)."""
        files = {"image": (name, data, content_type)}
        form = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        body = await self._json("POST", "/upload/image", files=files, data=form)
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    # --- live events -------------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        return f"{scheme}{self.base_url.removeprefix('https').removeprefix('http')}/ws"

    async def connect_events(self, client_id: str) -> ClientConnection:
        """A WebSocket that receives the execution events of prompts posted with this `client_id`."""
        try:
            # The socket is closed as soon as the result is in hand, often with events still unread. With
            # websockets' default queue of 16, reading pauses then and the server's close frame is never
            # read, so the close would wait out its timeout (10 s by default) on every such job.
            socket = await websockets.connect(
                f"{self.ws_url}?clientId={client_id}", max_size=None, open_timeout=10, ping_interval=20,
                max_queue=1024, close_timeout=1,
            )
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        self._answered()
        return socket
