"""Views: named SQL over the ledger's relations (and other views), versioned in the ledger itself,
usable from any query as of any tx, and optionally materialized as Parquet at a tx.

A definition is an event the ledger appends to itself (`ledger.view-defined` / `ledger.view-dropped`,
no Kafka provenance), so it is hash-chained and auditable like everything else; the definition of a
view as of tx T is the latest such record with tx <= T. A materialization is a cache: deleting
`views/` loses nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import threading
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ledger.errors import InvalidQuery, InvalidTime, InvalidViewName, LedgerError, UnknownView
from ledger.storage.catalog import CATALOG_DDL, quote, union_sql
from ledger.storage.parquet_types import portable_type, star_replace
from ledger.storage.segments import SEGMENTS_DIR
from ledger.temporal import (
    DEFAULT_TIMEOUT,
    RELATIONS,
    Database,
    Pin,
    TimePoint,
    check_read_only,
    check_time_point,
    mentions_time_travel,
    rewrite_time_travel,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

    from ledger.ledger import Ledger

DEFINED = "ledger.view-defined"
DROPPED = "ledger.view-dropped"
VIEWS_DIR = "views"
STATUS_FILE = "status.json"
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Names a view may not take: the relations, and the catalog's own tables.
RESERVED = frozenset(RELATIONS) | {
    m.group(1) for ddl in CATALOG_DDL if (m := re.match(r"CREATE \w+ IF NOT EXISTS (\w+)", ddl))
}


@functools.cache
def keywords() -> frozenset[str]:
    """SQL's own words (SELECT, GROUP, ALL, ...): a view so named could only be read quoted."""
    with duckdb.connect() as con:
        rows = con.execute(
            "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category <> 'unreserved'"
        ).fetchall()
    return frozenset(row[0] for row in rows)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_AS_OF_VIEW = re.compile(r"(?P<name>[a-z_][a-z0-9_]*)__as_of_(?P<tx>\d+)")


@dataclass(frozen=True, slots=True)
class ViewVersion:
    """One definition (or drop) of a view, as recorded at `tx`."""

    name: str
    sql: str
    description: str
    tx: int
    tx_time: datetime
    dropped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sql": self.sql, "description": self.description,
                "tx": self.tx, "tx_time": self.tx_time.isoformat()}


def check_name(name: object) -> str:
    """A valid view name, or InvalidViewName saying why not."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidViewName(
            f"view name {name!r} must match ^[a-z_][a-z0-9_]{{0,62}}$ (lower case, digits, underscores)"
        )
    if name in RESERVED or name.startswith("tail_") or "__as_of_" in name or name.startswith("_mv_"):
        raise InvalidViewName(f"view name {name!r} would shadow a relation or an internal table")
    if name in keywords():
        raise InvalidViewName(f"view name {name!r} is an SQL keyword")
    return name


def ident(name: str) -> str:
    """A view (or column) name as a quoted identifier (view names recorded before keywords were
    refused included)."""
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------ the catalog
class _Catalog:
    """Every view definition ever recorded, loaded incrementally as the head moves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded_tx = 0
        self.versions: dict[str, list[ViewVersion]] = {}

    def refresh(self, lg: Ledger) -> None:
        head = lg.head.tx
        if head <= self.loaded_tx:
            return
        with self.lock:
            lo = self.loaded_tx
            if head <= lo:
                return
            # Only records the ledger wrote itself (no Kafka provenance) define views: a producer
            # on the events topic cannot.
            where = (f"tx > {lo} AND tx <= {head} AND kind = 'event' AND kafka_topic IS NULL "
                     f"AND action IN ({quote(DEFINED)}, {quote(DROPPED)})")
            with lg.snapshot() as (cur, _):
                # Only the segments that can hold newer txs: usually none, and the tail is small.
                dirs = cur.execute(
                    f"SELECT dir FROM segments WHERE last_tx > {lo} ORDER BY first_tx"
                ).fetchall()
                files = [str(lg.root / SEGMENTS_DIR / d / "records.parquet") for (d,) in dirs]
                rows = cur.execute(
                    f"SELECT tx, tx_time, action, data FROM ({union_sql('records', files, where)}) "
                    "ORDER BY tx, seq"
                ).fetchall()
            for tx, tx_time, action, data in rows:
                version = _version(tx, tx_time.astimezone(UTC), action, json.loads(data))
                if version is not None:
                    self.versions.setdefault(version.name, []).append(version)
            self.loaded_tx = head

    def at(self, tx: int) -> dict[str, ViewVersion]:
        """The views defined as of tx."""
        out = {}
        for name, versions in self.versions.items():
            current = None
            for v in versions:
                if v.tx > tx:
                    break
                current = v
            if current is not None and not current.dropped:
                out[name] = current
        return out


