"""Who a caller is: a principal (an id and a role), and the API keys operators configure.

No I/O here; the API authenticates requests (api.auth) and Settings reads API_KEYS with `parse_api_key`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """`admin` manages templates and sees and cancels every job; `user` creates jobs and sees only its own."""

    admin = "admin"
    user = "user"


@dataclass(frozen=True)
class Principal:
    """The caller a request is made by. `id` is what jobs and audit entries record: never a secret."""

    id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin


# The longest principal id (a key's name, a JWT's `sub`): what the jobs row, the audit log and Owner hold.
MAX_PRINCIPAL_ID_LENGTH = 128

# With neither API_KEYS nor JWT_SECRET set the gateway is open: every caller is this one.
OPEN_MODE_PRINCIPAL = Principal("anonymous", Role.admin)

# An API key's role when its entry names none: the least one.
DEFAULT_KEY_ROLE = Role.user


@dataclass(frozen=True)
class ApiKey:
    """One entry of API_KEYS: `key`, `key:role` or `key:role:name`. Its repr hides the key."""

    key: str
    principal: Principal

    def __repr__(self) -> str:
        return f"ApiKey(principal={self.principal!r})"


def key_fingerprint(key: str) -> str:
    """The principal id of a key given without a name: recognisable in logs and rows, useless to a reader."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_api_key(entry: str) -> ApiKey:
    """`key[:role[:name]]`; raises ValueError (without the key in its message) for an entry that is not one."""
    key, _, rest = entry.partition(":")
    role_name, _, name = rest.partition(":")
    if not key:
        raise ValueError("an API_KEYS entry has an empty key")
    try:
        role = Role(role_name) if role_name else DEFAULT_KEY_ROLE
    except ValueError:
        raise ValueError(f"an API_KEYS entry has the role {role_name!r}; roles are admin and user") from None
    if rest.count(":") > 1 or (rest.count(":") == 1 and not name):
        raise ValueError("an API_KEYS entry is key, key:role or key:role:name (a name without ':')")
    if len(name) > MAX_PRINCIPAL_ID_LENGTH:
        raise ValueError(f"an API_KEYS entry has a name longer than {MAX_PRINCIPAL_ID_LENGTH} characters")
    return ApiKey(key, Principal(name or key_fingerprint(key), role))
