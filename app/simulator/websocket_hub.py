"""The /ws side of the simulated server: connected sockets, event routing and binary frames.

Mirrors ComfyUI's PromptServer messaging. The worker thread calls `send_sync`, which queues the
event on the event loop; `publish_loop` sends queued events in order. An event addressed to a
client id goes only to the socket registered under that id and is dropped if there is none; an
event with sid None goes to every socket. The hub also carries the execution-facing fields
ComfyUI keeps on PromptServer (`client_id`, `last_node_id`, `last_prompt_id`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import uuid
from io import BytesIO
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}


class BinaryEventTypes:
    """First uint32 of a binary WS frame (ComfyUI protocol.py)."""

    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


PreviewImage = tuple[str, Image.Image, int | None]  # ("PNG" | "JPEG", image, max size)


class MessageHub:
    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        # Set by the executor for the prompt being run, as ComfyUI does on PromptServer.
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._messages: asyncio.Queue[tuple[Any, Any, str | None]] | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._messages = asyncio.Queue()

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        """Queue an event from any thread; it is sent in order by publish_loop."""
        loop, messages = self._loop, self._messages
        if loop is None or messages is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(messages.put_nowait, (event, data, sid))
        except RuntimeError:
            # The loop shut down between the check and the call: nobody is listening any more.
            pass

    async def publish_loop(self) -> None:
        assert self._messages is not None
        while True:
            event, data, sid = await self._messages.get()
            await self.send(event, data, sid)

    def supports_feature(self, sid: str | None, feature: str) -> bool:
        if sid is None or sid not in self.sockets_metadata:
            return False
        return self.sockets_metadata[sid].get("feature_flags", {}).get(feature, False) is True

    async def send(self, event: Any, data: Any, sid: str | None = None) -> None:
        if event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
            await self._send_bytes(BinaryEventTypes.PREVIEW_IMAGE, encode_preview(data), sid)
        elif event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:
            preview, metadata = data
            await self._send_bytes(event, encode_preview_with_metadata(preview, metadata), sid)
        else:
            await self._send_json(event, data, sid)

    async def _send_json(self, event: str, data: Any, sid: str | None) -> None:
        message = {"type": event, "data": data}
        for ws in self._targets(sid):
            await _send_ignoring_disconnects(ws.send_json, message)

    async def _send_bytes(self, event: int, payload: bytes, sid: str | None) -> None:
        message = struct.pack(">I", event) + payload
        for ws in self._targets(sid):
            await _send_ignoring_disconnects(ws.send_bytes, message)

    def _targets(self, sid: str | None) -> list[web.WebSocketResponse]:
        if sid is None:
            return list(self.sockets.values())
        ws = self.sockets.get(sid)
        return [ws] if ws is not None else []

    async def handle_websocket(self, request: web.Request, queue_remaining: int) -> web.WebSocketResponse:
        """GET /ws?clientId=..: register the socket, greet it with status, answer feature_flags."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            # ComfyUI replaces the old socket of a reconnecting client without closing it.
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}
        try:
            await self.send("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}, "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            first_message = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    logger.warning("ws connection closed with exception %s", ws.exception())
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        payload = json.loads(msg.data)
                        if first_message and payload.get("type") == "feature_flags":
                            self.sockets_metadata[sid]["feature_flags"] = payload.get("data", {})
                            await self.send("feature_flags", dict(SERVER_FEATURES), sid)
                        first_message = False
                    except json.JSONDecodeError:
                        logger.warning("Invalid JSON received from client %s: %s", sid, msg.data)
                    except Exception as exc:  # a malformed message must not drop the socket
                        logger.error("Error processing WebSocket message: %s", exc)
        finally:
            # As in ComfyUI: when a replaced socket closes later, this drops the *new* socket of
            # that client id too. A client must reconnect after its old socket is gone.
            self.sockets.pop(sid, None)
            self.sockets_metadata.pop(sid, None)
        return ws

    async def close_all(self) -> None:
        for ws in list(self.sockets.values()):
            await ws.close()


def encode_preview(preview: PreviewImage) -> bytes:
    """Legacy preview frame body: uint32 format (1 JPEG, 2 PNG) then the encoded image."""
    image_type, image, max_size = preview
    image = _fit(image, max_size)
    buffer = BytesIO()
    buffer.write(struct.pack(">I", 1 if image_type == "JPEG" else 2))
    image.save(buffer, format=image_type, quality=95, compress_level=1)
    return buffer.getvalue()


def encode_preview_with_metadata(preview: PreviewImage, metadata: dict[str, Any]) -> bytes:
    """Preview frame body for clients that announced supports_preview_metadata:
    uint32 metadata length, metadata JSON, then the encoded image."""
    image_type, image, max_size = preview
    image = _fit(image, max_size)
    metadata = {**metadata, "image_type": "image/png" if image_type == "PNG" else "image/jpeg"}
    metadata_json = json.dumps(metadata).encode("utf-8")
    buffer = BytesIO()
    image.save(buffer, format=image_type, quality=95, compress_level=1)
    return struct.pack(">I", len(metadata_json)) + metadata_json + buffer.getvalue()


def _fit(image: Image.Image, max_size: int | None) -> Image.Image:
    if max_size is None:
        return image
    return ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)


async def _send_ignoring_disconnects(send: Any, message: Any) -> None:
    try:
        await send(message)
    except (aiohttp.ClientError, ConnectionResetError, BrokenPipeError, ConnectionError) as err:
        logger.warning("send error: %s", err)


class LaneHub:
    """One parallel lane's view of the hub (benchmarks only): the executor of each lane sets its own prompt's
    client id and node here, and sends through the server's one hub. A reconnecting socket is not told the
    node a lane is on (ComfyUI, which runs one prompt, tells it)."""

    def __init__(self, hub: MessageHub) -> None:
        self._hub = hub
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        self._hub.send_sync(event, data, sid)

    def supports_feature(self, sid: str | None, feature: str) -> bool:
        return self._hub.supports_feature(sid, feature)
