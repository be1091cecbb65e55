"""CORS for the codec routes alone: the Temporal Web UI calls /codec/* from the browser, from its own origin
(CODEC_CORS_ORIGINS), with credentials and the `X-Namespace` and `Authorization` headers. The rest of the API
keeps its own CORS (CORS_ORIGINS), so allowing the Web UI here opens nothing else to it."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

CODEC_PATH_PREFIX = "/codec/"


class CodecCors:
    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app, allow_origins=origins, allow_credentials=True, allow_methods=["POST"],
            allow_headers=["Content-Type", "Authorization", "X-Namespace", "X-API-Key"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(CODEC_PATH_PREFIX):
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)
