"""Domain errors to RFC 9457 problem+json: one shape for every error the API returns."""

from __future__ import annotations

from typing import Any

from litestar.exceptions import ClientException, HTTPException
from litestar.plugins.problem_details import ProblemDetailsException

from ledger.errors import (
    InvalidQuery,
    InvalidRecord,
    InvalidTime,
    LedgerError,
    LedgerLocked,
    ReadOnly,
)

PROBLEM_BASE = "https://commander-ledger.dev/problems/"


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
        kind = "malformed-json"
    elif exc.status_code == 413 and max_body_bytes is not None:
        detail = f"request body is larger than the {max_body_bytes:,}-byte limit"
    return ProblemDetailsException(
        status_code=exc.status_code, title=_TITLES.get(exc.status_code, "Error"), detail=detail,
        type_=PROBLEM_BASE + kind, headers=exc.headers, extra=extra or None,
    )


_TITLES = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 406: "Not acceptable",
           413: "Body too large",
           500: "Internal server error", 503: "Service unavailable"}
