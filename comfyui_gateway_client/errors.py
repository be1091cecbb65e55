"""The client's errors: a `GatewayError` carries the gateway's stable error code, the HTTP status and the
details of its `{"error": {"code", "message", "details"}}` answer; subclasses group the codes a caller most
often handles. The client adds three codes of its own, for what no gateway answer says: `GATEWAY_UNREACHABLE`
(no connection), `UNEXPECTED_ANSWER` (an answer that is not the gateway's, e.g. a proxy's error page) and
`OUTPUT_CORRUPTED` (a downloaded file whose size or sha256 is not the job's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from comfyui_gateway_client.models import Job

GATEWAY_UNREACHABLE = "GATEWAY_UNREACHABLE"
UNEXPECTED_ANSWER = "UNEXPECTED_ANSWER"
OUTPUT_CORRUPTED = "OUTPUT_CORRUPTED"


class GatewayError(Exception):
    """`code`: the gateway's error code (README's error table) or one of the client's own above; `status`: the
    answer's HTTP status (None when there was none); `retry_after`: seconds the gateway asked to wait (429, 503)."""

    def __init__(self, code: str, message: str, *, status: int | None = None, details: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}
        self.retry_after = retry_after


class AuthFailed(GatewayError):
    """401 AUTH_FAILED: no credentials, or an API key or token the gateway does not accept."""


class Forbidden(GatewayError):
    """403: the caller's role may not do this (FORBIDDEN, WORKFLOW_JSON_NOT_ALLOWED)."""


class NotFound(GatewayError):
    """404: JOB_NOT_FOUND, WORKFLOW_NOT_FOUND, BATCH_NOT_FOUND, OUTPUT_NOT_FOUND, OUTPUT_FILE_MISSING, NOT_FOUND."""


class InvalidRequest(GatewayError):
    """400 VALIDATION_ERROR (and the other 400s); `fields` lists `{field, message}` for each offending field."""

    @property
    def fields(self) -> list[dict[str, str]]:
        return list(self.details.get("fields", []))


class Conflict(GatewayError):
    """409: WORKFLOW_EXISTS, WORKFLOW_CONFLICT, JOB_ALREADY_FINISHED, BATCH_ALREADY_FINISHED, IDEMPOTENCY_CONFLICT."""


class TryLater(GatewayError):
    """429 or 503 with a `Retry-After`: rate limited, too many active jobs, the API busy, Temporal unavailable."""


class GatewayUnreachable(GatewayError):
    """No answer at all: nothing listens at the URL, or the connection broke. `url` is what was tried."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(GATEWAY_UNREACHABLE, f"cannot reach the gateway at {url}: {reason}", details={"url": url})
        self.url = url


class JobFailed(GatewayError):
    """`generate` (or `wait`) saw the job end as failed or cancelled: `code` is the job's error code
    (e.g. COMFYUI_OOM, JOB_CANCELLED), `job` the job as it ended."""

    def __init__(self, job: Job) -> None:
        error = job.error
        super().__init__(error.code if error else job.status.value.upper(),
                         error.message if error else f"job {job.job_id} {job.status.value}",
                         details=error.details if error else {})
        self.job = job


class OutputCorrupted(GatewayError):
    """A downloaded output whose size or sha256 differs from what the job recorded; the file is not kept."""


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidRequest, 401: AuthFailed, 403: Forbidden, 404: NotFound, 409: Conflict, 413: InvalidRequest,
    429: TryLater, 503: TryLater,
}


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: the gateway sends seconds


def error_from_answer(response: httpx.Response) -> GatewayError:
    """The error an answer of status >= 400 stands for (its body must have been read)."""
    kind = _BY_STATUS.get(response.status_code, GatewayError)
    try:
        error = response.json()["error"]
        code, message, details = str(error["code"]), str(error["message"]), dict(error.get("details") or {})
    except (ValueError, KeyError, TypeError):
        return kind(UNEXPECTED_ANSWER, f"HTTP {response.status_code} from {response.request.url}: "
                                       f"{response.text[:200]!r}", status=response.status_code,
                    retry_after=_retry_after(response))
    return kind(code, message, status=response.status_code, details=details, retry_after=_retry_after(response))


def unreachable(url: str, error: httpx.TransportError) -> GatewayUnreachable:
    return GatewayUnreachable(url, str(error) or type(error).__name__)


def succeeded(job: Job) -> Job:
    """The job, if it succeeded; JobFailed (with its error code) if it failed or was cancelled."""
    if job.status.value != "succeeded":
        raise JobFailed(job)
    return job
