"""The Ledger: one writer appending transactions to DuckDB, sealing them into Parquet, and handing
out immutable Database values for reads."""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import operator
import os
import re
import resource
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import duckdb
import pyarrow as pa

from ledger import chain, datoms
from ledger.datoms import DEFAULT_DELETION, DEFAULT_ENTITY_PATH, Rules
from ledger.errors import (
    ConfigMismatch,
    CorruptLedger,
    InvalidRecord,
    LedgerError,
    LedgerLocked,
    ReadOnly,
)
from ledger.records import (
    NewRecord,
    OffsetMark,
    Quarantined,
    Record,
    Transaction,
    TxReport,
    VerifyReport,
    check_json,
    dumps,
    loads,
    plain,
    validate,
)
from ledger.storage import index as idx
from ledger.storage import segments as seg
from ledger.storage.catalog import (
    CATALOG_DDL,
    INDEX_COLUMNS,
    RELATIONS,
    STATE_COLUMNS,
    TAIL_TABLES,
    Files,
    columns,
    entities_file,
    latest_datoms_sql,
    quote,
    state_sql,
    tail_datoms_ddl,
    union_sql,
)
from ledger.temporal import DEFAULT_TIMEOUT, Database, Pin, TimePoint, check_time_point

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)
DB_FILE = "ledger.duckdb"
DEFAULT_SEAL_EVERY = 250_000
# How long a writer's open waits for the file lock: a read-only snapshot holds it while it copies
# the tail (briefly), a writer for good.
LOCK_WAIT_S = 2.0
# Column types as Arrow types. Timestamps travel as epoch microseconds (ints), which Arrow turns
# into timestamps without a per-value conversion; UUIDs as text (DuckDB casts on insert).
_ARROW = {
    "BIGINT": pa.int64(), "INTEGER": pa.int32(), "VARCHAR": pa.string(), "JSON": pa.string(),
    "TIMESTAMPTZ": pa.int64(), "BOOLEAN": pa.bool_(), "BLOB": pa.binary(), "UUID": pa.string(),
}
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def index_attrs(
    rules: Rules, held: set[str], action: str, data: dict[str, Any], text: str,
) -> tuple[dict[str, Any], str]:
    """The attrs (and their JSON text) the writer indexes for one event of an entity holding
    `held` (updated): the record's own data and text, or for a deletion a null per held attribute."""
    if rules.is_deletion(action):
        attrs: dict[str, Any] = dict.fromkeys(sorted(held))
        text = dumps(attrs)
    else:
        attrs = data
    for a, v in datoms.attributes(attrs, rules.entity_key):
        (held.discard if v is None else held.add)(a)
    return attrs, text


def _micros(t: datetime) -> int:
    return (t - _EPOCH) // _US
OffsetKey = tuple[str, str, int]  # (consumer, topic, partition)
Listener: TypeAlias = "Callable[[TxReport, Sequence[NewRecord]], None]"


@dataclass(frozen=True, slots=True)
class Head:
    tx: int
    tx_time: datetime
    hash: str


_EMPTY_HEAD = Head(0, datetime.min.replace(tzinfo=UTC), chain.GENESIS)


def _arrow_column(values: list[Any], sql_type: str) -> pa.Array:
    arr = pa.array(values, type=_ARROW[sql_type])
    return arr.cast(_TIMESTAMP) if sql_type == "TIMESTAMPTZ" else arr


# Below this many rows, bound parameters beat registering an Arrow table (measured, 300-byte
# commands: 1 row 5.6 vs 8.3 ms a tx, 5 rows 7.6 vs 7.9, 40 rows 21.0 vs 10.9).
_SMALL_BATCH = 8


def _arrow_table(cols: Sequence[tuple[str, str]], rows: Mapping[str, list[Any]]) -> pa.Table | None:
    """Column lists (timestamps as epoch microseconds) as an Arrow table to insert; None for a
    batch small enough for bound parameters."""
    if len(rows["tx"]) < _SMALL_BATCH:
        return None
    return pa.table({c: _arrow_column(rows[c], t.split()[0]) for c, t in cols})


def _insert(
    con: duckdb.DuckDBPyConnection, table: str, cols: Sequence[tuple[str, str]],
    rows: Mapping[str, list[Any]], batch: pa.Table | None,
) -> None:
    """Insert column lists into `table`, in one statement: `batch` (their `_arrow_table`) or,
    when None, bound parameters."""
    if batch is not None:
        con.register("_batch", batch)
        con.execute(f"INSERT INTO {table} SELECT * FROM _batch")
        con.unregister("_batch")
        return
    n = len(rows["tx"])
    marks = ["make_timestamp(?::BIGINT)" if t.startswith("TIMESTAMPTZ") else "?" for _, t in cols]
    row = "(" + ", ".join(marks) + ")"
    con.execute(
        f"INSERT INTO {table} VALUES " + ", ".join([row] * n),
        [rows[c][i] for i in range(n) for c, _ in cols],
    )


# Data dirs this process has open for writing: DuckDB lets one process connect to a file twice, which
# would make two writers (two heads, the same tx numbers) out of one.
_WRITERS: weakref.WeakValueDictionary[Path, Ledger] = weakref.WeakValueDictionary()
_WRITERS_LOCK = threading.Lock()  # held while a writer opens


@atexit.register
def _close_writers() -> None:
    """Close the writers left open at exit: a seal under way on its (daemon) thread finishes first.
    Left running into the interpreter's finalization, it aborted the process (SIGABRT)."""
    for lg in list(_WRITERS.values()):
        try:
            lg.close()
        except Exception:
            log.exception("closing %s at exit", lg.root)


def _lock_holder(error: duckdb.Error) -> str:
    m = re.search(r"PID (\d+)", str(error))
    return m.group(1) if m else "unknown"


