"""Rate limits: at most RATE_LIMIT_MAX requests per RATE_LIMIT_WINDOW_MS from each client address and from each
principal (except the open mode's one principal, who is everyone), in a moving window kept by the `limits`
library (in this process's memory, or in Redis, which every API process then shares).

The address limit is counted by `RateLimitMiddleware`, before the request's body is read or its credentials
are checked, so a flood (of bad credentials too) costs a count and an answer. The principal's is counted by
the `limit_principal` dependency of every router that needs a caller, once the principal is known. Every
answer counted carries the tighter of the two in `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
`X-RateLimit-Reset` (seconds until a request counts again); a refusal is 429 RATE_LIMITED with `Retry-After`
(seconds). /health, /ready and /metrics are not counted: probes of load balancers and orchestrators, and
Prometheus's scrapes, must never be turned away.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from dataclasses import dataclass, field

from fastapi import Request
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import PrincipalDep
from api.errors import ApiError, error_response
from api.openapi import answers_with
from app.auth import OPEN_MODE_PRINCIPAL
from app.errors import ErrorCode
from app.settings import Settings

log = logging.getLogger(__name__)

EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
_SCOPE_KEY = "gateway.rate_limit"
# How often a rate limit store that cannot be reached is reported in the log, at most.
_STORE_WARNING_SECONDS = 60.0
# The close code of a WebSocket over the address's rate limit (README, "The feed of all jobs").
WS_CLOSE_RATE_LIMITED = 4429


@dataclass(frozen=True)
class WindowState:
    allowed: bool
    remaining: int
    reset_at: float  # epoch seconds at which the oldest request in the window stops counting


@dataclass
class RequestCount:
    """What the limits said of one request, for its answer's headers."""

    limit: int
    states: list[WindowState] = field(default_factory=list)

    def headers(self) -> list[tuple[bytes, bytes]]:
        tightest = min(self.states, key=lambda state: (state.allowed, state.remaining, -state.reset_at))
        reset = max(1, math.ceil(tightest.reset_at - time.time()))
        headers = [(b"x-ratelimit-limit", str(self.limit).encode()),
                   (b"x-ratelimit-remaining", str(max(0, tightest.remaining)).encode()),
                   (b"x-ratelimit-reset", str(reset).encode())]
        if not tightest.allowed:
            headers.append((b"retry-after", str(reset).encode()))
        return headers


class RateLimits:
    def __init__(self, settings: Settings) -> None:
        assert settings.rate_limit_max is not None and settings.rate_limit_window_ms is not None
        # `limits` counts windows in whole seconds.
        self.item = RateLimitItemPerSecond(settings.rate_limit_max, math.ceil(settings.rate_limit_window_ms / 1000))
        self.limiter = MovingWindowRateLimiter(_storage(settings.rate_limit_storage_uri))
        self.trusted_proxies = [ipaddress.ip_network(entry, strict=False) for entry in settings.trusted_proxies]
        self._warned_at = -math.inf

    async def count(self, kind: str, key: str) -> WindowState:
        """One more request of `key` (an address, a principal's id), or a refusal that does not count."""
        try:
            allowed = await self.limiter.hit(self.item, kind, key)
            stats = await self.limiter.get_window_stats(self.item, kind, key)
        except Exception as error:  # the store's client's errors vary (connection, timeout, protocol)
            # An unreachable store must not take the API down with it: requests go uncounted meanwhile.
            if time.monotonic() - self._warned_at > _STORE_WARNING_SECONDS:
                self._warned_at = time.monotonic()
                log.warning("rate limit store unreachable; requests are not limited meanwhile (%s)",
                            type(error).__name__)
            return WindowState(True, self.item.amount, time.time() + self.item.get_expiry())
        return WindowState(allowed, stats.remaining, stats.reset_time)

    def client_address(self, scope: Scope) -> str:
        """The peer's address; behind a trusted proxy, the first address in X-Forwarded-For, from the right,
        that is not one of the trusted proxies (what the outermost trusted proxy saw)."""
        peer = scope["client"][0] if scope.get("client") else "unknown"
        if not self.trusted_proxies or not self._is_trusted(peer):
            return peer
        forwarded = [address.strip() for name, value in scope["headers"] if name == b"x-forwarded-for"
                     for address in value.decode("latin-1").split(",") if address.strip()]
        for address in reversed(forwarded):
            if not self._is_trusted(address):
                return address
        return forwarded[0] if forwarded else peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)


def _storage(uri: str) -> Storage:
    if uri.startswith("memory://"):
        return MemoryStorage()
    return RedisStorage("async+" + uri, implementation="redispy")


def _refusal(count: RequestCount, what: str) -> ApiError:
    return ApiError(ErrorCode.RATE_LIMITED, f"too many requests from this {what}: at most {count.limit} per "
                                            "window; try again after Retry-After seconds", {"limitedBy": what})


class RateLimitMiddleware:
    """ASGI middleware: counts each request by client address, refuses one over the limit, and writes the
    rate limit headers on every answer counted (the principal's count, if it comes later, included)."""

    def __init__(self, app: ASGIApp, limits: RateLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        count = RequestCount(self.limits.item.amount)
        count.states.append(await self.limits.count("address", self.limits.client_address(scope)))
        scope[_SCOPE_KEY] = self.limits, count

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *count.headers()]
            await send(message)

        if not count.states[-1].allowed:
            refused = _refusal(count, "address")
            await error_response(refused.status, refused.code, refused.message, refused.details)(
                scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket counts once by address, as it connects: a flood of connections, each trying a guessed key
        in its first message, costs what a flood of requests does. Over the limit it is accepted and closed at
        once with WS_CLOSE_RATE_LIMITED (browsers see no status of a refused handshake)."""
        if (await self.limits.count("address", self.limits.client_address(scope))).allowed:
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": WS_CLOSE_RATE_LIMITED,
                    "reason": "too many requests from this address; try again later"})


@answers_with(ErrorCode.RATE_LIMITED)
async def limit_principal(request: Request, principal: PrincipalDep) -> None:
    """The principal's count; nothing when rate limits are off (or the path is not counted). The open mode's
    one principal is every caller, whom the address limit counts apart."""
    counted = request.scope.get(_SCOPE_KEY)
    if counted is None or principal == OPEN_MODE_PRINCIPAL:
        return
    limits, count = counted
    state = await limits.count("principal", principal.id)
    count.states.append(state)
    if not state.allowed:
        raise _refusal(count, "principal")

