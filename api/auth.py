"""Authenticating a request: an `X-API-Key` from API_KEYS, or an `Authorization: Bearer` JWT signed with
JWT_SECRET (HS256 only, with `sub`, `role` and `exp`). With neither configured the gateway is open and every
caller is an admin.

Every credential a request carries must verify: a valid key beside an expired or forged token is refused, and
so are a key and a token that name two different callers. A refusal is the same 401 AUTH_FAILED whatever was
wrong, so a caller learns nothing about which key or which part of a token failed; the reason is counted
(app.metrics) for the operator. Keys are compared in constant time against every configured key, and never logged.
"""

from __future__ import annotations

import hmac
import logging

import jwt

from api.errors import ApiError
from app.auth import MAX_PRINCIPAL_ID_LENGTH, OPEN_MODE_PRINCIPAL, Principal, Role
from app.errors import ErrorCode
from app.metrics import AUTH_FAILURES
from app.settings import Settings

log = logging.getLogger(__name__)

_REALM = 'realm="comfyui-gateway"'
_JWT_ALGORITHMS = ["HS256"]  # never taken from the token: `alg: none` and key confusion are refused
_JWT_REQUIRED_CLAIMS = ["exp", "sub", "role"]
_ROLE_NAMES = [role.value for role in Role]  # a list: a claim may be any JSON value, a dict too


def warn_if_open(settings: Settings) -> None:
    if settings.open_mode:
        log.warning(
            "!!! OPEN MODE: neither API_KEYS nor JWT_SECRET is set, so EVERY caller is an admin (templates, every "
            "job, the audit log). Set API_KEYS or JWT_SECRET before this gateway is reachable by anyone else; "
            "ENV=production refuses to start like this. !!!"
        )


def auth_failed(settings: Settings, reason: str) -> ApiError:
    AUTH_FAILURES.labels(reason=reason).inc()
    challenges = ([f"ApiKey {_REALM}"] if settings.api_keys else []) + ([f"Bearer {_REALM}"] if settings.jwt_secret else [])
    return ApiError(
        ErrorCode.AUTH_FAILED, "authentication failed: send a valid X-API-Key or Authorization: Bearer token",
        headers={"WWW-Authenticate": ", ".join(challenges)},
    )


def check_metrics_token(settings: Settings, bearer_token: str | None) -> None:
    """METRICS_TOKEN, when set, is the one credential GET /metrics takes (a scrape credential that opens nothing
    else, and no key or token of a caller opens /metrics); unset, /metrics is open."""
    if settings.metrics_token is None:
        return
    expected = settings.metrics_token.get_secret_value().encode()
    if bearer_token is None or not hmac.compare_digest(expected, bearer_token.encode()):
        AUTH_FAILURES.labels(reason="metrics_token").inc()
        raise ApiError(ErrorCode.AUTH_FAILED, "GET /metrics needs Authorization: Bearer <METRICS_TOKEN>",
                       headers={"WWW-Authenticate": f"Bearer {_REALM}"})


def authenticate(settings: Settings, api_key: str | None, bearer_token: str | None) -> Principal:
    """The principal the credentials name; ApiError AUTH_FAILED if there are none or they are not valid."""
    if settings.open_mode:
        return OPEN_MODE_PRINCIPAL
    # Every credential sent must verify, not just one of them: a good key does not excuse a forged or expired
    # token beside it.
    principals: set[Principal] = set()
    if api_key is not None:
        principals.add(_by_api_key(settings, api_key))
    if bearer_token is not None:
        principals.add(_by_jwt(settings, bearer_token))
    if not principals:
        raise auth_failed(settings, "missing")
    if len(principals) > 1:
        raise auth_failed(settings, "conflicting_credentials")  # a key and a token naming two callers
    return principals.pop()


def _by_api_key(settings: Settings, given: str) -> Principal:
    found: Principal | None = None
    given_bytes = given.encode()
    for configured in settings.parsed_api_keys:
        # Every key is compared, to the end: the time taken says nothing of which key or how much of it matched.
        if hmac.compare_digest(configured.key.encode(), given_bytes):
            found = configured.principal
    if found is None:
        raise auth_failed(settings, "unknown_key")
    return found


def _by_jwt(settings: Settings, token: str) -> Principal:
    if settings.jwt_secret is None:
        raise auth_failed(settings, "jwt_not_configured")
    try:
        claims = jwt.decode(
            token, settings.jwt_secret.get_secret_value(), algorithms=_JWT_ALGORITHMS,
            options={"require": _JWT_REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise auth_failed(settings, "expired_token") from None
    except jwt.PyJWTError:
        raise auth_failed(settings, "invalid_token") from None
    subject, role = claims["sub"], claims["role"]
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_PRINCIPAL_ID_LENGTH or role not in _ROLE_NAMES:
        raise auth_failed(settings, "invalid_claims")
    return Principal(subject, Role(role))