class Ledger:
    """An append-only ledger in one data directory. One writer per directory; any number of readers.

    Open with `Ledger.open(path)`. Reads go through `Database` values (`as_of`, `since`) or the
    shortcuts here, which read the latest transaction.
    """

    def __init__(
        self, root: Path, con: duckdb.DuckDBPyConnection, *, read_only: bool,
        seal_every: int, complete: bool = True, note: str | None = None,
    ) -> None:
        self.root = root
        self.read_only = read_only
        self.seal_every = seal_every
        self.complete = complete  # False: a snapshot of sealed segments only (a writer holds the tail)
        self.note = note
        self._con = con
        self._write_lock = threading.Lock()
        self._seal_lock = threading.Lock()  # one seal at a time; appends go on while it writes
        self._sealer: threading.Thread | None = None
        # Snapshots using each entity state checkpoint: a superseded one is deleted once unused.
        self._state_lock = threading.Lock()
        self._state_users: Counter[str] = Counter()
        self._state_retired: set[str] = set()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._closed = False
        meta = dict(con.execute("SELECT key, value FROM ledger_meta").fetchall())
        if json.loads(meta["format"]) != seg.FORMAT:
            raise CorruptLedger(
                f"{root} holds a {json.loads(meta['format'])} ledger; this version reads "
                f"{seg.FORMAT} (export it with the version that wrote it)"
            )
        self.rules = Rules(json.loads(meta["entity_path"]), json.loads(meta["deletion"]))
        con.execute(tail_datoms_ddl(self.rules.entity_key))
        self.damaged: str | None = None  # why the newest tx cannot be read (appends refused)
        self._head = self._read_head()
        # The entity index (ledger.storage.index) is the writer's; snapshots scan the datoms.
        self._index = None if read_only else idx.open_index(root / idx.FILE)
        self.indexed = not read_only
        self._listeners: list[Listener] = []
        self._tail_records = self._tail_count()

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Call `fn(report, stored)` after every committed append, in the writer's thread, with
        the records the tx stored; returns a function that removes it. Listeners must be quick
        and must not raise."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, read_only: bool = False,
        entity_path: str | None = None, deletion: str | None = None,
        seal_every: int = DEFAULT_SEAL_EVERY,
    ) -> Ledger:
        """Open the ledger in `path` for writing, creating it if missing.

        `read_only=True` gives a consistent snapshot that never blocks a writer (and never creates
        a ledger: CorruptLedger when `path` holds none): the catalog and tail are copied into
        memory and the file lock is released at once; if a writer holds the lock, the snapshot
        covers the sealed segments only (`complete` is False, `note` says so).
        """
        root = Path(path).resolve()  # segment paths handed to DuckDB must not depend on the cwd
        if seal_every < 1:
            raise LedgerError(f"seal_every must be at least 1, got {seal_every}")
        if root.exists() and not root.is_dir():
            raise LedgerError(f"{root} is a file, not a ledger's data directory")
        if glob := set(_GLOB).intersection(str(root)):
            # DuckDB reads file paths as patterns (a `d*` ledger read another ledger's files)
            raise LedgerError(f"the data directory's path {str(root)!r} holds {sorted(glob)[0]!r}, which "
                              "DuckDB would read as a file pattern; use a path without * ? [ ]")
        if read_only:
            return cls._open_snapshot(root, seal_every)
        root.mkdir(parents=True, exist_ok=True)
        with _WRITERS_LOCK:
            if root in _WRITERS:
                raise LedgerLocked(
                    f"ledger {root} is already open for writing in this process ({os.getpid()}); "
                    "use that Ledger, or open it with read_only=True for a snapshot"
                )
            ledger = _WRITERS[root] = cls._open_writer(root, seal_every, entity_path, deletion)
        return ledger

    @classmethod
    def _open_writer(
        cls, root: Path, seal_every: int, entity_path: str | None, deletion: str | None
    ) -> Ledger:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                con = duckdb.connect(str(root / DB_FILE))
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise CorruptLedger(f"cannot open {root / DB_FILE}: {e}") from e
                if time.monotonic() < deadline:  # maybe a snapshot copying the tail: brief
                    time.sleep(0.05)
                    continue
                raise LedgerLocked(
                    f"ledger {root} is being written by process {_lock_holder(e)}; open it with "
                    "read_only=True for a snapshot, or query it through that process's HTTP API"
                ) from e
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET parquet_metadata_cache = true")  # segments never change once written
            # A 10k-record tx writes ~10 MB of WAL; the 16 MiB default would checkpoint (rewrite the
            # indexes) every other commit. seal() checkpoints instead.
            con.execute("SET checkpoint_threshold = '1GB'")
            for ddl in CATALOG_DDL:
                con.execute(ddl)
            cls._settle_config(con, entity_path, deletion)
            registered = {r[0] for r in con.execute("SELECT dir FROM segments").fetchall()}
            seg.clean_orphans(root, registered)
            states = {f for (f,) in con.execute("SELECT file FROM entity_state").fetchall()}
            for gone in sorted(f for f in states if not all(
                    (root / seg.STATE_DIR / name).exists() for name in (f, entities_file(f)))):
                # deleted by hand, or written before checkpoints had their entities file
                con.execute("DELETE FROM entity_state WHERE file = ?", [gone])
                states.discard(gone)
            seg.clean_states(root, states | {entities_file(f) for f in states})
            ledger = cls(root, con, read_only=False, seal_every=seal_every)
        except BaseException:
            con.close()
            raise
        try:
            ledger._write_manifest()
            ledger._catch_up_index()
        except BaseException:
            ledger.close()
            raise
        _confine(con, root)
        return ledger

    @staticmethod
    def _settle_config(
        con: duckdb.DuckDBPyConnection, entity_path: str | None, deletion: str | None
    ) -> None:
        wanted = {"entity_path": entity_path, "deletion": deletion}
        stored = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM ledger_meta").fetchall()}
        if not stored:
            rules = Rules(DEFAULT_ENTITY_PATH if entity_path is None else entity_path,
                          DEFAULT_DELETION if deletion is None else deletion)
            con.executemany(
                "INSERT INTO ledger_meta VALUES (?, ?)",
                [["format", json.dumps(seg.FORMAT)], ["entity_path", json.dumps(rules.entity_path)],
                 ["deletion", json.dumps(rules.deletion)],
                 ["created_at", json.dumps(datetime.now(UTC).isoformat())]],
            )
            return
        for key, value in wanted.items():
            if value is not None and stored.get(key) != value:
                raise ConfigMismatch(
                    f"this ledger was created with {key}={stored.get(key)!r}; it cannot be "
                    f"reopened with {value!r} (that would change the meaning of its history)"
                )

    @classmethod
    def _open_snapshot(cls, root: Path, seal_every: int) -> Ledger:
        db_file = root / DB_FILE
        if not db_file.exists():
            raise CorruptLedger(f"no ledger at {root} (missing {DB_FILE})")
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET parquet_metadata_cache = true")
        for ddl in CATALOG_DDL:
            con.execute(ddl)
        copied = ["ledger_meta", "segments", "offsets", *TAIL_TABLES]
        if root in _WRITERS:  # DuckDB refuses to attach a file this process has open: the segments only
            return cls._open_sealed_only(root, con, seal_every, str(os.getpid()))
        try:
            con.execute(f"ATTACH {quote(str(db_file))} AS src (READ_ONLY)")
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                con.close()
                raise CorruptLedger(f"cannot open {db_file}: {e}") from e
            return cls._open_sealed_only(root, con, seal_every, _lock_holder(e))
        try:
            con.execute("BEGIN TRANSACTION")
            for table in copied:
                con.execute(f"INSERT INTO {table} SELECT * FROM src.{table}")
            con.execute("COMMIT")
        finally:
            con.execute("DETACH src")
        _confine(con, root)
        return cls(root, con, read_only=True, seal_every=seal_every)

    @classmethod
    def _open_sealed_only(
        cls, root: Path, con: duckdb.DuckDBPyConnection, seal_every: int, pid: str
    ) -> Ledger:
        try:
            manifest = seg.read_manifest(root)
        except CorruptLedger:
            con.close()
            raise
        if manifest is None:
            con.close()
            raise LedgerLocked(
                f"ledger {root} is being written by process {pid} and has no manifest yet; "
                "query it through that process's HTTP API"
            )
        try:
            for key in ("format", "entity_path", "deletion"):
                con.execute("INSERT INTO ledger_meta VALUES (?, ?)", [key, json.dumps(manifest[key])])
            for s in manifest["segments"]:
                con.execute(
                    "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)",
                    [s["first_tx"], s["last_tx"], s["dir"], s["records"], json.dumps(s["files"]),
                     s["sealed_at"]],
                )
            sealed = manifest["segments"][-1]["last_tx"] if manifest["segments"] else 0
        except (KeyError, TypeError, IndexError, duckdb.Error) as e:
            con.close()
            raise CorruptLedger(
                f"ledger {root} is being written by process {pid}, and its {seg.MANIFEST} is not a "
                f"ledger manifest ({type(e).__name__}: {e}); query it through that process's HTTP "
                "API (its next seal rewrites the manifest)"
            ) from e
        note = (
            f"process {pid} is writing this ledger; this snapshot holds its sealed segments "
            f"(through tx {sealed}) but not newer transactions — query the service for those"
        )
        _confine(con, root)
        return cls(root, con, read_only=True, seal_every=seal_every, complete=False, note=note)

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True  # no append or seal starts from here on
            sealer = self._sealer
        if sealer is not None:
            sealer.join()  # a seal under way finishes: nothing is left half-registered
        with self._write_lock:
            for cur in self._cursors:
                with suppress(duckdb.Error):
                    cur.close()
            self._con.close()
            if self._index is not None:
                self._index.close()
        if not self.read_only and _WRITERS.get(self.root) is self:
            del _WRITERS[self.root]

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writer"
        return f"<Ledger {str(self.root)!r} {mode} tx={self._head.tx}>"

    # ------------------------------------------------------------------------------------ reads
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor, for single-statement reads (each is atomic on its own)."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._con.cursor()
            cur.execute("SET TimeZone = 'UTC'")
            self._local.cursor = cur
            self._cursors.append(cur)
        return cur

    @contextmanager
    def snapshot(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, Files]]:
        """A cursor inside one DuckDB transaction, with the segment files that snapshot sees.

        The segment list and the tail are read in the same transaction, so a concurrent seal
        (which moves rows from the tail into a new segment atomically) can never be seen halfway.
        """
        if self._closed:
            raise LedgerError("the ledger is closed")
        cur = self._con.cursor()
        files = Files()
        try:
            cur.execute("SET TimeZone = 'UTC'")
            with self._state_lock:  # a seal retiring the checkpoint this snapshot sees waits
                cur.execute("BEGIN TRANSACTION")
                segments = cur.execute("SELECT dir, last_tx FROM segments ORDER BY first_tx").fetchall()
                states = cur.execute("SELECT tx, file FROM entity_state ORDER BY tx").fetchall()
                self._state_users.update(f for _, f in states)
                files.states = tuple((tx, str(self.root / seg.STATE_DIR / f)) for tx, f in states)
            dirs = [d for d, _ in segments]
            files.sealed_through, files.cursor = (segments[-1][1] if segments else 0), cur
            base = self.root / seg.SEGMENTS_DIR
            files.update({rel: [str(base / d / f"{rel}.parquet") for d in dirs] for rel in RELATIONS})
            yield cur, files
        finally:
            with suppress(duckdb.Error):
                cur.execute("ROLLBACK")  # reads only; also discards anything a query tried to write
            cur.close()
            if files.states:
                with self._state_lock:
                    self._state_users.subtract(Path(path).name for _, path in files.states)
                    self._drop_retired_states()

    @property
    def head(self) -> Head:
        return self._head

    def _read_head(self) -> Head:
        # The tail holds the newest txs; only when it is empty is the head in the last segment.
        # Reading no other segment keeps open() (and so verify()) working when one is damaged.
        newest = "SELECT tx, tx_time, hash FROM {} ORDER BY tx DESC LIMIT 1"
        with self.snapshot() as (cur, files):
            try:
                row = cur.execute(newest.format("tail_transactions")).fetchone()
                if row is None and files["transactions"]:
                    last = f"read_parquet({quote(files['transactions'][-1])})"
                    row = cur.execute(newest.format(last)).fetchone()
            except duckdb.Error as e:  # a damaged or missing segment file
                error = str(e).strip().splitlines()[0]
            else:
                return _EMPTY_HEAD if row is None else Head(row[0], row[1].astimezone(UTC), row[2])
        # Open anyway, so that verify() can name the damage; an append would break the chain.
        with self.snapshot() as (cur, _):
            found = cur.execute("SELECT first_tx, last_tx FROM segments ORDER BY first_tx DESC LIMIT 1")
            first_tx, last_tx = found.fetchone() or (0, 0)
        self.damaged = f"the last segment (txs {first_tx}-{last_tx}) cannot be read: {error}"
        log.error("ledger %s: %s; appends are refused until it is restored", self.root, self.damaged)
        return Head(last_tx, datetime.max.replace(tzinfo=UTC), "unreadable")

    def resolve(self, t: TimePoint) -> int:
        """A time point as a tx number: the latest tx committed at or before an instant."""
        point = check_time_point(t, "time")
        if isinstance(point, int):
            return point
        with self.snapshot() as (cur, files):
            txs = union_sql("transactions", files["transactions"], where="tx_time <= $t")
            row = cur.execute(
                f"SELECT coalesce(max(tx), 0) FROM ({txs})", {"t": point},
            ).fetchone()
        return int(row[0]) if row else 0

    def db(self) -> Database:
        """The latest database value."""
        return Database(self, Pin(basis=self._head.tx))

    def as_of(self, t: TimePoint) -> Database:
        return self.db().as_of(t)

    def since(self, t: TimePoint) -> Database:
        return self.db().since(t)

    def _at(self, as_of: TimePoint | None) -> Database:
        return self.db() if as_of is None else self.as_of(as_of)

    def entity(
        self, e: str, *, as_of: TimePoint | None = None, valid_at: datetime | str | None = None
    ) -> dict[str, Any] | None:
        return self._at(as_of).entity(e, valid_at=valid_at)

    def history(
        self, e: str, *, since: TimePoint | None = None, until: TimePoint | None = None
    ) -> list[Any]:
        return self.db().history(e, since=since, until=until)

    def sql(
        self, query: str, *, as_of: TimePoint | None = None, valid_at: datetime | str | None = None,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT, limit: int | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> pa.Table:
        return self._at(as_of).sql(query, params=params, valid_at=valid_at, timeout=timeout, limit=limit,
                                   progress=progress)

    def tx_range(self, start: TimePoint | None = None, end: TimePoint | None = None) -> list[Transaction]:
        """Transactions with start <= tx < end (Datomic's tx-range), each with its records."""
        lo = 0 if start is None else self._first_tx_from(start)
        hi = self._head.tx + 1 if end is None else self._first_tx_from(end)
        where = f"tx >= {lo} AND tx < {hi}"
        with self.snapshot() as (cur, files):
            txs = cur.execute(
                f"SELECT tx, tx_time, hash, prev_hash, meta, quarantine_count FROM "
                f"({union_sql('transactions', files['transactions'], where=where)}) ORDER BY tx"
            ).fetchall()
            recs = cur.execute(
                f"SELECT * FROM ({union_sql('records', files['records'], where=where)}) ORDER BY tx, seq"
            ).fetchall()
        by_tx: dict[int, list[Record]] = {}
        for row in recs:
            by_tx.setdefault(row[0], []).append(_record(row))
        return [
            Transaction(tx=t, tx_time=tt.astimezone(UTC), hash=h, prev_hash=p, meta=json.loads(m),
                        records=tuple(by_tx.get(t, ())), quarantined=q)
            for t, tt, h, p, m, q in txs
        ]

    def _first_tx_from(self, t: TimePoint) -> int:
        """The first tx at or after a time point: itself for a tx number; for an instant, the first
        tx committed at or after it (resolve() gives the last one before it)."""
        point = check_time_point(t, "time")
        if isinstance(point, int):
            return point
        return 1 if point == datetime.min.replace(tzinfo=UTC) else self.resolve(point - _US) + 1

    def offsets(self, consumer: str) -> dict[tuple[str, int], OffsetMark]:
        """Where `consumer` stands per (topic, partition), as committed with the records."""
        with self.snapshot() as (cur, _):
            rows = cur.execute(
                "SELECT topic, partition, next_offset, generation, last_digest FROM offsets "
                "WHERE consumer = ? QUALIFY row_number() OVER (PARTITION BY topic, partition "
                "ORDER BY tx DESC) = 1", [consumer]
            ).fetchall()
        return {(t, p): OffsetMark(o, g, d) for t, p, o, g, d in rows}

    def digest(self) -> dict[str, Any]:
        """The latest transaction's number, time and hash: publish it to pin the history."""
        h = self._head
        return {"tx": h.tx, "tx_time": h.tx_time.isoformat() if h.tx else None, "hash": h.hash}

    # ----------------------------------------------------------------------------------- writes
    def append(
        self, records: Iterable[Mapping[str, Any]], meta: Mapping[str, Any] | None = None, *,
        quarantine: Sequence[Quarantined] = (), offsets: Mapping[OffsetKey, OffsetMark] | None = None,
    ) -> TxReport:
        """Append records as one atomic transaction.

        Records whose id is already stored (or repeated in this batch) are not stored again and
        are listed in the report's `duplicates`. `quarantine` (raw input that could not become a
        record) and `offsets` ({(consumer, topic, partition): OffsetMark}) commit in the same
        transaction, which is what makes Kafka ingestion exactly-once.
        """
        if records is None or isinstance(records, (str, bytes, Mapping)):
            raise LedgerError(f"records must be a list of mappings, got {type(records).__name__}")
        if meta is not None and not isinstance(meta, Mapping):
            raise LedgerError(f"meta must be a JSON object, got {type(meta).__name__}")
        checked = [validate(i, r) for i, r in enumerate(records)]
        meta_obj = dict(meta or {})
        try:
            check_json(meta_obj, "meta")
        except ValueError as e:
            raise LedgerError(f"meta must be a JSON object: {e}") from e
        meta_obj = plain(meta_obj)
        if self.read_only:
            raise ReadOnly("this ledger was opened read-only")
        if self.damaged is not None:
            raise CorruptLedger(f"cannot append to {self.root}: {self.damaged} (ledger verify)")
        with self._write_lock:
            if self._closed:
                raise LedgerError("the ledger is closed")
            report, stored = self._commit(checked, meta_obj, quarantine, offsets or {})
            self._tail_records += len(stored)
            tail = self._tail_records
        for fn in list(self._listeners):
            fn(report, stored)
        if tail >= self.seal_every:
            self._seal_in_background()
        return report

    def _seal_in_background(self) -> None:
        """Start a seal on its own thread unless one is running: writing the Parquet files takes
        seconds (3.2 s for 250k records here), and appends need not wait for it."""
        with self._write_lock:
            if self._closed or (self._sealer is not None and self._sealer.is_alive()):
                return
            self._sealer = threading.Thread(target=self._seal_quietly, name="ledger-seal", daemon=True)
            self._sealer.start()

    def _seal_quietly(self) -> None:
        try:
            while self.seal() is not None:  # again if appends filled the tail meanwhile
                with self._write_lock:
                    if self._closed or self._tail_records < self.seal_every:
                        return
        except Exception:
            if not self._closed:  # (closing stops a seal that had not started: nothing to say)
                log.exception("sealing failed; the transactions stay in the tail (readable) and "
                              "the next append tries again")

    def _commit(
        self, checked: list[NewRecord], meta: dict[str, Any],
        quarantine: Sequence[Quarantined], offsets: Mapping[OffsetKey, OffsetMark],
    ) -> tuple[TxReport, list[NewRecord]]:
        head = self._head
        tx = head.tx + 1
        # Strictly increasing even if the wall clock steps back.
        tx_time = max(datetime.now(UTC), head.tx_time + timedelta(microseconds=1))
        unique = checked
        duplicates: list[NewRecord] = []
        if len({r.id for r in checked}) < len(checked):  # an id repeated in the batch
            seen: set[str] = set()
            unique = []
            for r in checked:
                (duplicates if r.id in seen else unique).append(r)
                seen.add(r.id)
        con = self._con
        staged = False
        con.execute("BEGIN TRANSACTION")
        try:
            stored = unique
            # One string, not a list of 10,000 (each a Value to convert: 34 -> 25 ms a tx, measured);
            # validated ids hold no comma.
            insert_ids = "INSERT INTO record_ids SELECT unnest(string_split($ids, ','))::UUID"
            ids = {"ids": ",".join([r.id for r in unique])}
            try:
                if unique:
                    con.execute(insert_ids, ids)
            except duckdb.ConstraintException:  # some were stored before (a redelivery)
                # Rare, so the common path skips ON CONFLICT (measured: ~2 ms a tx).
                con.execute("ROLLBACK")
                con.execute("BEGIN TRANSACTION")
                fresh = {
                    str(r[0]) for r in
                    con.execute(f"{insert_ids} ON CONFLICT DO NOTHING RETURNING id", ids).fetchall()
                }
                stored = [r for r in unique if r.id in fresh]
                duplicates += [r for r in unique if r.id not in fresh]
            if duplicates:
                self._refuse_conflicts(checked, duplicates)
            tx_us = _micros(tx_time)
            rec_rows, rec_hashes = _record_rows(stored, tx, tx_us)
            index_rows = self._index_rows(con, stored, tx, tx_us, rec_rows["valid_time"])
            q_rows, q_hashes = _quarantine_rows(quarantine, tx)
            tx_hash = chain.tx_hash(
                tx=tx, tx_us=tx_us, prev_hash=head.hash, meta=meta,
                record_hashes=rec_hashes, quarantine_hashes=q_hashes,
            )
            tx_rows: dict[str, list[Any]] = {
                "tx": [tx], "tx_time": [tx_us], "prev_hash": [head.hash], "hash": [tx_hash],
                "record_count": [len(stored)], "quarantine_count": [len(q_hashes)],
                "meta": [dumps(meta)],
            }
            inserts = [
                (table, cols, rows, _arrow_table(cols, rows)) for table, cols, rows in (
                    ("tail_records", RELATIONS["records"], rec_rows),
                    ("tail_quarantine", RELATIONS["quarantine"], q_rows),
                    ("tail_transactions", RELATIONS["transactions"], tx_rows),
                    ("tail_index", INDEX_COLUMNS, index_rows),
                ) if rows["tx"]
            ]
            # The index's worker starts once the Arrow tables are built: it needs the GIL, which
            # building them holds and DuckDB's inserts and commit release (measured at 10k records
            # a tx: +9% records/s).
            staged = self._stage_index(zip(*(index_rows[c] for c, _ in INDEX_COLUMNS), strict=True))
            for table, cols, rows, batch in inserts:
                _insert(con, table, cols, rows, batch)
            if offsets:
                values = [[c, t, p, m.next_offset, m.generation, m.last_digest, tx]
                          for (c, t, p), m in offsets.items()]
                con.execute(
                    "INSERT INTO offsets VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(values)),
                    [v for row in values for v in row],
                )
            con.execute("COMMIT")
        except BaseException:
            with suppress(duckdb.Error):
                con.execute("ROLLBACK")
            if staged and self._index is not None:
                self._index.abort()
            raise
        if staged:
            self._commit_index(tx)
        self._head = Head(tx, tx_time, tx_hash)
        report = TxReport(
            tx=tx, tx_time=tx_time, hash=tx_hash, ids=tuple(rec_rows["id"]),
            duplicates=tuple(r.id for r in duplicates), quarantined=len(q_hashes),
        )
        return report, stored

    def _refuse_conflicts(self, checked: list[NewRecord], duplicates: list[NewRecord]) -> None:
        """InvalidRecord for the first duplicate that is not the record already stored (or first
        in the batch) under its id: another kind, action, parent or data. A repeat is dropped; a
        different record reusing an id would otherwise vanish without a trace."""
        ids = ",".join(sorted({r.id for r in duplicates}))
        first: dict[str, tuple[Any, ...]] = {
            row["id"]: (row["kind"], row["action"], row["parent"], chain.data_hash(loads(row["data"])))
            for row in self.db().sql(
                "SELECT id, kind, action, parent, data FROM log "
                "WHERE id IN (SELECT unnest(string_split($ids, ',')))", params={"ids": ids}, timeout=None,
            ).to_pylist()
        }
        where = dict.fromkeys(first, "already in the ledger")
        dup = {id(r) for r in duplicates}
        for i, r in enumerate(checked):
            content = (r.kind, r.action, r.parent, chain.data_hash(r.data))
            if id(r) not in dup:
                first.setdefault(r.id, content)
            elif first.get(r.id, content) != content:
                raise InvalidRecord(i, "id", f"{r.id} is {where.get(r.id, 'earlier in this batch')} as "
                                             "another record (kind, action, parent or data differ)")

    def _index_rows(
        self, con: duckdb.DuckDBPyConnection, stored: list[NewRecord], tx: int, tx_us: int,
        valid_us: list[int],
    ) -> dict[str, list[Any]]:
        """One entity index row per event that names an entity (see ledger.datoms)."""
        rules, key = self.rules, self.rules.entity_key
        entity_of = rules.entity_of
        rows: dict[str, list[Any]] = {c: [] for c, _ in INDEX_COLUMNS}
        es, seqs, vts = rows["e"], rows["seq"], rows["valid_time"]
        rids, attrs = rows["record_id"], rows["attrs"]
        deletions = {a for a in {r.action for r in stored} if rules.is_deletion(a)}
        earlier: dict[str, list[dict[str, Any]]] = {}  # e -> attrs of this tx's earlier events
        for seq, r in enumerate(stored):
            if r.kind != "event" or (e := entity_of(r.data)) is None:
                continue
            if r.action in deletions:
                has = datoms.current([*self._committed_attrs(e), *earlier.get(e, ())], key)
                retract = dict.fromkeys(sorted(has))
                earlier.setdefault(e, []).append(retract)
                attrs.append(dumps(retract))
            else:
                if deletions:  # only a deletion reads `earlier`
                    earlier.setdefault(e, []).append(r.data)
                attrs.append(r.data_json)
            es.append(e)
            seqs.append(seq)
            vts.append(valid_us[seq])
            rids.append(r.id)
        rows["tx"] = [tx] * len(es)
        rows["tx_time"] = [tx_us] * len(es)
        return rows

    def _committed_attrs(self, e: str) -> list[dict[str, Any]]:
        """The attrs of entity e's committed events, in order (to expand a deletion)."""
        if self.indexed and self._index is not None:
            return [loads(row[5]) for row in self._index.rows(e)]
        by_event: dict[tuple[int, int], dict[str, Any]] = {}
        for a, v, _op, tx, seq, *_ in self.db()._datoms_of(e, Pin(basis=self._head.tx)):
            by_event.setdefault((tx, seq), {})[a] = v
        return list(by_event.values())

    def index_rows(self, e: str) -> list[tuple[Any, ...]]:
        """(tx, seq, valid_us, tx_us, record_id, attrs) of entity e from the entity index."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        if self._index is None:
            raise LedgerError("this ledger has no entity index (a read-only snapshot)")
        return self._index.rows(e)

    def _stage_index(self, rows: Iterable[idx.IndexRow]) -> bool:
        """Start writing a tx's index rows while DuckDB commits it; False when there is no index."""
        if self._index is None or not self.indexed:
            return False
        self._index.stage(rows)
        return True

    def _commit_index(self, tx: int) -> None:
        """After the DuckDB commit, the index's. A failure leaves the tx committed, and reads
        scan the datoms until the next open catches the index up."""
        assert self._index is not None
        try:
            self._index.commit(tx)
        except Exception as e:  # the tx is committed: append() must not report it as failed
            log.error("entity index update failed (%s); entity reads scan until the ledger reopens", e)
            self.indexed = False

    def _catch_up_index(self) -> None:
        """Add to the entity index what it lacks: rows of txs after its `through` mark, from the
        sealed datoms and the tail. A mark beyond the head means another history: rebuild."""
        index, head = self._index, self._head.tx
        if index is None:
            return
        through = index.through()
        if through > head:
            log.warning("entity index is ahead of the ledger (tx %s > %s); rebuilding it", through, head)
            index.clear()
            through = 0
        if through == head:
            return
        rules, key = self.rules, self.rules.entity_key
        held: dict[str, set[str]] = {}  # entity -> attributes it holds, as the rows are derived
        with self.snapshot() as (cur, files):
            if files["records"]:  # sealed: derived from the records, exactly as the writer did
                paths = ", ".join(quote(f) for f in files["records"])
                result = cur.execute(
                    "SELECT tx, seq, id, action, data, epoch_us(valid_time), epoch_us(tx_time) "
                    f"FROM read_parquet([{paths}]) WHERE tx > {through} AND kind = 'event' ORDER BY tx, seq"
                )
                while batch := result.fetchmany(100_000):
                    rows = []
                    for tx, seq, rid, action, text, vus, tus in batch:
                        data = loads(text)
                        if (e := rules.entity_of(data)) is None:
                            continue
                        if e not in held:  # what its rows up to `through` left it holding
                            held[e] = datoms.current((loads(r[5]) for r in index.rows(e)), key)
                        _, attrs = index_attrs(rules, held[e], action, data, text)
                        rows.append((e, tx, seq, vus, tus, rid, attrs))
                    index.add(rows, through)  # `through` moves only once every row is in
            tail = cur.execute(
                "SELECT e, tx, seq, epoch_us(valid_time), epoch_us(tx_time), CAST(record_id AS VARCHAR), "
                f"attrs FROM tail_index WHERE tx > {through}"
            )
            while batch := tail.fetchmany(100_000):
                index.add(batch, through)
        index.add((), head)

    def _tail_count(self) -> int:
        row = self._con.execute("SELECT count(*) FROM tail_records").fetchone()
        return int(row[0]) if row else 0

    def seal(self) -> int | None:
        """Move every tail transaction into a new immutable Parquet segment; returns its last tx.

        Appends go on while the segment's files are written (from committed, unchanging rows);
        they wait only while the segment is registered and the tail rows it holds are dropped."""
        if self.read_only:
            raise ReadOnly("this ledger was opened read-only")
        with self._seal_lock:
            with self._write_lock:
                if self._closed:
                    raise LedgerError("the ledger is closed")
                row = self._con.execute("SELECT min(tx), max(tx) FROM tail_transactions").fetchone()
                if row is None or row[0] is None:
                    return None
                cur = self._con.cursor()
            first, last = int(row[0]), int(row[1])
            try:
                cur.execute("SET TimeZone = 'UTC'")
                hashes = seg.write_segment(cur, self.root, first, last)
                count = cur.execute(
                    f"SELECT count(*) FROM tail_records WHERE tx BETWEEN {first} AND {last}"
                ).fetchone()
                old = next(iter(cur.execute(
                    "SELECT tx, file FROM entity_state ORDER BY tx DESC LIMIT 1").fetchall()), None)
                state = self._write_state(cur, old, first, last)
            finally:
                cur.close()
            with self._write_lock, self._state_lock:
                con = self._con
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute(
                        "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)",
                        [first, last, seg.segment_name(first, last), count[0] if count else 0,
                         json.dumps(hashes), datetime.now(UTC)],
                    )
                    for table in TAIL_TABLES:
                        con.execute(f"DELETE FROM {table} WHERE tx BETWEEN {first} AND {last}")
                    con.execute(
                        "DELETE FROM offsets o WHERE tx < (SELECT max(tx) FROM offsets l WHERE "
                        "l.consumer = o.consumer AND l.topic = o.topic AND l.partition = o.partition)"
                    )
                    superseded = state is not None and old is not None and self._superseded(old[0])
                    retired = old[1] if superseded and old is not None else None
                    if state is not None:
                        con.execute("INSERT INTO entity_state VALUES (?, ?)", [last, state])
                    if retired is not None:
                        con.execute("DELETE FROM entity_state WHERE file = ?", [retired])
                    con.execute("COMMIT")
                    self._tail_records = self._tail_count()
                except BaseException:
                    with suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
                if retired is not None:
                    self._state_retired.add(retired)
                    self._drop_retired_states()
                self._write_manifest()
                con.execute("CHECKPOINT")
            return last

    def _write_state(
        self, cur: duckdb.DuckDBPyConnection, old: tuple[int, str] | None, first: int, last: int
    ) -> str | None:
        """The entity state checkpoint at `last` (a new segment first..last being sealed): the
        previous checkpoint folded with the new datoms, or every sealed datom when there is none.
        None if it cannot be written: readers then keep the old one, or scan the datoms."""
        segs = self.root / seg.SEGMENTS_DIR
        new = [str(segs / seg.segment_name(first, last) / "datoms.parquet")]
        if old is not None and old[0] == first - 1:
            sources, previous = [str(self.root / seg.STATE_DIR / old[1]), *new], (old[1], new)
        else:
            dirs = [r[0] for r in cur.execute("SELECT dir FROM segments ORDER BY first_tx").fetchall()]
            sources, previous = [*(str(segs / d / "datoms.parquet") for d in dirs), *new], None
        try:
            return seg.write_state(cur, self.root, last, sources, previous)
        except (duckdb.Error, OSError):
            log.exception("the entity state checkpoint at tx %d was not written (entities reads "
                          "scan more datoms until the next seal writes one)", last)
            return None

    def _superseded(self, tx: int) -> bool:
        """Whether the checkpoint at `tx`, no longer the newest, goes (see seg.KEEP_STATE_EVERY)."""
        found = self._con.execute("SELECT count(*) FROM segments WHERE last_tx <= ?", [tx]).fetchall()
        return bool(found[0][0] % seg.KEEP_STATE_EVERY)

    def _drop_retired_states(self) -> None:
        """Delete superseded checkpoints no snapshot is reading (caller holds _state_lock)."""
        for name in [n for n in self._state_retired if not self._state_users[n]]:
            for file in (name, entities_file(name)):
                (self.root / seg.STATE_DIR / file).unlink(missing_ok=True)
            self._state_retired.discard(name)
            del self._state_users[name]

    def _write_manifest(self) -> None:
        con = self._con
        rows = con.execute(
            "SELECT first_tx, last_tx, dir, records, files, sealed_at FROM segments ORDER BY first_tx"
        ).fetchall()
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM ledger_meta").fetchall()}
        segments = [
            {"first_tx": f, "last_tx": la, "dir": d, "records": n,
             "files": json.loads(files), "sealed_at": at.isoformat()}
            for f, la, d, n, files, at in rows
        ]
        seg.write_manifest(self.root, {
            "format": meta["format"], "entity_path": meta["entity_path"],
            "deletion": meta["deletion"], "segments": segments,
            "relations": {r: [c for c, _ in cols] for r, cols in RELATIONS.items()},
        })

    # ---------------------------------------------------------------------------------- verify
    def verify(self) -> VerifyReport:
        """Recompute every record hash and the tx hash chain from the stored data, segment by
        segment and then the tail, and name the first transaction that does not match. The derived
        data is checked against the records too: the datoms each event yields, and the entity index."""
        # The index is read before the snapshot: every tx it holds is then in the snapshot too
        # (txs it does not hold yet, committed concurrently, are not compared). A snapshot reads
        # the file the writer keeps, and the checkpoints on disk: what the writer serves.
        try:
            index = (self._index.all_rows() if self.indexed and self._index is not None
                     else idx.read_all_rows(self.root / idx.FILE) if self.read_only else None)
        except sqlite3.Error as e:
            return VerifyReport(ok=False, checked=0, first_bad_tx=1, reason=(
                f"{idx.FILE} cannot be read: {e} (derived data: delete it and reopen to rebuild it)"))
        check = _ChainCheck(self.rules, index)
        with self.snapshot() as (cur, files):
            segs = cur.execute(
                "SELECT first_tx, dir, files FROM segments ORDER BY first_tx"
            ).fetchall()
            for first, d, file_hashes in segs:
                paths = {r: self.root / seg.SEGMENTS_DIR / d / f"{r}.parquet" for r in RELATIONS}
                missing = [r for r, p in paths.items() if not p.exists()]
                if missing:
                    return check.fail(first, f"segment {d}: {missing[0]}.parquet is missing")
                sources = {r: f"read_parquet({quote(str(p))})" for r, p in paths.items()}
                try:
                    if not check.source(cur, sources):
                        return check.report()
                except duckdb.Error as e:
                    return check.fail(first, f"segment {d} cannot be read: {e}")
                for relation, digest in json.loads(file_hashes).items():
                    if seg.sha256_file(paths[relation]) != digest:
                        return check.fail(first, f"segment {d}: {relation}.parquet was modified")
            if check.source(cur, {r: f"tail_{r}" for r in RELATIONS}):
                check.index_leftovers()
            if check.bad is None:
                _check_states(cur, files, self._states_on_disk(files) if self.read_only else files.states,
                              check)
        return check.report()

    def _states_on_disk(self, files: Files) -> tuple[tuple[int, str], ...]:
        """The entity state checkpoints in the data directory, through the snapshot's sealed tx
        (a snapshot's reads do not use them: the writer may retire one while it reads)."""
        found = []
        for path in (self.root / seg.STATE_DIR).glob("[0-9]*.parquet"):
            if path.stem.isdigit() and int(path.stem) <= files.sealed_through:
                found.append((int(path.stem), str(path)))
        return tuple(sorted(found))

    # ------------------------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        counts = self.sql(
            "SELECT (SELECT count(*) FROM log) AS records, (SELECT count(*) FROM commands) AS commands, "
            "(SELECT count(*) FROM events) AS events, (SELECT count(*) FROM datoms) AS datoms, "
            "(SELECT count(*) FROM quarantine) AS quarantined, "
            "(SELECT count(*) FROM transactions) AS transactions"
        ).to_pylist()[0]
        with self.snapshot() as (cur, _):
            segs = cur.execute("SELECT count(*), coalesce(max(last_tx), 0) FROM segments").fetchone()
        size = _bytes_under(self.root)
        return {
            "data_dir": str(self.root), **counts, **self.digest(),
            "segments": segs[0] if segs else 0, "sealed_through_tx": segs[1] if segs else 0,
            "bytes_on_disk": size, "complete": self.complete, "note": self.note,
        }


