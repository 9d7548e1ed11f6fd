"""Export: a slice of the ledger as of a tx as plain Parquet files plus a manifest (tables, row
counts, the digest at that tx), readable by anything that reads Parquet."""

from __future__ import annotations

import json
import os
import re
import zipfile
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow.parquet as pq

from ledger import chain, views
from ledger.errors import UnknownView
from ledger.temporal import RELATIONS

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    import pyarrow as pa

    from ledger.ledger import Ledger
    from ledger.temporal import Database, TimePoint

MANIFEST = "manifest.json"
FORMAT = 1
# DuckDB types Parquet has no form for (INTERVAL, UNION), or that the Arrow route writes wrongly
# (UHUGEINT wraps, a TIMETZ loses its offset, BIT and BIGNUM become their internal bytes): written
# as DuckDB's text for them, which casts back exactly; a VARIANT as JSON text.
_AS_TEXT = frozenset({"INTERVAL", "UHUGEINT", "BIGNUM", "VARINT", "BIT", "TIME WITH TIME ZONE", "UNION"})
_AS_JSON = frozenset({"VARIANT"})
# A DuckDB type name as DESCRIBE prints it, in tokens: quoted names, quoted strings, words, marks.
_TYPE_TOKEN = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'|TIME(?:STAMP)? WITH TIME ZONE|\w+|\S')


def digest_at(lg: Ledger, tx: int) -> dict[str, Any]:
    """The digest (tx, tx_time, hash) of the ledger as it stood at tx."""
    if tx == 0:
        return {"tx": 0, "tx_time": None, "hash": chain.GENESIS}
    row = lg.sql(f"SELECT tx, tx_time, hash FROM transactions WHERE tx = {int(tx)}", as_of=tx).to_pylist()
    if not row:
        raise UnknownView(f"tx {tx} does not exist")
    return {"tx": tx, "tx_time": row[0]["tx_time"].astimezone(UTC).isoformat(), "hash": row[0]["hash"]}


def _tables(
    lg: Ledger, as_of: TimePoint | None, tables: Sequence[str] | None, timeout: float | None = None,
) -> tuple[int, Iterator[tuple[str, str, pa.Table]]]:
    db = lg.db() if as_of is None else lg.as_of(as_of)
    t = db.basis_tx
    wanted = list(tables) if tables else list(RELATIONS)
    defined = views.definitions(lg, as_of=t)
    for name in wanted:
        if name not in RELATIONS and name not in defined:
            raise UnknownView(
                f"no relation or view named {name!r} as of tx {t} (relations: {', '.join(RELATIONS)}; "
                f"views: {', '.join(sorted(defined)) or 'none'})"
            )

    def each() -> Iterator[tuple[str, str, pa.Table]]:
        for name in dict.fromkeys(wanted):
            if name in RELATIONS:  # their types all have a Parquet form
                yield name, "relation", db.sql(f"SELECT * FROM {name}", timeout=timeout)
            else:
                yield name, "view", db.sql(_portable_select(db, name, timeout), timeout=timeout)

    return t, each()


def _portable_select(db: Database, name: str, timeout: float | None) -> str:
    """SELECT * FROM the view, with each column of a type in _AS_TEXT or _AS_JSON (at any depth)
    cast to one Parquet holds."""
    described = db.sql(f"DESCRIBE SELECT * FROM {views.ident(name)}", timeout=timeout).to_pylist()
    casts = [f"CAST({views.ident(r['column_name'])} AS {target}) AS {views.ident(r['column_name'])}"
             for r in described if (target := _portable_type(r["column_type"])) is not None]
    star = f"* REPLACE ({', '.join(casts)})" if casts else "*"
    return f"SELECT {star} FROM {views.ident(name)}"


def _portable_type(duckdb_type: str) -> str | None:
    """The type export writes for a DuckDB type (`INTERVAL` -> `VARCHAR`,
    `STRUCT(a INTERVAL[])` -> `STRUCT(a VARCHAR[])`), or None when it is written as it is."""
    tokens: list[str] = _TYPE_TOKEN.findall(duckdb_type)
    pos, changed = 0, False

    def one() -> str:
        nonlocal pos, changed
        name, pos = tokens[pos], pos + 1
        args: list[str] = []
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            while tokens[pos] != ")":
                if name.upper() in ("STRUCT", "UNION"):  # (field TYPE, ...)
                    field, pos = tokens[pos], pos + 1
                    args.append(f"{field} {one()}")
                elif name.upper() == "MAP":  # (KEY, VALUE)
                    args.append(one())
                else:  # DECIMAL(18,3), ENUM('a', 'b'): as they are
                    args.append(tokens[pos])
                    pos += 1
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
        text = name + (f"({', '.join(args)})" if args else "")
        if name.upper() in _AS_TEXT | _AS_JSON:
            changed = True
            text = "VARCHAR" if name.upper() in _AS_TEXT else "JSON"
        while pos < len(tokens) and tokens[pos] == "[":  # LIST (T[]) or ARRAY (T[3])
            end = tokens.index("]", pos)
            text += "".join(tokens[pos:end + 1])
            pos = end + 1
        return text

    portable = one()
    return portable if changed else None


def _manifest(t: int, digest: dict[str, Any], entries: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "as_of_tx": t, "digest": digest, "tables": entries,
            "exported_at": datetime.now(UTC).isoformat()}


def export_dir(
    lg: Ledger, out: Path, *, as_of: TimePoint | None = None, tables: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write <table>.parquet for each table and manifest.json into `out`; returns the manifest."""
    t, items = _tables(lg, as_of, tables)
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for name, kind, table in items:
        file = f"{name}.parquet"
        tmp = out / f".{file}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, out / file)
        entries[name] = {"file": file, "kind": kind, "rows": table.num_rows}
    manifest = _manifest(t, digest_at(lg, t), entries)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, out / MANIFEST)  # last: a directory with a manifest is complete
    return manifest


def export_zip(
    lg: Ledger, out: BinaryIO, *, as_of: TimePoint | None = None, tables: Sequence[str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The same files as export_dir, as one zip written to `out` (Parquet is already compressed:
    stored as is). Each table's query runs under `timeout` seconds (None: no limit)."""
    t, items = _tables(lg, as_of, tables, timeout)
    entries: dict[str, Any] = {}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, kind, table in items:
            file = f"{name}.parquet"
            with z.open(file, "w", force_zip64=True) as member:
                pq.write_table(table, member, compression="zstd")
            entries[name] = {"file": file, "kind": kind, "rows": table.num_rows}
        manifest = _manifest(t, digest_at(lg, t), entries)
        z.writestr(MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _fsync(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())
