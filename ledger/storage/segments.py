"""Sealed segments: immutable zstd Parquet files, one directory per tx range, written under a temp
name, fsynced, then renamed into place; and the manifest that lets anyone read them without us."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

from ledger.errors import CorruptLedger
from ledger.storage.catalog import (
    RELATIONS,
    SEAL_ORDER,
    STATE_COLUMNS,
    columns,
    entities_file,
    latest_datoms_sql,
    quote,
    state_sql,
)

if TYPE_CHECKING:
    from pathlib import Path

    import duckdb

SEGMENTS_DIR = "segments"
STATE_DIR = "state"  # entity state checkpoints: derived from the datoms, safe to delete when stopped
# Each seal writes a checkpoint; the one before it is kept only if its segment's number is a
# multiple of this, so reads as of an older tx start from at most this many segments back.
KEEP_STATE_EVERY = 8
MANIFEST = "manifest.json"
FORMAT = "commander-ledger/3"
_ROW_GROUP = {"datoms": 16_384}  # small row groups: an entity lookup reads little


def segment_name(first_tx: int, last_tx: int) -> str:
    return f"{first_tx:012d}-{last_tx:012d}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_segment(
    con: duckdb.DuckDBPyConnection, root: Path, first_tx: int, last_tx: int
) -> dict[str, str]:
    """Copy tail rows with first_tx <= tx <= last_tx into a new segment directory.

    Returns {relation: sha256 of its file}. The directory appears under its final name only once
    every file in it is complete and on disk; a crash before that leaves a `.tmp-` directory that
    `clean_orphans` removes.
    """
    segs = root / SEGMENTS_DIR
    name = segment_name(first_tx, last_tx)
    tmp = segs / f".tmp-{name}"
    final = segs / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hashes = {}
    for relation in RELATIONS:
        out = tmp / f"{relation}.parquet"
        options = "FORMAT parquet, COMPRESSION zstd"
        if relation in _ROW_GROUP:
            options += f", ROW_GROUP_SIZE {_ROW_GROUP[relation]}"
        con.execute(
            f"COPY (SELECT {columns(relation)} FROM tail_{relation} "
            f"WHERE tx BETWEEN {first_tx} AND {last_tx} ORDER BY {SEAL_ORDER[relation]}) "
            f"TO {quote(str(out))} ({options})"
        )
        fsync_path(out)
        hashes[relation] = sha256_file(out)
    fsync_path(tmp)
    if final.exists():  # left by a crash after the rename but before the catalog commit
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(segs)
    return hashes


def state_name(tx: int) -> str:
    return f"{tx:012d}.parquet"


def write_state(
    con: duckdb.DuckDBPyConnection, root: Path, tx: int, sources: list[str],
    previous: tuple[str, list[str]] | None = None,
) -> str:
    """Write the entity state checkpoint at `tx`: the latest datom of each (entity, attribute)
    in `sources` (Parquet files with the columns of STATE_COLUMNS: an older checkpoint and the
    datoms sealed after it, or every datoms file), and beside it its `entities_file`, the state
    per entity. `previous`: (the older checkpoint's name, the datoms files after it) when those
    are the sources; its entities file is then kept but for the entities those datoms change.
    Returns the checkpoint's file name under STATE_DIR.

    `entities` as of any tx >= `tx` can then fold the checkpoint and the newer datoms instead of
    the whole log. Temp name, fsync, rename, like a segment."""
    folder = root / STATE_DIR
    folder.mkdir(exist_ok=True)
    name = state_name(tx)
    union = " UNION ALL ".join(
        f"SELECT {STATE_COLUMNS} FROM read_parquet({quote(path)}) WHERE tx <= {tx}" for path in sources
    )
    _write_file(con, f"{latest_datoms_sql(union)} ORDER BY e, a", folder / name)
    checkpoint = f"SELECT e, a, v, tx, tx_time FROM read_parquet({quote(str(folder / name))})"
    if previous is not None and (carried := folder / entities_file(previous[0])).exists():
        changed = " UNION ".join(f"SELECT e FROM read_parquet({quote(p)})" for p in previous[1])
        entities = (
            f"WITH changed AS ({changed}) SELECT * FROM read_parquet({quote(str(carried))}) "
            f"ANTI JOIN changed USING (e) UNION ALL {state_sql(f'{checkpoint} SEMI JOIN changed USING (e)')}"
        )
    else:
        entities = state_sql(checkpoint)
    _write_file(con, f"SELECT * FROM ({entities}) ORDER BY e", folder / entities_file(name))
    fsync_path(folder)
    return name


def _write_file(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    con.execute(f"COPY ({query}) TO {quote(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
    fsync_path(tmp)
    os.replace(tmp, path)


def clean_states(root: Path, keep: set[str]) -> None:
    """Remove checkpoints other than the registered ones (superseded, or left by a crash)."""
    folder = root / STATE_DIR
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name not in keep:
                child.unlink(missing_ok=True)


def clean_orphans(root: Path, registered: set[str]) -> list[str]:
    """Remove segment directories the catalog does not know (interrupted seals)."""
    segs = root / SEGMENTS_DIR
    removed = []
    if segs.is_dir():
        for child in sorted(segs.iterdir()):
            if child.name not in registered:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return removed


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace manifest.json (temp file, fsync, rename)."""
    tmp = root / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    fsync_path(root)


def read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        with (root / MANIFEST).open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, not UTF-8
        raise CorruptLedger(f"{root / MANIFEST} cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise CorruptLedger(f"{root / MANIFEST} is not a ledger manifest (a JSON {type(data).__name__})")
    return data
