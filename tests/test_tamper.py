"""Tamper evidence (invariant 3): change stored bytes or values behind the ledger's back, in a copy of
a data directory, and verify() must name the first transaction that no longer matches."""

from __future__ import annotations

import contextlib
import json
import shutil
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import duckdb
import pyarrow.parquet as pq
import pytest

from ledger import CorruptLedger, Ledger, Quarantined
from ledger.storage.catalog import entities_file

if TYPE_CHECKING:
    from pathlib import Path

SEALS = (5, 10, 15)  # seal after these txs: segments 1-5, 6-10, 11-15; txs 16-20 stay in the tail
HEAD = 20
SEGMENTS = [(1, 5), (6, 10), (11, 15)]


def segment_dir(root: Path, first: int, last: int) -> Path:
    return root / "segments" / f"{first:012d}-{last:012d}"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tamper") / "ledger"
    with Ledger.open(root, seal_every=10**9) as lg:
        for tx in range(1, HEAD + 1):
            records = [
                {"kind": "command", "action": "open-account", "data": {"n": tx, "owner": "ådå 🦆"},
                 "key": f"k{tx}", "headers": {"trace": str(tx)}, "topic": "commands",
                 "partition": tx % 3, "offset": tx, "timestamp": "2024-03-01T12:00:00+05:30"},
                *({"kind": "event", "action": "balance-set", "data": {"id": f"acct-{i}", "balance": tx * i}}
                  for i in range(tx % 4 + 1)),
            ]
            quarantine = [Quarantined(
                reason="not JSON", value=b"\xff", key=b"k", topic="events", partition=1, offset=tx,
                headers=(("trace", str(tx)),), kafka_timestamp=datetime(2024, 3, 1, tzinfo=UTC),
            )]
            report = lg.append(records, meta={"consumer": "c1", "n": tx},
                               quarantine=quarantine if tx % 6 == 0 else ())
            assert report.tx == tx
            if tx in SEALS:
                lg.seal()
    assert sorted(p.name for p in (root / "segments").iterdir()) == [
        segment_dir(root, f, la).name for f, la in SEGMENTS
    ]
    return root


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(pristine, target)
    return target


def verify(root: Path, *, read_only: bool = False) -> tuple[bool, int, int | None, str | None]:
    with Ledger.open(root, read_only=read_only) as lg:
        r = lg.verify()
    return r.ok, r.checked, r.first_bad_tx, r.reason


def test_untampered_ledger_and_its_copy_verify(pristine: Path, copy: Path) -> None:
    assert verify(pristine) == (True, HEAD, None, None)
    assert verify(copy) == (True, HEAD, None, None)
    assert verify(copy, read_only=True) == (True, HEAD, None, None)  # (what `ledger verify` runs)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_flipped_byte_in_a_segment_names_a_tx_in_that_segment(copy: Path, where: float) -> None:
    first, last = SEGMENTS[1]
    path = segment_dir(copy, first, last) / "records.parquet"
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))
    ok, checked, bad, reason = verify(copy)
    assert not ok
    assert bad is not None and first <= bad <= last, reason
    assert checked == bad - 1 >= SEGMENTS[0][1], (checked, bad, reason)  # txs before it verified


@pytest.mark.parametrize(
    ("statement", "bad_tx"),
    [
        ("""UPDATE tail_records SET data = '{"n":999,"owner":"mallory"}' WHERE tx = 17 AND seq = 0""", 17),
        ("""UPDATE tail_transactions SET meta = '{"consumer":"c1","n":-1}' WHERE tx = 18""", 18),
        ("UPDATE tail_records SET valid_time = valid_time + INTERVAL 1 SECOND WHERE tx = 16 AND seq = 1", 16),
        ("DELETE FROM tail_records WHERE tx = 19 AND seq = 1", 19),
        ("UPDATE tail_quarantine SET reason = 'valid after all' WHERE tx = 18", 18),
        ("""UPDATE tail_quarantine SET headers = '[["trace","0"]]' WHERE tx = 18""", 18),
        ("UPDATE tail_quarantine SET kafka_timestamp = NULL WHERE tx = 18", 18),
    ],
    ids=["record-data", "tx-meta", "valid-time", "deleted-record", "quarantine-reason",
         "quarantine-headers", "quarantine-kafka-time"],
)
def test_value_changed_in_the_tail_names_that_tx(copy: Path, statement: str, bad_tx: int) -> None:
    con = duckdb.connect(str(copy / "ledger.duckdb"))
    try:
        changed = con.execute(statement).fetchone()
    finally:
        con.close()
    assert changed == (1,)
    ok, checked, bad, reason = verify(copy)
    assert (ok, bad, checked) == (False, bad_tx, bad_tx - 1), reason


@pytest.mark.parametrize("index", [1, 2])
def test_deleted_segment_names_its_first_tx(copy: Path, index: int) -> None:
    first, last = SEGMENTS[index]
    shutil.rmtree(segment_dir(copy, first, last))
    ok, checked, bad, reason = verify(copy)
    assert (ok, bad, checked) == (False, first, first - 1), reason
    assert reason is not None and "missing" in reason


