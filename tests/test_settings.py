import httpx
import pytest
from pydantic import ValidationError

from app.comfy.backends import Backend, configured_backends
from app.comfy.client import ComfyClient
from app.comfy.errors import ComfyError
from app.errors import ErrorCode
from app.settings import Settings
from tests.harness import free_port


def test_defaults_match_what_users_know() -> None:
    settings = Settings(_env_file=None)
    assert settings.port == 3000 and settings.comfyui_url == "http://127.0.0.1:8188"
    assert settings.comfyui_timeout_ms == 300_000 and settings.max_concurrency == 1
    assert settings.max_image_size == 2048 and settings.max_batch_size == 4
    assert settings.resolved_database_url.startswith("sqlite:///") and settings.temporal_address == "127.0.0.1:7233"


@pytest.mark.parametrize(("variable", "value"), [("STORAGE_PROVIDER", "ftp"), ("COMFYUI_URL", "localhost:8188"),
                                                 ("DATABASE_URL", "mysql://x"), ("LOG_LEVEL", "loud")])
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_s3_storage_needs_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_PROVIDER", "s3")
    with pytest.raises(ValidationError, match="S3_BUCKET"):
        Settings(_env_file=None)
    monkeypatch.setenv("S3_BUCKET", "outputs")
    settings = Settings(_env_file=None)
    assert settings.s3_bucket == "outputs" and settings.s3_presign_expiry_s == 3600


def test_lists_and_postgres_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "https://a.test, https://b.test")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    settings = Settings(_env_file=None)
    assert settings.cors_origins == ["https://a.test", "https://b.test"]
    assert settings.resolved_database_url == "postgresql+psycopg://u@h/db"


def test_webhook_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    monkeypatch.setenv("WEBHOOK_ALLOWED_DOMAINS", "Hooks.Example.com., 127.0.0.1")
    settings = Settings(_env_file=None)
    assert settings.webhook_allowed_domains == ["hooks.example.com", "127.0.0.1"]
    assert Settings(_env_file=None, webhook_allowed_domains="").webhook_allowed_domains == []
    assert Settings(_env_file=None, port=8080).resolved_public_base_url == "http://127.0.0.1:8080"
    assert Settings(_env_file=None, public_base_url="https://gw.example/").resolved_public_base_url == "https://gw.example"


def test_the_result_cache_is_off_by_default_and_keeps_results_a_day() -> None:
    settings = Settings(_env_file=None)
    assert settings.cache_enabled is False and settings.cache_ttl_seconds == 86_400


def test_rate_limit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for one_of_them in ({"rate_limit_max": 10}, {"rate_limit_window_ms": 60_000}):
        with pytest.raises(ValidationError, match="set both or neither"):
            Settings(_env_file=None, **one_of_them)
    monkeypatch.setenv("RATE_LIMIT_MAX", "10")
    monkeypatch.setenv("RATE_LIMIT_WINDOW_MS", "60000")
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16")
    settings = Settings(_env_file=None)
    assert settings.rate_limited and settings.rate_limit_storage_uri == "memory://"
    assert settings.trusted_proxies == ["10.0.0.1", "192.168.0.0/16"]
    assert not Settings(_env_file=None, rate_limit_max=None, rate_limit_window_ms=None).rate_limited
    for refused in ({"trusted_proxies": "proxy.example"}, {"rate_limit_storage_uri": "memcached://x"}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **refused)


def test_comfyui_urls_name_each_backend_its_slots_and_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_URLS", "gpu1=http://10.0.0.5:8188;slots=2;tags=sdxl+flux, gpu2=https://u:pw@gpu.test/")
    monkeypatch.setenv("MAX_CONCURRENCY", "3")
    settings = Settings(_env_file=None)
    assert configured_backends(settings) == [
        Backend(id="gpu1", url="http://10.0.0.5:8188", slots=2, tags=("sdxl", "flux")),
        Backend(id="gpu2", url="https://u:pw@gpu.test", slots=3),  # MAX_CONCURRENCY is the default slot count
    ]
    assert configured_backends(settings)[1].public_url == "https://gpu.test"
    assert configured_backends(settings)[0].capacity(settings.comfyui_prefetch) == 4  # prefetch 1 per slot


@pytest.mark.parametrize(("url", "shown"), [
    ("https://u:pw@gpu.test", "https://gpu.test"),
    ("http://svc:pw@[fd00::5]:8188/comfy", "http://[fd00::5]:8188/comfy"),
    ("http://10.0.0.5:8188", "http://10.0.0.5:8188"),
])
def test_a_backend_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert Backend(id="gpu1", url=url, slots=1).public_url == shown


async def test_an_unreachable_comfyui_is_named_without_its_credentials() -> None:
    """The error reaches the job's warning, its log, its error and the worker's log."""
    async with httpx.AsyncClient() as http:
        client = ComfyClient(f"http://svc:hunter2@127.0.0.1:{free_port()}", http)
        with pytest.raises(ComfyError) as unreachable:
            await client.system_stats()
    assert unreachable.value.code is ErrorCode.COMFYUI_UNREACHABLE
    assert "hunter2" not in unreachable.value.message and "hunter2" not in str(unreachable.value.details)
    assert "127.0.0.1" in unreachable.value.message


def test_comfyui_url_alone_is_the_one_backend_comfyui_1() -> None:
    settings = Settings(_env_file=None, comfyui_url="http://gpu:8188", max_concurrency=2)
    assert configured_backends(settings) == [Backend(id="comfyui-1", url="http://gpu:8188", slots=2)]


@pytest.mark.parametrize(("value", "complaint"), [
    ("gpu1=http://a:1,gpu1=http://b:1", "gpu1 is listed twice"),
    ("GPU=http://a:1", "entry 1 must be name=url"),
    ("gpu1", "entry 1 must be name=url"),
    ("gpu1=ftp://secret@a:1", "backend gpu1: the URL must start with http"),
    ("gpu1=http://a:1/?token=secret", "backend gpu1: the URL must not have a query"),
    ("gpu1=http://a:1;slots=0", "unknown option 'slots'"),
    ("gpu1=http://a:1;gpus=2", "unknown option 'gpus'"),
    ("gpu1=http://a:1;tags=Big", "tag 'Big'"),
    ("comfyui=http://a:1", "the shared queue's"),
    (" , ", "names no backend"),
])
def test_a_bad_backend_list_is_refused_naming_the_entry_never_its_url(
    monkeypatch: pytest.MonkeyPatch, value: str, complaint: str
) -> None:
    monkeypatch.setenv("COMFYUI_URLS", value)
    with pytest.raises(ValidationError, match=complaint) as refused:
        Settings(_env_file=None)
    assert "secret" not in str(refused.value)


def test_comfyui_url_and_comfyui_urls_do_not_go_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_URLS", "gpu1=http://a:1")
    monkeypatch.setenv("COMFYUI_URL", "http://b:1")
    with pytest.raises(ValidationError, match="both set"):
        Settings(_env_file=None)