def _version(tx: int, tx_time: datetime, action: str, data: Any) -> ViewVersion | None:
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return None  # kept in the log for the audit, but it defines nothing
    if action == DROPPED:
        return ViewVersion(data["name"], "", "", tx, tx_time, dropped=True)
    if not isinstance(data.get("sql"), str):
        return None
    return ViewVersion(data["name"], data["sql"], str(data.get("description") or ""), tx, tx_time)


_catalogs: weakref.WeakKeyDictionary[Ledger, _Catalog] = weakref.WeakKeyDictionary()
_catalogs_lock = threading.Lock()


def _catalog(lg: Ledger) -> _Catalog:
    with _catalogs_lock:
        cat = _catalogs.get(lg)
        if cat is None:
            cat = _catalogs[lg] = _Catalog()
    cat.refresh(lg)
    return cat


def definitions(lg: Ledger, *, as_of: TimePoint | None = None) -> dict[str, ViewVersion]:
    """The views defined as of a tx or instant (default: the latest tx), by name."""
    tx = lg.head.tx if as_of is None else lg.as_of(as_of).basis_tx
    return _catalog(lg).at(tx)


def definition(lg: Ledger, name: str, *, as_of: TimePoint | None = None) -> ViewVersion:
    defs = definitions(lg, as_of=as_of)
    if name not in defs:
        when = "" if as_of is None else f" as of {as_of}"
        raise UnknownView(f"no view named {name!r}{when}")
    return defs[name]


def history(lg: Ledger, name: str) -> list[ViewVersion]:
    """Every definition and drop of a view, oldest first."""
    return list(_catalog(lg).versions.get(name, []))


# Definitions a read should use instead of those as of its basis tx (definition=current, dry runs,
# rebuilds). When set, materializations are not used: they belong to the as-of definitions.
_OVERRIDE: ContextVar[Mapping[str, ViewVersion] | None] = ContextVar("view_override", default=None)


@contextlib.contextmanager
def _using(defs: Mapping[str, ViewVersion]) -> Iterator[None]:
    token = _OVERRIDE.set(defs)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


# ----------------------------------------------------------------------------- query plans
def _idents(sql: str) -> set[str]:
    return {m.lower() for m in _IDENT.findall(sql)}


