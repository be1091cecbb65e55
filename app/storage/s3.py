"""Outputs in a bucket of any S3-compatible store (AWS S3, MinIO, Cloudflare R2, ...), through boto3.

Every call here blocks (boto3 is synchronous): callers run them on a thread, never on an event loop. Files go
up with boto3's managed transfer, multipart above `MULTIPART_THRESHOLD`, reading the file part by part, so an
output of any size is never held whole in memory. Download URLs are presigned GETs, made each time a job is
read (signing is local work: no request to the store), so they never expire inside a job's history.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import StorageError, validate_key, validate_prefix

MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNK = 8 * 1024 * 1024
# Parts in flight at once per upload: with MULTIPART_CHUNK, the memory one upload may use at most.
UPLOAD_CONCURRENCY = 4
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3Storage:
    provider = "s3"
    signs_urls = True

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        prefix: str = "",
        presign_expiry_s: int = 3600,
        force_path_style: bool = False,
    ) -> None:
        self.bucket = bucket
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._presign_expiry_s = presign_expiry_s
        config = Config(
            # A few quick tries inside one call (a part of a multipart upload meeting a 503 is not the whole
            # file again); longer trouble is the activity's, which Temporal retries as STORAGE_ERROR.
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            # Checksums only where S3 requires them: boto3's newer default (a CRC trailer on every upload)
            # is refused by several S3-compatible stores.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            signature_version="s3v4",
            s3={"addressing_style": "path" if force_path_style else "auto"},
        )
        # One client for all threads: boto3 clients are thread-safe (sessions are not, so it is made here).
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            region_name=region, config=config,
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=UPLOAD_CONCURRENCY,
        )

    def _key(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        with _storage_errors(f"uploading {key}"):
            self._client.upload_file(
                str(source), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}, Config=self._transfer
            )

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with _storage_errors(f"uploading {key}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def open(self, key: str) -> BinaryIO:
        """The object's body, streamed from the store as it is read (botocore's StreamingBody)."""
        with _storage_errors(f"reading {key}"):
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in _MISSING:
                    raise FileNotFoundError(f"no object {self.location(key)}") from None
                raise

    def exists(self, key: str) -> bool:
        with _storage_errors(f"looking up {key}"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as error:
                # A HEAD answer has no body: a missing object is only its status, which botocore gives as "404".
                if error.response.get("Error", {}).get("Code") in _MISSING:
                    return False
                raise
        return True

    def local_path(self, key: str) -> Path | None:
        return None

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def download_url(self, key: str, api_route: str) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=self._presign_expiry_s
        )

    def delete_prefix(self, prefix: str) -> int:
        full = self._prefix + validate_prefix(prefix)
        deleted = 0
        with _storage_errors(f"deleting {full}*"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                for start in range(0, len(keys), _DELETE_BATCH):
                    batch = keys[start:start + _DELETE_BATCH]
                    answer = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                    if errors := answer.get("Errors"):
                        raise StorageError(f"the store kept {len(errors)} objects under {full}: {errors[0]}")
                    deleted += len(batch)
        return deleted


@contextmanager
def _storage_errors(doing: str) -> Iterator[None]:
    """boto3's failures (connection refused, timeouts, access denied, a failed multipart upload) as StorageError;
    anything else (FileNotFoundError for a missing key) passes as it is."""
    try:
        yield
    except (BotoCoreError, ClientError, S3UploadFailedError) as error:
        raise StorageError(f"{doing} failed: {error}") from error
