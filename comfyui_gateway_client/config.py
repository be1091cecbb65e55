"""What both clients are made with: the gateway's URL, the credentials, timeouts, and when to try a request again."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from comfyui_gateway_client.errors import GatewayError, TryLater, unreachable

DEFAULT_URL = "http://127.0.0.1:3000"  # `comfyui-gateway dev` and `api` listen here unless PORT says otherwise
# A stream's keep-alive comment comes every SSE_KEEPALIVE_S (15 s by default): a minute of silence is a dead
# connection, and the stream reconnects.
STREAM_READ_TIMEOUT_S = 60.0
# Longest wait a Retry-After may impose on one try; a gateway asking for more gets the error instead.
MAX_RETRY_AFTER_S = 30.0


class InvalidGatewayUrl(ValueError):
    """The gateway's URL is no http:// or https:// URL (`localhost:3000`): said at once, not as an unreachable
    gateway after the retries."""


@dataclass(frozen=True)
class ClientConfig:
    url: str
    headers: dict[str, str]
    timeout: float
    retries: int

    @classmethod
    def make(cls, url: str | None, api_key: str | None, token: str | None, timeout: float, retries: int) -> ClientConfig:
        """`url`, `api_key` default to GATEWAY_URL and GATEWAY_API_KEY (as the CLI's do), `token` to GATEWAY_TOKEN."""
        api_key = api_key if api_key is not None else _from_environment("API_KEY")
        token = token if token is not None else _from_environment("TOKEN")
        headers = {"X-API-Key": api_key} if api_key else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = (url or _from_environment("URL") or DEFAULT_URL).rstrip("/")
        if not _is_http_url(url):
            example = f"http://{url}" if url and "://" not in url else DEFAULT_URL
            raise InvalidGatewayUrl(f"the gateway's URL {url!r} needs http:// or https:// and a host, e.g. {example}")
        return cls(url=url, headers=headers, timeout=timeout, retries=retries)

    def timeouts(self, waits: float = 0.0) -> httpx.Timeout:
        """Each request's; one the gateway holds on purpose (`wait=`) gets that long more to answer."""
        return httpx.Timeout(self.timeout, read=self.timeout + waits)

    def stream_timeouts(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_TIMEOUT_S))


def _is_http_url(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _from_environment(name: str) -> str | None:
    """GATEWAY_URL, GATEWAY_API_KEY, GATEWAY_TOKEN: the client's own defaults (which gateway, whose credentials),
    read where the client runs; the gateway itself never reads them."""
    return os.environ.get(f"GATEWAY_{name}")


def next_try(error: GatewayError | httpx.TransportError, tries_so_far: int, config: ClientConfig) -> float:
    """Seconds to wait before trying a request again; the error to raise when it is not tried again. Only what
    cannot have had an effect is tried again, so any request may be: a connection that was never made, and a 429
    or 503 the gateway answered before doing anything (rate limited, busy, too many waits or streams; the
    gateway says so with Retry-After)."""
    if tries_so_far <= config.retries:
        if isinstance(error, httpx.ConnectError):
            return min(0.25 * 2 ** (tries_so_far - 1), 2.0)
        if isinstance(error, TryLater) and error.retry_after is not None and error.retry_after <= MAX_RETRY_AFTER_S:
            return error.retry_after
    if isinstance(error, GatewayError):
        raise error
    raise unreachable(config.url, error) from error