@dataclass
class Plan:
    """The user views one query needs, as temp views to create in dependency order."""

    ledger: Ledger
    pin: Pin
    order: list[tuple[str, str, ViewVersion]]  # (name, rewritten body, version)
    pinned: dict[str, tuple[str, int]]  # `v__as_of_t` identifiers -> (view, tx)
    past: set[int]
    materialize: bool
    broken: dict[str, str]

    @property
    def text(self) -> str:
        """The view bodies, so the caller binds the relations they mention."""
        return "\n".join(body for _, body, _ in self.order)

    def install(self, cur: duckdb.DuckDBPyConnection, timeout: float | None) -> None:
        """Create the views on `cur`; what must be computed first (a view as of another tx, a
        materialization's delta) runs within `timeout` seconds each."""
        for alias, (name, tx) in self.pinned.items():
            db = Database(self.ledger, replace(self.pin, basis=tx, since=None))
            try:
                cur.register(alias, db.sql(f"SELECT * FROM {ident(name)}", timeout=timeout))
            except LedgerError as e:
                self.broken[alias] = f"view {name!r} as of tx {tx}: {e}"
        for name, body, version in self.order:
            source = self._materialized(cur, name, version, timeout) or body
            try:
                # Bound first as a relation: a statement that fails would abort the snapshot's
                # transaction, and with it every later statement of the query.
                cur.sql(source)
                cur.execute(f"CREATE TEMP VIEW {ident(name)} AS {source}")
            except duckdb.Error as e:
                # Maybe the query only mentions the name as a column: fail only if it is used.
                self.broken[name] = (
                    f"view {name!r} (defined at tx {version.tx}) cannot be evaluated as of tx "
                    f"{self.pin.basis}: {_first_line(str(e))}"
                )

    def _materialized(
        self, cur: duckdb.DuckDBPyConnection, name: str, version: ViewVersion, timeout: float | None
    ) -> str | None:
        pin = self.pin
        if not self.materialize or pin.valid_at is not None or pin.since is not None:
            return None
        mat = _usable(self.ledger.root, name, version, pin.basis)
        if mat is None:
            return None
        path, m, incremental = mat
        # Columns of a type Parquet cannot hold, and JSON (text in Parquet and Arrow), are cast back
        # to the type the file's field metadata names.
        types = {f.name: f.metadata[_DUCKDB_TYPE].decode() for f in pq.read_schema(path)
                 if f.metadata and _DUCKDB_TYPE in f.metadata}
        star = star_replace(types)
        source = f"SELECT {star} FROM read_parquet({quote(str(path))})"
        if pin.basis == m:
            return source
        if not incremental:
            return None
        # The newer rows go through Arrow too, so in the same portable form as the file's.
        portable = {c: p for c, t in types.items() if (p := portable_type(t)) is not None}
        sql = f"SELECT {star_replace(portable)} FROM ({version.sql}\n)" if portable else version.sql
        delta = Database(self.ledger, Pin(basis=pin.basis, since=m)).sql(sql, timeout=timeout)
        cur.register(f"_mv_delta_{name}", delta)
        return f"{source} UNION ALL BY NAME SELECT {star} FROM _mv_delta_{name}"

    def explain(self, error: str) -> str | None:
        """A clearer message when DuckDB's error is about a view that could not be created."""
        for name, reason in self.broken.items():
            if re.search(rf"\b{re.escape(name)}\b", error, re.IGNORECASE):
                return reason
        return None


_DUCKDB_TYPE = b"duckdb_type"  # field metadata key: a column's DuckDB type (as JSON_TYPE says JSON)


def portable_select(db: Database, name: str, timeout: float | None) -> tuple[str, dict[str, str]]:
    """SELECT * FROM the view, with each column of a type Parquet cannot hold (at any depth) cast
    to one it holds; and those columns' DuckDB types, by name."""
    described = db.sql(f"DESCRIBE SELECT * FROM {ident(name)}", timeout=timeout).to_pylist()
    original = {r["column_name"]: r["column_type"] for r in described}
    portable = {c: p for c, t in original.items() if (p := portable_type(t)) is not None}
    return f"SELECT {star_replace(portable)} FROM {ident(name)}", {c: original[c] for c in portable}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def plan(lg: Ledger, query: str, pin: Pin) -> Plan | None:
    """The views `query` may use as of pin.basis; None (at the cost of a regex and a set
    intersection) when it mentions none."""
    idents = _idents(query)
    override = _OVERRIDE.get()
    cat = _catalog(lg)
    if override is None:
        ever = cat.versions.keys()
        pinned_names = {i for i in idents if "__as_of_" in i}
        if not (idents & ever) and not pinned_names:
            return None
        defs: Mapping[str, ViewVersion] = cat.at(pin.basis)
    else:
        defs = override
    pinned: dict[str, tuple[str, int]] = {}
    for ident in idents:
        m = _AS_OF_VIEW.fullmatch(ident)
        if m and int(m.group("tx")) <= pin.basis and m.group("name") in cat.at(int(m.group("tx"))):
            pinned[ident] = (m.group("name"), int(m.group("tx")))
    order: list[tuple[str, str, ViewVersion]] = []
    past: set[int] = set()
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        if name in state:
            return  # done, or on the current path (a cycle: its creation will fail, clearly)
        state[name] = "active"
        version = defs[name]
        body, txs = rewrite_time_travel(version.sql, lambda t: min(pin.basis, lg.resolve(t)))
        past.update(txs)
        for dep in sorted((_idents(body) & defs.keys()) - {name}):
            visit(dep)
        state[name] = "done"
        order.append((name, body, version))

    for name in sorted(idents & defs.keys()):
        visit(name)
    if not order and not pinned:
        return None
    return Plan(lg, pin, order, pinned, past, materialize=override is None, broken={})


