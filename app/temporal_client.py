"""Connecting to Temporal with the converter every part of the gateway shares, and registering the
search attributes the workflow writes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.runtime import (
    LogForwardingConfig, LoggingConfig, PrometheusConfig, Runtime, TelemetryConfig, TelemetryFilter,
)
from temporalio.service import RPCError

from app.codec import EncryptionCodec
from app.search_attributes import JOB_SEARCH_ATTRIBUTES
from app.settings import Settings


log = logging.getLogger(__name__)

# How `temporal operator search-attribute create --type` names each kind the gateway uses.
_CLI_TYPES = {IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD: "Keyword", IndexedValueType.INDEXED_VALUE_TYPE_INT: "Int"}


class SearchAttributesMissing(RuntimeError):
    """The namespace lacks the gateway's search attributes and would not take them."""


class TemporalUnreachable(RuntimeError):
    """Temporal did not answer within TEMPORAL_CONNECT_TIMEOUT_S."""


def gateway_data_converter(settings: Settings) -> DataConverter:
    """Pydantic payloads; with ENCRYPTION_KEYS every payload encrypted, and failures too: their message and
    stack trace move into an encrypted payload (what Temporal shows is "Encoded failure"), since an error
    may quote an input. The API and the worker must use the same one. Search attributes stay readable: they
    hold only what names a job (status, template, owner, backend, priority, batch), never its inputs."""
    keys = settings.encryption_key_ring
    if not keys:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect_temporal(settings: Settings, runtime: Runtime | None = None) -> Client:
    return await Client.connect(
        settings.temporal_address, namespace=settings.temporal_namespace, data_converter=gateway_data_converter(settings),
        runtime=runtime,
    )


async def connect_within(settings: Settings, runtime: Runtime) -> Client:
    """Connect, trying again every second while Temporal is not up yet (a stack starts its parts together),
    for TEMPORAL_CONNECT_TIMEOUT_S in all, the attempt under way included: one that hangs (an address that
    drops packets) is bounded too."""
    last_error: Exception | None = None
    try:
        async with asyncio.timeout(settings.temporal_connect_timeout_s):
            while True:
                try:
                    return await connect_temporal(settings, runtime)
                except Exception as error:  # connection errors vary by transport; all mean "not up yet"
                    last_error = error
                log.info("waiting for Temporal at %s (%s)", settings.temporal_address, last_error)
                await asyncio.sleep(1)
    except TimeoutError:
        raise TemporalUnreachable(
            f"Temporal at {settings.temporal_address} (TEMPORAL_ADDRESS) did not answer within "
            f"{settings.temporal_connect_timeout_s:g} s (TEMPORAL_CONNECT_TIMEOUT_S)"
            + (f"; last error: {last_error}" if last_error is not None else "")
        ) from None


def process_runtime(settings: Settings, *, serves_metrics: bool) -> Runtime:
    """A gateway process's SDK runtime (one per process: its clients and workers share it). The SDK core's own
    lines (Rust, on stderr by default) go through Python's logging as `temporalio.core`, so they are lines of the
    process's format (LOG_FORMAT) like every other; warnings and worse only (forwarding the core's info lines
    left a worker hanging at its stop). The worker's also serves the SDK's metrics at TEMPORAL_METRICS_ADDRESS
    (it binds the address now)."""
    forwarding = LogForwardingConfig(logger=logging.getLogger("temporalio.core"), prepend_target_on_message=False,
                                     append_log_fields_to_message=False)
    metrics = None
    if serves_metrics and settings.temporal_metrics_address is not None:
        metrics = PrometheusConfig(bind_address=settings.temporal_metrics_address, durations_as_seconds=True)
    return Runtime(telemetry=TelemetryConfig(
        logging=LoggingConfig(filter=TelemetryFilter(core_level="WARN", other_level="ERROR"), forwarding=forwarding),
        metrics=metrics))


async def register_search_attributes(client: Client) -> None:
    """Make sure the namespace has the gateway's search attributes; an existing one is left as it is.

    A workflow that writes an unregistered attribute cannot make progress, so the worker calls this
    before polling and refuses to start when it fails (e.g. Temporal Cloud, where the operator API is
    closed and the attributes are created with `tcld`)."""
    wanted = {key.name: IndexedValueType.ValueType(key.indexed_value_type.value) for key in JOB_SEARCH_ATTRIBUTES}
    existing = await _custom_search_attributes(client)
    # Only the missing ones are asked for: a namespace of an older release has some of them (JobStatus, TemplateId,
    # Owner), and a request that names an existing attribute may be refused as a whole.
    missing = {name: kind for name, kind in wanted.items() if existing is None or name not in existing}
    if not missing:
        return
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
        return
    except RPCError as refused:
        failure = refused
    existing = await _custom_search_attributes(client)
    if existing is not None and set(wanted) <= existing:
        return  # another worker added them meanwhile
    commands = "; ".join(
        f"temporal operator search-attribute create --namespace {client.namespace} --name {name} "
        f"--type {_CLI_TYPES[kind]}"
        for name, kind in missing.items()
    )
    raise SearchAttributesMissing(
        f"namespace {client.namespace!r} lacks the search attributes {', '.join(missing)} and refused to add them "
        f"({failure.message}); create them once: {commands}"
    )


async def _custom_search_attributes(client: Client) -> set[str] | None:
    """The namespace's custom search attributes; None when the server will not say."""
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError:
        return None
    return set(listed.custom_attributes)
