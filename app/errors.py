"""The gateway's error classes: every stable error code, the HTTP status it answers with, whether Temporal
retries an activity that fails with it, and whether a client may opt in to re-running a job after it.

This table is the one place these rules live: the workflow's retry policies, the activities' failures, the
API's error answers, the `retry.retryOn` check and the README's table (with what to do about each) are all
derived from it. No I/O here: the workflow imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from pydantic import ValidationError


class ErrorCode(str, Enum):
    """Stable error codes: clients branch on these, so they never change meaning."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    SERVER_BUSY = "SERVER_BUSY"
    TOO_MANY_WAITS = "TOO_MANY_WAITS"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    AUTH_FAILED = "AUTH_FAILED"
    FORBIDDEN = "FORBIDDEN"
    WORKFLOW_JSON_NOT_ALLOWED = "WORKFLOW_JSON_NOT_ALLOWED"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_ACTIVE_JOBS = "TOO_MANY_ACTIVE_JOBS"
    WORKFLOW_NOT_FOUND = "WORKFLOW_NOT_FOUND"
    WORKFLOW_EXISTS = "WORKFLOW_EXISTS"
    WORKFLOW_CONFLICT = "WORKFLOW_CONFLICT"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_ALREADY_FINISHED = "JOB_ALREADY_FINISHED"
    BATCH_NOT_FOUND = "BATCH_NOT_FOUND"
    BATCH_ALREADY_FINISHED = "BATCH_ALREADY_FINISHED"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    OUTPUT_NOT_FOUND = "OUTPUT_NOT_FOUND"
    OUTPUT_FILE_MISSING = "OUTPUT_FILE_MISSING"
    JOB_CANCELLED = "JOB_CANCELLED"
    JOB_TERMINATED = "JOB_TERMINATED"
    COMFYUI_UNREACHABLE = "COMFYUI_UNREACHABLE"
    COMFYUI_OOM = "COMFYUI_OOM"
    COMFYUI_NODE_ERROR = "COMFYUI_NODE_ERROR"
    COMFYUI_TIMEOUT = "COMFYUI_TIMEOUT"
    COMFYUI_INTERRUPTED = "COMFYUI_INTERRUPTED"
    COMFYUI_PROTOCOL_ERROR = "COMFYUI_PROTOCOL_ERROR"
    PROMPT_LOST = "PROMPT_LOST"
    BACKEND_LOST = "BACKEND_LOST"
    IMAGE_FETCH_FAILED = "IMAGE_FETCH_FAILED"
    STORAGE_ERROR = "STORAGE_ERROR"
    WEBHOOK_NOT_CONFIGURED = "WEBHOOK_NOT_CONFIGURED"
    WEBHOOK_DELIVERY_FAILED = "WEBHOOK_DELIVERY_FAILED"
    WEBHOOK_TARGET_REFUSED = "WEBHOOK_TARGET_REFUSED"
    TEMPORAL_UNAVAILABLE = "TEMPORAL_UNAVAILABLE"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    CONFIGURATION_ERROR = "CONFIGURATION_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True)
class ErrorClass:
    http_status: int
    # Temporal retries an activity that failed with it (with backoff, within the activity's own limits).
    temporal_retries: bool
    # A client may name it in `retry.retryOn` to have the job re-run on ComfyUI after it.
    client_retryable: bool
    # Where it is seen: "request" (an API answer), "job" (a failed job's `error.code`), or both.
    seen_in: str
    meaning: str
    # What the caller, or the operator when it says so, does about it: the README's "what to do" column.
    remedy: str


_REQUEST, _JOB, _BOTH = "request", "job", "request, job"
# A webhook's delivery attempts are in the job's log (`GET /jobs/{id}/logs`); they never change the job.
_JOB_LOG = "job log"

