"""Security headers on every answer, the API's own errors and 500s included.

JSON and output files need no scripts, styles or frames: their Content-Security-Policy allows nothing. The
docs pages (/docs, /redoc) run the Swagger UI and ReDoc bundled with the package (fastapi-offline): scripts
and styles from this origin, the pages' inline start-up script and styles, images as data: URIs and ReDoc's
blob: worker. Strict-Transport-Security is sent on answers over https only: over plain http browsers ignore
it, and behind a proxy that ends TLS the proxy's answers are the place for it. API answers are `no-store`
(they hold job state and users' outputs); the docs' static assets keep their own caching.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_API_POLICY = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'")
_DOCS_POLICY = (
    b"content-security-policy",
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
)
_NO_STORE = (b"cache-control", b"no-store")
_HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")

DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
DOCS_ASSETS = "/static-offline-docs/"


def _variants(headers: list[tuple[bytes, bytes]]) -> dict[bool, list[tuple[bytes, bytes]]]:
    return {False: headers, True: [*headers, _HSTS]}


# Made once: the middleware runs on every request, polling included.
_API = _variants([*_COMMON, _API_POLICY, _NO_STORE])
_DOCS_PAGES = _variants([*_COMMON, _DOCS_POLICY, _NO_STORE])
_DOCS_ASSETS = _variants([*_COMMON, _DOCS_POLICY])


def _headers_for(path: str, https: bool) -> list[tuple[bytes, bytes]]:
    if path in DOCS_PATHS:
        return _DOCS_PAGES[https]
    if path.startswith(DOCS_ASSETS):
        return _DOCS_ASSETS[https]
    return _API[https]


class SecurityHeaders:
    """ASGI middleware, the outermost: a header the answer already has is left as the route set it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = _headers_for(scope["path"], scope.get("scheme") == "https")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [header for header in added if header[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
