"""Database values: the ledger pinned to a basis tx (as-of), optionally after a tx (since) and at a
valid time (bitemporal). Each read runs in one DuckDB snapshot, so it never sees half a tx."""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import pyarrow as pa

from ledger.datoms import attributes
from ledger.errors import InvalidQuery, InvalidTime
from ledger.records import Datom, dumps, loads, to_utc, utf8_text
from ledger.storage.catalog import (
    TAIL_TABLES,
    Files,
    columns,
    datoms_sql,
    entities_file,
    index_rows_sql,
    quote,
    state_sql,
    union_sql,
)
from ledger.storage.parquet_types import arrow_type, star_replace

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence, Set

    from ledger.ledger import Ledger

DEFAULT_TIMEOUT = 30.0  # seconds a query may run before it is interrupted
T = TypeVar("T")
TimePoint = int | datetime | str  # a tx number, or an instant in transaction time
_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


@dataclass(frozen=True, slots=True)
class Pin:
    """Which part of the log a read sees."""

    basis: int  # tx <= basis
    since: int | None = None  # tx > since
    valid_at: datetime | None = None  # valid_time <= valid_at

    def where(self, *, valid: bool = True) -> str:
        parts = [f"tx <= {self.basis}"]
        if self.since is not None:
            parts.append(f"tx > {self.since}")
        if valid and self.valid_at is not None:
            parts.append(f"valid_time <= '{self.valid_at.isoformat()}'::TIMESTAMPTZ")
        return " AND ".join(parts)

    @property
    def latest_key(self) -> str:
        """Which assertion wins: the latest in valid time when valid_at is given, else in tx order
        ((tx, seq) is unique, so there are no ties)."""
        if self.valid_at is not None:
            return "(valid_time, tx, seq)"
        return "(tx, seq)"


def relation_views(pin: Pin, files: Files, suffix: str, needed: Set[str]) -> dict[str, str]:
    """The SQL of the relations `needed` (named with `suffix`), restricted to `pin`. (`entities`
    is worked out only when needed: that may take a query.)"""
    def pinned(relation: str, valid: bool) -> str:
        return union_sql(relation, files[relation], where=pin.where(valid=valid))

    datoms = f"datoms{suffix}"
    state = files.state_at(pin.basis) if pin.since is None and pin.valid_at is None else None
    if f"entities{suffix}" not in needed:
        entities = ""
    elif state is None:
        entities = entities_sql(pin, datoms)
    elif not files.datoms_between(state[0], pin.basis):  # the checkpoint's state is the answer
        entities = f"SELECT * FROM read_parquet({quote(entities_file(state[1]))})"
    else:
        # The checkpoint holds the latest datom of each (e, a) through its tx, and its entities
        # file the state of each entity then. An entity no newer datom touches is read from the
        # entities file as it is; the others are folded from the checkpoint and the newer datoms
        # (a newer datom of an (e, a) replaces the checkpoint's).
        at, path = state
        newer = f"(SELECT * FROM {datoms} WHERE tx > {at})"
        folded = (
            "SELECT * FROM newer UNION ALL SELECT e, a, v, tx, tx_time FROM "
            f"read_parquet({quote(path)}) SEMI JOIN changed USING (e) ANTI JOIN newer USING (e, a)"
        )
        entities = (
            f"WITH newer AS ({latest_sql(pin, newer)}), changed AS (SELECT DISTINCT e FROM newer) "
            f"SELECT * FROM read_parquet({quote(entities_file(path))}) ANTI JOIN changed USING (e) "
            f"UNION ALL {state_sql(folded)}"
        )

    bodies = {
        f"log{suffix}": pinned("records", True),
        f"commands{suffix}": f"SELECT * FROM log{suffix} WHERE kind = 'command'",
        f"events{suffix}": f"SELECT * FROM log{suffix} WHERE kind = 'event'",
        f"datoms{suffix}": pinned("datoms", True),
        f"entities{suffix}": entities,
        f"transactions{suffix}": pinned("transactions", False),
        f"quarantine{suffix}": pinned("quarantine", False),
    }
    return {n: b for n, b in bodies.items() if n in needed}


def entities_sql(pin: Pin, datoms: str) -> str:
    """State per entity from `datoms` (a relation or subquery, already restricted to `pin`)."""
    return state_sql(latest_sql(pin, datoms))


def latest_sql(pin: Pin, datoms: str) -> str:
    """The latest datom of each (e, a) in `datoms` (a relation or a parenthesized subquery), by
    arg_max (measured 30% faster than a window), retractions included: e, a, v, tx, tx_time."""
    return (
        "SELECT e, a, w.v AS v, w.tx AS tx, w.tx_time AS tx_time FROM (SELECT e, a, "
        f"arg_max({{'v': v, 'tx': tx, 'tx_time': tx_time}}, {pin.latest_key}) AS w FROM {datoms} "
        "GROUP BY e, a)"
    )


RELATIONS = ("log", "commands", "events", "datoms", "entities", "transactions", "quarantine")


