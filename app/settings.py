"""The gateway's one configuration object, read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
from enum import Enum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


class StorageProvider(str, Enum):
    local = "local"
    s3 = "s3"


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
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # HTTP API
    port: int = Field(3000, ge=1, le=65535, description="where the API listens")
    host: str = Field("127.0.0.1", description="the address the API binds; 0.0.0.0 for all interfaces")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed to call the API from a browser")
    log_level: LogLevel = Field(LogLevel.info, description="DEBUG, INFO, WARNING or ERROR")
    privacy_mode: bool = Field(False, description="keep job inputs out of the database and the logs")
    # Against clients that are slow or many (`comfyui-gateway api` and `dev`).
    api_header_timeout_s: float = Field(
        10.0, gt=0, description="how long a client may take to send a request's line and headers; then it is cut off")
    api_body_timeout_s: float = Field(
        30.0, gt=0, description="how long a request's body may stop arriving before the request is refused with 408")
    api_max_concurrent_requests: int = Field(
        2048, ge=1, description="requests the API handles at once; more are refused with 503 SERVER_BUSY")
    api_concurrent_reads: int = Field(
        2, ge=1, description="GET requests the API works on at once; more wait their turn, so that clients "
                             "polling hard cannot crowd out submissions")
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
    comfyui_url: str = Field("http://127.0.0.1:8188", description="the ComfyUI server")
    comfyui_timeout_ms: int = Field(300_000, gt=0, description="a job's time limit on ComfyUI (per job: timeoutSeconds)")
    max_concurrency: int = Field(
        1, ge=1, le=64, description="prompts run at once per ComfyUI; further jobs wait durably in Temporal")
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

    # Persistence
    data_dir: Path = Field(Path("./data"), description="SQLite database, Temporal's dev database, outputs, scratch files")
    database_url: str | None = Field(None, description="default: a SQLite file in DATA_DIR; or postgresql://user@host/db")
    storage_provider: StorageProvider = Field(StorageProvider.local, description="where outputs are stored: local (s3 soon)")
    storage_local_path: Path | None = Field(None, description="default: DATA_DIR/outputs")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint (with STORAGE_PROVIDER=s3; soon)")
    s3_bucket: str | None = Field(None, description="S3 bucket (soon)")
    s3_access_key: str | None = Field(None, description="S3 access key (soon)")
    s3_secret_key: str | None = Field(None, description="S3 secret key (soon)")
    s3_region: str | None = Field(None, description="S3 region (soon)")
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
    temporal_ui_port: int = Field(8233, ge=1, le=65535, description="the dev server's Web UI (comfyui-gateway dev)")

    # Features that later releases fill in. They are declared so that setting one is a clear
    # start-up error rather than a silently ignored option.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="API keys (soon)")
    jwt_secret: str | None = Field(None, description="JWT secret (soon)")
    cache_enabled: bool = Field(False, description="result cache (soon)")
    cache_ttl_seconds: int | None = Field(None, description="result cache lifetime (soon)")

    _split_lists = field_validator(
        "cors_origins", "api_keys", "webhook_allowed_domains", "trusted_proxies", mode="before")(_split_csv)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            ipaddress.ip_network(entry, strict=False)  # a ValueError names the entry
        return entries

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

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("comfyui_url")
    @classmethod
    def _one_comfyui_url(cls, value: str) -> str:
        if "," in value:
            raise ValueError("several ComfyUI servers are not supported yet; give one URL")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

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
    def _refuse_unsupported_features(self) -> "Settings":
        unsupported = {
            "STORAGE_PROVIDER=s3": self.storage_provider is StorageProvider.s3,
            "API_KEYS": bool(self.api_keys),
            "JWT_SECRET": bool(self.jwt_secret),
            "CACHE_ENABLED": self.cache_enabled,
            "CACHE_TTL_SECONDS": self.cache_ttl_seconds is not None,
        }
        named = [name for name, is_set in unsupported.items() if is_set]
        if named:
            raise ValueError(
                "not supported by this version of the gateway (remove them from the environment): "
                + ", ".join(named)
            )
        return self

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
