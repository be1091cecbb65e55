from app.settings import Settings, StorageProvider
from app.storage.base import OutputStorage
from app.storage.local import LocalStorage


def build_storage(settings: Settings) -> OutputStorage:
    if settings.storage_provider is StorageProvider.local:
        return LocalStorage(settings.resolved_storage_path)
    raise ValueError(f"unsupported STORAGE_PROVIDER {settings.storage_provider.value}")


__all__ = ["OutputStorage", "LocalStorage", "build_storage"]
