"""S3Storage against a real S3 HTTP endpoint (moto's server in a child process), and delete_prefix on both
providers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from app.storage import LocalStorage, S3Storage
from app.storage.base import StorageError
from tests.harness import MotoServerProcess, free_port


def s3_storage(server: MotoServerProcess, bucket: str, **options: object) -> S3Storage:
    return S3Storage(bucket=bucket, endpoint_url=server.url, access_key="test", secret_key="test",
                     region="us-east-1", **options)  # type: ignore[arg-type]


@pytest.fixture
def bucket(s3_server: MotoServerProcess) -> str:
    return s3_server.create_bucket()


def test_put_open_and_replace(s3_server: MotoServerProcess, bucket: str, tmp_path: Path) -> None:
    storage = s3_storage(s3_server, bucket)
    source = tmp_path / "a.png"
    source.write_bytes(b"first")
    storage.put_file("job/0/a.png", source, "image/png")
    storage.put_bytes("job/0/a.png", b"second", "image/png")  # a retry replaces the object
    with storage.open("job/0/a.png") as body:
        assert body.read(3) == b"sec" and body.read() == b"ond"
    head = s3_server.client().head_object(
        Bucket=bucket, Key="job/0/a.png")
    assert head["ContentType"] == "image/png"
    assert storage.location("job/0/a.png") == f"s3://{bucket}/job/0/a.png" and storage.local_path("job/0/a.png") is None


def test_a_missing_object_is_file_not_found(s3_server: MotoServerProcess, bucket: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/job/0/gone.png"):
        s3_storage(s3_server, bucket).open("job/0/gone.png")


def test_exists_asks_the_store_without_reading_the_object(s3_server: MotoServerProcess, bucket: str) -> None:
    storage = s3_storage(s3_server, bucket, prefix="gateway")
    storage.put_bytes("job/0/a.png", b"png", "image/png")
    assert storage.exists("job/0/a.png")
    assert not storage.exists("job/0/gone.png")
    assert not s3_storage(s3_server, bucket).exists("job/0/a.png")  # under the prefix only


def test_exists_on_a_store_that_does_not_answer_is_a_storage_error() -> None:
    down = S3Storage(bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}", access_key="test",
                     secret_key="test", region="us-east-1")
    with pytest.raises(StorageError, match="looking up job/0/a.png"):
        down.exists("job/0/a.png")


def test_local_exists_is_a_stored_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_bytes("job/0/a.png", b"png", "image/png")
    assert storage.exists("job/0/a.png")
    assert not storage.exists("job/0/gone.png") and not storage.exists("job/0")  # a folder is no object


def test_download_url_is_a_presigned_get(s3_server: MotoServerProcess, bucket: str) -> None:
    storage = s3_storage(s3_server, bucket, presign_expiry_s=120, prefix="/gateway/")
    storage.put_bytes("job/0/a.png", b"png bytes", "image/png")
    url = storage.download_url("job/0/a.png", "/outputs/job/a.png")
    assert url.startswith(f"{s3_server.url}/{bucket}/gateway/job/0/a.png?") and "X-Amz-Expires=120" in url
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == b"png bytes"
    assert storage.location("job/0/a.png") == f"s3://{bucket}/gateway/job/0/a.png"


def test_large_files_go_up_in_parts(s3_server: MotoServerProcess, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 * 1024 * 1024))
    s3_storage(s3_server, bucket).put_file("job/0/big.bin", source, "application/octet-stream")
    head = s3_server.client().head_object(
        Bucket=bucket, Key="job/0/big.bin")
    assert head["ContentLength"] == source.stat().st_size
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload's ETag counts its parts (8 + 8 + 4 MB)
    digest = hashlib.sha256()
    with s3_storage(s3_server, bucket).open("job/0/big.bin") as body:
        while chunk := body.read(1024 * 1024):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()


def test_delete_prefix_deletes_exactly_what_starts_with_it(s3_server: MotoServerProcess, bucket: str) -> None:
    storage = s3_storage(s3_server, bucket, prefix="p")
    for key in ["job1/0/a.png", "job1/1/b.png", "job10/0/c.png", "inputs/x.png"]:
        storage.put_bytes(key, b"x", "image/png")
    assert storage.delete_prefix("job1/") == 2
    assert storage.delete_prefix("job1/") == 0
    with storage.open("job10/0/c.png"), storage.open("inputs/x.png"):
        pass
    with pytest.raises(ValueError):
        storage.delete_prefix("")


def test_local_delete_prefix_matches_s3(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    for key in ["job1/0/a.png", "job1/1/b.png", "job10/0/c.png", "inputs/x.png", "inputs/y.png"]:
        storage.put_bytes(key, b"x", "image/png")
    assert storage.delete_prefix("job1/") == 2
    assert not (tmp_path / "outputs" / "job1").exists()
    assert storage.delete_prefix("inputs/x") == 1 and storage.delete_prefix("nothing/") == 0
    assert sorted(p.relative_to(tmp_path / "outputs").as_posix() for p in (tmp_path / "outputs").rglob("*.png")) == [
        "inputs/y.png", "job10/0/c.png"]
    with pytest.raises(ValueError):
        storage.delete_prefix("../")
