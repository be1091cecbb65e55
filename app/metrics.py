"""The gateway's Prometheus metrics (prometheus-client's default registry)."""

from __future__ import annotations

from prometheus_client import Counter

# Requests refused for their credentials, by what was wrong: the answer never says, the operator may see it.
AUTH_FAILURES = Counter(
    "gateway_auth_failures", "requests refused with 401 AUTH_FAILED", ["reason"]
)
