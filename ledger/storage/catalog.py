"""The DuckDB side of a ledger: the catalog (config, segments, offsets, record ids) and the tail
(transactions not yet sealed into Parquet), plus the SQL for the union that readers query."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import duckdb

# Columns of each sealed relation, in storage order. The tail tables and the Parquet segments
# share them exactly, so a reader can UNION ALL the two.
RELATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "records": (
        ("tx", "BIGINT NOT NULL"),
        ("seq", "INTEGER NOT NULL"),
        ("id", "VARCHAR NOT NULL"),
        ("kind", "VARCHAR NOT NULL"),
        ("action", "VARCHAR NOT NULL"),
        ("parent", "VARCHAR"),
        ("data", "JSON NOT NULL"),
        ("valid_time", "TIMESTAMPTZ NOT NULL"),
        ("tx_time", "TIMESTAMPTZ NOT NULL"),
        ("key", "VARCHAR"),
        ("headers", "JSON"),
        ("kafka_topic", "VARCHAR"),
        ("kafka_partition", "INTEGER"),
        ("kafka_offset", "BIGINT"),
        ("kafka_timestamp", "TIMESTAMPTZ"),
    ),
    "datoms": (
        ("e", "VARCHAR NOT NULL"),
        ("a", "VARCHAR NOT NULL"),
        ("v", "JSON"),
        ("op", "BOOLEAN NOT NULL"),
        ("tx", "BIGINT NOT NULL"),
        ("seq", "INTEGER NOT NULL"),
        ("tx_time", "TIMESTAMPTZ NOT NULL"),
        ("valid_time", "TIMESTAMPTZ NOT NULL"),
        ("record_id", "VARCHAR NOT NULL"),
    ),
    "transactions": (
        ("tx", "BIGINT NOT NULL"),
        ("tx_time", "TIMESTAMPTZ NOT NULL"),
        ("prev_hash", "VARCHAR NOT NULL"),
        ("hash", "VARCHAR NOT NULL"),
        ("record_count", "INTEGER NOT NULL"),
        ("quarantine_count", "INTEGER NOT NULL"),
        ("meta", "JSON NOT NULL"),
    ),
    "quarantine": (
        ("tx", "BIGINT NOT NULL"),
        ("seq", "INTEGER NOT NULL"),
        ("reason", "VARCHAR NOT NULL"),
        ("value", "BLOB"),
        ("key", "BLOB"),
        ("headers", "JSON"),
        ("kafka_topic", "VARCHAR"),
        ("kafka_partition", "INTEGER"),
        ("kafka_offset", "BIGINT"),
        ("kafka_timestamp", "TIMESTAMPTZ"),
        ("hash", "VARCHAR NOT NULL"),
    ),
}

# Relations whose tail is a view over another table (tail_datoms over tail_index).
DERIVED = frozenset({"datoms"})

INDEX_COLUMNS: tuple[tuple[str, str], ...] = (
    ("e", "VARCHAR NOT NULL"),
    ("tx", "BIGINT NOT NULL"),
    ("seq", "INTEGER NOT NULL"),
    ("valid_time", "TIMESTAMPTZ NOT NULL"),  # the order of ledger.storage.index's rows
    ("tx_time", "TIMESTAMPTZ NOT NULL"),
    ("record_id", "UUID NOT NULL"),
    ("attrs", "VARCHAR NOT NULL"),  # JSON we wrote; VARCHAR skips a re-parse on insert
)

# Sort order inside a sealed segment: datoms by entity so a lookup reads one row group per segment.
SEAL_ORDER = {
    "records": "tx, seq",
    "datoms": "e, tx, seq, a",  # one record's datoms adjacent: its ids and times run-length encode
    "transactions": "tx",
    "quarantine": "tx, seq",
}

CATALOG_DDL = [
    "CREATE TABLE IF NOT EXISTS ledger_meta (key VARCHAR PRIMARY KEY, value JSON NOT NULL)",
    # Every record id ever stored: the primary key is what makes append() exactly-once.
    "CREATE TABLE IF NOT EXISTS record_ids (id UUID PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS segments (
        first_tx BIGINT PRIMARY KEY, last_tx BIGINT NOT NULL, dir VARCHAR NOT NULL,
        records BIGINT NOT NULL, files JSON NOT NULL, sealed_at TIMESTAMPTZ NOT NULL)""",
    # Where each consumer stood per partition after each tx, committed with the records it covers
    # (append-only: the latest row per partition is the position; a seal drops superseded rows).
    # A topic that was recreated (offsets went backwards) starts a new generation, which keeps
    # its ids distinct.
    """CREATE TABLE IF NOT EXISTS offsets (
        consumer VARCHAR NOT NULL, topic VARCHAR NOT NULL, partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL, generation INTEGER NOT NULL, last_digest VARCHAR,
        tx BIGINT NOT NULL)""",
    # Entity state checkpoints (ledger.storage.segments.write_state) readers may start from.
    "CREATE TABLE IF NOT EXISTS entity_state (tx BIGINT PRIMARY KEY, file VARCHAR NOT NULL)",
    # The unsealed events that name an entity, one row per event (not per datom): `attrs` is the
    # JSON object of the event's attributes (its `data`, or {a: null} for each attribute a
    # deletion retracts). The tail datoms are unpacked from it; a seal writes them to Parquet.
    # (Point reads go to the entity index, ledger.storage.index, which holds every tx.)
    "CREATE TABLE IF NOT EXISTS tail_index ("
    + ", ".join(f"{col} {typ}" for col, typ in INDEX_COLUMNS) + ")",
    *(
        f"CREATE TABLE IF NOT EXISTS tail_{name} ("
        + ", ".join(f"{col} {typ}" for col, typ in cols)
        + ")"
        for name, cols in RELATIONS.items() if name not in DERIVED
    ),
]


