"""The API's Temporal client, which may not be there yet: the API starts even while Temporal is down, and a
request that needs Temporal answers 503 until it is up. Routes ask for the client only once they need it, so
a request refused for what it says is refused as such (400, 404) whether or not Temporal is up."""

from __future__ import annotations

from dataclasses import dataclass

from temporalio.client import Client

from api.errors import ApiError
from app.errors import ErrorCode


@dataclass
class TemporalConnection:
    client: Client | None = None

    def require(self) -> Client:
        if self.client is None:
            raise ApiError(ErrorCode.TEMPORAL_UNAVAILABLE, "Temporal is not reachable; no job was created or changed")
        return self.client