ERROR_CLASSES: dict[ErrorCode, ErrorClass] = {
    ErrorCode.VALIDATION_ERROR: ErrorClass(
        400, False, False, _BOTH,
        "a request or its inputs are invalid (`details.fields` names each field); as a job's error, ComfyUI refused "
        "the prompt (`details.nodeErrors` says which node, which input, why)",
        remedy="fix each field `details.fields` names, as its message says, and send again (nothing was created); as"
        " a job's error, fix the input of the node `details.nodeErrors` names, or the template"),
    ErrorCode.REQUEST_TOO_LARGE: ErrorClass(413, False, False, _REQUEST, "the request body is over 64 MB",
        remedy="give images as URLs instead of inline base64, or split a batch's items over several batches"),
    ErrorCode.NOT_FOUND: ErrorClass(404, False, False, _REQUEST, "no such route",
        remedy="check the path against the API's document (`/docs`)"),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorClass(
        405, False, False, _REQUEST, "the route does not take this method (the `Allow` header says which it takes)",
        remedy="use a method the `Allow` header names"),
    ErrorCode.REQUEST_TIMEOUT: ErrorClass(
        408, False, False, _REQUEST,
        "the request's body stopped arriving for `API_BODY_TIMEOUT_S`; the connection is closed",
        remedy="send the body without stalling (a client or proxy that holds the upload back), then send again"),
    ErrorCode.SERVER_BUSY: ErrorClass(
        503, False, False, _REQUEST,
        "the API is handling `API_MAX_CONCURRENT_REQUESTS` requests already; try again after `Retry-After` seconds",
        remedy="send again after `Retry-After` seconds, backing off; operators: add API processes, or raise "
        "`API_MAX_CONCURRENT_REQUESTS`"),
    ErrorCode.TOO_MANY_WAITS: ErrorClass(
        503, False, False, _REQUEST,
        "`API_MAX_CONCURRENT_WAITS` requests are waiting (`wait=`) for jobs already; try again after `Retry-After` "
        "seconds, or without `wait`. At `POST /jobs` nothing was created",
        remedy="send again after `Retry-After` seconds, or poll without `wait`; operators: raise "
        "`API_MAX_CONCURRENT_WAITS`"),
    ErrorCode.TOO_MANY_STREAMS: ErrorClass(
        503, False, False, _REQUEST,
        "`API_MAX_CONCURRENT_STREAMS` event streams are open already; try again after `Retry-After` seconds",
        remedy="connect again after `Retry-After` seconds, or poll `GET /jobs/{jobId}`; operators: raise "
        "`API_MAX_CONCURRENT_STREAMS`, or add API processes"),
    ErrorCode.AUTH_FAILED: ErrorClass(
        401, False, False, _REQUEST,
        "no credentials, or an API key or JWT that is not valid (unknown, badly signed, expired, malformed); the "
        "answer never says which",
        remedy="send `X-API-Key` with a key of `API_KEYS`, or `Authorization: Bearer` with a current HS256 JWT "
        "(`sub`, `role`, `exp`); operators see the reason in `gateway_auth_failures_total{reason}`"),
    ErrorCode.FORBIDDEN: ErrorClass(
        403, False, False, _REQUEST, "the caller's role may not do this (template changes, the audit log and the codec are admin's)",
        remedy="use an admin's key or token (`key:admin` in `API_KEYS`, or `role: admin` in the JWT)"),
    ErrorCode.WORKFLOW_JSON_NOT_ALLOWED: ErrorClass(
        403, False, False, _REQUEST, "the caller's role may not submit a raw `workflowJson` (`RAW_WORKFLOW_ROLES`); "
                                     "run a template by `workflowId`",
        remedy="run a registered template by `workflowId`, or have an admin register the graph as one"),
    ErrorCode.RATE_LIMITED: ErrorClass(
        429, False, False, _REQUEST,
        "the principal, or the client address, made `RATE_LIMIT_MAX` requests within `RATE_LIMIT_WINDOW_MS`; "
        "try again after `Retry-After` seconds",
        remedy="wait `Retry-After` seconds, then send again; pace requests by `X-RateLimit-Remaining`"),
    ErrorCode.TOO_MANY_ACTIVE_JOBS: ErrorClass(
        429, False, False, _REQUEST,
        "the principal has `MAX_ACTIVE_JOBS_PER_PRINCIPAL` jobs queued or running; submit again when one has "
        "finished",
        remedy="submit again once one of your jobs has ended (`?wait=` or a webhook tells you when); `details` has "
        "`active` and `limit`"),
    ErrorCode.WORKFLOW_NOT_FOUND: ErrorClass(
        404, False, False, _BOTH, "no such workflow template (as a job's error: its version was removed)",
        remedy="take an id from `GET /workflows`; as a job's error, submit it again against a template that exists"),
    ErrorCode.WORKFLOW_EXISTS: ErrorClass(409, False, False, _REQUEST, "a template with this id exists",
        remedy="choose another id, or change the template with `PUT /workflows/{id}`"),
    ErrorCode.WORKFLOW_CONFLICT: ErrorClass(
        409, False, False, _REQUEST, "a concurrent update took the same template version first",
        remedy="read the template again (`GET /workflows/{id}`) and send the update again"),
    ErrorCode.JOB_NOT_FOUND: ErrorClass(404, False, False, _REQUEST, "no such job",
        remedy="check the id (the `jobId` of `POST /jobs`) and send the credentials that submitted it; an ended job "
        "may have been deleted by retention (`RETENTION_DAYS`)"),
    ErrorCode.JOB_ALREADY_FINISHED: ErrorClass(409, False, False, _REQUEST, "the job has finished; it cannot be cancelled",
        remedy="nothing to cancel: `GET /jobs/{jobId}` says how it ended"),
    ErrorCode.BATCH_NOT_FOUND: ErrorClass(404, False, False, _REQUEST, "no such batch",
        remedy="check the id (the `batchId` of `POST /batches`) and send the credentials that submitted it"),
    ErrorCode.BATCH_ALREADY_FINISHED: ErrorClass(
        409, False, False, _REQUEST, "the batch has ended (completed or cancelled); it cannot be cancelled",
        remedy="nothing to cancel: `GET /batches/{batchId}` has its counts"),
    ErrorCode.IDEMPOTENCY_CONFLICT: ErrorClass(
        409, False, False, _REQUEST,
        "a job with this idempotency key (`Idempotency-Key` or `metadata.requestId`) was submitted with a different "
        "body (`details.jobId` names it)",
        remedy="use a new key for a different request, or read the job `details.jobId` names"),
    ErrorCode.OUTPUT_NOT_FOUND: ErrorClass(404, False, False, _REQUEST, "the job has no output of this name",
        remedy="take the file name from the job's `outputs` (or `GET /outputs/{jobId}`)"),
    ErrorCode.OUTPUT_FILE_MISSING: ErrorClass(
        404, False, False, _REQUEST, "the job has this output, but its file is gone from storage",
        remedy="run the job again; operators: find what deleted the file from `STORAGE_LOCAL_PATH` or the bucket"),
    ErrorCode.JOB_CANCELLED: ErrorClass(
        409, False, False, _JOB, "the job was cancelled (`message` says by whom and why)",
        remedy="submit it again if it is still wanted"),
    ErrorCode.JOB_TERMINATED: ErrorClass(
        409, False, False, _JOB,
        "the job's workflow was terminated or timed out in Temporal (`message` has the operator's reason); "
        "status `cancelled`",
        remedy="submit it again if it is still wanted; operators: Cancel in the Web UI rather than Terminate"),
    ErrorCode.COMFYUI_UNREACHABLE: ErrorClass(
        503, False, False, _BOTH,
        "connection refused, timeouts, 5xx; the job waits for its ComfyUI inside the step that needs it, with a "
        "`warning`, and fails with this code once its timeout has passed",
        remedy="start ComfyUI, or point `COMFYUI_URL` / `COMFYUI_URLS` at it (`GET /health` says what answers), then"
        " submit again (see *Troubleshooting*)"),
    ErrorCode.COMFYUI_OOM: ErrorClass(
        502, False, True, _JOB, "out of memory (`torch.OutOfMemoryError` or CUDA OOM text)",
        remedy="lower `width`, `height` or the batch size, use a smaller model, or free the GPU of other work; for "
        "an occasional one, `retry.retryOn` (see *Troubleshooting*)"),
    ErrorCode.COMFYUI_NODE_ERROR: ErrorClass(
        502, False, True, _JOB,
        "a node raised; `details` has `nodeId`, `nodeType`, `exceptionType`, `exceptionMessage`",
        remedy="read `details.exceptionMessage`: fix that node's input, or install the model or custom node it needs"
        " (ComfyUI's own log has the traceback)"),
    ErrorCode.COMFYUI_TIMEOUT: ErrorClass(
        504, False, True, _JOB, "no result within the job's timeout (the prompt is interrupted)",
        remedy="give a longer `timeoutSeconds` (up to `MAX_JOB_TIMEOUT_S`), or ask for less work (steps, size, "
        "frames)"),
    ErrorCode.COMFYUI_INTERRUPTED: ErrorClass(
        502, False, True, _JOB, "someone else interrupted the prompt on ComfyUI",
        remedy="find who interrupts prompts on that ComfyUI (its own web page, another client); submit again, or opt"
        " in with `retry.retryOn`"),
    ErrorCode.COMFYUI_PROTOCOL_ERROR: ErrorClass(
        502, False, False, _BOTH,
        "ComfyUI answered outside its protocol, e.g. refused to serve an output file (`/view` refuses names "
        "containing `..`)",
        remedy="check that the URL is ComfyUI itself, not a proxy or another service, and its version; report it "
        "with the job's log"),
    ErrorCode.PROMPT_LOST: ErrorClass(
        502, False, False, _JOB,
        "ComfyUI restarted and forgot the prompt; the workflow resubmits it as a new attempt, up to 3 times",
        remedy="nothing while it is retried; as a job's error, ComfyUI kept restarting: see its log (crashes, the "
        "OOM killer)"),
    ErrorCode.BACKEND_LOST: ErrorClass(
        503, False, False, _JOB,
        "the job's ComfyUI stopped answering for longer than `COMFYUI_HEARTBEAT_TIMEOUT_S` while other backends "
        "could run it; the workflow runs it again as a new attempt on a healthy backend, up to 3 times",
        remedy="nothing while it is retried; as a job's error, see which backends are down (`GET /backends`)"),
    ErrorCode.IMAGE_FETCH_FAILED: ErrorClass(
        502, True, False, _JOB, "an image input's URL timed out or answered 5xx, 408 or 429 (up to 5 tries)",
        remedy="check that the image URL answers from the gateway's network, or send the image inline (data URI or "
        "base64)"),
    ErrorCode.STORAGE_ERROR: ErrorClass(
        500, True, False, _BOTH,
        "storing or reading an output or an image input failed (a full disk, a bucket down or refusing); a job "
        "retries it and fails with it when it lasts; at `POST /jobs`, an inline image was not stored and no job "
        "was created",
        remedy="operators: check the disk's free space and `STORAGE_LOCAL_PATH`'s permissions, or the bucket, its "
        "endpoint and credentials; then submit again"),
    ErrorCode.WEBHOOK_NOT_CONFIGURED: ErrorClass(
        400, False, False, _REQUEST,
        "a `callbackUrl` was given but the gateway has no `WEBHOOK_SECRET`: it never sends unsigned webhooks",
        remedy="operators: set `WEBHOOK_SECRET` (see *Webhooks*); clients: leave out `callbackUrl` and poll"),
    ErrorCode.WEBHOOK_DELIVERY_FAILED: ErrorClass(
        502, True, False, _JOB_LOG,
        "a webhook attempt got no 2xx (another status, a redirect, a timeout, a refused connection); tried again "
        "with backoff for `WEBHOOK_RETRY_FOR_S`",
        remedy="make the receiver answer 2xx within 10 s; each attempt is in `GET /jobs/{jobId}/logs` (see "
        "*Troubleshooting*)"),
    ErrorCode.WEBHOOK_TARGET_REFUSED: ErrorClass(
        400, False, False, _JOB_LOG,
        "a webhook is not tried again: the receiver answered 410 Gone, or its host resolves to an address the "
        "gateway may not reach (or to none)",
        remedy="use a host that resolves to public addresses, or list a private one exactly in "
        "`WEBHOOK_ALLOWED_DOMAINS` (see *Troubleshooting*)"),
    ErrorCode.TEMPORAL_UNAVAILABLE: ErrorClass(
        503, False, False, _REQUEST, "Temporal is not reachable; nothing was created or changed",
        remedy="send again, backing off; operators: start Temporal or fix `TEMPORAL_ADDRESS` (`comfyui-gateway "
        "health`)"),
    ErrorCode.DATABASE_UNAVAILABLE: ErrorClass(
        503, False, False, _REQUEST,
        "the database did not answer in time (unreachable, every connection in use, or a lock held past its "
        "timeout). `POST /jobs` answers it only before its job is started: once the workflow has started, a "
        "database that cannot answer costs the answer's `etaSeconds` (`null`) or, with `wait`, the finished job "
        "(the `202` instead), never the `202` itself",
        remedy="send again after `Retry-After` seconds, with the same `Idempotency-Key` at `POST /jobs` (a job "
        "already started is then answered, not made twice); operators: check `DATABASE_URL` and the database's "
        "load (SQLite under many writers: PostgreSQL)"),
    ErrorCode.CONFIGURATION_ERROR: ErrorClass(
        500, False, False, _JOB, "the gateway's configuration cannot run the job (e.g. an unknown backend)",
        remedy="operators: fix what the message names (e.g. a backend missing from `COMFYUI_URLS`) and restart the "
        "worker"),
    ErrorCode.INTERNAL_ERROR: ErrorClass(500, False, False, _BOTH, "a fault in the gateway; see its log",
        remedy="report it with the time and the job id: the gateway's log has the traceback"),
}

