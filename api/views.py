"""Views over HTTP: define (versioned in the ledger), read as of any tx, rebuild materializations,
changes between two points; and GET /export, a Parquet slice of the ledger as of a tx."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.openapi import ResponseSpec
from litestar.params import QueryParameter
from litestar.response import Stream

from api.errors import bad_request, not_found, problems
from api.query import MAX_ROWS, _plain, result_format, sql_body, table_response
from api.records import instant_param, time_param
from api.services import Services  # Litestar reads handler annotations at runtime
from ledger import views
from ledger.errors import InvalidQuery, InvalidTime, InvalidViewName, UnknownView
from ledger.export import export_zip
from ledger.temporal import DEFAULT_TIMEOUT

log = logging.getLogger("api")
_rebuilds: set[asyncio.Task[Any]] = set()  # strong references while they run


def _describe(services: Services, name: str) -> dict[str, Any]:
    try:
        return views.describe(services.ledger, name)
    except UnknownView as e:
        raise not_found(f"view {name!r}") from e


def _definition_param(definition: str) -> str:
    if definition not in ("as_of", "current"):
        raise bad_request("definition must be 'as_of' or 'current'", field="definition")
    return definition


class ViewController(Controller):
    path = "/views"
    tags = ["views"]

    @get("/")
    async def list_views(self, services: Services) -> dict[str, Any]:
        """Every view defined now, with its materialization status."""
        lg = services.ledger
        defs = await asyncio.to_thread(views.definitions, lg)
        items = [await asyncio.to_thread(views.describe, lg, n) for n in sorted(defs)]
        return {"tx": lg.head.tx, "items": items}

    @put("/{name:str}", response_description="Replaced an existing view's definition", responses={
        201: ResponseSpec(dict[str, Any], generate_examples=False,
                          description="Defined a new view (Location: /views/{name})"),
        **problems(400, 413),
    })
    async def define(self, services: Services, name: str, data: Any = None) -> Response[Any]:
        """Define or replace a view (validated by a dry run): 201 new, 200 replaced."""
        data = sql_body(data, {"sql", "description"})
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise bad_request("'description' must be a string", field="description")
        try:
            _version, created = await asyncio.to_thread(
                views.define_view, services.ledger, name, data["sql"], description,
            )
        except InvalidViewName as e:
            raise bad_request(str(e), field="name", kind="invalid-view-name") from e
        except InvalidQuery as e:
            raise bad_request(str(e), field="sql", kind="invalid-query") from e
        body = await asyncio.to_thread(views.describe, services.ledger, name)
        return Response(body, status_code=201 if created else 200,
                        headers={"Location": f"/views/{name}"} if created else None)

    @get("/{name:str}", responses=problems(400, 404))
    async def show(self, services: Services, name: str) -> dict[str, Any]:
        """The view's definition, its version tx, and its materialization status and progress."""
        return await asyncio.to_thread(_describe, services, name)

    @delete("/{name:str}", status_code=204, responses=problems(400, 404))
    async def drop(self, services: Services, name: str) -> None:
        """Drop the view (its past definitions stay in the ledger and still answer as-of reads)."""
        try:
            await asyncio.to_thread(views.drop_view, services.ledger, name)
        except UnknownView as e:
            raise not_found(f"view {name!r}") from e

    @get("/{name:str}/rows", responses=problems(400, 404, 406))
    async def rows(
        self, request: Request[Any, Any, Any], services: Services, name: str, as_of: str | None = None,
        valid_at: str | None = None, definition: str = "as_of", limit: int = 10_000,
    ) -> Response[Any]:
        """The view's rows as of a tx or instant (formats by Accept, as for /query)."""
        fmt = result_format(request)
        if not 1 <= limit <= MAX_ROWS:
            raise bad_request(f"limit must be an integer between 1 and {MAX_ROWS}", field="limit")
        at = time_param(as_of, "as_of", head=services.ledger.head.tx)
        try:
            table = await asyncio.to_thread(
                views.rows, services.ledger, name, as_of=at,
                valid_at=instant_param(valid_at, "valid_at"), definition=_definition_param(definition),
                limit=limit,
            )
        except UnknownView as e:
            raise not_found(f"view {name!r}" + (f" as of {as_of}" if as_of else "")) from e
        return table_response(table, fmt)

    @post("/{name:str}/rebuild", status_code=202, responses=problems(400, 404))
    async def rebuild(self, services: Services, name: str) -> Response[Any]:
        """Rebuild the materialization from the full log in the background; poll GET /views/{name}."""
        lg = services.ledger
        try:
            started = await asyncio.to_thread(views.start_rebuild, lg, name)
        except UnknownView as e:
            raise not_found(f"view {name!r}") from e
        if started:
            task = asyncio.create_task(asyncio.to_thread(_rebuild, lg, name), name=f"rebuild-{name}")
            _rebuilds.add(task)
            task.add_done_callback(_rebuilds.discard)
        body = await asyncio.to_thread(_describe, services, name)
        return Response(body, status_code=202, headers={"Location": f"/views/{name}"})

    @get("/{name:str}/changes", responses=problems(400, 404))
    async def changes(
        self, services: Services, name: str, since: Annotated[str, QueryParameter(name="from")],
        until: Annotated[str | None, QueryParameter(name="to")] = None, definition: str = "as_of",
    ) -> dict[str, Any]:
        """Rows added and removed between `from` and `to` (tx numbers or instants; `to` defaults to
        the latest tx, and may not be before `from`). At a point before the view was defined (or
        after it was dropped) the view reads as empty; a name that is a view at neither point, nor
        now, is 404."""
        lg = services.ledger
        start = time_param(since, "from", head=lg.head.tx)
        if start is None:
            raise bad_request("'from' is required (a tx number or an instant)", field="from")
        end = time_param(until, "to", head=lg.head.tx)
        try:
            added, removed = await asyncio.to_thread(
                views.changes, lg, name, since=start, until=end, definition=_definition_param(definition),
            )
        except UnknownView as e:
            raise not_found(f"view {name!r}") from e
        except InvalidQuery as e:  # the view's columns changed between the two points
            raise bad_request(str(e), field="definition", kind="invalid-query") from e
        except InvalidTime as e:  # the only one left once both points parsed: `from` after `to`
            raise bad_request(f"'from' ({since}) is after 'to' ({until})", field="from",
                              kind="invalid-time") from e
        from_tx = lg.as_of(start).basis_tx
        to_tx = lg.head.tx if end is None else lg.as_of(end).basis_tx
        return {
            "view": name, "from_tx": from_tx, "to_tx": to_tx,
            "columns": added.column_names,
            "added": [_plain(r) for r in added.to_pylist()],
            "removed": [_plain(r) for r in removed.to_pylist()],
        }


