"""Temporal reads over HTTP: entities, their history, transactions, and read-only SQL."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from litestar import Controller, Request, Response, get, post

from api.errors import bad_request, json_type, not_found, problem, problems
from api.records import instant_param, record_json, time_param
from api.services import Services  # Litestar reads handler annotations at runtime
from ledger.errors import InvalidQuery, InvalidTime
from ledger.storage.parquet_types import infinite_column

MAX_ROWS = 100_000
MAX_RESULT_BYTES = 256 << 20  # a result's size in Arrow, about its size in any format
TRUNCATED = "Ledger-Result-Truncated"  # header: "true" when the row limit cut the result
AS_OF_TX = "Ledger-As-Of-Tx"  # header: the tx a query was read as of
MAX_TX = 2**63 - 1


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


FORMATS = ("application/json", "text/csv", "application/vnd.apache.arrow.stream",
           "application/vnd.apache.parquet")


def result_format(request: Request[Any, Any, Any]) -> str:
    """The format a result goes out in, by the request's Accept (JSON when it names none); 406
    when it accepts none of them."""
    header = request.headers.get("accept")
    if not header or header in ("*/*", FORMATS[0]):  # most clients: no negotiation (~0.1 ms)
        return FORMATS[0]
    best = negotiate(header, FORMATS)
    if best is None:
        raise problem(406, "Not acceptable", f"Accept {header!r} takes none of: {', '.join(FORMATS)}",
                      kind="not-acceptable")
    return best


def negotiate(header: str, offered: tuple[str, ...]) -> str | None:
    """The offered media type an Accept header prefers (RFC 9110 12.5.1): each type's weight is
    the q of the most specific range that matches it (type/subtype, then type/*, then */*); q=0
    means "not this one". Highest weight wins, ties go to the earlier offered type."""
    ranges: dict[str, float] = {}
    for item in header.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0  # an unreadable weight: not a preference to act on
        if media:
            ranges.setdefault(media.lower(), q)

    def weight(media: str) -> float:
        kind = media.split("/")[0]
        for pattern in (media, f"{kind}/*", "*/*"):
            if pattern in ranges:
                return ranges[pattern]
        return 0.0

    weights = [weight(m) for m in offered]
    best = max(weights)
    return offered[weights.index(best)] if best > 0 else None


def table_response(table: pa.Table, accept: str) -> Response[Any]:
    """A result in one of FORMATS (see result_format); 400 naming the format when a column's type
    has no form in it (a list in CSV, an INTERVAL in Parquet, an infinite timestamp in JSON), and
    when it is larger than MAX_RESULT_BYTES. A result cut at its row limit says so in a header."""
    if table.nbytes > MAX_RESULT_BYTES:
        raise bad_request(f"the result is {table.nbytes:,} bytes, over the {MAX_RESULT_BYTES:,}-byte "
                          "limit: select fewer rows (limit) or smaller columns")
    try:
        response = _encoded(table, accept)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, OverflowError, ValueError) as e:
        raise bad_request(
            f"the result cannot be written as {accept}: {str(e).strip().splitlines()[0]}; cast the "
            "column (to VARCHAR, for one) or ask for another format", field="accept",
        ) from e
    if (table.schema.metadata or {}).get(b"truncated") == b"true":
        response.headers[TRUNCATED] = "true"  # (CSV has no other place to say so)
    return response


def _encoded(table: pa.Table, accept: str) -> Response[Any]:
    if accept == "text/csv":
        if (name := infinite_column(table)) is not None:
            raise ValueError(f"column {name!r} holds infinity, which has no form in CSV")
        buf = io.BytesIO()
        pa_csv.write_csv(table, buf)
        return Response(buf.getvalue(), media_type="text/csv")
    if accept == "application/vnd.apache.arrow.stream":
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return Response(sink.getvalue().to_pybytes(), media_type="application/vnd.apache.arrow.stream")
    if accept == "application/vnd.apache.parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return Response(buf.getvalue(), media_type="application/vnd.apache.parquet")
    for name, col in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_floating(col.type) and pc.any(pc.invert(pc.is_finite(col))).as_py():
            raise ValueError(f"column {name!r} holds NaN or infinity, which JSON cannot hold")
    # JSON columns (data, state, ...) go out as JSON values, not as text holding JSON.
    is_json = [(f.metadata or {}).get(b"duckdb_type") == b"JSON" for f in table.schema]
    columns = [{"name": f.name, "type": "json" if j else str(f.type)}
               for f, j in zip(table.schema, is_json, strict=True)]
    rows = [[json.loads(v) if j and v is not None else _plain(v)
             for v, j in zip(row.values(), is_json, strict=True)] for row in table.to_pylist()]
    truncated = (table.schema.metadata or {}).get(b"truncated") == b"true"
    return Response({"columns": columns, "rows": rows, "row_count": len(rows), "truncated": truncated})


ENTITIES = "/entities/"


def decode_entity_id(segment: str) -> str:
    """An entity id from its path segment, which reaches the handlers still percent-encoded (see
    api.app._App): `/` in an id is sent as `%2F`."""
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise bad_request("the entity id is not percent-encoded UTF-8", field="entity_id") from None


class QueryController(Controller):
    tags = ["query"]

    @get("/entities/{entity_id:str}", responses=problems(400, 404))
    async def entity(
        self, services: Services, entity_id: str, as_of: str | None = None, valid_at: str | None = None,
    ) -> dict[str, Any]:
        """An entity's attributes as of a tx or instant (and valid at an instant). An id holding `/`
        is sent percent-encoded (`%2F`)."""
        entity_id = decode_entity_id(entity_id)
        lg = services.ledger
        at = time_param(as_of, "as_of", head=lg.head.tx)  # (empty: the latest, as everywhere; was tx 0)
        db = lg.db() if at is None else lg.as_of(at)
        valid = instant_param(valid_at, "valid_at")
        found = await asyncio.to_thread(db.entity_with_tx, entity_id, valid_at=valid)
        if found is None:
            raise not_found(f"entity {entity_id!r} (as of tx {db.basis_tx})")
        state, attribute_tx = found
        return {"id": entity_id, "as_of_tx": db.basis_tx, "state": state, "attribute_tx": attribute_tx}

    @get("/entities/{entity_id:str}/history", responses=problems(400))
    async def history(
        self, services: Services, entity_id: str, since: str | None = None, until: str | None = None,
    ) -> dict[str, Any]:
        """Every assertion and retraction of the entity, with tx, tx_time, valid time and record."""
        entity_id = decode_entity_id(entity_id)
        datoms = await asyncio.to_thread(
            services.ledger.history, entity_id, since=time_param(since, "since"),
            until=time_param(until, "until"),
        )
        return {"id": entity_id, "datoms": [
            {"a": d.a, "v": d.v, "op": d.op, "tx": d.tx, "tx_time": d.tx_time.isoformat(),
             "valid_time": d.valid_time.isoformat(), "record_id": d.record_id} for d in datoms
        ]}

    @get("/tx/{t:str}", responses=problems(400, 404))
    async def transaction(self, services: Services, t: str) -> dict[str, Any]:
        """One transaction (a tx number): metadata, hash and records."""
        if not (t.isascii() and t.isdigit()):
            raise bad_request(f"t must be a tx number (a positive integer), got {t!r}", field="t")
        if len(t) > 18:  # beyond any tx a ledger can hold
            raise not_found(f"tx {t}")
        txs = await asyncio.to_thread(services.ledger.tx_range, int(t), int(t) + 1)
        if not txs:
            raise not_found(f"tx {t}")
        return _tx_json(txs[0])

    @get("/tx", responses=problems(400))
    async def tx_range(
        self, services: Services, since: str | None = None, until: str | None = None, limit: int = 100,
        cursor: int | None = None,
    ) -> dict[str, Any]:
        """Transactions with since < tx <= until (Datomic's tx-range), oldest first, paged. Each bound
        is a tx or an instant (an instant stands for the last tx committed at or before it)."""
        if not 1 <= limit <= 1000:
            raise bad_request("limit must be between 1 and 1000", field="limit")
        if cursor is not None and not 1 <= cursor <= MAX_TX:  # next_cursor is the last tx of a page
            raise bad_request(f"cursor {cursor} is not one this API returned", field="cursor")
        lg = services.ledger
        low, high = [None if t is None else await asyncio.to_thread(lg.resolve, t)
                     for t in (time_param(since, "since"), time_param(until, "until"))]
        start = max(low or 0, cursor or 0) + 1
        end = start + limit if high is None else min(high + 1, start + limit)
        txs = await asyncio.to_thread(lg.tx_range, start, end)
        more = bool(txs) and txs[-1].tx < (lg.head.tx if high is None else high)
        return {"items": [_tx_json(t) for t in txs], "next_cursor": txs[-1].tx if more else None}

    @post("/query", status_code=200, responses=problems(400, 406, 413))
    async def query(
        self, request: Request[Any, Any, Any], services: Services, data: Any = None,
    ) -> Response[Any]:
        """Run one read-only SELECT over the ledger's relations, as of a tx or instant."""
        fmt = result_format(request)
        data = sql_body(data, {"sql", "params", "as_of", "valid_at", "limit"})
        limit = data.get("limit", 10_000)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_ROWS:
            raise bad_request(f"limit must be an integer between 1 and {MAX_ROWS}", field="limit")
        as_of, valid_at, params = data.get("as_of"), data.get("valid_at"), data.get("params")
        if as_of is not None and (isinstance(as_of, bool) or not isinstance(as_of, (int, str))):
            raise bad_request("as_of must be a tx number or an ISO-8601 instant", field="as_of")
        if valid_at is not None and not isinstance(valid_at, str):
            raise bad_request("valid_at must be an ISO-8601 instant", field="valid_at")
        if params is not None and not isinstance(params, (list, dict)):
            raise bad_request("params must be a list ($1, $2, ...) or an object ($name)", field="params")
        lg = services.ledger
        pinned = None if as_of is None else time_param(str(as_of), "as_of", head=lg.head.tx)
        valid = instant_param(valid_at, "valid_at")

        def run() -> tuple[int, pa.Table]:
            db = lg.db() if pinned is None else lg.as_of(pinned)
            return db.basis_tx, db.sql(data["sql"], valid_at=valid, params=params, limit=limit)

        try:
            basis, table = await asyncio.to_thread(run)
        except (InvalidQuery, InvalidTime) as e:
            raise bad_request(str(e), field=_at_fault(str(e), params),
                              kind="invalid-query" if isinstance(e, InvalidQuery) else "invalid-time") from e
        response = table_response(table, fmt)
        response.headers[AS_OF_TX] = str(basis)  # what an instant (or no as_of) was read as
        return response


_PARAMS_ERROR = re.compile(r"Values were not provided|\bparameters?\b|Python (integer|Conversion)|"
                           r"Unimplemented type for cast", re.IGNORECASE)


def _at_fault(message: str, params: object) -> str:
    """The body member a refused query's error is about: `params` when DuckDB's message is about
    binding them, else `sql`."""
    return "params" if params is not None and _PARAMS_ERROR.search(message) else "sql"


def sql_body(data: Any, fields: set[str]) -> dict[str, Any]:
    """The decoded JSON body (None when empty) as an object with a string `sql` and no field but
    `fields`; else 400 naming the field at fault."""
    if not isinstance(data, dict):
        raise bad_request(f"body must be a JSON object with a string 'sql', got {json_type(data)}",
                          field="body")
    if not isinstance(data.get("sql"), str):
        raise bad_request("body must be an object with a string 'sql'", field="sql")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r}", field=unknown[0])
    return data


def _tx_json(t: Any) -> dict[str, Any]:
    return {
        "tx": t.tx, "tx_time": t.tx_time.isoformat(), "hash": t.hash, "prev_hash": t.prev_hash,
        "meta": t.meta, "quarantined": t.quarantined,
        "records": [record_json({
            "id": r.id, "kind": r.kind, "action": r.action, "parent": r.parent,
            "data": json.dumps(r.data), "valid_time": r.valid_time, "tx": r.tx, "seq": r.seq,
            "tx_time": r.tx_time, "key": r.key, "headers": json.dumps(r.headers) if r.headers else None,
            "kafka_topic": r.topic, "kafka_partition": r.partition, "kafka_offset": r.offset,
        }) for r in t.records],
    }