def needed_relations(query: str, suffix: str = "") -> set[str]:
    """The relations a query may mention (binding a view over Parquet is not free)."""
    pattern = rf"\b({'|'.join(RELATIONS)}){re.escape(suffix)}\b"
    names = {m.lower() for m in re.findall(pattern, query, re.IGNORECASE)}
    if names & {"commands", "events"}:
        names.add("log")
    if "entities" in names:
        names.add("datoms")
    return {n + suffix for n in names}


# String literals ('..', E'..', $$..$$), quoted names and comments, skipped whole; an unclosed one
# runs to the end (else every later opener would rescan the rest of the query: quadratic).
_SKIP = (
    r"(?P<skip>E'(?:[^'\\]|\\.|'')*(?:'|\Z)|'(?:[^']|'')*(?:'|\Z)|"
    r"\$(?P<tag>(?:[A-Za-z_]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z)|"  # $$..$$ and $tag$..$tag$
    r"\"(?:[^\"]|\"\")*(?:\"|\Z)|--[^\n]*|/\*.*?(?:\*/|\Z))"
)
_GAP = r"(?:\s|/\*.*?\*/)+"  # white space, and block comments
_TIME_TRAVEL = re.compile(
    rf"(?<![\w$])(?P<rel>[A-Za-z_][A-Za-z0-9_]*|\"[A-Za-z_][A-Za-z0-9_]*\"){_GAP}FOR\s+SYSTEM_TIME\s+AS\s+OF\s+"
    r"(?P<point>[0-9]+|TIMESTAMP(?:TZ)?\s*'[^']*'|'[^']*')"
    # Not part of an expression (2+3, 5.5, 2 || 'x', 2 AT TIME ZONE ...): those are refused below.
    r"(?![\w.'$]|\s*(?:[+*%|&^<>=!~(\[]|/(?!\*)|-(?!-)|::|AT\s|COLLATE\s))"
    r"(?P<after>\s+(?P<next>[A-Za-z_]+))?|" + _SKIP,
    re.IGNORECASE | re.DOTALL,
)
_SYSTEM_TIME = re.compile(_SKIP + r"|\bFOR\s+SYSTEM_TIME\b", re.IGNORECASE | re.DOTALL)
TIME_TRAVEL_SYNTAX = "relation FOR SYSTEM_TIME AS OF <tx number | TIMESTAMP '...' | '...'>"


def mentions_time_travel(query: str) -> bool:
    """Whether FOR SYSTEM_TIME appears outside string literals, quoted names and comments."""
    return any(m.group("skip") is None for m in _SYSTEM_TIME.finditer(query))


_NOT_ALIASES = {
    "where", "join", "left", "right", "inner", "outer", "full", "cross", "on", "using", "group",
    "order", "limit", "having", "union", "except", "intersect", "window", "qualify", "natural",
    "asof", "positional", "offset", "for", "semi", "anti", "tablesample", "pivot", "unpivot",
}
# A relation right after these takes no alias (DESCRIBE log, SUMMARIZE entities).
_BARE_RELATION = re.compile(r"\s*(?:DESCRIBE|SUMMARIZE|SHOW)\s*\Z", re.IGNORECASE)
# DuckDB's own time travel, for catalogs that keep versions (the ledger's relations do not).
_AT_VERSION = re.compile(_SKIP + r"|\bAT\s*\(\s*(?:VERSION|TIMESTAMP)\s*=>", re.IGNORECASE | re.DOTALL)


_AS_OF = "__as_of_"  # relation{_AS_OF}{tx}: a relation pinned at tx


def suffix_for(tx: int) -> str:
    return f"{_AS_OF}{tx}"


def rewrite_time_travel(query: str, resolve: Callable[[TimePoint], int]) -> tuple[str, set[int]]:
    """SQL:2011 `rel FOR SYSTEM_TIME AS OF <tx | TIMESTAMP '...'>` as a relation pinned at that
    tx (kept under its own name as alias). Returns the rewritten query and the txs it needs."""
    txs: set[int] = set()

    def replace_clause(m: re.Match[str]) -> str:
        if m.group("skip") is not None:
            return m.group("skip")
        point = m.group("point")
        if point.isdigit():
            tx = resolve(int(point))
        else:
            tx = resolve(point.split("'")[1])
        txs.add(tx)
        rel = m.group("rel")  # kept as written for the alias: "group" stays quoted
        out = rel.strip('"') + suffix_for(tx)
        nxt = m.group("next")
        if (nxt is None or nxt.lower() in _NOT_ALIASES) and not _BARE_RELATION.match(query[:m.start()]):
            out += f" AS {rel}"
        return out + (m.group("after") or "")

    if any(m.group("skip") is None for m in _AT_VERSION.finditer(query)):
        raise InvalidQuery("AT (VERSION => ...) / AT (TIMESTAMP => ...) is DuckDB's time travel for "
                           f"catalogs that keep versions; here write {TIME_TRAVEL_SYNTAX}")
    rewritten = _TIME_TRAVEL.sub(replace_clause, query)
    if mentions_time_travel(rewritten):
        raise InvalidQuery(f"FOR SYSTEM_TIME is written {TIME_TRAVEL_SYNTAX} (no expressions or parameters)")
    return rewritten, txs


