"""Outputs on the local disk under STORAGE_LOCAL_PATH."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from app.storage.base import validate_key, validate_prefix


class LocalStorage:
    provider = "local"
    signs_urls = False

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

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        # Only the folder the prefix ends in can hold matching keys: walk that, not the whole store.
        folder = self.root / prefix.rpartition("/")[0]
        if not folder.is_dir():
            return 0
        deleted = 0
        for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
            key = path.relative_to(self.root).as_posix()
            if not key.startswith(prefix):
                continue
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
                deleted += not path.name.endswith(".part")  # a put's staging file is not an object
        if folder != self.root and f"{folder.relative_to(self.root).as_posix()}/".startswith(prefix):
            with contextlib.suppress(OSError):  # left in place when something else is in it
                folder.rmdir()
        return deleted