def _check_states(
    cur: duckdb.DuckDBPyConnection, files: Files, states: tuple[tuple[int, str], ...], check: _ChainCheck,
) -> None:
    """Each entity state checkpoint against the (already verified) datoms it summarises: the
    first against a fold of every datom through its tx, each next one against the one before it
    (checked) folded with the datoms in between; and its entities file against the checkpoint."""
    base, lo = "", 0
    for at, path in states:
        stored = f"SELECT {STATE_COLUMNS} FROM read_parquet({quote(path)})"
        newer = union_sql("datoms", files["datoms"], where=f"tx > {lo} AND tx <= {at}")
        expected = latest_datoms_sql(f"{base}SELECT {STATE_COLUMNS} FROM ({newer})")
        entities = f"SELECT e, state, tx, tx_time FROM read_parquet({quote(entities_file(path))})"
        per_entity = state_sql(f"SELECT e, a, v, tx, tx_time FROM read_parquet({quote(path)})")
        for what, found, derived in (("", stored, expected), (" (its entities file)", entities, per_entity)):
            try:
                row = cur.execute(
                    f"SELECT count(*), min(tx) FROM (({found} EXCEPT ALL {derived}) "
                    f"UNION ALL ({derived} EXCEPT ALL {found}))"
                ).fetchone()
            except duckdb.Error as e:
                if not Path(path).exists():
                    return  # retired meanwhile by the writer (another process)
                check.fail(at, f"the entity state checkpoint at tx {at}{what} cannot be read: {e}")
                return
            if row is not None and row[0]:
                check.fail(min(int(row[1]), at), (
                    f"the entity state checkpoint at tx {at}{what} does not match the datoms (derived "
                    f"data: delete {path} and reopen; the next seal writes a new one)"))
                return
        base, lo = f"{stored} UNION ALL ", at


