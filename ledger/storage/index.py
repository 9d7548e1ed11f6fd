"""The entity index: every event that names an entity, keyed by (entity, tx, seq) in a SQLite
B-tree beside the DuckDB catalog.

Entity reads are the ledger's hottest path, and a point query is what DuckDB is slowest at: its
ART index answered in about 1.5 ms on the development box, a SQLite primary-key range read in a
tenth of that (bench/core.py). The index is derived data. The writer adds a tx's rows right after
the DuckDB commit; when the ledger opens it catches up from the tail and the sealed datoms, so a
crash between the two commits, or a deleted index file, costs a rebuild and nothing else.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

FILE = "entity_index.sqlite"

# (e, tx, seq, valid_us, tx_us, record_id, attrs): attrs is the JSON object of the event's
# attributes (see ledger.datoms); times are epoch microseconds.
IndexRow = tuple[str, int, int, int, int, str, str]
COLUMNS = ("e", "tx", "seq", "valid_time", "tx_time", "record_id", "attrs")  # of tail_index, in that order

_DDL = (
    """CREATE TABLE IF NOT EXISTS entity_index (
        e TEXT NOT NULL, tx INTEGER NOT NULL, seq INTEGER NOT NULL, valid_us INTEGER NOT NULL,
        tx_us INTEGER NOT NULL, record_id TEXT NOT NULL, attrs TEXT NOT NULL,
        PRIMARY KEY (e, tx, seq)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS index_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


class EntityIndex:
    """One writer (under the ledger's write lock), readers on their own per-thread connections."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._write = self._connect()
        # WAL: readers never block the writer. NORMAL: no fsync per commit; a commit lost to a
        # power cut is caught up at the next open, like any other gap.
        self._write.execute("PRAGMA journal_mode = WAL")
        self._write.execute("PRAGMA synchronous = NORMAL")
        for ddl in _DDL:
            self._write.execute(ddl)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        # Each connection is used by one thread at a time; close() may come from another.
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    def through(self) -> int:
        """The last tx whose rows are all in the index."""
        row = self._write.execute("SELECT value FROM index_meta WHERE key = 'through_tx'").fetchone()
        return int(row[0]) if row else 0

    def add(self, rows: Iterable[IndexRow], through_tx: int) -> None:
        """Add rows and move `through` to `through_tx`, atomically."""
        con = self._write
        con.execute("BEGIN")
        try:
            con.executemany("INSERT OR REPLACE INTO entity_index VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            con.execute(
                "INSERT OR REPLACE INTO index_meta VALUES ('through_tx', ?)", (through_tx,)
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def clear(self) -> None:
        self._write.execute("DELETE FROM entity_index")
        self._write.execute("DELETE FROM index_meta")

    def rows(self, e: str) -> list[tuple[Any, ...]]:
        """(tx, seq, valid_us, tx_us, record_id, attrs) of entity e, in (tx, seq) order."""
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            self._local.con = con
            with self._lock:
                self._readers.append(con)
        return con.execute(
            "SELECT tx, seq, valid_us, tx_us, record_id, attrs FROM entity_index WHERE e = ?", (e,)
        ).fetchall()

    def close(self) -> None:
        with self._lock:
            for con in [*self._readers, self._write]:
                con.close()
            self._readers.clear()