def datoms_sql(source: str, entity_key: str | None) -> str:
    """Datoms unpacked from index rows (`source` has the columns of INDEX_COLUMNS).
    `entity_key` (the top-level field that holds the entity id, None for a nested path) is not an
    attribute."""
    skip = "" if entity_key is None else f" WHERE kv.key <> {quote(entity_key)}"
    return (
        "SELECT e, kv.key AS a, kv.value AS v, kv.value IS NOT NULL AS op, tx, seq, tx_time, valid_time, "
        "CAST(record_id AS VARCHAR) AS record_id "
        "FROM (SELECT *, unnest(map_entries(CAST(CAST(attrs AS JSON) AS MAP(VARCHAR, JSON)))) AS kv "
        f"FROM {source}){skip}"
    )


# The columns of an entity state checkpoint: the latest datom of each (entity, attribute).
STATE_COLUMNS = "e, a, v, tx, seq, tx_time"


def latest_datoms_sql(source: str) -> str:
    """The latest datom (in tx order) of each (e, a) in `source`, retractions included, with the
    columns of STATE_COLUMNS: folding a checkpoint and newer datoms gives the next checkpoint."""
    return (
        "SELECT e, a, w.v AS v, w.tx AS tx, w.seq AS seq, w.tx_time AS tx_time FROM (SELECT e, a, "
        f"arg_max({{'v': v, 'tx': tx, 'seq': seq, 'tx_time': tx_time}}, (tx, seq)) AS w FROM ({source}) "
        "GROUP BY e, a)"
    )


def state_sql(latest: str) -> str:
    """State per entity from the latest datom of each of its attributes: the held ones as a JSON
    object with its fields in attribute order (the same state is the same text); tx and tx_time
    of the last change, a retraction included. Sorting each entity's list, not an ordered
    string_agg, costs a fifth less."""
    return (
        "SELECT e, CAST('{' || array_to_string(list_transform(list_sort(list({'a': a, 'v': v}) "
        "FILTER (WHERE v IS NOT NULL)), lambda f: to_json(f.a) || ':' || f.v), ',') || '}' AS JSON) "
        f"AS state, max(tx) AS tx, max(tx_time) AS tx_time FROM ({latest}) GROUP BY e HAVING count(v) > 0"
    )