def _bytes_under(root: Path) -> int:
    """Bytes of the files under root. A writer in another process may be sealing (its `.tmp-`
    directory comes and goes): what vanishes while we walk is not counted."""
    total = 0
    for folder, _dirs, files in os.walk(root):  # os.walk skips directories that vanish
        for name in files:
            with suppress(FileNotFoundError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


_GLOB = "*?[]"  # pattern characters in a DuckDB file path

# Of a process's memory limit, what DuckDB may use: the rest is for Python, Arrow results and
# the allocations DuckDB does not count (a list built by range() in one call, ...).
DUCKDB_SHARE_OF_LIMIT = 0.6


def _confine(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """No file access beyond the ledger's own segments and materialized views, whatever SQL a
    reader sends."""
    segments = (root / seg.SEGMENTS_DIR).resolve()
    views = (root / "views").resolve()  # materializations: ledger.views.VIEWS_DIR
    state = (root / seg.STATE_DIR).resolve()
    allowed = ", ".join(quote(str(d) + "/") for d in (segments, views, state))
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute("SET enable_external_access = false")
    soft, _hard = resource.getrlimit(resource.RLIMIT_DATA)  # ledger serve --memory-limit
    if soft != resource.RLIM_INFINITY:  # DuckDB spills to disk before the process hits it
        con.execute(f"SET memory_limit = '{int(soft * DUCKDB_SHARE_OF_LIMIT) >> 20}MiB'")


def _rows_by_tx(
    rows: duckdb.DuckDBPyConnection | Iterable[tuple[Any, ...]],
) -> Iterator[tuple[int, list[tuple[Any, ...]]]]:
    """Group (tx, ...) rows in tx order (an executed cursor, read in batches, or any iterable) into
    (tx, rows) without loading them all at once."""
    if isinstance(rows, duckdb.DuckDBPyConnection):
        cursor = rows
        rows = (row for batch in iter(lambda: cursor.fetchmany(10_000), []) for row in batch)
    for tx, group in itertools.groupby(rows, key=operator.itemgetter(0)):
        yield tx, list(group)


def _record(row: tuple[Any, ...]) -> Record:
    """A stored row as a Record, with its hash recomputed from the stored fields."""
    (tx, seq, rid, kind, action, parent, data, valid_time, tx_time, key, headers,
     topic, partition, offset, kafka_ts) = row
    data = json.loads(data)
    hdrs = tuple((k, v) for k, v in json.loads(headers)) if headers else ()
    valid_time = valid_time.astimezone(UTC)
    kafka_ts = None if kafka_ts is None else kafka_ts.astimezone(UTC)
    h = chain.record_hash(
        id=rid, kind=kind, action=action, parent=parent, data=data, valid_us=_micros(valid_time),
        key=key, headers=hdrs, topic=topic, partition=partition, offset=offset,
        kafka_us=None if kafka_ts is None else _micros(kafka_ts),
    )
    return Record(
        id=rid, kind=kind, action=action, data=data, valid_time=valid_time, tx=tx, seq=seq,
        tx_time=tx_time.astimezone(UTC), hash=h, parent=parent, key=key, headers=hdrs,
        topic=topic, partition=partition, offset=offset, kafka_timestamp=kafka_ts,
    )


_VERIFY_RECORD_COLUMNS = (
    "tx, seq, id, kind, action, parent, data, epoch_us(valid_time), key, headers, kafka_topic, "
    "kafka_partition, kafka_offset, epoch_us(kafka_timestamp)"
)


def _rehash(row: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """A stored record row (_VERIFY_RECORD_COLUMNS) -> its recomputed hash, and (seq, id, kind,
    action, data, data text, valid_us) for deriving its datoms."""
    (_tx, seq, rid, kind, action, parent, text, valid_us, key, headers, topic, partition, offset,
     kafka_us) = row
    data = loads(text)
    h = chain.record_hash(
        id=rid, kind=kind, action=action, parent=parent, data=data, valid_us=valid_us, key=key,
        headers=loads(headers) if headers else (), topic=topic, partition=partition, offset=offset,
        kafka_us=kafka_us,
    )
    return h, (seq, rid, kind, action, data, text, valid_us)


def _record_rows(
    stored: list[NewRecord], tx: int, tx_us: int
) -> tuple[dict[str, list[Any]], list[str]]:
    """Column lists of the records relation (timestamps in epoch microseconds) and their hashes."""
    n = len(stored)
    valid = [tx_us if r.valid_time is None else _micros(r.valid_time) for r in stored]
    kafka = [None if r.kafka_timestamp is None else _micros(r.kafka_timestamp) for r in stored]
    hashes = [
        chain.record_hash(
            id=r.id, kind=r.kind, action=r.action, parent=r.parent, data=r.data, valid_us=vus,
            key=r.key, headers=r.headers, topic=r.topic, partition=r.partition, offset=r.offset,
            kafka_us=kus,
        )
        for r, vus, kus in zip(stored, valid, kafka, strict=True)
    ]
    rows: dict[str, list[Any]] = {
        "tx": [tx] * n, "seq": list(range(n)), "id": [r.id for r in stored],
        "kind": [r.kind for r in stored], "action": [r.action for r in stored],
        "parent": [r.parent for r in stored], "data": [r.data_json for r in stored],
        "valid_time": valid, "tx_time": [tx_us] * n, "key": [r.key for r in stored],
        "headers": [dumps([list(h) for h in r.headers]) if r.headers else None for r in stored],
        "kafka_topic": [r.topic for r in stored], "kafka_partition": [r.partition for r in stored],
        "kafka_offset": [r.offset for r in stored],
        "kafka_timestamp": kafka,
    }
    return rows, hashes


def _quarantine_rows(items: Sequence[Quarantined], tx: int) -> tuple[dict[str, list[Any]], list[str]]:
    rows: dict[str, list[Any]] = {c: [] for c, _ in RELATIONS["quarantine"]}
    hashes = []
    for seq, q in enumerate(items):
        if not isinstance(q, Quarantined):
            raise LedgerError(f"quarantine item {seq} must be a Quarantined, got {type(q).__name__}")
        kafka_us = None if q.kafka_timestamp is None else _micros(q.kafka_timestamp)
        h = chain.quarantine_hash(
            reason=q.reason, value=q.value, key=q.key, headers=q.headers, topic=q.topic,
            partition=q.partition, offset=q.offset, kafka_us=kafka_us,
        )
        hashes.append(h)
        for c, v in (
            ("tx", tx), ("seq", seq), ("reason", q.reason), ("value", q.value), ("key", q.key),
            ("headers", dumps([list(h) for h in q.headers]) if q.headers else None),
            ("kafka_topic", q.topic), ("kafka_partition", q.partition), ("kafka_offset", q.offset),
            ("kafka_timestamp", kafka_us),
            ("hash", h),
        ):
            rows[c].append(v)
    return rows, hashes


def _same(stored: dict[int, tuple[str, str, dict[str, Any]]],
          derived: dict[int, tuple[str, str, dict[str, Any]]]) -> bool:
    """The same datoms, values equal as JSON with their types (True is not 1, 1.0 is not 1)."""
    if stored != derived:
        return False
    for seq, (_e, _rid, attrs) in stored.items():
        other = derived[seq][2]
        for a, v in attrs.items():
            w = other[a]
            if type(v) is not type(w) or (isinstance(v, (dict, list)) and _typed(v) != _typed(w)):
                return False
    return True


def _typed(v: Any) -> Any:
    """A value with the types of everything in it, for comparisons where 1 == True won't do."""
    if isinstance(v, dict):
        return {k: _typed(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_typed(x) for x in v]
    return (type(v), v)


class _TxGroups:
    """Rows grouped by tx (in tx order), taken one tx at a time as the transactions are walked."""

    def __init__(self, rows: duckdb.DuckDBPyConnection | Iterable[tuple[Any, ...]]) -> None:
        self._groups = _rows_by_tx(rows)
        self._head = next(self._groups, None)

    @property
    def next_tx(self) -> int | None:
        return None if self._head is None else self._head[0]

    def take(self, tx: int) -> list[tuple[Any, ...]] | None:
        """The rows of `tx` ([] when it has none); None when rows of an earlier tx come first."""
        if self._head is None or self._head[0] > tx:
            return []
        if self._head[0] < tx:
            return None
        rows = self._head[1]
        self._head = next(self._groups, None)
        return rows


class _ChainCheck:
    """Walks sources (segments, then the tail) in tx order, carrying the chain across them."""

    def __init__(self, rules: Rules, index: tuple[int, Iterable[tuple[Any, ...]]] | None) -> None:
        self.prev_tx, self.prev_hash = 0, chain.GENESIS
        self.prev_time: datetime | None = None
        self.bad: tuple[int, str] | None = None
        self.rules = rules
        self.held: dict[str, set[str]] = {}  # entity -> attributes it holds (to expand deletions)
        # The entity index (entity() and history() read it), (tx, [(e, seq, valid_us, tx_us,
        # record_id, attrs)]) in tx order, compared tx by tx with what the records yield.
        self.index_through, rows = (0, None) if index is None else index
        self.index = None if rows is None else _TxGroups(rows)

    def _derived(
        self, tx_us: int, recs: list[tuple[Any, ...]]
    ) -> tuple[dict[int, tuple[str, str, dict[str, Any]]], list[tuple[Any, ...]]]:
        """What a tx's records (see _rehash) yield, as the writer derives it (ledger.datoms): per
        event seq, its entity, record id and {a: v}; and its entity index rows."""
        rules, key = self.rules, self.rules.entity_key
        out: dict[int, tuple[str, str, dict[str, Any]]] = {}
        index: list[tuple[Any, ...]] = []
        for seq, rid, kind, action, data, text, valid_us in recs:
            if kind != "event" or (e := rules.entity_of(data)) is None:
                continue
            attrs, text = index_attrs(rules, self.held.setdefault(e, set()), action, data, text)
            found = dict(datoms.attributes(attrs, key))
            index.append((e, seq, valid_us, tx_us, rid, text))
            if found:  # an event with no attribute has no datoms
                out[seq] = (e, rid, found)
        return out, index

    def _check_index(self, tx: int, expected: list[tuple[Any, ...]]) -> bool:
        if self.index is None or tx > self.index_through:
            return True
        stored = self.index.take(tx)
        if stored is None:  # rows of an earlier tx that its records did not yield
            tx = self.index.next_tx or tx
        if stored is None or [row[1:] for row in stored] != expected:
            self.bad = (tx, f"the entity index rows of tx {tx} do not match its records "
                            "(derived data: delete entity_index.sqlite and reopen to rebuild it)")
            return False
        return True

    def index_leftovers(self) -> None:
        """Index rows of txs the chain does not have (rows committed after the snapshot are fine)."""
        tx = None if self.index is None else self.index.next_tx
        if tx is not None and tx <= self.prev_tx:
            self.bad = (tx, f"the entity index has rows of tx {tx} that its records do not yield")

    def fail(self, tx: int, reason: str) -> VerifyReport:
        self.bad = (tx, reason)
        return self.report()

    def report(self) -> VerifyReport:
        if self.bad is None:
            return VerifyReport(ok=True, checked=self.prev_tx)
        # A segment can fail (file hash, read error) after some of its txs were walked: those count
        # as checked only if they come before the first bad tx.
        checked = min(self.prev_tx, self.bad[0] - 1)
        return VerifyReport(ok=False, checked=checked, first_bad_tx=self.bad[0], reason=self.bad[1])

    def source(self, cur: duckdb.DuckDBPyConnection, tables: Mapping[str, str]) -> bool:
        """Check one source's transactions; False (and `bad` set) at the first mismatch."""
        def select(relation: str, order: str) -> str:
            return f"SELECT {columns(relation)} FROM {tables[relation]} ORDER BY {order}"

        txs = cur.execute(select("transactions", "tx")).fetchall()
        quarantine: dict[int, list[str]] = {}
        for q in cur.execute(select("quarantine", "tx, seq")).fetchall():
            tx, _seq, reason, value, key, headers, topic, partition, offset, kts, _h = q
            quarantine.setdefault(tx, []).append(chain.quarantine_hash(
                reason=reason, value=value, key=key, headers=loads(headers) if headers else (),
                topic=topic, partition=partition, offset=offset,
                kafka_us=None if kts is None else _micros(kts),
            ))
        # Read before the records' stream starts (one result at a time per cursor, and a second
        # cursor would not be in this snapshot): a segment's worth at most.
        datoms_by_tx = _TxGroups(cur.execute(
            f"SELECT tx, seq, e, a, v, record_id FROM {tables['datoms']} ORDER BY tx, seq, a").fetchall())
        records = _TxGroups(cur.execute(
            f"SELECT {_VERIFY_RECORD_COLUMNS} FROM {tables['records']} ORDER BY tx, seq"))
        for tx, tx_time, prev_h, h, n_rec, n_q, meta in txs:
            if tx != self.prev_tx + 1:
                self.bad = (self.prev_tx + 1, f"tx {self.prev_tx + 1} is missing")
                return False
            if self.prev_time is not None and tx_time <= self.prev_time:
                self.bad = (tx, "tx_time does not increase")
                return False
            rows = records.take(tx)
            if rows is None:
                self.bad = (records.next_tx or tx, f"records of unknown tx {records.next_tx}")
                return False
            if len(rows) != n_rec:
                self.bad = (tx, f"expected {n_rec} records, found {len(rows)}")
                return False
            try:
                hashes, recs = zip(*map(_rehash, rows), strict=True) if rows else ((), ())
            except (TypeError, ValueError, AttributeError) as e:  # a damaged file read as other types
                self.bad = (tx, f"a record of tx {tx} cannot be read: {e}")
                return False
            q_hashes = quarantine.pop(tx, [])
            if len(q_hashes) != n_q:
                self.bad = (tx, f"expected {n_q} quarantined items, found {len(q_hashes)}")
                return False
            if prev_h != self.prev_hash:
                self.bad = (tx, "prev_hash does not match the previous tx")
                return False
            again = chain.tx_hash(
                tx=tx, tx_us=_micros(tx_time), prev_hash=self.prev_hash,
                meta=json.loads(meta), record_hashes=hashes, quarantine_hashes=q_hashes,
            )
            if again != h:
                self.bad = (tx, "tx hash does not match its contents")
                return False
            datom_rows = datoms_by_tx.take(tx)
            if datom_rows is None:
                self.bad = (datoms_by_tx.next_tx or tx, f"rows of unknown tx {datoms_by_tx.next_tx}")
                return False
            stored: dict[int, tuple[str, str, dict[str, Any]]] = {}
            for _tx, seq, ent, a, v, rid in datom_rows:
                stored.setdefault(seq, (ent, str(rid), {}))[2][a] = None if v is None else loads(v)
            derived, index_rows = self._derived(_micros(tx_time), list(recs))
            if not _same(stored, derived):
                self.bad = (tx, f"the datoms of tx {tx} do not match its records")
                return False
            if not self._check_index(tx, index_rows):
                return False
            self.prev_tx, self.prev_hash, self.prev_time = tx, h, tx_time
        leftover = [t for t in (records.next_tx, datoms_by_tx.next_tx) if t is not None] + list(quarantine)
        if leftover:
            self.bad = (min(leftover), f"rows of unknown tx {min(leftover)}")
            return False
        return True