def _kept_when_short(fn: Callable[[str], T]) -> Callable[[str], T]:
    """`fn` of a query, remembered for the 1,024 latest short queries: dashboards repeat theirs."""
    cached = functools.lru_cache(maxsize=1024)(fn)
    return functools.wraps(fn)(lambda query: cached(query) if len(query) <= 4096 else fn(query))


@_kept_when_short  # when it accepts (a refusal raises)
def check_read_only(query: str) -> None:
    """Only single SELECT / EXPLAIN statements run; everything else is refused by name."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise InvalidQuery(str(e)) from e
    if len(statements) != 1:
        raise InvalidQuery(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in _ALLOWED:
        # Named as written: DuckDB files INSTALL under LOAD, USE under SET, CHECKPOINT under CALL.
        word = _FIRST_WORD.match(statements[0].query)
        raise InvalidQuery(f"only SELECT queries are allowed, not {word[1].upper() if word else kind.name}")
    if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs what it explains: a SELECT only
        explain = _EXPLAIN.match(query)
        try:
            explained = duckdb.extract_statements(query[explain.end():]) if explain else []
        except duckdb.Error:  # EXPLAIN (FORMAT ...) SELECT: options are not supported
            explained = []
        if [s.type for s in explained] != [duckdb.StatementType.SELECT]:
            word = _FIRST_WORD.match(query[explain.end():]) if explain and explained else None
            raise InvalidQuery("EXPLAIN [ANALYZE] explains a SELECT only, not "
                               + (word[1].upper() if word else "that form"))


_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")


class Database:
    """An immutable value of the ledger: every read on it answers the same forever."""

    def __init__(self, ledger: Ledger, pin: Pin) -> None:
        self._ledger = ledger
        self.pin = pin

    def __repr__(self) -> str:
        return f"<Database basis_tx={self.pin.basis} since={self.pin.since} valid_at={self.pin.valid_at}>"

    @property
    def basis_tx(self) -> int:
        return self.pin.basis

    def as_of(self, t: TimePoint) -> Database:
        return Database(self._ledger, replace(self.pin, basis=min(self.pin.basis, self._ledger.resolve(t))))

    def since(self, t: TimePoint) -> Database:
        """Only what came after `t` (and after this value's own `since`: a chain narrows)."""
        after = self._ledger.resolve(t)
        return Database(self._ledger, replace(
            self.pin, since=after if self.pin.since is None else max(self.pin.since, after)))

    def valid_at(self, instant: datetime | str) -> Database:
        return Database(self._ledger, replace(self.pin, valid_at=to_utc(instant, "valid_at")))

    def _with_valid(self, valid_at: datetime | str | None) -> Pin:
        return self.pin if valid_at is None else replace(self.pin, valid_at=to_utc(valid_at, "valid_at"))

    def _datoms_of(self, e: str, pin: Pin) -> list[tuple[Any, ...]]:
        """(a, v, op, tx, seq, valid_us, tx_us, record_id) of one entity within `pin`, in
        (tx, seq, a) order; v is the Python value, times are epoch microseconds. The writer reads
        its entity index; snapshots scan the datoms."""
        e = _entity_id(e)
        lo = -1 if pin.since is None else pin.since
        vt = None if pin.valid_at is None else _epoch_us(pin.valid_at)
        if self._ledger.indexed:
            key = self._ledger.rules.entity_key
            kept = [
                (a, v, v is not None, tx, seq, vus, tus, rid)
                for tx, seq, vus, tus, rid, attrs in self._ledger.index_rows(e)
                if lo < tx <= pin.basis and (vt is None or vus <= vt)
                for a, v in attributes(loads(attrs), key)
            ]
        else:
            with self._ledger.snapshot() as (cur, files):
                source = union_sql("datoms", files["datoms"], where="e = $e")
                rows = cur.execute(
                    "SELECT a, v, op, tx, seq, epoch_us(valid_time), epoch_us(tx_time), record_id "
                    f"FROM ({source})", {"e": e},
                ).fetchall()
            kept = [
                (a, None if v is None else loads(v), *rest)
                for a, v, *rest in rows
                if lo < rest[1] <= pin.basis and (vt is None or rest[3] <= vt)
            ]
        kept.sort(key=lambda r: (r[3], r[4], r[0]))
        return kept

    def entity(self, e: str, *, valid_at: datetime | str | None = None) -> dict[str, Any] | None:
        """The entity's attributes, or None when it has none (never seen, or deleted)."""
        found = self.entity_with_tx(e, valid_at=valid_at)
        return None if found is None else found[0]

    def entity_with_tx(
        self, e: str, *, valid_at: datetime | str | None = None
    ) -> tuple[dict[str, Any], dict[str, int]] | None:
        """The entity's attributes and, for each, the tx of the assertion that holds it."""
        pin = self._with_valid(valid_at)
        rows = self._datoms_of(e, pin)
        if pin.valid_at is not None:  # the latest in valid time wins; ties in tx order
            rows.sort(key=lambda r: (r[5], r[3], r[4]))
        latest = {r[0]: r for r in rows}
        held = sorted((a, r) for a, r in latest.items() if r[2])
        return ({a: r[1] for a, r in held}, {a: r[3] for a, r in held}) if held else None

    def history(
        self, e: str, *, since: TimePoint | None = None, until: TimePoint | None = None
    ) -> list[Datom]:
        """Every assertion and retraction of the entity with since < tx <= until, in tx order."""
        e, pin = _entity_id(e), self.pin
        if since is not None:
            lower = self._ledger.resolve(since)
            pin = replace(pin, since=lower if pin.since is None else max(pin.since, lower))
        if until is not None:
            pin = replace(pin, basis=min(pin.basis, self._ledger.resolve(until)))
        return [
            Datom(e=e, a=a, v=v, tx=tx, tx_time=_from_epoch_us(tus), op=op,
                  valid_time=_from_epoch_us(vus), record_id=rid)
            for a, v, op, tx, _seq, vus, tus, rid in self._datoms_of(e, pin)
        ]

    def sql(
        self,
        query: str,
        *,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        valid_at: datetime | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        limit: int | None = None,
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> pa.Table:
        """Run one SELECT over log, commands, events, datoms, entities, transactions, quarantine.

        A query running longer than `timeout` seconds, or when `cancel` is set, is interrupted;
        `limit` caps the rows returned (the result's schema metadata says `truncated` when rows
        were cut). `progress` is called now and then, from another thread, with DuckDB's estimate
        of the fraction done.
        """
        from ledger import views  # views build on this module

        if not isinstance(query, str):
            raise InvalidQuery(f"a query is SQL text, got {type(query).__name__}")
        _utf8(query, "the query")
        if params is not None and (isinstance(params, (str, bytes))
                                   or not isinstance(params, (list, tuple, Mapping))):
            raise InvalidQuery(
                f"params must be a list ($1, ...) or a mapping ($name), got {type(params).__name__}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidQuery(f"limit must be a whole number of rows, at least 0, got {limit!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise InvalidQuery(f"timeout must be a positive number of seconds, got {timeout!r}")

        query, past = rewrite_time_travel(query, lambda t: min(self.pin.basis, self._ledger.resolve(t)))
        check_read_only(query)
        pin = self._with_valid(valid_at)
        plan = views.plan(self._ledger, query, pin)  # None unless the query names a user view
        text = query if plan is None else f"{query}\n{plan.text}"
        past |= set() if plan is None else plan.past
        pins = [(pin, ""), *((replace(pin, basis=t), suffix_for(t)) for t in sorted(past))]
        allowed = {name + suffix for _, suffix in pins for name in RELATIONS}
        if plan is not None:
            allowed |= {name for name, _, _ in plan.order} | plan.pinned.keys()
        parsed = parse(query)
        check_relations(parsed, query, allowed)
        ast = None if plan is not None or _EXPLAIN.match(query) else _plain_select(parsed.statement)

        def run(cur: duckdb.DuckDBPyConnection, sql: str, *, fallback: bool = False) -> pa.Table | None:
            """The rows of `sql`; with `fallback`, None if DuckDB refuses it before it runs."""
            timer = None if timeout is None else threading.Timer(timeout, cur.interrupt)
            if timer is not None:
                timer.daemon = True
                timer.start()
            done = threading.Event()
            watcher = None if progress is None else _watch_progress(cur, done, progress)
            if cancel is not None:
                threading.Thread(target=_interrupt_when, args=(cur, cancel, done), daemon=True).start()
            try:
                try:
                    rel = cur.sql(sql, params=params)
                except duckdb.Error as e:
                    if fallback and not isinstance(e, duckdb.InterruptException):
                        return None
                    raise
                if rel is None:
                    raise InvalidQuery("the statement returned no result")
                types = [str(t) for t in rel.types]
                json_columns = {c for c, t in zip(rel.columns, types, strict=True) if t == "JSON"}
                casts = {c: a for c, t in zip(rel.columns, types, strict=True) if (a := arrow_type(t))}
                if casts:  # as DuckDB's text (UHUGEINT would wrap, a TIMETZ lose its offset...)
                    rel = rel.query("result", f"SELECT {star_replace(casts)} FROM result") or rel
                    json_columns |= {c for c, a in casts.items() if a == "JSON"}  # (a VARIANT)
                table = (rel if limit is None else rel.limit(limit + 1)).to_arrow_table()
                return _mark_json(table, json_columns) if json_columns else table
            finally:
                done.set()
                if watcher is not None:
                    watcher.join()  # no report after the query's end
                if timer is not None:
                    timer.cancel()

        if ast is not None and plan is None and not past and progress is None and self._ledger.indexed:
            found = _point_lookup(ast, params)
            if found is not None and (table := self._lookup(*found, pin)) is not None:
                return _limited(table, limit)
        try:
            if ast is not None:
                # A plain SELECT: the relations go in as leading CTEs (creating temp views costs
                # milliseconds each). If DuckDB refuses that statement, the temp-view path below
                # (in a snapshot of its own) reports why, with messages that point into the caller's text.
                with self._ledger.snapshot() as (cur, files):
                    bodies = _bodies(pins, files, text)
                    self._from_index(bodies, ast, pin, params)
                    ctes = ", ".join(f"{n} AS NOT MATERIALIZED ({b})" for n, b in bodies.items())
                    table = run(cur, f"WITH {ctes}\n{query}" if ctes else query, fallback=True)
                    if table is not None:
                        return _limited(table, limit)
            with self._ledger.snapshot() as (cur, files):
                for name, body in _bodies(pins, files, text).items():
                    cur.execute(f"CREATE TEMP VIEW {name} AS {body}")
                if plan is not None:
                    plan.install(cur, timeout)
                table = run(cur, query)
                assert table is not None
        except duckdb.InterruptException as e:
            if cancel is not None and cancel.is_set():
                raise InvalidQuery("query cancelled") from e
            raise InvalidQuery(f"query interrupted: it ran longer than the {timeout} s limit") from e
        except duckdb.Error as e:
            raise InvalidQuery((plan and plan.explain(str(e))) or _caller_lines(str(e).strip(), query)) from e
        except pa.ArrowException as e:  # e.g. nesting deeper than Arrow's recursion limit
            raise InvalidQuery(f"the result cannot be returned: {e}") from e
        except UnicodeEncodeError as e:  # a parameter holding a lone surrogate
            raise InvalidQuery(f"a parameter is not valid UTF-8 text ({e.reason})") from e
        return _limited(table, limit)

    def _lookup(self, e: str, columns: list[tuple[str, str]], pin: Pin) -> pa.Table | None:
        """The rows of `SELECT columns FROM entities WHERE e = x`, computed here from the entity
        index as the SQL of `entities` does (DuckDB's planning alone costs ~10x more); None when
        a value's JSON text could differ from the text DuckDB writes (see _plain_json)."""
        latest: dict[str, tuple[Any, ...]] = {}
        by_valid = pin.valid_at is not None
        for a, v, _op, tx, seq, vus, tus, _rid in self._datoms_of(e, pin):
            order = (vus, tx, seq) if by_valid else (tx, seq)
            if a not in latest or order > latest[a][0]:
                latest[a] = (order, v, tx, tus)
        held = sorted((a, v) for a, (_, v, _, _) in latest.items() if v is not None)
        if not all(_plain_json(a) and _plain_json(v) for a, v in held):
            return None
        rows: dict[str, list[Any]] = {"e": [], "state": [], "tx": [], "tx_time": []}
        if held:  # an entity holding no attribute has no row
            rows["e"].append(e)
            rows["state"].append("{" + ",".join(f"{dumps(a)}:{dumps(v)}" for a, v in held) + "}")
            rows["tx"].append(max(w[2] for w in latest.values()))
            rows["tx_time"].append(max(w[3] for w in latest.values()))
        table = pa.table({out: pa.array(rows[col], _ENTITY_COLUMNS[col]) for out, col in columns})
        json_columns = {out for out, col in columns if col == "state"}
        return _mark_json(table, json_columns) if json_columns else table

    def _from_index(
        self, bodies: dict[str, str], ast: Mapping[str, Any], pin: Pin,
        params: Sequence[Any] | Mapping[str, Any] | None,
    ) -> None:
        """Serve `datoms` from the entity index when the query reads only a few entities' datoms
        (`... FROM datoms|entities WHERE e = x [AND ...]`): a lookup then costs the same however
        many segments the ledger has."""
        if "datoms" not in bodies or not self._ledger.indexed:
            return
        wanted = _pinned_entities(ast, params)
        if wanted is None:
            return
        rows = [(e, *row) for e in sorted(wanted) for row in self._ledger.index_rows(e)]
        if len(rows) <= INLINE_INDEX_ROWS:
            source = datoms_sql(index_rows_sql(rows), self._ledger.rules.entity_key)
            bodies["datoms"] = f"SELECT {columns('datoms')} FROM ({source}) WHERE {pin.where()}"
            if "entities" in bodies:  # from those datoms alone, not the whole checkpoint
                bodies["entities"] = entities_sql(pin, "datoms")


_LINE = re.compile(r"\bLINE (\d+): (.*)")


def _entity_id(e: object) -> str:
    """An entity id as the datoms hold it: a string, or an integer (an event's integer id is
    stored as its decimal text, see Rules.entity_of)."""
    if isinstance(e, int) and not isinstance(e, bool):
        return str(e)
    if not isinstance(e, str):
        raise InvalidQuery(f"entity id: expected a string or an integer, got {type(e).__name__}")
    _utf8(e, "the entity id")
    return e


def _utf8(value: str, what: str) -> None:
    """InvalidQuery unless `value` can be handed to DuckDB and SQLite (lone surrogates cannot)."""
    try:
        utf8_text(value, what)
    except ValueError as e:
        raise InvalidQuery(str(e)) from e


def _caller_lines(message: str, query: str) -> str:
    """DuckDB's "LINE n: <text>" renumbered as a line of `query`: the statement DuckDB ran may
    have had lines before the caller's (the relations as CTEs, the row limit's wrapper)."""
    lines = query.splitlines()

    def renumber(m: re.Match[str]) -> str:
        shown = m[2].strip().removeprefix("...").removesuffix("...").strip()
        at = next((i for i, line in enumerate(lines) if shown and shown in line), None)
        return m[0] if at is None else f"LINE {at + 1}: {m[2]}"

    return _LINE.sub(renumber, message)


PROGRESS_EVERY = 0.25  # seconds between two readings of a running query's progress


def _interrupt_when(cur: duckdb.DuckDBPyConnection, cancel: threading.Event, done: threading.Event) -> None:
    """Interrupt the query running on `cur` if `cancel` is set before `done` (checked every 0.1 s)."""
    while not done.wait(0.1):
        if cancel.is_set():
            cur.interrupt()
            return


def _watch_progress(cur: duckdb.DuckDBPyConnection, done: threading.Event,
                    report: Callable[[float], None]) -> threading.Thread:
    """Report DuckDB's progress estimate for the query about to run on `cur` until `done`."""
    cur.execute("SET enable_progress_bar = true")  # tracking on, printing off: read below
    cur.execute("SET enable_progress_bar_print = false")

    def watch() -> None:
        last = 0.0
        while not done.wait(PROGRESS_EVERY):
            percent = cur.query_progress()  # -1 before the query starts and after it ends
            if 0 <= percent <= 100 and percent / 100 > last:
                last = percent / 100
                report(last)

    thread = threading.Thread(target=watch, name="ledger-query-progress", daemon=True)
    thread.start()
    return thread


def _bodies(pins: Sequence[tuple[Pin, str]], files: Files, text: str) -> dict[str, str]:
    """The SQL of each relation (at each pin) that `text` may read."""
    bodies: dict[str, str] = {}
    for p, suffix in pins:
        bodies.update(relation_views(p, files, suffix, needed_relations(text, suffix)))
    return bodies


# (after any comments: DuckDB keeps them in a statement's text)
_EXPLAIN = re.compile(r"^(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*EXPLAIN(\s+ANALYZE)?\s+",
                      re.IGNORECASE | re.DOTALL)
# The catalog's own tables: rows newer than any as-of point, offsets, ... not the query's business.
_INTERNAL = frozenset({
    "ledger_meta", "record_ids", "segments", "offsets", "entity_state", "tail_datoms", *TAIL_TABLES,
})


@dataclass(frozen=True)
class Parsed:
    """What the checks read of a query's parse tree. Shared between the calls that ask about the
    same text (see parse): read it, never change it."""

    statement: Mapping[str, Any] | None  # DuckDB's tree of the one statement; None if it has none
    tables: frozenset[str]  # the tables it reads, less its own CTEs
    functions: frozenset[str]  # every function it calls, lower case


_parsers = threading.local()


@_kept_when_short  # parsing costs ~0.5 ms
def parse(query: str) -> Parsed:
    """DuckDB's parse tree of one query (of the query an EXPLAIN explains)."""
    con: duckdb.DuckDBPyConnection | None = getattr(_parsers, "con", None)
    if con is None:  # a private in-memory database per thread: parsing touches no data
        con = _parsers.con = duckdb.connect()
    rows = con.execute("SELECT json_serialize_sql($q)", {"q": _EXPLAIN.sub("", query, count=1)}).fetchall()
    tree: dict[str, Any] = json.loads(rows[0][0]) if rows else {"error": True}
    if tree.get("error") or len(tree["statements"]) != 1:
        return Parsed(None, frozenset(), frozenset())
    statement: dict[str, Any] = tree["statements"][0]
    return Parsed(statement, frozenset(_tables(statement, frozenset())), frozenset(_functions(statement)))


# Table functions that run SQL given as text, or act on the database file.
_RUNS_SQL = frozenset({"query", "query_table", "json_execute_serialized_sql", "checkpoint",
                       "force_checkpoint"})


def _reaches_catalog(function: str) -> bool:
    """Functions that read tables by name (query_table('tail_records')), describe the catalog
    (duckdb_tables(), pragma_table_info(...)) or read files (read_blob, glob: the data directory
    holds the catalog's own files, which allowed_directories cannot exclude): around the
    relations, so refused."""
    return function in _RUNS_SQL or function == "glob" or function.startswith(
        ("duckdb_", "pragma_", "read_", "parquet_", "sniff_"))


def check_relations(parsed: Parsed, query: str, allowed: set[str]) -> None:
    """Refuse tables other than the ledger's relations and views (and the query's own CTEs), and
    functions that reach the catalog some other way."""
    names: Set[str]
    functions: Set[str]
    if parsed.statement is None:  # DuckDB cannot serialize it: look for the catalog's names in the text
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query)}
        names, functions = words & _INTERNAL, words
    else:
        names, functions = parsed.tables, parsed.functions
    if refused := sorted(f for f in functions if _reaches_catalog(f)):
        raise InvalidQuery(
            f"function {refused[0]}() is not available: queries read {', '.join(RELATIONS)} and "
            "the views (GET /views, ledger views list)"
        )
    unknown = sorted(names - {a.lower() for a in allowed})
    if unknown:
        name, _, tx = unknown[0].partition(_AS_OF)
        at = f" (as of tx {tx})" if tx.isdigit() else ""
        raise InvalidQuery(
            f"unknown relation {(name if at else unknown[0])!r}{at}: queries read {', '.join(RELATIONS)} "
            "and the views (GET /views, ledger views list)"
        )


def _tables(tree: object, ctes: frozenset[str]) -> set[str]:
    """The table names a parse tree reads, less the CTEs in scope where each is named."""
    found: set[str] = set()
    if isinstance(tree, list):
        for item in tree:
            found |= _tables(item, ctes)
    elif isinstance(tree, dict):
        defined = (tree.get("cte_map") or {}).get("map") or []
        # A CTE's body sees the CTEs before it, and itself only when it is recursive: in
        # `WITH offsets AS (SELECT * FROM offsets)` the inner `offsets` is the catalog's table.
        outer = ctes
        for cte in defined:
            name = str(cte["key"]).lower()
            recursive = _names_recursive(cte.get("value"), name)
            found |= _tables(cte.get("value"), outer | {name} if recursive else outer)
            outer = outer | {name}
        ctes = outer
        if tree.get("type") in ("BASE_TABLE", "SHOW_REF") and tree.get("table_name"):
            name = str(tree["table_name"]).lower()
            if name not in ctes:
                found.add(name)
        for key, value in tree.items():
            if key != "cte_map":
                found |= _tables(value, ctes)
    return found


def _nodes(tree: object) -> Iterator[dict[str, Any]]:
    """Every object in a parse tree, depth first."""
    if isinstance(tree, list):
        for item in tree:
            yield from _nodes(item)
    elif isinstance(tree, dict):
        yield tree
        for value in tree.values():
            yield from _nodes(value)


def _names_recursive(tree: object, name: str) -> bool:
    """Whether a CTE body is the recursive CTE `name` (DuckDB's RECURSIVE_CTE_NODE)."""
    return any(str(node.get("cte_name", "")).lower() == name for node in _nodes(tree))


def _functions(tree: object) -> set[str]:
    """Every function a parse tree calls (scalar, aggregate or table function), lower case."""
    return {n["function_name"].lower() for n in _nodes(tree) if isinstance(n.get("function_name"), str)}


JSON_TYPE = {b"duckdb_type": b"JSON"}  # field metadata of a JSON column (Arrow has text only)


def _mark_json(table: pa.Table, names: set[str]) -> pa.Table:
    """Say in the schema which text columns hold JSON (DuckDB's Arrow export does not)."""
    fields = [f.with_metadata(JSON_TYPE) if f.name in names else f for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def _limited(table: pa.Table, limit: int | None) -> pa.Table:
    if limit is not None and table.num_rows > limit:
        table = table.slice(0, limit).replace_schema_metadata({"truncated": "true"})
    return table


INLINE_INDEX_ROWS = 2_000  # beyond this many index rows, scanning the datoms plans faster


def _plain_select(statement: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The parse tree of a SELECT that defines no CTEs of its own, else None."""
    if statement is None:
        return None
    node = statement["node"]
    if node.get("cte_map", {}).get("map"):
        return None
    if (node.get("from_table") or {}).get("type") == "SHOW_REF":
        return None  # DESCRIBE, SUMMARIZE, SHOW: DuckDB takes no CTEs before them
    return statement


def _pinned_entities(
    statement: Mapping[str, Any], params: Sequence[Any] | Mapping[str, Any] | None
) -> set[str] | None:
    """The entity ids a `SELECT ... FROM datoms|entities [alias] WHERE e = x [AND ...]` (or
    `e IN (x, ...)`) is restricted to, when that is its only use of those relations; else None."""
    node = statement["node"]
    source = node.get("from_table") or {}
    if node.get("type") != "SELECT_NODE" or _entity_tables(node) != 1 or not _is_entity_table(source):
        return None
    names = {source["table_name"].lower(), source["alias"].lower()} - {""}

    def value(expr: Mapping[str, Any]) -> str | None:
        got: object = None
        if expr.get("type") == "VALUE_CONSTANT" and expr["literal"].get("kind") in ("STRING", "VARCHAR"):
            got = expr["literal"]["text"]
        elif expr.get("type") == "VALUE_PARAMETER" and params is not None:
            ident = expr["identifier"]
            with suppress(KeyError, IndexError, ValueError):
                got = params[ident] if isinstance(params, Mapping) else params[int(ident) - 1]
        # Inlined as a SQL literal: no NUL, which would end the statement's text early.
        return got if isinstance(got, str) and "\x00" not in got else None

    def is_e(expr: Mapping[str, Any]) -> bool:
        return _column(expr, names) == "e"

    where = node.get("where_clause") or {}
    conjuncts = where.get("children", []) if where.get("type") == "CONJUNCTION_AND" else [where]
    for c in conjuncts:
        if c.get("type") == "COMPARE_EQUAL":
            for col, other in ((c["left"], c["right"]), (c["right"], c["left"])):
                if is_e(col) and (v := value(other)) is not None:
                    return {v}
        if c.get("type") == "COMPARE_IN" and is_e(c["children"][0]):
            found = [value(x) for x in c["children"][1:]]
            if all(v is not None for v in found):
                return {v for v in found if v is not None}
    return None


# The columns of `entities`, as DuckDB hands them to Arrow.
_ENTITY_COLUMNS = {"e": pa.string(), "state": pa.string(), "tx": pa.int64(),
                   "tx_time": pa.timestamp("us", tz="UTC")}


def _point_lookup(
    statement: Mapping[str, Any], params: Sequence[Any] | Mapping[str, Any] | None
) -> tuple[str, list[tuple[str, str]]] | None:
    """(entity, [(output name, column)]) when the query is exactly `SELECT e|state|tx|tx_time|*
    FROM entities [alias] WHERE e = 'x'|$p` (params holding just that value), else None."""
    node = statement["node"]
    source = node.get("from_table") or {}
    if (
        node.get("type") != "SELECT_NODE" or node.get("modifiers") or node.get("group_expressions")
        or node.get("group_sets") or any(node.get(k) for k in ("having", "sample", "qualify"))
        or node.get("aggregate_handling") != "STANDARD_HANDLING" or not _is_entity_table(source)
        or source["table_name"].lower() != "entities" or source.get("sample")
        or source.get("at_clause") or source.get("column_name_alias")
    ):
        return None
    names = {source["alias"].lower() or "entities"}  # with an alias, only it names the table
    where = node.get("where_clause") or {}
    if where.get("type") != "COMPARE_EQUAL":
        return None
    left, right = where["left"], where["right"]
    expr = right if _column(left, names) == "e" else left if _column(right, names) == "e" else None
    if expr is None:
        return None
    if expr.get("type") == "VALUE_PARAMETER":
        ident = str(expr["identifier"])
        if isinstance(params, Mapping):
            keys = list(params)
            e = params[keys[0]] if len(keys) == 1 and str(keys[0]).lower() == ident.lower() else None
        else:
            e = params[0] if params is not None and len(params) == 1 and ident == "1" else None
    elif expr.get("type") == "VALUE_CONSTANT" and params is None:
        e = expr["literal"]["text"] if expr["literal"].get("kind") in ("STRING", "VARCHAR") else None
    else:
        e = None
    if not isinstance(e, str) or "\x00" in e:
        return None
    columns = []
    for item in node.get("select_list", []):
        if item.get("type") == "STAR" and not any(
            item.get(k) for k in ("relation_name", "exclude_list", "replace_list", "columns", "expr",
                                  "qualified_exclude_list", "rename_list")
        ):
            columns += [(c, c) for c in _ENTITY_COLUMNS]
        elif (col := _column(item, names)) in _ENTITY_COLUMNS:
            columns.append((item.get("alias") or col, col))
        else:
            return None
    if len({out.lower() for out, _ in columns}) != len(columns):
        return None  # DuckDB renames duplicates
    return e, columns


def _column(expr: Mapping[str, Any], tables: set[str]) -> str | None:
    """The column a COLUMN_REF names (`c`, or `t.c` with t in `tables`), lower case."""
    cols = [str(c).lower() for c in expr.get("column_names", ())]
    if expr.get("type") != "COLUMN_REF" or not cols or cols[:-1] not in ([], *([t] for t in tables)):
        return None
    return cols[-1]


_INT64 = range(-(2**63), 2**63)
_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _plain_json(value: object) -> bool:
    """Whether any JSON writer gives `value` the same compact text: no float (digits vary), no
    integer beyond 64 bits, no string that needs an escape."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return value in _INT64
    if isinstance(value, str):
        return _ESCAPED.search(value) is None
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(_plain_json(k) and _plain_json(v) for k, v in value.items())
    return False


def _is_entity_table(ref: Mapping[str, Any]) -> bool:
    return (
        ref.get("type") == "BASE_TABLE" and not ref.get("schema_name") and not ref.get("catalog_name")
        and str(ref.get("table_name", "")).lower() in ("datoms", "entities")
    )


def _entity_tables(tree: object) -> int:
    """How many times the parse tree names datoms or entities as a table."""
    if isinstance(tree, dict):
        return int(_is_entity_table(tree)) + sum(_entity_tables(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(_entity_tables(v) for v in tree)
    return 0


def check_time_point(t: object, what: str) -> int | datetime:
    """Validate a time argument: a non-negative tx number, or a tz-aware instant."""
    if isinstance(t, bool):
        raise InvalidTime(f"{what}: expected a tx number or an instant, got a bool")
    if isinstance(t, int):
        if t < 0:
            raise InvalidTime(f"{what}: tx numbers start at 0, got {t}")
        return t
    return to_utc(t, what)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def _from_epoch_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)