def test_rewritten_record_is_caught_by_the_tx_chain(copy: Path) -> None:
    """Rewrite a value inside a segment (a valid Parquet file): record hashes are recomputed from
    the stored fields, so the tx hash that covers them is what no longer matches."""
    first, last = SEGMENTS[1]
    target = 8
    path = segment_dir(copy, first, last) / "records.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    row = next(r for r in rows if r["tx"] == target and r["seq"] == 0)
    data = json.loads(row["data"])
    data["owner"] = "mallory"
    row["data"] = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path, compression="zstd")

    ok, checked, bad, reason = verify(copy)
    assert (ok, bad, checked) == (False, target, target - 1), reason
    assert reason == "tx hash does not match its contents"


def test_derived_datoms_changed_in_the_tail_names_that_tx(copy: Path) -> None:
    """`entities` and SQL read the datoms; they must say what the records say."""
    con = duckdb.connect(str(copy / "ledger.duckdb"))
    try:
        changed = con.execute("""UPDATE tail_index SET attrs = '{"id":"acct-1","balance":-1}'
                                 WHERE tx = 17 AND e = 'acct-1'""").fetchone()
    finally:
        con.close()
    assert changed == (1,)
    ok, checked, bad, reason = verify(copy)
    assert (ok, bad, checked) == (False, 17, 16), reason
    assert reason == "the datoms of tx 17 do not match its records"


@pytest.mark.parametrize("file", ["checkpoint", "entities"])
def test_entity_state_checkpoint_changed_names_that_tx(copy: Path, file: str) -> None:
    """`entities` starts from the checkpoint the last seal wrote (state/): its entities file for
    the entities no later datom changed, the checkpoint's datoms for the others (and for the next
    seal's checkpoint). A value changed in either is what readers would be told, so verify()
    compares both with the datoms."""
    path = copy / "state" / f"{SEALS[-1]:012d}.parquet"
    if file == "entities":
        path = path.with_name(entities_file(path.name))
    table = pq.read_table(path)
    rows = table.to_pylist()
    if file == "entities":
        row = next(r for r in rows if r["e"] == "acct-1")
        assert row["tx"] == SEALS[-1] and json.loads(row["state"])["balance"] == SEALS[-1]
        row["state"] = json.dumps({**json.loads(row["state"]), "balance": -1}, separators=(",", ":"))
    else:
        row = next(r for r in rows if r["e"] == "acct-1" and r["a"] == "balance")
        assert row["tx"] == SEALS[-1] and json.loads(row["v"]) == SEALS[-1]
        row["v"] = "-1"
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path, compression="zstd")
    # A read-only snapshot (`ledger verify`) checks the files the writer reads, too (found by audit:
    # it said ok, its own reads not using them).
    ok, _checked, bad, reason = verify(copy, read_only=True)
    assert (ok, bad) == (False, SEALS[-1]) and reason is not None and "entity state checkpoint" in reason
    with Ledger.open(copy) as lg:
        if file == "entities":
            query = "select state->>'balance' as b from entities where e like 'acct-1'"  # not from the index
            assert lg.sql(query, as_of=SEALS[-1]).to_pylist() == [{"b": "-1"}]  # what a reader is told
        r = lg.verify()
    assert (r.ok, r.first_bad_tx, r.checked) == (False, SEALS[-1], SEALS[-1] - 1), r.reason
    assert r.reason is not None and "entity state checkpoint" in r.reason


@pytest.mark.parametrize("tx", [3, 18])  # sealed, and in the tail
def test_entity_index_changed_names_that_tx(copy: Path, tx: int) -> None:
    """entity() and history() read the entity index (SQLite): it is checked against the records."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(copy / "entity_index.sqlite")) as con, con:
        changed = con.execute("UPDATE entity_index SET attrs = ? WHERE tx = ? AND e = 'acct-1'",
                              ('{"id":"acct-1","balance":-1}', tx)).rowcount
    assert changed == 1
    ok, _checked, bad, reason = verify(copy, read_only=True)  # as `ledger verify` (found by audit)
    assert (ok, bad) == (False, tx) and reason is not None and "entity index" in reason
    with Ledger.open(copy) as lg:
        assert lg.entity("acct-1", as_of=tx) == {"balance": -1}  # what a reader would be told
        r = lg.verify()
    assert (r.ok, r.first_bad_tx) == (False, tx), r.reason
    assert r.reason is not None and "entity index" in r.reason


def test_an_unreadable_entity_index_is_named_then_rebuilt_by_the_writer(pristine: Path, copy: Path) -> None:
    """Derived data: the writer rebuilds it (it raised sqlite3.DatabaseError at open; found by audit)."""
    (copy / "entity_index.sqlite").write_bytes(b"garbage")
    ok, _checked, _bad, reason = verify(copy, read_only=True)
    assert not ok and reason is not None and "entity_index.sqlite cannot be read" in reason
    with Ledger.open(copy) as lg, Ledger.open(pristine, read_only=True) as good:
        assert lg.entity("acct-1") == good.entity("acct-1") is not None
        assert lg.verify().ok


def test_deleted_last_segment_with_an_empty_tail_still_opens_and_verify_names_it(
    pristine: Path, tmp_path: Path
) -> None:
    root = tmp_path / "sealed"
    shutil.copytree(pristine, root)
    with Ledger.open(root) as lg:
        lg.seal()  # the tail (16-20) becomes the last segment
    shutil.rmtree(segment_dir(root, 16, HEAD))
    ok, checked, bad, reason = verify(root)
    assert (ok, bad, checked) == (False, 16, 15), reason
    with Ledger.open(root) as lg:
        assert lg.damaged is not None and "16-20" in lg.damaged
        with pytest.raises(CorruptLedger, match="cannot append"):
            lg.append([{"kind": "command", "action": "x", "data": {}}])
