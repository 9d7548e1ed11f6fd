"""Entity state checkpoints (state/): each seal writes one, older ones are kept every
KEEP_STATE_EVERY segments, and `entities` as of any tx starts from the newest at or before it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest

from ledger import Ledger
from ledger.storage import segments as seg
from ledger.storage.catalog import entities_file

if TYPE_CHECKING:
    from pathlib import Path

STATE = "SELECT e, state, tx, tx_time FROM entities ORDER BY e"


def build(root: Path, seals: int) -> Ledger:
    lg = Ledger.open(root, seal_every=10**9)
    for n in range(1, seals + 1):  # one tx per segment: tx n is segment n
        lg.append([
            {"kind": "event", "action": "set", "data": {"id": f"e{n % 3}", "n": n, f"a{n % 2}": n}},
            {"kind": "event", "action": "x-deleted" if n == 4 else "set", "data": {"id": "e0", "m": n}},
        ])
        lg.seal()
    lg.append([{"kind": "event", "action": "set", "data": {"id": "e1", "n": 0}}])  # the tail
    return lg


def test_older_checkpoints_are_kept_every_k_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg, "KEEP_STATE_EVERY", 2)
    lg = build(tmp_path / "ledger", seals=5)
    try:
        kept = [seg.state_name(2), seg.state_name(4), seg.state_name(5)]
        assert sorted(p.name for p in (tmp_path / "ledger" / "state").iterdir()) == sorted(
            [*kept, *map(entities_file, kept)])
        for t in range(lg.head.tx + 1):
            with lg.snapshot() as (_, files):
                start = files.state_at(t)
            assert start == (None if t < 2 else next(s for s in files.states[::-1] if s[0] <= t))
            # valid_at reads never start from a checkpoint: the same state from every datom
            scanned = lg.as_of(t).sql(STATE, valid_at="9999-01-01T00:00:00Z").to_pylist()
            assert lg.as_of(t).sql(STATE).to_pylist() == scanned, t
        assert lg.verify().ok
    finally:
        lg.close()


def test_a_changed_older_checkpoint_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg, "KEEP_STATE_EVERY", 2)
    build(tmp_path / "ledger", seals=5).close()
    path = tmp_path / "ledger" / "state" / seg.state_name(2)
    table = pq.read_table(path)
    rows = [r for r in table.to_pylist() if not (r["e"] == "e0" and r["a"] == "m")]  # drop one
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)
    with Ledger.open(tmp_path / "ledger") as lg:
        r = lg.verify()
    assert (r.ok, r.first_bad_tx) == (False, 2), r.reason
    assert r.reason is not None and "checkpoint at tx 2" in r.reason


def test_a_checkpoint_without_its_entities_file_is_dropped_at_open(tmp_path: Path) -> None:
    """Checkpoints written before they had an entities file (or one deleted by hand) are derived
    data: the next open forgets them, reads fold the datoms, and the next seal writes both files."""
    root = tmp_path / "ledger"
    lg = build(root, seals=3)
    expected = [lg.as_of(t).sql(STATE).to_pylist() for t in range(lg.head.tx + 1)]
    lg.close()
    (root / "state" / entities_file(seg.state_name(3))).unlink()
    with Ledger.open(root, seal_every=10**9) as lg:
        with lg.snapshot() as (_, files):
            assert files.states == ()
        assert not (root / "state" / seg.state_name(3)).exists()
        assert [lg.as_of(t).sql(STATE).to_pylist() for t in range(lg.head.tx + 1)] == expected
        assert lg.seal() == lg.head.tx
        with lg.snapshot() as (_, files):
            assert [s[0] for s in files.states] == [lg.head.tx]
        assert (root / "state" / entities_file(seg.state_name(lg.head.tx))).exists()
        assert [lg.as_of(t).sql(STATE).to_pylist() for t in range(lg.head.tx + 1)] == expected
        assert lg.verify().ok


def test_entities_after_a_checkpoint_with_no_newer_datoms_is_its_entities_file(tmp_path: Path) -> None:
    """When no datom came after the checkpoint (txs of commands, of events naming no entity),
    `entities` is the checkpoint's entities file as it is; a newer datom brings the fold back."""
    lg = build(tmp_path / "ledger", seals=3)
    try:
        lg.seal()  # the tail tx too: the checkpoint is at the head
        at = lg.head.tx
        lg.append([{"kind": "command", "action": "c", "data": {"id": "e1", "n": 5}},
                   {"kind": "event", "action": "no-entity", "data": {"n": 5}}])

        def plan() -> str:
            return str(lg.sql("EXPLAIN SELECT * FROM entities").column(1)[0]).upper()

        assert "JOIN" not in plan() and "READ_PARQUET" in plan()  # one file, read as it is
        scanned = lg.sql(STATE, valid_at="9999-01-01T00:00:00Z").to_pylist()
        assert lg.sql(STATE).to_pylist() == scanned == lg.as_of(at).sql(STATE).to_pylist()
        lg.append([{"kind": "event", "action": "set", "data": {"id": "e1", "n": 6}}])
        assert "JOIN" in plan()  # folded from the checkpoint again
        changed = lg.sql(STATE).to_pylist()
        assert changed == lg.sql(STATE, valid_at="9999-01-01T00:00:00Z").to_pylist() != scanned
    finally:
        lg.close()
