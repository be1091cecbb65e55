"""Signing a webhook's exact bytes twice, with one key:

- `X-Signature: sha256=<hex HMAC-SHA256(key, body)>`, what most existing receivers check;
- Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256(key,
  "<id>.<timestamp>.<body>")>`), made by the `standardwebhooks` package.

The key is WEBHOOK_SECRET as Standard Webhooks defines it: `whsec_<base64>` is the base64-decoded bytes; any
other string is its own UTF-8 bytes (the raw key). X-Signature uses the same key bytes, so a receiver holding a
raw secret checks both with the string itself. The secret and the signatures are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import datetime

from standardwebhooks.webhooks import Webhook

_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    if secret.startswith(_PREFIX):
        try:
            return base64.b64decode(secret.removeprefix(_PREFIX), validate=True)
        except binascii.Error:
            raise ValueError("WEBHOOK_SECRET starts with whsec_ but the rest is not base64") from None
    return secret.encode()


class WebhookSigner:
    def __init__(self, secret: str) -> None:
        key = signing_key(secret)
        if not key:
            raise ValueError("WEBHOOK_SECRET is empty")
        self._key = key
        self._standard = Webhook(key)  # bytes: used as they are, not base64-decoded again

    def __repr__(self) -> str:
        return "WebhookSigner(<secret>)"

    def headers(self, webhook_id: str, body: str, at: datetime) -> dict[str, str]:
        """The signature headers of one attempt: the timestamp is the attempt's (receivers refuse old ones),
        the id and the body are the event's."""
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        return {
            "X-Signature": f"sha256={digest}",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._standard.sign(webhook_id, at, body),
        }
