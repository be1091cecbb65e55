"""Reaching a URL a user gave, without letting it reach the gateway's own network (SSRF).

Every host is resolved here and every address checked; the connection then goes to the checked address
itself (the URL's host travels in the Host header and in TLS SNI), so DNS cannot answer one address to the
check and another to the connection. Image inputs fetch through this, and so can anything else that calls out
to a user's URL. No Temporal here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

_UNKNOWN_HOST_ERRNOS = frozenset({socket.EAI_NONAME, socket.EAI_NODATA})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedTarget(Exception):
    """The URL is not one the gateway may reach (bad syntax, a non-public address, an unknown host):
    asking again cannot help."""


class TargetUnavailable(Exception):
    """The URL's host could not be resolved just now: worth trying again."""


def describe_url(url: httpx.URL) -> str:
    """The URL without credentials or query (signed URLs carry secrets there), shortened for messages."""
    shown = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"
    return shown if len(shown) <= 100 else shown[:99] + "…"


def parse_http_url(value: str) -> httpx.URL:
    """The URL, if it is an http(s) URL with a host and a usable port; a host's trailing dot (the DNS root,
    `example.com.`) is dropped, so that the host is checked and reached as the name or address it spells."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        raise RefusedTarget("is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise RefusedTarget(f"only http and https URLs with a host are accepted (got a {url.scheme}: URL)")
    # httpx takes any integer as a port (99999, 0, -1) and drops an empty one ("h:/x"): none can be connected to.
    if (url.port is not None and not 1 <= url.port <= 65535) or urlsplit(value).netloc.endswith(":"):
        raise RefusedTarget("has a port that is not a number from 1 to 65535")
    if url.host.endswith("."):
        host = url.host.rstrip(".")
        if not host:
            raise RefusedTarget("is not a valid URL")
        url = url.copy_with(host=host)
    return url


def check_literal_host(url: httpx.URL, *, allow_private: bool) -> None:
    """What can be told without resolving: a host that is a literal address the gateway must not reach."""
    address = literal_address(url.host)
    reason = None if address is None or allow_private else refusal_reason(address)
    if reason is not None:
        raise RefusedTarget(f"{address} is a {reason} address; only public addresses are reached")


def literal_address(host: str) -> Address | None:
    """The address a host names literally, in any form the resolver accepts: 127.0.0.1, but also
    2130706433, 127.1 and 0x7f.0.0.1."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


# Cloud instance-metadata services: named first, so that a refusal says what was aimed at.
_METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IETF protocol assignments (RFC 6890): some of it is counted global by Python's ipaddress (192.0.0.8, ...).
_IETF_PROTOCOL = ipaddress.ip_network("192.0.0.0/24")
# NAT64 prefixes translate to any IPv4 address, private ones included, on a network that runs NAT64.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def refusal_reason(address: Address) -> str | None:
    """Why the gateway must not connect to `address` on a user's behalf, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1, though ipaddress does not say so here
    checks = (
        ("cloud metadata", address in _METADATA),
        ("carrier-grade NAT", isinstance(address, ipaddress.IPv4Address) and address in _CGNAT),
        ("IETF protocol assignment", isinstance(address, ipaddress.IPv4Address) and address in _IETF_PROTOCOL),
        # 2002::/16 (6to4) carries an IPv4 address, reached through a relay: it is as public as that address.
        ("6to4 of a non-public", isinstance(address, ipaddress.IPv6Address) and address.sixtofour is not None
         and refusal_reason(address.sixtofour) is not None),
        ("NAT64", isinstance(address, ipaddress.IPv6Address) and any(address in net for net in _NAT64)),
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    )
    return next((reason for reason, refused in checks if refused), None)


async def resolve(url: httpx.URL, *, allow_private: bool) -> list[str]:
    """Every address of the URL's host; all must be public unless private ones are allowed."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        failure = RefusedTarget if error.errno in _UNKNOWN_HOST_ERRNOS else TargetUnavailable
        raise failure(f"the host {host} cannot be resolved ({error.strerror})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for address in addresses:
            reason = refusal_reason(ipaddress.ip_address(address))
            if reason is not None:
                raise RefusedTarget(
                    f"the host {host} resolves to {address}, a {reason} address; only public addresses are reached"
                )
    return addresses


async def send_pinned(
    http: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    addresses: list[str],
    *,
    headers: Mapping[str, str],
    timeout: httpx.Timeout,
    content: bytes | None = None,
) -> httpx.Response:
    """Send to the first of the URL's checked addresses that accepts a connection; a streaming response,
    redirects not followed (each hop must be checked by the caller)."""
    pinned_headers = {
        **headers,
        "Host": url.netloc.decode("ascii"),
        # The pool keys connections by address: one opened for this host must not serve another host's request.
        "Connection": "close",
    }
    # TLS checks the certificate against the URL's host, not against the address connected to.
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}

    async def send_to(address: str) -> httpx.Response:
        request = http.build_request(
            method, url.copy_with(host=address), headers=pinned_headers, content=content, extensions=extensions,
            timeout=timeout,
        )
        return await http.send(request, stream=True, follow_redirects=False)

    for address in addresses[:-1]:
        try:
            return await send_to(address)
        except httpx.ConnectError:
            continue  # the host's next address may answer
    return await send_to(addresses[-1])
