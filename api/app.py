"""The Litestar application: controllers, problem+json errors, OpenAPI at /schema."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from litestar import Litestar, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import QueryParameter
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)

from api.commands import CommandController
from api.errors import bad_request, from_http_exception, from_ledger_error, not_utf8, problem
from api.events import EventController
from api.query import ENTITIES, QueryController
from api.schemas import SchemaController
from api.services import Services, Settings, lifespan
from api.updates import sse_updates, ws_updates
from api.views import ViewController, export
from ledger.errors import LedgerError

if TYPE_CHECKING:
    from litestar import Request
    from litestar.types import Receive, Scope, Send

log = logging.getLogger("api")


@get("/health", tags=["health"])
async def health() -> dict[str, Any]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@get("/ready", tags=["health"], responses={
    503: ResponseSpec(dict[str, Any], generate_examples=False, description="Not ready: `checks` says why"),
})
async def ready(services: Services) -> Response[dict[str, Any]]:
    """Readiness: the ledger is open, the consumer has partitions, the broker is reachable."""
    body = await services.ready()
    return Response(body, status_code=200 if body["ready"] else 503)


def _ledger_error(request: Request[Any, Any, Any], exc: LedgerError) -> Response[Any]:
    return from_ledger_error(exc).to_response(request)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    converted = exc if isinstance(exc, ProblemDetailsException) else from_http_exception(
        exc, max_body_bytes=request.app.state["services"].settings.max_body_bytes)
    return converted.to_response(request)


def _too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    """Decoding a body (or a value in it) that nests deeper than Python's recursion limit."""
    return bad_request("the body nests too deeply to decode", field="body",
                       kind="malformed-json").to_response(request)


def _not_utf8(request: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[Any]:
    """Litestar decoding a JSON body (POST /commands reads its own)."""
    return not_utf8(exc).to_response(request)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "Internal server error", f"{type(exc).__name__}: the error was logged",
                   kind="internal").to_response(request)


_NOT_QUERY = frozenset({"services", "request", "scope", "data", "socket"})  # injected, not sent
_query_names: dict[int, tuple[frozenset[str], frozenset[str]]] = {}  # by id(route handler)


async def _known_query(request: Request[Any, Any, Any]) -> None:
    """Refuse a query parameter the endpoint does not take, and a single-valued one given twice:
    both were ignored silently (/events?kind=command listed events; found by audit)."""
    path = request.url.path
    if not request.query_params or path == "/schema" or path.startswith("/schema/"):  # (OpenAPI's)
        return
    handler = request.route_handler
    if (known := _query_names.get(id(handler))) is None:
        taken: set[str] = set()
        repeatable: set[str] = set()
        for name, field in handler.parsed_fn_signature.parameters.items():
            alias = field.kwarg_definition
            key = getattr(alias, "query", None) or (alias.name if isinstance(alias, QueryParameter) else None)
            taken.add(key or name)
            if field.is_non_string_sequence:
                repeatable.add(key or name)
        known = _query_names[id(handler)] = frozenset(taken - _NOT_QUERY), frozenset(repeatable)
    names, lists = known
    for key in request.query_params:
        if key not in names or key in request.path_params:
            takes = sorted(names - set(request.path_params))
            raise bad_request(f"unknown query parameter {key!r}; {request.url.path} takes "
                              + (", ".join(takes) if takes else "none"), field=key)
        if key not in lists and len(request.query_params.getall(key)) > 1:
            raise bad_request(f"query parameter {key!r} is given more than once", field=key)


class _App(Litestar):
    """Routes /entities/... on the path as the client sent it, still percent-encoded, so that an
    entity id holding `/` (sent as `%2F`) stays one path segment; the handlers decode it
    (api.query.decode_entity_id). The server has already decoded `path`; `raw_path` is what was sent."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == ScopeType.HTTP and scope["path"].startswith(ENTITIES):
            raw = scope.get("raw_path")  # (bytes beyond ASCII, which a client should have escaped, too)
            if raw is None or not raw.startswith(ENTITIES.encode()):
                scope["path"] = quote(scope["path"], safe="/")
            else:
                scope["path"] = quote(raw, safe="/%")
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings()
    services = Services(settings)
    return _App(
        route_handlers=[
            CommandController, EventController, QueryController, SchemaController,
            sse_updates, ws_updates, health, ready, ViewController, export,
        ],
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        state=State({"services": services}),
        lifespan=[lifespan],
        plugins=[ProblemDetailsPlugin(ProblemDetailsConfig())],  # Litestar's own errors: _http_error
        exception_handlers={
            LedgerError: _ledger_error, HTTPException: _http_error, RecursionError: _too_deep,
            UnicodeDecodeError: _not_utf8, Exception: _unexpected,
        },
        before_request=_known_query,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Commander Ledger", version="0.1.0", path="/schema",
                                     use_handler_docstrings=True),
    )
