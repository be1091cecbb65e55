"""Where a webhook may go: WEBHOOK_ALLOWED_DOMAINS, and the SSRF checks of app.safe_http.

An entry of WEBHOOK_ALLOWED_DOMAINS matches its host exactly and every subdomain of it (`example.com` allows
`hooks.example.com`); `*` allows any host. Whatever matched, the addresses reached must be public, except for a
host that is listed exactly: listing `127.0.0.1` or `hooks.internal` is how an operator lets webhooks reach a
loopback or private receiver on purpose. `*` never does.

Checked twice: at submit, what can be told without resolving (scheme, host, a literal address); at every
delivery attempt, every address the host resolves to, the connection then pinned to a checked address.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from app.safe_http import RefusedTarget, check_literal_host, parse_http_url, resolve

ANY_HOST = "*"


def _host(url: httpx.URL) -> str:
    return url.host.lower().rstrip(".")


def listed_exactly(url: httpx.URL, allowed: Sequence[str]) -> bool:
    return _host(url) in allowed


def check_callback_url(value: str, allowed: Sequence[str]) -> httpx.URL:
    """The callback URL, parsed, if webhooks may go there; RefusedTarget says why not."""
    url = parse_http_url(value)
    if url.userinfo:
        raise RefusedTarget("must not carry credentials; the webhook's signature authenticates it")
    host = _host(url)
    if not allowed:
        raise RefusedTarget("webhooks are switched off on this gateway (WEBHOOK_ALLOWED_DOMAINS is empty)")
    if ANY_HOST not in allowed and not any(host == entry or host.endswith("." + entry) for entry in allowed):
        raise RefusedTarget(f"the host {host} is not in WEBHOOK_ALLOWED_DOMAINS")
    check_literal_host(url, allow_private=listed_exactly(url, allowed))
    return url


async def resolve_callback(url: httpx.URL, allowed: Sequence[str]) -> list[str]:
    """The checked addresses to connect to, resolved now (every attempt: DNS answers change)."""
    url = check_callback_url(str(url), allowed)  # the list may have changed since the job was submitted
    return await resolve(url, allow_private=listed_exactly(url, allowed))
