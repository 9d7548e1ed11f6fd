"""Domain errors to RFC 9457 problem+json: one shape for every error the API returns."""

from __future__ import annotations

import re
from typing import Any, TypedDict

from litestar.exceptions import ClientException, HTTPException
from litestar.openapi import ResponseSpec
from litestar.plugins.problem_details import ProblemDetailsException

from ledger.errors import (
    InvalidQuery,
    InvalidRecord,
    InvalidTime,
    LedgerError,
    LedgerLocked,
    ReadOnly,
)
from ledger.records import json_type as json_type  # (re-exported: the API's messages use it too)

PROBLEM_BASE = "https://commander-ledger.dev/problems/"


# Optional members go in a total=False base: NotRequired[...] is not seen in a postponed annotation.
class _ProblemInput(TypedDict, total=False):
    field: str  # the input at fault: a parameter, a body member, or "body"
    errors: list[dict[str, Any]]  # every violation (a JSON pointer or key, and a message)


class Problem(_ProblemInput):
    """RFC 9457 problem details (application/problem+json): the body of every error."""

    type: str
    title: str
    status: int
    detail: str


_MEANINGS = {
    400: "Bad input: `field` names it, `errors` lists every violation",
    404: "No such resource",
    406: "The Accept header takes none of the formats offered",
    413: "Too large: the body (`field` body), or a command as a Kafka message (`field` data)",
    422: "The command's data breaks its action's JSON Schema: `errors` has each violation's JSON pointer",
    503: "Kafka or the ledger is unavailable; nothing was written: retry after `Retry-After` seconds",
}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI for the errors a handler answers, each as problem+json (in place of Litestar's own
    error shape, which this API never sends)."""
    return {s: ResponseSpec(Problem, description=_MEANINGS[s], media_type="application/problem+json",
                            generate_examples=False) for s in statuses}


def problem(
    status: int, title: str, detail: str, *, kind: str, headers: dict[str, str] | None = None,
    **extra: Any,
) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=status, title=title, detail=detail, type_=PROBLEM_BASE + kind,
        headers=headers, extra=extra or None,
    )


def bad_request(
    detail: str, *, field: str | None = None, kind: str = "bad-request"
) -> ProblemDetailsException:
    if field:
        return problem(400, "Bad request", detail, kind=kind, field=field)
    return problem(400, "Bad request", detail, kind=kind)


def not_utf8(exc: UnicodeDecodeError) -> ProblemDetailsException:
    """A JSON body holding bytes that are not UTF-8."""
    return bad_request(f"body is not valid JSON: it is not UTF-8 ({exc.reason}: byte "
                       f"0x{exc.object[exc.start]:02x})", field="body", kind="malformed-json")


def not_found(what: str) -> ProblemDetailsException:
    return problem(404, "Not found", f"{what} does not exist", kind="not-found")


def unavailable(detail: str, retry_after: int = 1) -> ProblemDetailsException:
    return problem(503, "Service unavailable", detail, kind="unavailable",
                   headers={"Retry-After": str(retry_after)})


def from_ledger_error(exc: LedgerError) -> ProblemDetailsException:
    """Map each domain error to a status; the detail is the error's own message."""
    if isinstance(exc, InvalidRecord):
        return bad_request(str(exc), field=exc.field, kind="invalid-record")
    if isinstance(exc, InvalidQuery):
        return bad_request(str(exc), kind="invalid-query")
    if isinstance(exc, InvalidTime):
        return bad_request(str(exc), kind="invalid-time")
    if isinstance(exc, (LedgerLocked, ReadOnly)):
        return unavailable(str(exc), retry_after=5)
    return problem(500, "Ledger error", str(exc), kind="ledger-error")


def from_http_exception(exc: HTTPException, *, max_body_bytes: int | None = None) -> ProblemDetailsException:
    """Litestar's own errors (validation, undecodable bodies, size, routing) in the same shape as
    ours: the field at fault as `field`, every violation under `errors`."""
    kind = {400: "bad-request", 404: "not-found", 405: "method-not-allowed",
            413: "body-too-large", 503: "unavailable"}.get(exc.status_code, "http-error")
    detail, extra = exc.detail, {}
    violations = exc.extra if isinstance(exc.extra, list) else []
    if violations and all(isinstance(v, dict) for v in violations):
        # A body parameter is named `data` in the handler; the client sent it as the body.
        keys = ["body" if v.get("key") == "data" and str(v.get("source")) == "body" else v.get("key")
                for v in violations]
        detail = "; ".join(f"{k}: {v.get('message')}" if k else str(v.get("message"))
                           for k, v in zip(keys, violations, strict=True))
        extra = {"errors": violations, **({"field": keys[0]} if keys[0] else {})}
    elif isinstance(exc.extra, dict):
        extra = exc.extra
    elif exc.status_code == 400 and type(exc) is ClientException:  # the body did not decode
        detail, extra = f"body is not valid JSON: {exc.detail}", {"field": "body"}
        if exc.detail == "Input data was truncated":  # msgspec says so of a lone high surrogate too
            detail = ("body is not valid JSON: it ends before the JSON value does, or a \\ud800-\\udbff "
                      "escape is not followed by its low surrogate")
        kind = "malformed-json"
    elif m := _MISSING.match(str(detail)):
        extra = {"field": m[1]}
    elif exc.status_code == 413:
        extra = {"field": "body"}
        if max_body_bytes is not None:
            detail = f"request body is larger than the {max_body_bytes:,}-byte limit"
    return ProblemDetailsException(
        status_code=exc.status_code, title=_TITLES.get(exc.status_code, "Error"), detail=detail,
        type_=PROBLEM_BASE + kind, headers=exc.headers, extra=extra or None,
    )


_MISSING = re.compile(r"Missing required \w+ parameter '([^']+)'")

_TITLES = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 406: "Not acceptable",
           413: "Body too large",
           500: "Internal server error", 503: "Service unavailable"}
