"""What `GET /metrics` reads when it is scraped, beside the counters the API keeps (app.metrics): the jobs that
wait and run, from the jobs table (one grouped count, the same in every API process, since the table is every
job's truth), and each ComfyUI backend as the API's background probe last found it (api.probes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from api.probes import Probes
from app.metrics import template_label
from app.models import LIVE_STATUSES
from app.tables import JobRow

log = logging.getLogger(__name__)


class UnfinishedJobs(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            with Session(self._engine) as session:
                counts = session.execute(
                    select(JobRow.template_id, JobRow.status, func.count())
                    .where(JobRow.status.in_([status.value for status in LIVE_STATUSES]))  # type: ignore[attr-defined]
                    .group_by(JobRow.template_id, JobRow.status)
                ).all()
        except SQLAlchemyError:
            # The scrape still answers with everything else; the gap in this series says the database did not.
            log.warning("GET /metrics: the jobs table could not be read", exc_info=True)
            return
        gauge = GaugeMetricFamily(
            "gateway_jobs_unfinished", "jobs waiting (queued: for a slot, or in ComfyUI's own queue) and running, by "
            "template and status, from the jobs table", labels=["template", "status"])
        for template_id, status, count in counts:
            gauge.add_metric([template_label(template_id), status], count)
        yield gauge


class Backends(Collector):
    def __init__(self, probes: Probes) -> None:
        self._probes = probes

    def collect(self) -> Iterator[Metric]:
        probe = self._probes.latest
        up = GaugeMetricFamily("gateway_backend_up", "1 if the ComfyUI answered the API's last probe (about once a "
                                                     "second), else 0", labels=["backend"])
        queue = GaugeMetricFamily("gateway_backend_queue_remaining", "prompts the ComfyUI has, running and pending, "
                                                                     "from anyone (its GET /prompt)", labels=["backend"])
        total = GaugeMetricFamily("gateway_backend_vram_total_bytes", "a ComfyUI device's memory (its /system_stats "
                                                                      "vram_total)", labels=["backend", "device"])
        used = GaugeMetricFamily("gateway_backend_vram_used_bytes", "a ComfyUI device's memory in use (vram_total less "
                                                                    "vram_free)", labels=["backend", "device"])
        for backend in self._probes.backends:
            up.add_metric([backend.id], 1 if probe is not None and probe.comfyui.get(backend.id) else 0)
            reading = self._probes.readings.get(backend.id)
            if reading is None:
                continue
            if reading.queue_remaining is not None:
                queue.add_metric([backend.id], reading.queue_remaining)
            for device in reading.devices:
                total.add_metric([backend.id, device.name], device.total_bytes)
                used.add_metric([backend.id, device.name], device.used_bytes)
        yield from (up, queue, total, used)


def api_registry(engine: Engine, probes: Probes) -> CollectorRegistry:
    """What one API app's GET /metrics serves: the process's default registry (its counters, and the process's
    CPU, memory and GC) and the app's readings. Per app, since a test process runs many apps."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in (REGISTRY, UnfinishedJobs(engine), Backends(probes)):
        registry.register(collector)  # a registry collects like any collector
    return registry
