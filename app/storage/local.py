"""Outputs on the local disk under STORAGE_LOCAL_PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from app.storage.base import validate_key


class LocalStorage:
    provider = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same filesystem → an atomic rename; otherwise copy to a sibling, then rename into place.
        staging = target.with_name(f".{target.name}.part")
        shutil.move(source, staging)
        os.replace(staging, target)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.part")
        staging.write_bytes(data)
        os.replace(staging, target)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def location(self, key: str) -> str:
        return validate_key(key)

    def download_url(self, key: str, api_route: str) -> str:
        return api_route  # the API streams local files itself
