"""Whether a ComfyUI answers, as the gateway's own calls find out: one log line when it stops answering and
one when it answers again, however many jobs are waiting for it and however often they try."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("comfyui_gateway.backends")


class BackendHealth:
    def __init__(self, backend_id: str, url: str) -> None:
        self.backend_id = backend_id
        self.url = url
        self.down_since: float | None = None
        self.last_error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.down_since is None

    def answered(self) -> None:
        if self.down_since is not None:
            log.info("ComfyUI %s (%s) answers again after %.0f s", self.backend_id, self.url,
                     time.time() - self.down_since)
            self.down_since = None

    def failed(self, message: str) -> None:
        self.last_error = message
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("ComfyUI %s is unreachable (%s); its jobs wait for it", self.backend_id, message)
