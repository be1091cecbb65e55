"""The small interface every output store implements (local disk, S3-compatible buckets). Jobs and their
histories hold storage keys only; where a file can be downloaded is asked of the store when it is read."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Protocol


class StorageError(OSError):
    """The store could not be reached or refused the operation (a bucket's endpoint down, access denied). An
    OSError, like a local disk's failures, so that every caller treats both alike: retried as STORAGE_ERROR."""


class OutputStorage(Protocol):
    provider: str
    # download_url signs with the store's SDK (CPU work of boto3): the API calls it off the event loop.
    signs_urls: bool

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        """Store a finished local file under `key`, replacing what was there (so a retry is harmless). The
        source may be moved away; the caller removes whatever is left of it."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Store small data (such as an image input) under `key`, replacing what was there."""

    def open(self, key: str) -> BinaryIO:
        """Open the stored object for reading, streamed; FileNotFoundError when there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`, asked without reading it (on S3 a HEAD, not a GET)."""

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


def validate_prefix(prefix: str) -> str:
    """A key prefix to delete under: never empty (that would be everything), never climbing out of the store."""
    if not prefix or prefix.startswith("/") or any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"invalid storage key prefix {prefix!r}")
    return prefix
