"""The API documents itself: Swagger UI and ReDoc that work offline."""

from __future__ import annotations

from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from httpx import ASGITransport

from api.main import create_app
from app.settings import Settings
from tests.harness import free_port, migrate_database


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API alone: a migrated SQLite database, and a ComfyUI and a Temporal where nothing listens."""
    settings = Settings(
        _env_file=None, data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        comfyui_url=f"http://127.0.0.1:{free_port()}", temporal_address=f"127.0.0.1:{free_port()}",
    )
    migrate_database(settings)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


class AssetReferences(HTMLParser):
    """Every URL a page loads: stylesheets, icons, scripts, and ReDoc's spec."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("href", "src", "spec-url") and value]


def referenced_assets(html: str) -> list[str]:
    parser = AssetReferences()
    parser.feed(html)
    return parser.urls


EXPECTED_TYPES = {".css": "text/css", ".js": "javascript", ".png": "image/png", ".json": "application/json"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_load_nothing_from_another_host(api: httpx.AsyncClient, page: str) -> None:
    response = await api.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text, response.text
    assets = referenced_assets(response.text)
    assert any(url.endswith(".js") for url in assets), assets
    if page == "/docs":
        assert "url: '/openapi.json'" in response.text  # Swagger UI's spec is set in its script, not an attribute
        assets.append("/openapi.json")
    for url in assets:
        target = urljoin(f"http://gateway{page}", url)
        assert urlsplit(target).netloc == "gateway", url
        asset = await api.get(target)
        assert asset.status_code == 200, url
        assert EXPECTED_TYPES[Path(urlsplit(target).path).suffix] in asset.headers["content-type"], (url, asset.headers)
        assert len(asset.content) > 0, url
