"""The remote codec of the Temporal Web UI and CLI (ENCRYPTION_KEYS): POST /codec/encode and /codec/decode take
and answer Temporal's `Payloads` as protobuf JSON (`{"payloads": [{"metadata": {name: base64}, "data": base64}]}`),
so that an admin pointed at `<gateway>/codec` reads the histories the gateway encrypts. Admins only: a decode
reveals job inputs. Without ENCRYPTION_KEYS both answer the payloads unchanged, as the gateway stores them."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from temporalio.api.common.v1 import Payload

from api.deps import AdminDep, DatabaseDep, SettingsDep
from api.errors import validation_error
from api.json_body import JsonBodyRoute
from api.openapi import answers_with
from api.rate_limits import limit_principal
from app.audit import CODEC_DECODE, record_audit
from app.codec import EncryptionCodec, PayloadDecryptionError
from app.errors import ErrorCode

router = APIRouter(
    prefix="/codec", tags=["codec"], route_class=JsonBodyRoute, dependencies=[Depends(limit_principal)])

class CodecPayload(BaseModel):
    metadata: dict[str, str] = Field(default_factory=dict, description="metadata values, base64")
    data: str = Field("", description="the payload's bytes, base64")


class CodecPayloads(BaseModel):
    payloads: list[CodecPayload] = Field(default_factory=list)


def _bytes(value: str) -> bytes:
    # Protobuf JSON writes standard base64 and reads the URL-safe alphabet too.
    return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)


def _payloads(body: CodecPayloads) -> list[Payload]:
    try:
        return [
            Payload(metadata={name: _bytes(value) for name, value in item.metadata.items()}, data=_bytes(item.data))
            for item in body.payloads
        ]
    except (binascii.Error, ValueError):
        raise validation_error([{"field": "payloads", "message": "metadata values and data must be base64"}]) from None


def _answer(payloads: list[Payload]) -> CodecPayloads:
    return CodecPayloads(payloads=[
        CodecPayload(metadata={name: base64.b64encode(value).decode() for name, value in payload.metadata.items()},
                     data=base64.b64encode(payload.data).decode())
        for payload in payloads
    ])


def _codec(request: Request) -> EncryptionCodec | None:
    return request.app.state.payload_codec


@router.post("/encode", response_model=CodecPayloads)
async def encode(body: CodecPayloads, request: Request, principal: AdminDep) -> CodecPayloads:
    payloads = _payloads(body)
    codec = _codec(request)
    return _answer(await codec.encode(payloads) if codec else payloads)


@router.post("/decode", response_model=CodecPayloads)
@answers_with(ErrorCode.VALIDATION_ERROR)
async def decode(
    body: CodecPayloads, request: Request, principal: AdminDep, db: DatabaseDep, settings: SettingsDep
) -> CodecPayloads:
    payloads = _payloads(body)
    codec = _codec(request)
    try:
        decoded = await codec.decode(payloads) if codec else payloads
    except PayloadDecryptionError as error:
        raise validation_error([{"field": "payloads", "message": str(error)}]) from None
    # A decode shows job inputs in the clear: who decoded how many payloads, of which namespace, is audited.
    namespace = request.headers.get("X-Namespace") or settings.temporal_namespace
    await db.run(record_audit, principal, CODEC_DECODE, namespace[:200], {"payloads": len(payloads)})
    return _answer(decoded)
