"""The entity index (SQLite, beside DuckDB) is derived data: whatever happens to it, the ledger
catches it up when it opens, and index reads answer exactly what a scan of the datoms answers."""

from __future__ import annotations

import random
import sqlite3
from typing import TYPE_CHECKING, Any

from ledger import Ledger
from ledger.storage import index as idx

if TYPE_CHECKING:
    from pathlib import Path

ENTITIES = [f"e{i}" for i in range(12)]


def build(root: Path) -> Ledger:
    """Assertions, null retractions and whole-entity deletions, across two seals and a tail."""
    rng = random.Random(5)
    lg = Ledger.open(root, seal_every=10**9)
    for tx in range(60):
        batch: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, 4)):
            e = rng.choice(ENTITIES)
            if rng.random() < 0.1:
                batch.append({"kind": "event", "action": "thing-deleted", "data": {"id": e}})
            elif rng.random() < 0.1:  # an event with no attribute: indexed, but no datoms
                batch.append({"kind": "event", "action": "thing-touched", "data": {"id": e}})
            else:
                data = {"id": e, rng.choice("abcd"): rng.choice([1, "x", None, {"n": [1, 2]}])}
                batch.append({"kind": "event", "action": "thing-changed", "data": data})
        lg.append(batch)
        if tx in (20, 40):
            lg.seal()
    return lg


def answers(lg: Ledger) -> dict[tuple[str, int], Any]:
    head = lg.head.tx
    return {
        (e, t): (lg.entity(e, as_of=t), [(d.a, d.v, d.tx, d.record_id) for d in lg.history(e, until=t)])
        for e in ENTITIES for t in (1, 10, 25, 45, head)
    }


def scanned(root: Path) -> dict[tuple[str, int], Any]:
    """The same reads through a read-only snapshot, which scans the datoms (no index)."""
    with Ledger.open(root, read_only=True) as snap:
        assert not snap.indexed
        return answers(snap)


def test_index_reads_match_a_scan_of_the_datoms(tmp_path: Path) -> None:
    lg = build(tmp_path)
    assert lg.indexed
    got = answers(lg)
    lg.close()
    assert got == scanned(tmp_path)


def test_a_deleted_index_is_rebuilt_on_open(tmp_path: Path) -> None:
    build(tmp_path).close()
    expected = scanned(tmp_path)
    for f in tmp_path.glob(idx.FILE + "*"):
        f.unlink()
    with Ledger.open(tmp_path) as lg:
        assert answers(lg) == expected
        assert lg.verify().ok, lg.verify()  # the rebuilt rows are the writer's, row for row


def tamper(root: Path, *statements: str) -> None:
    """Change the index file behind the ledger's back (it is closed)."""
    con = sqlite3.connect(root / idx.FILE)
    with con:
        for sql in statements:
            con.execute(sql)
    con.close()


def test_an_index_behind_the_ledger_catches_up(tmp_path: Path) -> None:
    """As after a crash between the DuckDB commit and the index's: its last txs are missing."""
    build(tmp_path).close()
    expected = scanned(tmp_path)
    tamper(tmp_path, "DELETE FROM entity_index WHERE tx > 15",
           "UPDATE index_meta SET value = 15 WHERE key = 'through_tx'")
    with Ledger.open(tmp_path) as lg:
        assert answers(lg) == expected
        assert lg.verify().ok, lg.verify()  # the rebuilt rows are the writer's, row for row


def test_an_index_ahead_of_the_ledger_is_rebuilt(tmp_path: Path) -> None:
    """An index from another history (say, a data dir restored without its index file)."""
    build(tmp_path).close()
    expected = scanned(tmp_path)
    tamper(tmp_path, "INSERT INTO entity_index VALUES ('e1', 999, 0, 0, 0, 'x', '{\"a\": \"ghost\"}')",
           "UPDATE index_meta SET value = 999 WHERE key = 'through_tx'")
    with Ledger.open(tmp_path) as lg:
        assert answers(lg) == expected
        assert lg.verify().ok, lg.verify()  # the rebuilt rows are the writer's, row for row
        assert lg.index_rows("e1")[-1][0] <= lg.head.tx


def test_a_failing_index_never_fails_an_append_and_reads_fall_back_to_a_scan(tmp_path: Path) -> None:
    lg = build(tmp_path)
    assert lg._index is not None
    lg._index._write.close()  # fault injection: every index write now fails
    report = lg.append([{"kind": "event", "action": "thing-changed", "data": {"id": "e1", "z": 7}},
                        {"kind": "event", "action": "thing-deleted", "data": {"id": "e2"}}])
    assert report.tx == lg.head.tx and not lg.indexed  # committed; reads scan from now on
    assert (lg.entity("e1") or {}).get("z") == 7 and lg.entity("e2") is None
    got = answers(lg)
    lg.close()
    expected = scanned(tmp_path)
    assert got == expected
    with Ledger.open(tmp_path) as again:  # the next open catches the index up
        assert again.indexed and answers(again) == expected
