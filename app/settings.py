"""The gateway's one configuration object, read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
from enum import Enum
from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from app.codec import EncryptionKey, parse_encryption_keys
from app.comfy.backends import parse_backends, valid_url
from app.logs import LogFormat
from app.auth import ApiKey, Role, parse_api_key
from app.models import MAX_JOB_TIMEOUT_SECONDS


class StorageProvider(str, Enum):
    local = "local"
    s3 = "s3"


class Environment(str, Enum):
    development = "development"
    production = "production"


# The shortest JWT_SECRET production accepts: HS256's key should be as long as its 256-bit hash.
MIN_PRODUCTION_JWT_SECRET_BYTES = 32


class LogLevel(str, Enum):
    debug = "DEBUG"
    info = "INFO"
    warning = "WARNING"
    error = "ERROR"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    # A refused setting may be a secret: errors name the setting and the reason, never the value.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    env: Environment = Field(
        Environment.development,
        description="development or production; production refuses to start without authentication "
                    "(API_KEYS or JWT_SECRET) or with a JWT_SECRET shorter than 32 bytes")

    # Authentication and roles. With neither API_KEYS nor JWT_SECRET every caller is an admin (open mode).
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated API keys for the X-API-Key header: key, key:role or key:role:name; roles "
                    "admin and user (default user); a key's principal is its name, else key-<8 hex of its sha256>")
    jwt_secret: SecretStr | None = Field(
        None, description="accept Authorization: Bearer JWTs signed with this HS256 secret, with sub, role and exp")
    raw_workflow_roles: Annotated[list[Role], NoDecode] = Field(
        default_factory=lambda: [Role.admin, Role.user],
        description="comma-separated roles that may submit a raw workflowJson graph (others run templates only)")

    # HTTP API
    port: int = Field(3000, ge=1, le=65535, description="where the API listens")
    host: str = Field("127.0.0.1", description="the address the API binds; 0.0.0.0 for all interfaces")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed to call the API from a browser")
    log_level: LogLevel = Field(LogLevel.info, description="DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = Field(
        LogFormat.json, description="json: one JSON object per line (time, level, logger, message, request and job "
                                    "ids); text: a line for people")
    access_log: bool = Field(
        False, description="log each API request (method, path, status, duration, request id) at INFO; "
                           "otherwise at DEBUG")
    privacy_mode: bool = Field(
        False, description="keep job inputs (prompts and other text) out of the database, the job log and the logs; "
                           "needs ENCRYPTION_KEYS, which keeps them out of Temporal's history")
    encryption_keys: SecretStr | None = Field(
        None, description="encrypt every Temporal payload (AES-GCM): id:base64key,... with 16, 24 or 32-byte keys; "
                          "the first encrypts, all decrypt (rotate by putting a new key first)")
    codec_cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated browser origins (a Temporal Web UI) allowed to call /codec/encode and "
                    "/codec/decode; default the dev server's UI, http://localhost:TEMPORAL_UI_PORT")
    # Against clients that are slow or many (`comfyui-gateway api` and `dev`).
    api_header_timeout_s: float = Field(
        10.0, gt=0, description="how long a client may take to send a request's line and headers; then it is cut off")
    # Longer than the idle time of clients' connection pools (httpx, Node: 4-5 s), so that a client reusing
    # a connection does not send its request just as the server closes it (uvicorn's own default is 5 s).
    api_keep_alive_s: float = Field(
        75.0, gt=0, description="how long an idle kept-alive connection stays open for the client's next request")
    api_body_timeout_s: float = Field(
        30.0, gt=0, description="how long a request's body may stop arriving before the request is refused with 408")
    api_max_concurrent_requests: int = Field(
        2048, ge=1, description="requests the API handles at once; more are refused with 503 SERVER_BUSY")
    api_concurrent_reads: int = Field(
        2, ge=1, description="GET requests the API works on at once; more wait their turn, so that clients "
                             "polling hard cannot crowd out submissions")
    # `?wait=` on POST /jobs and GET /jobs/{id}: a request that waits holds no place among the two above.
    max_wait_seconds: float = Field(
        60.0, ge=0, le=3600, description="the longest `wait` a request may give POST /jobs and GET /jobs/{id}")
    api_max_concurrent_waits: int = Field(
        1000, ge=1, description="requests that may wait (`wait=`) for a job at once; more are refused with 503 "
                                "TOO_MANY_WAITS")
    api_max_concurrent_streams: int = Field(
        1000, ge=1, description="event streams (GET /jobs/{id}/events, GET /batches/{id}/events, GET /events, WS "
                                "/ws) an API process serves at once; more are refused with 503 TOO_MANY_STREAMS")
    sse_poll_s: float = Field(
        0.2, gt=0, le=5, description="how often an event stream's one reader per job or batch reads it from the "
                                     "database (Temporal is asked about a live job at most every 0.25 s whatever "
                                     "this is)")
    sse_keepalive_s: float = Field(
        15.0, gt=0, description="how often a quiet event stream (GET /jobs/{id}/events) sends a keep-alive comment, "
                                "so that proxies do not close it")
    feed_poll_s: float = Field(
        0.2, gt=0, le=5, description="how often the API process's one reader of the feed of all jobs (GET /events, "
                                     "WS /ws) reads the new events, one query for all its listeners")
    feed_replay_window_s: float = Field(
        300.0, gt=0, description="how long the feed keeps events: a listener that reconnects (Last-Event-ID, a "
                                 "WebSocket subscribe's since) is told what it missed within this window")
    feed_replay_max_events: int = Field(
        1000, ge=1, description="most events a reconnecting feed listener is told it missed (the newest)")
    feed_listener_queue: int = Field(
        1000, ge=1, description="events a feed connection may fall behind, across a WebSocket's subscriptions, "
                                "before it is dropped (its stream ends, its socket is closed with 4408; it "
                                "reconnects with its last event id)")
    ws_auth_timeout_s: float = Field(
        5.0, gt=0, le=60, description="how long WS /ws waits for the first message's credentials of a client that "
                                      "sent none in headers, before it closes with 4401")
    # Rate limits: RATE_LIMIT_MAX requests per RATE_LIMIT_WINDOW_MS, per principal and per client address.
    rate_limit_max: int | None = Field(
        None, ge=1, description="requests a principal, and a client address, may make per window (with "
                                "RATE_LIMIT_WINDOW_MS; off when unset); more are refused with 429 RATE_LIMITED")
    rate_limit_window_ms: int | None = Field(
        None, ge=1000, description="the rate limit's moving window, in milliseconds (with RATE_LIMIT_MAX)")
    rate_limit_storage_uri: str = Field(
        "memory://", description="where rate limit counts are kept: memory:// (each API process its own) or "
                                 "redis://host:port/db (shared by every API process)")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated proxy addresses or networks (CIDR) whose X-Forwarded-For names the client; "
                    "from any other peer the header is ignored")
    max_active_jobs_per_principal: int | None = Field(
        None, ge=1, description="unfinished (queued or running) jobs a principal may have at once; more are "
                                "refused with 429 TOO_MANY_ACTIVE_JOBS; off when unset")

    # ComfyUI
    comfyui_url: str = Field(
        "http://127.0.0.1:8188", description="the ComfyUI server (one backend, named comfyui-1); or COMFYUI_URLS")
    comfyui_urls: str | None = Field(
        None, description="several ComfyUI servers, comma-separated: name=url[;slots=N][;tags=a+b], e.g. "
                          "gpu1=http://10.0.0.5:8188;slots=1;tags=sdxl+flux,gpu2=http://10.0.0.6:8188 (names 1 to 32 "
                          "of a-z, 0-9, -); slots defaults to MAX_CONCURRENCY; not with COMFYUI_URL")
    comfyui_prefetch: int = Field(
        1, ge=0, le=8, description="prompts per slot that wait in ComfyUI's own queue while one runs, so that the "
                                   "GPU never waits for the gateway between two")
    comfyui_timeout_ms: int = Field(300_000, gt=0, description="a job's time limit on ComfyUI (per job: timeoutSeconds)")
    max_job_timeout_s: float = Field(
        MAX_JOB_TIMEOUT_SECONDS, gt=0, description="the longest timeoutSeconds a job may ask for (an hour-long render "
                                                   "needs 3600 or more); at least COMFYUI_TIMEOUT_MS")
    max_concurrency: int = Field(
        1, ge=1, le=64, description="prompts run at once per ComfyUI (its slots, unless COMFYUI_URLS says); "
                                    "further jobs wait durably in Temporal")
    comfyui_heartbeat_timeout_s: float = Field(
        20.0, ge=2.0, description="how long a silent worker keeps a running prompt before another worker re-attaches")

    # Limits on what a job may ask of ComfyUI
    max_image_size: int = Field(2048, ge=64, description="largest width/height a job may ask for")
    max_batch_size: int = Field(4, ge=1, description="largest batch_size a job may ask for")
    input_image_max_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="largest image input (URL, data URI or base64) the gateway accepts")
    # Off in production: a URL input must not reach the gateway's own network (SSRF).
    input_image_allow_private_urls: bool = Field(
        False, description="let image URLs point at private and loopback addresses (tests and closed networks only)")

    # Batches (POST /batches)
    max_batch_items: int = Field(1000, ge=1, le=10_000, description="most items a batch may have")
    batch_max_parallel: int = Field(
        20, ge=1, le=1000, description="items of one batch started and not yet ended at once; the rest wait, in "
                                       "order, in the batch's workflow")
    batch_items_per_run: int = Field(
        200, ge=1, le=2000, description="items one run of a batch's workflow starts before it continues as new, "
                                        "which keeps its history bounded")

    # Persistence
    data_dir: Path = Field(Path("./data"), description="SQLite database, Temporal's dev database, outputs, scratch files")
    database_url: str | None = Field(None, description="default: a SQLite file in DATA_DIR; or postgresql://user@host/db")
    storage_provider: StorageProvider = Field(
        StorageProvider.local, description="where outputs and image inputs are stored: local (STORAGE_LOCAL_PATH) or s3")
    storage_local_path: Path | None = Field(None, description="default: DATA_DIR/outputs")
    s3_endpoint: str | None = Field(
        None, description="with STORAGE_PROVIDER=s3: the endpoint of an S3-compatible store (MinIO, R2, ...); "
                          "default: AWS S3")
    s3_bucket: str | None = Field(None, description="with STORAGE_PROVIDER=s3: the bucket (required; it must exist)")
    s3_access_key: str | None = Field(None, description="S3 access key id; default: boto3's own lookup (AWS_* variables, "
                                                        "~/.aws, an instance role)")
    s3_secret_key: str | None = Field(None, description="S3 secret access key")
    s3_region: str | None = Field(None, description="S3 region (R2: auto); default: boto3's own lookup")
    s3_prefix: str = Field("", description="a folder in the bucket that every key goes under, to share a bucket")
    s3_force_path_style: bool = Field(
        False, description="path-style URLs (endpoint/bucket/key), for MinIO and stores without bucket subdomains")
    s3_presign_expiry_s: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="how long an output's presigned download URL works, from when the "
                                                   "job is read")
    retention_days: int | None = Field(
        None, ge=1, le=36_500,
        description="delete jobs (rows, log, outputs, staged inputs) that finished longer ago than this; "
                    "off when unset. The worker runs it hourly as a Temporal Schedule")

    # Webhooks (a job's callbackUrl)
    webhook_secret: str | None = Field(
        None, description="signs every webhook (X-Signature and Standard Webhooks headers): whsec_<base64> as "
                          "Standard Webhooks defines it, any other string is the raw key; without it a callbackUrl "
                          "is refused")
    webhook_allowed_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="comma-separated hosts webhooks may go to: an entry matches that host and its subdomains; * is "
                    "any public host; a private or loopback address is reached only when its exact host is listed")
    public_base_url: str | None = Field(
        None, description="the gateway's URL as webhook receivers reach it, for the output URLs in webhook bodies; "
                          "default http://HOST:PORT")
    webhook_retry_first_interval_s: float = Field(
        2.0, gt=0, le=60, description="wait before a webhook's first retry; each retry then waits twice as long")
    webhook_retry_max_interval_s: float = Field(
        600.0, gt=0, description="longest wait between two tries of a webhook")
    webhook_retry_for_s: float = Field(
        86_400.0, gt=0, description="how long a webhook is tried, in all, before it is given up")
    webhook_progress_interval_s: float = Field(
        2.0, gt=0, description="at most one job.progress webhook per this many seconds per job")

    # Temporal
    temporal_address: str = Field("127.0.0.1:7233", description="the Temporal frontend")
    temporal_namespace: str = Field("default", description="the Temporal namespace")
    temporal_task_queue: str = Field(
        "comfyui-gateway", description="the main task queue (each ComfyUI gets <queue>.<backend>)")
    temporal_connect_timeout_s: float = Field(
        60.0, gt=0, description="how long `comfyui-gateway api` and `worker` wait for Temporal to answer when they "
                                "start, before they exit with code 69 (EX_UNAVAILABLE) and the last error")
    temporal_sticky_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="how long a job's next workflow task waits for the worker that ran its last one (which keeps the "
                    "job in memory) before any worker takes it: the delay a killed worker adds to its jobs' next step")
    temporal_ui_port: int = Field(8233, ge=1, le=65535, description="the dev server's Web UI (comfyui-gateway dev)")
    temporal_ui_url: str | None = Field(
        None, pattern=r"^https?://", description="the Temporal Web UI operators use, for each job's `temporalUiUrl` "
        "(e.g. https://temporal-ui.example.com); `comfyui-gateway dev` sets its own UI's; none: no links")

    # Metrics (Prometheus): the API serves its own at GET /metrics; the worker's are off until given an address,
    # since a fixed port would stop a second worker process on the same host from starting.
    metrics_token: SecretStr | None = Field(
        None, description="when set, GET /metrics requires Authorization: Bearer <this token> (a scrape credential "
                          "that opens nothing else); unset: /metrics is open on the API's port")
    worker_metrics_address: str | None = Field(
        None, description="host:port where the worker serves its Prometheus metrics (jobs created and finished, "
                          "durations, webhooks), e.g. 0.0.0.0:9464; off when unset")
    temporal_metrics_address: str | None = Field(
        None, description="host:port where the worker's Temporal SDK serves its own Prometheus metrics (task slots, "
                          "poll and schedule latencies, workflow and activity outcomes), e.g. 0.0.0.0:9465; off "
                          "when unset")

    # Result cache
    cache_enabled: bool = Field(
        False, description="answer a job identical to an earlier success (explicit seed, no image URLs) with that "
                            "job's outputs, at once, instead of running it again")
    cache_ttl_seconds: int = Field(
        86_400, ge=1, description="how long a succeeded job's outputs answer identical jobs (with CACHE_ENABLED)")

    _split_lists = field_validator(
        "cors_origins", "codec_cors_origins", "api_keys", "webhook_allowed_domains", "raw_workflow_roles",
        "trusted_proxies", mode="before")(_split_csv)

    @field_validator("api_keys")
    @classmethod
    def _api_key_entries(cls, entries: list[SecretStr]) -> list[SecretStr]:
        parsed = [parse_api_key(entry.get_secret_value()) for entry in entries]
        if len({key.key for key in parsed}) < len(parsed):
            raise ValueError("a key is listed twice")
        return entries

    @field_validator("env", mode="before")
    @classmethod
    def _lower_env(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            ipaddress.ip_network(entry, strict=False)  # a ValueError names the entry
        return entries

    @field_validator("worker_metrics_address", "temporal_metrics_address")
    @classmethod
    def _listen_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, colon, port = value.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 0.0.0.0:9464")
        return value

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _rate_limit_storage(cls, value: str) -> str:
        if not value.startswith(("memory://", "redis://", "rediss://")):
            raise ValueError("must be memory:// or a redis:// (rediss://) URI")
        return value

    @model_validator(mode="after")
    def _rate_limit_both_or_neither(self) -> "Settings":
        if (self.rate_limit_max is None) != (self.rate_limit_window_ms is None):
            raise ValueError("RATE_LIMIT_MAX and RATE_LIMIT_WINDOW_MS go together: set both or neither")
        return self

    @field_validator("webhook_allowed_domains")
    @classmethod
    def _domain_names(cls, entries: list[str]) -> list[str]:
        # Host names compare lower-case and without a trailing dot, as URLs' hosts do.
        return [entry.lower().rstrip(".") for entry in entries]

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @field_validator("encryption_keys")
    @classmethod
    def _valid_encryption_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_encryption_keys(value.get_secret_value())  # its errors never quote key material
        return value

    @model_validator(mode="after")
    def _default_timeout_within_maximum(self) -> "Settings":
        if self.job_timeout_seconds > self.max_job_timeout_s:
            raise ValueError(f"COMFYUI_TIMEOUT_MS ({self.comfyui_timeout_ms}) is longer than MAX_JOB_TIMEOUT_S "
                             f"({self.max_job_timeout_s:g} s): no job could have the default time limit")
        return self

    @model_validator(mode="after")
    def _privacy_needs_encryption(self) -> "Settings":
        if self.privacy_mode and self.encryption_keys is None:
            raise ValueError(
                "PRIVACY_MODE=true needs ENCRYPTION_KEYS: without them the job inputs stay readable in Temporal's "
                "history (generate a key with: python -c \"import os,base64;print('k1:'+base64.b64encode("
                "os.urandom(32)).decode())\")"
            )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_log_format(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("comfyui_url")
    @classmethod
    def _one_comfyui_url(cls, value: str) -> str:
        if "," in value:
            raise ValueError("one URL; several ComfyUI servers go in COMFYUI_URLS")
        return valid_url(value)

    @field_validator("comfyui_urls")
    @classmethod
    def _backend_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_backends(value, default_slots=1)  # its errors name the entry, never a URL
        return value

    @model_validator(mode="after")
    def _one_way_to_name_comfyui(self) -> "Settings":
        if self.comfyui_urls is not None and "comfyui_url" in self.model_fields_set:
            raise ValueError("COMFYUI_URL and COMFYUI_URLS are both set: give one (COMFYUI_URLS for several servers)")
        return self

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql:// URLs are supported")
        if value and value.startswith("postgresql://"):
            # psycopg 3 is the driver the project ships.
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> "Settings":
        if self.storage_provider is StorageProvider.s3 and not self.s3_bucket:
            raise ValueError("STORAGE_PROVIDER=s3 needs S3_BUCKET")
        return self

    @model_validator(mode="after")
    def _production_is_authenticated(self) -> "Settings":
        if self.env is not Environment.production:
            return self
        if self.open_mode:
            raise ValueError("ENV=production refuses to run open (every caller an admin): set API_KEYS or JWT_SECRET")
        if self.jwt_secret is not None and len(self.jwt_secret.get_secret_value().encode()) < MIN_PRODUCTION_JWT_SECRET_BYTES:
            raise ValueError(f"ENV=production refuses a JWT_SECRET shorter than {MIN_PRODUCTION_JWT_SECRET_BYTES} bytes")
        return self

    @property
    def open_mode(self) -> bool:
        """No authentication configured: every caller is an admin."""
        return not self.api_keys and not self.jwt_secret

    @cached_property
    def parsed_api_keys(self) -> list[ApiKey]:
        # Parsed (and hashed) once, not on every authenticated request.
        return [parse_api_key(entry.get_secret_value()) for entry in self.api_keys]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'gateway.db').resolve()}"

    @property
    def resolved_storage_path(self) -> Path:
        return (self.storage_local_path or self.data_dir / "outputs").resolve()

    @property
    def resolved_public_base_url(self) -> str:
        return self.public_base_url or f"http://{self.host}:{self.port}"

    @property
    def input_image_max_pixels(self) -> int:
        """An input image may have twice the largest output's width and height: enough to downscale from."""
        return 4 * self.max_image_size**2

    @property
    def rate_limited(self) -> bool:
        return self.rate_limit_max is not None

    @property
    def encryption_key_ring(self) -> list[EncryptionKey]:
        """The keys of ENCRYPTION_KEYS, the encrypting one first; empty when encryption is off."""
        return parse_encryption_keys(self.encryption_keys.get_secret_value()) if self.encryption_keys else []

    @property
    def resolved_codec_cors_origins(self) -> list[str]:
        return self.codec_cors_origins or [f"http://localhost:{self.temporal_ui_port}",
                                           f"http://127.0.0.1:{self.temporal_ui_port}"]

    @property
    def job_timeout_seconds(self) -> float:
        return self.comfyui_timeout_ms / 1000


def env_example() -> str:
    """A commented `.env.example`: every setting with its default, all commented out."""
    lines = ["# ComfyUI Gateway configuration. Uncomment and change what you need; the values shown are the defaults."]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, Enum):
            default = default.value
        elif isinstance(default, list):
            default = ",".join(default)
        lines += ["", f"# {field.description}", f"# {name.upper()}={'' if default is None else default}"]
    return "\n".join(lines) + "\n"


@lru_cache
def get_settings() -> Settings:
    return Settings()