def _rebuild(lg: Any, name: str) -> None:
    try:
        views.rebuild(lg, name, claimed=True)
    except Exception:  # the status file says "failed" with the reason
        log.exception("rebuild of view %s failed", name)


@get("/export", tags=["export"], responses=problems(400))
async def export(services: Services, as_of: str | None = None, tables: str | None = None) -> Stream:
    """A zip of Parquet files (one per relation or view) and manifest.json (tables, row counts,
    and the ledger digest at that tx), readable by plain DuckDB after unzip. Each table's query
    runs under the query time limit; the zip is spooled to a temporary file, not held in memory."""
    wanted = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
    at = time_param(as_of, "as_of", head=services.ledger.head.tx)
    spool = tempfile.TemporaryFile()
    try:
        manifest = await asyncio.to_thread(
            export_zip, services.ledger, spool, as_of=at, tables=wanted,
            timeout=DEFAULT_TIMEOUT,
        )
        size = spool.seek(0, os.SEEK_END)
        spool.seek(0)
    except UnknownView as e:
        spool.close()
        raise bad_request(str(e), field="tables") from e
    except BaseException:
        spool.close()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        with spool:
            while chunk := await asyncio.to_thread(spool.read, 1 << 20):
                yield chunk

    return Stream(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="ledger-tx{manifest["as_of_tx"]}.zip"',
        "Content-Length": str(size),
    })
