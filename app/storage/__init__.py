from app.settings import Settings, StorageProvider
from app.storage.base import OutputStorage, StorageError
from app.storage.local import LocalStorage
from app.storage.s3 import S3Storage


def build_storage(settings: Settings) -> OutputStorage:
    if settings.storage_provider is StorageProvider.s3:
        assert settings.s3_bucket is not None  # the settings refuse s3 without a bucket
        return S3Storage(
            bucket=settings.s3_bucket, endpoint_url=settings.s3_endpoint, access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key, region=settings.s3_region, prefix=settings.s3_prefix,
            presign_expiry_s=settings.s3_presign_expiry_s, force_path_style=settings.s3_force_path_style,
        )
    return LocalStorage(settings.resolved_storage_path)


__all__ = ["OutputStorage", "StorageError", "LocalStorage", "S3Storage", "build_storage"]
