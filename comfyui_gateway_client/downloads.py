"""Writing a downloaded output: streamed to a temporary file beside the target, checked against the job's
recorded size and sha256 when they are known, and only then renamed into place, so a broken download never
leaves a file that looks whole."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import httpx

from comfyui_gateway_client.errors import OUTPUT_CORRUPTED, OutputCorrupted
from comfyui_gateway_client.models import OutputFile

CHUNK_BYTES = 1024 * 1024


def target_path(destination: Path, filename: str) -> Path:
    """`destination` itself, or the file's own name inside it when it is a folder (never a path the server chose)."""
    return destination / Path(filename).name if destination.is_dir() else destination


def external_request(http: httpx.Client | httpx.AsyncClient, location: str) -> httpx.Request:
    """A GET of where the gateway redirected (S3 storage: a presigned URL), without the gateway's credentials:
    a presigned URL needs none, and the API key must not travel to the storage's host."""
    request = http.build_request("GET", location)
    for header in ("X-API-Key", "Authorization"):
        request.headers.pop(header, None)
    return request


def _new_file_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file in `path`'s folder, made as `open` makes files (0666 less the umask: 0644 as a
    rule), since it becomes the output itself; tempfile.mkstemp's would stay 0600, readable by no one else."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue


class OutputWriter:
    """Collects a download's chunks into a temporary file; `finish` checks it and renames it to `path`."""

    def __init__(self, path: Path, expected: OutputFile | None) -> None:
        self.path = path
        self.expected = expected
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, self.temporary = _new_file_beside(path)
        self.file = os.fdopen(descriptor, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def finish(self) -> Path:
        self.file.close()
        expected = self.expected
        if expected is not None and (self.size, self.digest.hexdigest()) != (expected.size, expected.sha256):
            self.temporary.unlink()
            raise OutputCorrupted(OUTPUT_CORRUPTED, f"{expected.filename}: got {self.size} bytes with sha256 "
                                  f"{self.digest.hexdigest()}, the job recorded {expected.size} with {expected.sha256}")
        self.temporary.replace(self.path)
        return self.path

    def abandon(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)
