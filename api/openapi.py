"""The OpenAPI document as the API really answers.

FastAPI documents a `422 HTTPValidationError` for every route with a parameter, which this API never sends:
its errors are `{"error": {"code", "message", "details"}}` (api.errors) with the status of the error table
(app.errors). So the document is rewritten once, when first asked for: the 422s go, and each operation lists
the error codes it can answer with, grouped by their status. A route's codes are those marked on it and on
its dependencies (`answers_with`), VALIDATION_ERROR for a route whose query or body can be invalid,
REQUEST_TOO_LARGE for one with a body, and INTERNAL_ERROR, which any route answers for a fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.errors import ERROR_CLASSES, ErrorCode, http_status

F = TypeVar("F", bound=Callable[..., Any])

_CODES_ATTRIBUTE = "__answers_with__"
# The codes whose `details.fields` lists every offending field of the request.
_FIELD_CODES = {ErrorCode.VALIDATION_ERROR, ErrorCode.REQUEST_TOO_LARGE}
_SCHEMAS = "#/components/schemas/"

_ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "FieldError": {
        "title": "FieldError",
        "type": "object",
        "required": ["field", "message"],
        "properties": {
            "field": {"type": "string", "description": "the field's path in the request, e.g. `inputs.width`; "
                                                       "`body` for the body as a whole"},
            "message": {"type": "string"},
        },
    },
    "ErrorDetails": {
        "title": "ErrorDetails",
        "type": "object",
        "description": "what the error is about, e.g. the `jobId` or `workflowId` it names",
        "additionalProperties": True,
    },
    "FieldErrorDetails": {
        "title": "FieldErrorDetails",
        "type": "object",
        "description": "every offending field of the request",
        "required": ["fields"],
        "properties": {"fields": {"type": "array", "minItems": 1, "items": {"$ref": _SCHEMAS + "FieldError"}}},
        "additionalProperties": True,
    },
}


def answers_with(*codes: ErrorCode) -> Callable[[F], F]:
    """Marks a route, or a dependency of routes, with the error codes it can answer with, for the document."""

    def mark(function: F) -> F:
        setattr(function, _CODES_ATTRIBUTE, codes)
        return function

    return mark


def _route_error_codes(route: APIRoute) -> set[ErrorCode]:
    codes = {ErrorCode.INTERNAL_ERROR}
    pending: list[Dependant] = [route.dependant]
    while pending:
        dependant = pending.pop()
        codes.update(getattr(dependant.call, _CODES_ATTRIBUTE, ()))
        if dependant.query_params or dependant.body_params:
            codes.add(ErrorCode.VALIDATION_ERROR)
        if dependant.body_params:
            codes.add(ErrorCode.REQUEST_TOO_LARGE)
        pending.extend(dependant.dependencies)
    return codes


def _error_body_schema(codes: list[ErrorCode]) -> dict[str, Any]:
    details = "FieldErrorDetails" if set(codes) <= _FIELD_CODES else "ErrorDetails"
    return {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": [code.value for code in codes]},
                "message": {"type": "string"},
                "details": {"$ref": _SCHEMAS + details},
            },
        }},
    }


def _error_response(codes: list[ErrorCode]) -> dict[str, Any]:
    return {
        "description": "\n".join(f"- `{code.value}`: {ERROR_CLASSES[code].meaning}" for code in codes),
        "content": {"application/json": {"schema": _error_body_schema(codes)}},
    }


def _request_codes_table() -> str:
    rows = ["| code | HTTP | meaning |", "|---|---|---|"]
    rows += [f"| `{code.value}` | {error.http_status} | {error.meaning} |"
             for code, error in ERROR_CLASSES.items() if "request" in error.seen_in]
    return "\n".join(rows)


def describe_errors(document: dict[str, Any], routes: Iterable[APIRoute]) -> None:
    """Rewrites a FastAPI document in place: each operation's real error answers instead of the 422."""
    for route in routes:
        by_status: dict[int, list[ErrorCode]] = {}
        for code in sorted(_route_error_codes(route), key=list(ErrorCode).index):
            by_status.setdefault(http_status(code), []).append(code)
        for method in route.methods:
            operation = document["paths"][route.path_format][method.lower()]
            responses = operation["responses"]
            responses.pop("422", None)
            for status, codes in by_status.items():
                if str(status) in responses:
                    raise ValueError(f"{method} {route.path_format} documents {status} as an answer and an error")
                responses[str(status)] = _error_response(codes)
            operation["responses"] = dict(sorted(responses.items()))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_ERROR_SCHEMAS)
    document["info"]["description"] += (
        "\n\n## Errors\n\nEvery error is `{\"error\": {\"code\", \"message\", \"details\"}}` with a stable `code`; "
        "validation errors list every offending field in `details.fields: [{field, message}]`. Each operation "
        "lists the codes it answers with. Any path answers `NOT_FOUND` when it names no route, and "
        "`METHOD_NOT_ALLOWED` for a method its route does not take.\n\n" + _request_codes_table()
    )


def install_openapi(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """`app.openapi()` (and `/openapi.json`) answers with the document as the API really answers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            describe_errors(generate(), [route for router in routers for route in router.routes
                                         if isinstance(route, APIRoute) and route.include_in_schema])
        return app.openapi_schema  # type: ignore[return-value]  # generate() stored it

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to change the document