# Not a job's error: the failure type of a run_prompt retry that a worker of another backend polled, while its
# prompt may be on the backend its heartbeat names (`details[0]["backend"]`). The workflow sends the attempt
# back to that backend's own queue; it never posts the prompt a second time elsewhere. `details[0]` also has
# the seconds of the job's time limit that attempt had used (ELAPSED_SECONDS_DETAIL), counted on from there.
PROMPT_ON_OTHER_BACKEND = "PROMPT_ON_OTHER_BACKEND"
ELAPSED_SECONDS_DETAIL = "elapsedSeconds"

CLIENT_RETRYABLE_CODES = tuple(code for code, error in ERROR_CLASSES.items() if error.client_retryable)
# For Temporal retry policies: an activity failing with one of these is never tried again.
NON_RETRYABLE_TYPES = [code.value for code, error in ERROR_CLASSES.items() if not error.temporal_retries]


def http_status(code: ErrorCode) -> int:
    return ERROR_CLASSES[code].http_status


def temporal_retries(code: ErrorCode) -> bool:
    return ERROR_CLASSES[code].temporal_retries


def markdown_table() -> str:
    """The README's table of error codes."""
    rows = [
        "| code | HTTP | seen in | retried by Temporal | `retry.retryOn` | meaning | what to do |",
        "|---|---|---|---|---|---|---|",
    ]
    for code, error in ERROR_CLASSES.items():
        rows.append(
            f"| `{code.value}` | {error.http_status} | {error.seen_in} | {'yes' if error.temporal_retries else 'no'} "
            f"| {'yes' if error.client_retryable else 'no'} | {error.meaning} | {error.remedy} |"
        )
    return "\n".join(rows)


@dataclass(frozen=True)
class FieldIssue:
    field: str
    message: str


# How many offending fields a message names; the rest are counted.
_FIELDS_IN_MESSAGE = 3


def summarise(issues: Sequence[tuple[str, str]], total: int) -> str:
    """The first few of `total` issues as "field: message", then how many more there are."""
    named = "; ".join(f"{field}: {message}" for field, message in issues[:_FIELDS_IN_MESSAGE])
    unnamed = total - min(len(issues), _FIELDS_IN_MESSAGE)
    return f"{named}; and {unnamed} more" if unnamed else named


class InvalidInput(ValueError):
    """What is wrong with a request or a job's inputs, every offending field at once."""

    def __init__(self, issues: list[FieldIssue]) -> None:
        named = [(issue.field, issue.message) for issue in issues[:_FIELDS_IN_MESSAGE]]
        super().__init__(summarise(named, len(issues)))
        self.issues = issues

    @classmethod
    def of(cls, error: ValidationError, under: str) -> "InvalidInput":
        """A pydantic model's complaints about a part of a request, named as fields of `under`."""
        return cls([FieldIssue(".".join([under, *map(str, e["loc"])]), e["msg"]) for e in error.errors()])


if __name__ == "__main__":
    print(markdown_table())
