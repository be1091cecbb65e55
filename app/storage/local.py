"""Outputs on the local disk under STORAGE_LOCAL_PATH."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from app.storage.base import validate_key


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

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def location(self, key: str) -> str:
        return validate_key(key)

    def download_url(self, key: str, api_route: str) -> str:
        return api_route  # the API streams local files itself

    def delete_prefix(self, prefix: str) -> int:
        # Keys are paths, so what starts with `prefix` is in the folder before its last "/": the entries there
        # whose names start with the rest (a whole folder of them when the prefix ends with "/").
        head, _, name = prefix.rpartition("/")
        if not prefix or prefix.startswith("/"):
            raise ValueError(f"invalid storage prefix {prefix!r}")
        if head:
            validate_key(head)
        folder = self.root / head
        deleted = 0
        for entry in folder.glob(glob.escape(name) + "*") if folder.is_dir() else []:
            if entry.is_dir():
                deleted += sum(1 for path in entry.rglob("*") if path.is_file())
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
                deleted += 1
        if head and not name:
            with contextlib.suppress(OSError):  # gone already, or something was written to it meanwhile
                folder.rmdir()
        return deleted