# ----------------------------------------------------------------------------- define, drop
def define_view(lg: Ledger, name: str, sql: str, description: str = "") -> tuple[ViewVersion, bool]:
    """Record a (new version of a) view after a dry run; returns it and whether it is new."""
    check_name(name)
    if not isinstance(sql, str) or not sql.strip():
        raise InvalidQuery("a view needs a non-empty 'sql'")
    if not isinstance(description, str):
        raise InvalidQuery("a view's 'description' must be a string")
    sql = sql.strip().rstrip(";").strip()
    if mentions_time_travel(sql):
        raise InvalidQuery("a view cannot use FOR SYSTEM_TIME: it is evaluated as of the point it is "
                           "read at; pin it in the query instead (... FROM view FOR SYSTEM_TIME AS OF t)")
    check_read_only(sql)
    if duckdb.extract_statements(sql)[0].type != duckdb.StatementType.SELECT:
        raise InvalidQuery("a view must be a SELECT")
    current = definitions(lg)
    candidate = ViewVersion(name, sql, description, lg.head.tx + 1, datetime.now(UTC))
    defs = {**current, name: candidate}
    with _using(defs):
        try:
            lg.db().sql(f"SELECT * FROM ({sql}\n) LIMIT 0", timeout=DEFAULT_TIMEOUT)  # \n: after a -- comment
        except LedgerError:
            if (loop := _cycle(defs, name)) is not None:
                raise InvalidQuery(f"view {name!r} would depend on itself: {' -> '.join(loop)}") from None
            raise
    lg.append([{"kind": "event", "action": DEFINED,
                "data": {"name": name, "sql": sql, "description": description}}],
              meta={"view": name})
    return definition(lg, name), name not in current


def _cycle(defs: Mapping[str, ViewVersion], name: str) -> list[str] | None:
    """A path of views from `name` back to itself, each mentioning the next (the first found), or None."""
    seen: set[str] = set()

    def walk(path: list[str]) -> list[str] | None:
        for dep in sorted(_idents(defs[path[-1]].sql) & defs.keys()):
            if dep == name:
                return [*path, dep]
            if dep not in seen:
                seen.add(dep)
                if (found := walk([*path, dep])) is not None:
                    return found
        return None

    return walk([name])


def drop_view(lg: Ledger, name: str) -> ViewVersion:
    """Record that a view is gone (its past definitions stay in the log); returns the last one."""
    last = definition(lg, name)
    lg.append([{"kind": "event", "action": DROPPED, "data": {"name": name}}], meta={"view": name})
    with _building_lock:
        if (rebuilding := _building.get((str(lg.root), name))) is not None:
            rebuilding.set()  # it stops, and removes what it wrote
    shutil.rmtree(lg.root / VIEWS_DIR / name, ignore_errors=True)  # a cache of a view now gone
    return last


# ------------------------------------------------------------------------------------ reads
def rows(
    lg: Ledger, name: str, *, as_of: TimePoint | None = None, valid_at: datetime | str | None = None,
    definition: str = "as_of", limit: int | None = None, timeout: float | None = DEFAULT_TIMEOUT,
) -> pa.Table:
    """The view's rows as of a tx (and valid at an instant), with the definition current at that
    tx (`definition="as_of"`) or today's definition over past data (`"current"`)."""
    db = lg.db() if as_of is None else lg.as_of(as_of)
    if not NAME.fullmatch(name):
        raise UnknownView(f"no view named {name!r}")
    query = f"SELECT * FROM {ident(name)}"
    if definition == "current":
        defs = definitions(lg)
        if name not in defs:
            raise UnknownView(f"no view named {name!r}")
        with _using(defs):
            return db.sql(query, valid_at=valid_at, limit=limit, timeout=timeout)
    if definition != "as_of":
        raise InvalidQuery(f"definition must be 'as_of' or 'current', got {definition!r}")
    if name not in _catalog(lg).at(db.basis_tx):
        raise UnknownView(f"no view named {name!r} as of tx {db.basis_tx}")
    return db.sql(query, valid_at=valid_at, limit=limit, timeout=timeout)


