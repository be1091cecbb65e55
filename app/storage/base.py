"""The small interface every output store implements (local disk now; S3-compatible stores next). Jobs and
their histories hold storage keys only; where a file can be downloaded is asked of the store when it is read."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Protocol


class OutputStorage(Protocol):
    provider: str

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        """Move a finished local file under `key`, replacing what was there (so a retry is harmless)."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Store small data (such as an image input) under `key`, replacing what was there."""

    def open(self, key: str) -> BinaryIO:
        """Open the stored object for reading; FileNotFoundError when there is none."""

    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine when the store is a local disk, else None."""

    def location(self, key: str) -> str:
        """Where the object is, for people: the key under the local root, or a bucket URI."""

    def download_url(self, key: str, api_route: str) -> str:
        """Where a client downloads the object: `api_route` (the gateway serves it) or a URL of the store's."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with prefix; return how many. None left is not an error."""


def validate_key(key: str) -> str:
    parts = key.split("/")
    # Backslashes separate folders on Windows, and a NUL byte ends a path in C: neither belongs in a key.
    unsafe = "\\" in key or "\x00" in key
    if not key or key.startswith("/") or unsafe or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key
