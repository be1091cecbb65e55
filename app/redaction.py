"""PRIVACY_MODE redaction: a job's free-text inputs kept out of what the gateway writes about the job (its row's
error, its event log, its webhooks, its failure) even when ComfyUI quotes them back in an error.

A job's free texts are the string values of its inputs (prompts, negative prompts, file names, image URLs;
numbers and booleans stay) and, for a raw `workflowJson`, every string its nodes receive as an input value
(links and class types are not values). They are found in any text the gateway writes as written, JSON-escaped
or repr-escaped, and so is a run of at least `_PREFIX_CHARS` characters that begins one of them (ComfyUI and the
gateway shorten long quotes). Strings shorter than `_MIN_CHARS` are not looked for: they would shred ordinary
words and say little.

Pure functions: the workflow calls them (deterministic), and so do the activities that pass ComfyUI's words on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

REDACTED = "[redacted]"
_MIN_CHARS = 3
_PREFIX_CHARS = 16


def free_texts(inputs: dict[str, Any], workflow_json: dict[str, Any] | None = None) -> list[str]:
    texts = list(_strings(inputs))
    for node in (workflow_json or {}).values():
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            texts += [value for value in node["inputs"].values() if isinstance(value, str)]
    return sorted(set(texts))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


class Redactor:
    """Replaces a job's free texts with "[redacted]"; with no texts (privacy off) it changes nothing."""

    def __init__(self, texts: Iterable[str]) -> None:
        forms = set()
        for text in texts:
            if len(text) >= _MIN_CHARS:
                forms |= {text, json.dumps(text)[1:-1], repr(text)[1:-1]}
        self._forms = sorted(forms, key=len, reverse=True)  # the longest first: a text inside another goes with it

    def __bool__(self) -> bool:
        return bool(self._forms)

    def text(self, text: str) -> str:
        # What is redacted already stays as it is: a text found inside "[redacted]" must not split it, so a
        # message redacted twice (the job's error, then its log event) reads as once.
        for form in self._forms:
            text = REDACTED.join(_without(piece, form) for piece in text.split(REDACTED))
        return text

    def value(self, value: Any) -> Any:
        """Every string inside a JSON-like value, keys included."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(key)): self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value


def _without(text: str, form: str) -> str:
    """`text` with each occurrence of `form`, or of a run of its first `_PREFIX_CHARS`+ characters, redacted."""
    head = form[:_PREFIX_CHARS]
    pieces, start = [], 0
    while (found := text.find(head, start)) != -1:
        end = found + len(head)
        while end - found < len(form) and end < len(text) and text[end] == form[end - found]:
            end += 1
        pieces += [text[start:found], REDACTED]
        start = end
    return "".join(pieces) + text[start:] if pieces else text