def changes(
    lg: Ledger, name: str, *, since: TimePoint, until: TimePoint | None = None,
    definition: str = "as_of", timeout: float | None = DEFAULT_TIMEOUT,
) -> tuple[pa.Table, pa.Table]:
    """(added, removed): rows of the view at `until` (default: the latest tx) not at `since`, and
    the reverse (as multisets). `until` may not be before `since` (InvalidTime). At a point where
    the view did not exist (before it was defined, after it was dropped) it had no rows; a name
    that is a view at neither point nor now is UnknownView. Each side runs within `timeout` seconds."""
    start = check_time_point(since, "since")
    end = None if until is None else check_time_point(until, "until")
    if end is not None:
        # Two instants compare as instants (both may fall in one tx), else as the txs they name.
        if isinstance(start, datetime) and isinstance(end, datetime):
            backwards = start > end
        else:
            backwards = lg.resolve(start) > lg.resolve(end)
        if backwards:
            raise InvalidTime(f"since ({since}) is after until ({until})")

    def at(point: TimePoint | None) -> pa.Table | None:
        try:
            return rows(lg, name, as_of=point, definition=definition, timeout=timeout)
        except UnknownView:
            return None

    after, before = at(end), at(start)
    if after is None:  # empty then; with no rows at either point, the view's columns now
        after = (rows(lg, name, definition=definition, limit=0, timeout=timeout) if before is None
                 else before).slice(0, 0)
    if before is None:
        before = after.slice(0, 0)
    if before.column_names != after.column_names:
        raise InvalidQuery(
            f"view {name!r} has columns {before.column_names} at {since} but {after.column_names} "
            "later; compare with definition=current"
        )
    con = duckdb.connect()
    try:
        con.register("before_rows", before)
        con.register("after_rows", after)
        added = con.sql("SELECT * FROM after_rows EXCEPT ALL SELECT * FROM before_rows").to_arrow_table()
        removed = con.sql("SELECT * FROM before_rows EXCEPT ALL SELECT * FROM after_rows").to_arrow_table()
    except duckdb.Error as e:
        raise InvalidQuery(str(e).strip()) from e
    finally:
        con.close()
    return added, removed


# -------------------------------------------------------------------------- materialization
_AGGREGATES = frozenset(
    r[0] for r in duckdb.connect().execute(
        "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE function_type = 'aggregate'"
    ).fetchall()
)
_NOT_A_FILTER = frozenset({
    "group", "order", "having", "distinct", "join", "limit", "offset", "union", "except", "intersect",
    "qualify", "over", "window", "with", "recursive", "pivot", "unpivot", "sample", "using",
    "lateral", "tablesample", "for", "system_time", "select", "from", "exists", "in", "any", "all",
    "row_number", "rowid",
})


@functools.cache  # asked of DuckDB's catalog once, when a view is first checked (not at import)
def _unrepeatable() -> frozenset[str]:
    """Functions whose value is not a function of their arguments: chance, sequences and the
    session (DuckDB says they have side effects), the clock (only "consistent within a query" to
    DuckDB, like the date parts of a TIMESTAMPTZ, so listed here; `age(t)` is the age now), and
    the macros over them (`ago`)."""
    clock = {"now", "today", "current_timestamp", "current_date", "current_time", "localtimestamp",
             "localtime", "current_localtimestamp", "current_localtime", "get_current_timestamp",
             "get_current_time", "transaction_timestamp", "age", "current_setting", "getvariable",
             "txid_current"}
    with duckdb.connect() as con:
        volatile = {name for (name,) in con.execute(
            "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE has_side_effects"
        ).fetchall()}
        macros = con.execute("SELECT DISTINCT lower(function_name), macro_definition FROM duckdb_functions() "
                             "WHERE macro_definition IS NOT NULL").fetchall()
    names = clock | volatile
    return frozenset(names | {name for name, body in macros if _idents(body) & names})


_FILTER = re.compile(
    r"\s*select\s+(?P<proj>.+?)\s+from\s+(?:log|commands|events)(?:\s+(?:as\s+)?[a-z_][a-z0-9_]*)?"
    r"(?:\s+where\s+(?P<cond>.+?))?\s*",
    re.IGNORECASE | re.DOTALL,
)


