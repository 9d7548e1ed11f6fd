"""Export: a slice of the ledger as of a tx as plain Parquet files plus a manifest (tables, row
counts, the digest at that tx), readable by anything that reads Parquet."""

from __future__ import annotations

import json
import os
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
    from ledger.temporal import TimePoint

MANIFEST = "manifest.json"
FORMAT = 1



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
                yield name, "view", db.sql(views.portable_select(db, name, timeout)[0], timeout=timeout)

    return t, each()


def _manifest(t: int, digest: dict[str, Any], entries: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "as_of_tx": t, "digest": digest, "tables": entries,
            "exported_at": datetime.now(UTC).isoformat()}


def export_dir(
    lg: Ledger, out: Path, *, as_of: TimePoint | None = None, tables: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write <table>.parquet for each table and manifest.json into `out`; returns the manifest.
    Tables of an earlier export into `out` that this one does not write are removed after its
    manifest is in place (other files are left alone)."""
    t, items = _tables(lg, as_of, tables)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _exported_files(out)
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
    for file in earlier - {e["file"] for e in entries.values()}:
        (out / file).unlink(missing_ok=True)
    return manifest


def _exported_files(out: Path) -> set[str]:
    """The table files the manifest in `out` lists, if there is one (plain names only)."""
    try:
        listed = json.loads((out / MANIFEST).read_text())["tables"].values()
        names = {str(e["file"]) for e in listed}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {n for n in names if n.endswith(".parquet") and "/" not in n and not n.startswith(".")}


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
