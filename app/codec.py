"""Encryption of every Temporal payload the gateway writes (ENCRYPTION_KEYS): a payload codec doing AES-GCM.

Each payload is serialised whole (metadata and data) and sealed with the first key; the key's id goes in the
new payload's metadata, so that every key listed can still open what it sealed (rotation: put the new key
first, keep the old ones until no history needs them). A payload without the encrypted encoding passes through
unchanged: histories written before encryption was turned on still decode and replay.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCRYPTED_ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
_NONCE_BYTES = 12
_KEY_BYTES = (16, 24, 32)


class PayloadDecryptionError(ValueError):
    """An encrypted payload that the configured keys cannot open."""


@dataclass(frozen=True)
class EncryptionKey:
    id: str
    key: bytes

    def __repr__(self) -> str:  # the key material never reaches a log line or a traceback
        return f"EncryptionKey(id={self.id!r})"


def parse_encryption_keys(value: str) -> list[EncryptionKey]:
    """`id:base64key,...` → keys, the encrypting one first. Errors name the entry by position and id only,
    never by its key material."""
    keys: list[EncryptionKey] = []
    for position, entry in enumerate((item.strip() for item in value.split(",")), start=1):
        if not entry:
            continue
        key_id, separator, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not separator or not key_id or not encoded.strip():
            raise ValueError(f"entry {position} is not id:base64key")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {key_id!r} is not valid base64") from None
        if len(key) not in _KEY_BYTES:
            raise ValueError(f"key {key_id!r} is {len(key)} bytes; AES-GCM takes 16, 24 or 32")
        if any(known.id == key_id for known in keys):
            raise ValueError(f"key id {key_id!r} is listed twice")
        keys.append(EncryptionKey(key_id, key))
    if not keys:
        raise ValueError("lists no key")
    return keys


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Sequence[EncryptionKey]) -> None:
        if not keys:
            raise ValueError("an encryption codec needs at least one key")
        self._encrypting = keys[0].id
        self._ciphers = {key.id: AESGCM(key.key) for key in keys}

    @property
    def encrypting_key_id(self) -> str:
        return self._encrypting

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(_NONCE_BYTES)  # random per payload: a nonce reused under one key breaks AES-GCM
        key_id = self._encrypting.encode()
        sealed = self._ciphers[self._encrypting].encrypt(nonce, payload.SerializeToString(), key_id)
        return Payload(metadata={"encoding": ENCRYPTED_ENCODING, KEY_ID_METADATA: key_id}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCRYPTED_ENCODING:
            return payload  # written before encryption was turned on
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {key_id!r}, which ENCRYPTION_KEYS does not list "
                f"(it lists {', '.join(sorted(self._ciphers))})"
            )
        nonce, sealed = payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, key_id.encode())
        except InvalidTag:
            raise PayloadDecryptionError(
                f"payload under key id {key_id!r} does not open with that key (altered, or a different key "
                "under the same id)"
            ) from None
        return Payload.FromString(plain)