def entities_file(state: str) -> str:
    """The file (name or path) beside a checkpoint that holds `state_sql` of it: `entities` as of
    the checkpoint's tx, read as it is, and for any later tx, less the entities changed since."""
    return state.removesuffix(".parquet") + ".entities.parquet"


class Files(dict[str, list[str]]):
    """The sealed Parquet files of each relation in one snapshot, and the entity state checkpoints
    (tx, path), oldest first, that its reads may start `entities` from."""

    states: tuple[tuple[int, str], ...] = ()
    sealed_through: int = 0  # the last sealed tx
    cursor: duckdb.DuckDBPyConnection | None = None  # the snapshot's, for datoms_between

    def state_at(self, basis: int) -> tuple[int, str] | None:
        """The newest checkpoint a read as of `basis` can start from."""
        return next((s for s in reversed(self.states) if s[0] <= basis), None)

    def datoms_between(self, low: int, high: int) -> bool:
        """Whether this snapshot may hold a datom with low < tx <= high (True when unsure)."""
        if high <= low:
            return False
        if self.sealed_through > low or self.cursor is None:
            return True
        found = self.cursor.execute(
            "SELECT count(*) FROM (SELECT 1 FROM tail_index WHERE tx > ? AND tx <= ? LIMIT 1)", [low, high]
        ).fetchall()
        return bool(found[0][0])


def tail_datoms_ddl(entity_key: str | None) -> str:
    """The unsealed datoms, unpacked from tail_index."""
    return f"CREATE OR REPLACE VIEW tail_datoms AS {datoms_sql('tail_index', entity_key)}"


def index_rows_sql(rows: Sequence[tuple[Any, ...]]) -> str:
    """Entity index rows (e, tx, seq, valid_us, tx_us, record_id, attrs) as a SQL source with
    the columns of INDEX_COLUMNS (literals: small row counts only)."""
    values = ", ".join(
        f"({quote(e)}, {int(tx)}, {int(seq)}, {int(vus)}, {int(tus)}, {quote(rid)}, {quote(attrs)})"
        for e, tx, seq, vus, tus, rid, attrs in rows
    ) or "(NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
    return (
        "(SELECT CAST(e AS VARCHAR) AS e, CAST(tx AS BIGINT) AS tx, CAST(seq AS INTEGER) AS seq, "
        "CAST(make_timestamp(CAST(vus AS BIGINT)) AS TIMESTAMPTZ) AS valid_time, "
        "CAST(make_timestamp(CAST(tus AS BIGINT)) AS TIMESTAMPTZ) AS tx_time, "
        "CAST(record_id AS VARCHAR) AS record_id, CAST(attrs AS VARCHAR) AS attrs "
        f"FROM (VALUES {values}) AS rows(e, tx, seq, vus, tus, record_id, attrs) WHERE e IS NOT NULL)"
    )


# Every table holding unsealed transactions: a seal empties them, a snapshot copies them.
TAIL_TABLES = (*(f"tail_{r}" for r in RELATIONS if r not in DERIVED), "tail_index")


def columns(relation: str) -> str:
    return ", ".join(col for col, _ in RELATIONS[relation])


def quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def union_sql(relation: str, files: Sequence[str], where: str | None = None) -> str:
    """The tail table plus every sealed Parquet file of one relation, as one SELECT.

    The filter is repeated on both sides so DuckDB prunes Parquet row groups by their statistics.
    """
    cols = columns(relation)
    cond = f" WHERE {where}" if where else ""
    sql = f"SELECT {cols} FROM tail_{relation}{cond}"
    if files:
        paths = ", ".join(quote(f) for f in files)
        sql += f" UNION ALL SELECT {cols} FROM read_parquet([{paths}]){cond}"
    return sql
