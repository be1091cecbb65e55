"""Connecting to Temporal with the converter every part of the gateway shares, and registering the
search attributes the workflow writes."""

from __future__ import annotations

import dataclasses

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import RPCError

from app.codec import EncryptionCodec
from app.search_attributes import JOB_SEARCH_ATTRIBUTES
from app.settings import Settings


class SearchAttributesMissing(RuntimeError):
    """The namespace lacks the gateway's search attributes and would not take them."""


def gateway_data_converter(settings: Settings) -> DataConverter:
    """Pydantic payloads; with ENCRYPTION_KEYS every payload encrypted, and failures too: their message and
    stack trace move into an encrypted payload (what Temporal shows is "Encoded failure"), since an error
    may quote an input. The API and the worker must use the same one. Search attributes stay readable: they
    hold only a job's status and template id."""
    keys = settings.encryption_key_ring
    if not keys:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address, namespace=settings.temporal_namespace, data_converter=gateway_data_converter(settings)
    )


async def register_search_attributes(client: Client) -> None:
    """Make sure the namespace has the gateway's search attributes; an existing one is left as it is.

    A workflow that writes an unregistered attribute cannot make progress, so the worker calls this
    before polling and refuses to start when it fails (e.g. Temporal Cloud, where the operator API is
    closed and the attributes are created with `tcld`)."""
    wanted = {key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in JOB_SEARCH_ATTRIBUTES}
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=wanted)
        )
        return
    except RPCError as refused:
        failure = refused
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError:
        listed = None
    if listed is not None and set(wanted) <= set(listed.custom_attributes):
        return
    commands = "; ".join(
        f"temporal operator search-attribute create --namespace {client.namespace} --name {name} --type Keyword"
        for name in wanted
    )
    raise SearchAttributesMissing(
        f"namespace {client.namespace!r} lacks the search attributes {', '.join(wanted)} and refused to add them "
        f"({failure.message}); create them once: {commands}"
    )
