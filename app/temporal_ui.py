"""Deep links into the Temporal Web UI, for operators: every job (and batch) answer carries the address of its
workflow's history there, `temporalUiUrl`.

The base is TEMPORAL_UI_URL: the Web UI of the cluster the gateway uses (e.g. https://temporal-ui.example.com,
or https://cloud.temporal.io for Temporal Cloud, whose paths are the same); `comfyui-gateway dev` sets it to its
embedded dev server's UI. Without one no link is made: the API cannot tell where an operator's browser reaches
the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from app.settings import Settings


@dataclass(frozen=True)
class TemporalUi:
    base_url: str | None
    namespace: str

    @classmethod
    def of(cls, settings: Settings) -> TemporalUi:
        base = settings.temporal_ui_url.rstrip("/") if settings.temporal_ui_url else None
        return cls(base_url=base, namespace=settings.temporal_namespace)

    def workflow_url(self, workflow_id: str) -> str | None:
        """The workflow's page, which the UI opens on the latest run's history: a link made before a reset (or
        a continue-as-new) still shows what runs now. None when no UI is configured."""
        if self.base_url is None:
            return None
        return f"{self.base_url}/namespaces/{quote(self.namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"
