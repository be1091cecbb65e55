"""The README's JavaScript webhook checks, run in node as they are written there, accept what the gateway signs
and refuse what it did not: another secret, a changed body, an old timestamp."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from app.webhooks.payload import compact_json
from app.webhooks.signing import WebhookSigner

README = Path(__file__).resolve().parents[1] / "README.md"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

WHSEC = "whsec_GZP9Qf5HHmz4LLLKEcp6NFhDKQmIM3XdhXpk+vchuKg="
RAW_SECRET = "a raw secret, used as its own UTF-8 bytes"
WEBHOOK_ID = "ba4c8cf3-5359-4963-813c-1a6eb816ce01:webhook:job.succeeded"
# Values whose JSON has more than one spelling: JSON.stringify of the parsed body must give these bytes back.
BODY = compact_json({
    "event": "job.succeeded", "jobId": "ba4c8cf3-5359-4963-813c-1a6eb816ce01", "status": "succeeded",
    "result": {"outputs": [{"filename": "gateway_00002_.png", "size": 441, "animated": False}]}, "error": None,
    "metadata": {"ratio": 1.0, "small": 2.5e-5, "large": 1e21, "note": "naïve 🎨 </script> \"quoted\""},
})

# An item as n8n's Webhook node hands it on ({headers, body}, header names in lower case) runs through the
# Code node's source; the other block is a function of the raw body. Each case prints its outcome.
HARNESS = r"""
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
const realNow = Date.now;
const outcomes = cases.map(({ block, source, secret, headers, body }) => {
  Date.now = realNow;
  try {
    if (block === "n8n code node") {
      const code = source.replace('"whsec_..."', JSON.stringify(secret));
      const item = new Function("require", "$json", code)(require, { headers, body: JSON.parse(body) });
      return { accepted: true, item: item.json };
    }
    const verify = new Function("require", "process", source + "\nreturn verify;")(
      require, { env: { WEBHOOK_SECRET: secret } });
    return { accepted: verify(Buffer.from(body, "utf8"), headers) };
  } catch (error) {
    return { accepted: false, reason: error.message };
  }
});
process.stdout.write(JSON.stringify(outcomes));
"""


def readme_block(name: str) -> str:
    """The ```js block that follows the README's comment naming it."""
    text = README.read_text()
    marker = text.index(f"<!-- tests/test_readme_examples.py: {name} ")
    start = text.index("```js\n", marker) + len("```js\n")
    return text[start:text.index("\n```", start)]


def signed(secret: str, body: str = BODY, at: datetime | None = None) -> dict[str, str]:
    headers = WebhookSigner(secret).headers(WEBHOOK_ID, body, at or datetime.now(timezone.utc))
    return {name.lower(): value for name, value in headers.items()}


def run(cases: list[dict]) -> list[dict]:
    assert NODE is not None
    done = subprocess.run([NODE, "-e", HARNESS], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=30, check=True)
    return json.loads(done.stdout)


def test_the_readme_webhook_checks_accept_the_gateways_signatures_and_refuse_others() -> None:
    tampered = BODY.replace("naïve", "naive")
    ten_minutes_ago = datetime.now(timezone.utc) - timedelta(minutes=10)
    checks = [
        # (block, secret the receiver holds, headers as sent, body as received) → accepted?
        ("n8n code node", WHSEC, signed(WHSEC), BODY, True),
        ("n8n code node", RAW_SECRET, signed(RAW_SECRET), BODY, True),
        ("n8n code node", RAW_SECRET, signed(WHSEC), BODY, False),
        ("n8n code node", WHSEC, signed(WHSEC), tampered, False),
        ("n8n code node", WHSEC, signed(WHSEC, at=ten_minutes_ago), BODY, False),
        ("node verify", WHSEC, signed(WHSEC), BODY, True),
        ("node verify", RAW_SECRET, signed(RAW_SECRET), BODY, True),
        ("node verify", RAW_SECRET, signed(WHSEC), BODY, False),
        ("node verify", WHSEC, signed(WHSEC), tampered, False),
        ("node verify", WHSEC, signed(WHSEC, at=ten_minutes_ago), BODY, False),
    ]
    sources = {name: readme_block(name) for name in ("n8n code node", "node verify")}
    outcomes = run([{"block": block, "source": sources[block], "secret": secret, "headers": headers, "body": body}
                    for block, secret, headers, body, _ in checks])

    assert [outcome["accepted"] for outcome in outcomes] == [accepted for *_, accepted in checks], outcomes
    # What the n8n node hands on is the job, with the id that stays the same on every retry of the event.
    assert outcomes[0]["item"] == {"webhookId": WEBHOOK_ID, **json.loads(BODY)}
    assert "signature does not match" in outcomes[2]["reason"]
    assert "signature does not match" in outcomes[3]["reason"]
    assert "more than 5 minutes off" in outcomes[4]["reason"]