def incremental(sql: str) -> bool:
    """True when the SQL is a pure filter/projection over one of log, commands, events: its rows
    as of T are then its rows as of M plus its rows over the records with M < tx <= T.

    Conservative: anything that might aggregate, join, look at other rows, or depend on the
    clock or on chance counts as not incremental (the file's rows would keep the value of their
    own evaluation: a rebuild evaluates them again)."""
    m = _FILTER.fullmatch(sql)
    if m is None:
        return False
    try:
        if not duckdb.get_table_names(sql) <= {"log", "commands", "events"}:
            return False
    except duckdb.Error:
        return False
    words = _idents(m.group("proj") + " " + (m.group("cond") or ""))
    return not (words & _NOT_A_FILTER or words & _AGGREGATES or words & _unrepeatable())


def _dir(root: Path, name: str) -> Path:
    return root / VIEWS_DIR / name


def read_status(root: Path, name: str) -> dict[str, Any] | None:
    try:
        value = json.loads((_dir(root, name) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temp name, fsync, rename, fsync the directory: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_status(root: Path, name: str, status: dict[str, Any]) -> None:
    _write_atomic(_dir(root, name) / STATUS_FILE,
                  lambda p: p.write_text(json.dumps(status, indent=1, sort_keys=True)))


def _usable(root: Path, name: str, version: ViewVersion, basis: int) -> tuple[Path, int, bool] | None:
    """The materialization of this definition usable at `basis`: (file, its tx, incremental)."""
    status = read_status(root, name)
    if not status or status.get("file") is None or status.get("definition_tx") != version.tx:
        return None
    m = int(status["tx"])
    path = _dir(root, name) / str(status["file"])
    if basis < m or not path.exists():
        return None
    return path, m, bool(status.get("incremental"))


# Seconds a rebuild's evaluation may run before it is interrupted (the CLI passes None).
REBUILD_TIMEOUT = 600.0

# The rebuilds running in this process; an event set asks one to stop (its view was dropped).
_building: dict[tuple[str, str], threading.Event] = {}
_building_lock = threading.Lock()


def building(lg: Ledger, name: str) -> bool:
    """Whether this process is rebuilding the view now."""
    with _building_lock:
        return (str(lg.root), name) in _building


def start_rebuild(lg: Ledger, name: str) -> bool:
    """Claim the rebuild of a view in this process; False if one is already running."""
    definition(lg, name)
    key = (str(lg.root), name)
    with _building_lock:
        if key in _building:
            return False
        _building[key] = threading.Event()
    _write_status(lg.root, name, {**(read_status(lg.root, name) or {}), "state": "building",
                                  "progress": 0.0, "started": _now(), "finished": None, "error": None})
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat()


def rebuild(
    lg: Ledger, name: str, *, on_progress: Callable[[float, str], None] | None = None,
    claimed: bool = False, timeout: float | None = REBUILD_TIMEOUT,
) -> dict[str, Any]:
    """Evaluate the view over the full log at the head tx M and store it as
    views/<name>/<M>.parquet (zstd) with a status file; returns the status. The evaluation is
    interrupted after `timeout` seconds, or when the view is dropped.

    `claimed`: the caller already called start_rebuild (the API does, to answer 202 at once).
    """
    if not claimed and not start_rebuild(lg, name):
        raise LedgerError(f"view {name!r} is already being rebuilt")
    root = lg.root
    with _building_lock:
        dropped = _building[(str(root), name)]
    previous = read_status(root, name) or {}
    started = time.monotonic()

    def progress(fraction: float, message: str) -> None:
        _write_status(root, name, {**previous, "state": "building", "progress": round(fraction, 3),
                                   "message": message})
        if on_progress is not None:
            on_progress(fraction, message)

    try:
        m = lg.head.tx
        defs = definitions(lg, as_of=m)
        if name not in defs:
            raise UnknownView(f"no view named {name!r}")
        version = defs[name]
        evaluating = f"evaluating {name} over the log as of tx {m}"
        progress(0.05, evaluating)
        with _using(defs):  # from the log itself, not from any materialization
            db = lg.as_of(m)
            select, cast = portable_select(db, name, timeout=timeout)
            table = db.sql(select, timeout=timeout, cancel=dropped,
                           progress=lambda done: progress(0.05 + 0.75 * done, evaluating))
        if cast:  # reads cast them back
            table = table.cast(pa.schema(
                [f.with_metadata({_DUCKDB_TYPE: cast[f.name].encode()}) if f.name in cast else f
                 for f in table.schema], metadata=table.schema.metadata))
        progress(0.8, f"writing {table.num_rows} rows")
        file = f"{m}.parquet"
        _write_atomic(_dir(root, name) / file,
                      lambda p: pq.write_table(table, p, compression="zstd"))
        status = {
            **previous, "name": name, "state": "ready", "tx": m, "definition_tx": version.tx,
            "file": file, "rows": table.num_rows, "incremental": incremental(version.sql),
            "seconds": round(time.monotonic() - started, 3), "finished": _now(), "progress": 1.0,
            "message": None, "error": None,
        }
        _write_status(root, name, status)
        for old in _dir(root, name).glob("*.parquet"):
            if old.name != file:
                old.unlink(missing_ok=True)  # readers holding it open keep reading (POSIX)
        if on_progress is not None:
            on_progress(1.0, "done")
        return status
    except BaseException as e:
        if dropped.is_set():  # no status to keep for a view that is gone
            shutil.rmtree(_dir(root, name), ignore_errors=True)
            raise
        failed = {**previous, "state": "failed", "error": f"{type(e).__name__}: {e}",
                  "finished": _now(), "seconds": round(time.monotonic() - started, 3)}
        with contextlib.suppress(OSError):
            _write_status(root, name, failed)
        raise
    finally:
        with _building_lock:
            _building.pop((str(root), name), None)


def status(lg: Ledger, name: str) -> dict[str, Any]:
    """The view's materialization: state none|building|ready|stale|failed, tx, rows, progress..."""
    version = definition(lg, name)
    st = read_status(lg.root, name) or {}
    state = st.get("state", "none")
    # Only the writer rebuilds: if this process is the writer and is not building it, whoever was
    # went away (a crash mid-rebuild). A reader can only guess, from the claim's age.
    if state == "building" and not building(lg, name) and (not lg.read_only or _stale_claim(st)):
        state = "failed"  # the process that was building it went away
        st = {**st, "error": st.get("error") or "the rebuild was interrupted: the process running it stopped"}
    out: dict[str, Any] = {
        "state": state, "tx": st.get("tx"), "rows": st.get("rows"), "progress": st.get("progress"),
        "seconds": st.get("seconds"), "started": st.get("started"), "finished": st.get("finished"),
        "incremental": st.get("incremental"), "error": st.get("error"), "message": st.get("message"),
    }
    if st.get("definition_tx") is not None and st.get("definition_tx") != version.tx:
        out["state"] = "stale" if state == "ready" else state
        out["note"] = "the view was redefined after this materialization; rebuild it"
    elif state == "ready" and not st.get("incremental") and lg.head.tx > int(st["tx"]):
        out["state"] = "stale"
    return out


def refresh_stale(lg: Ledger, min_interval_s: float) -> list[str]:
    """Rebuild the materialized views that fell behind (SQL that cannot be kept fresh
    incrementally, or a redefinition), each at most every `min_interval_s` seconds and never more
    than a tenth of the time (a view that took 8 s waits 80 s). Returns the names rebuilt."""
    done = []
    for name in sorted(definitions(lg)):
        if status(lg, name)["state"] != "stale":
            continue
        last = read_status(lg.root, name) or {}
        with contextlib.suppress(KeyError, TypeError, ValueError):
            age = (datetime.now(UTC) - datetime.fromisoformat(last["finished"])).total_seconds()
            if age < max(min_interval_s, 10 * float(last.get("seconds") or 0)):
                continue
        if start_rebuild(lg, name):
            rebuild(lg, name, claimed=True)
            done.append(name)
    return done


def _stale_claim(st: Mapping[str, Any]) -> bool:
    started = st.get("started")
    if not isinstance(started, str):
        return True
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds()
    except ValueError:
        return True
    return age > 24 * 3600


def describe(lg: Ledger, name: str) -> dict[str, Any]:
    """Definition, version and materialization status of one view (what GET /views/{name} says)."""
    version = definition(lg, name)
    versions = [v for v in history(lg, name) if not v.dropped]
    return {**version.as_dict(), "versions": len(versions), "materialization": status(lg, name)}
