"""Readers and the writer at once (invariant 5), and Database values that never change (invariant 1)."""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING, Any

from ledger import Database, Ledger
from ledger.temporal import Pin

if TYPE_CHECKING:
    from pathlib import Path

# Rows that would show a torn tx: records without their transactions row, or fewer/more records
# than the tx says it holds; events whose datoms are missing, datoms whose event is missing.
TORN = """
SELECT coalesce(t.tx, l.tx) AS tx, t.record_count, l.n FROM transactions t
FULL OUTER JOIN (SELECT tx, count(*) AS n FROM log GROUP BY tx) l ON t.tx = l.tx
WHERE t.tx IS NULL OR t.record_count <> coalesce(l.n, 0)
UNION ALL
SELECT tx, NULL, NULL FROM events ev WHERE NOT EXISTS (SELECT 1 FROM datoms d WHERE d.record_id = ev.id)
UNION ALL
SELECT tx, NULL, NULL FROM datoms d WHERE NOT EXISTS (SELECT 1 FROM log l WHERE l.id = d.record_id)
"""
TOTALS = """
SELECT (SELECT count(*) FROM transactions) AS txs, count(*) AS records,
       coalesce(sum((data->>'inc')::BIGINT), 0) AS counter
FROM log
"""

# The newest event's k is the largest k both in the log and in the state of its entity.
LATEST = """
SELECT (SELECT max((state->>'k')::BIGINT) FROM entities)
       IS NOT DISTINCT FROM (SELECT max((data->>'k')::BIGINT) FROM events) AS same
"""


def batch(rng: random.Random, k: int) -> list[dict[str, Any]]:
    n = rng.choice([1, 2, 3, 10, 40, 120])
    return [
        {"kind": "event", "action": "counted", "data": {"id": f"c-{rng.randrange(5)}", "inc": 1, "k": k}}
        if i % 2 else {"kind": "command", "action": "count", "data": {"inc": 2, "k": k}}
        for i in range(n)
    ]


def test_readers_never_see_a_torn_tx_while_the_writer_appends_and_seals(tmp_path: Path) -> None:
    rng = random.Random(7)
    lg = Ledger.open(tmp_path / "ledger", seal_every=150)
    lg.append(batch(rng, 0))
    done = threading.Event()
    errors: list[BaseException] = []
    iterations = {"head": 0, "unbounded": 0}
    seen: dict[str, list[tuple[int, int, int]]] = {"head": [], "unbounded": []}

    def reader(name: str) -> None:
        try:
            while not done.is_set():
                # "head": the public reads, pinned to the latest tx when the call started.
                # "unbounded": no basis filter at all, so only the storage snapshot keeps it whole.
                db = lg.db() if name == "head" else Database(lg, Pin(basis=2**62))
                torn = db.sql(TORN).to_pylist()
                assert torn == [], f"{name} reader saw a torn tx: {torn[:3]}"
                row = db.sql(TOTALS).to_pylist()[0]
                # entities starts from the checkpoint of the seal before: it agrees with the log
                assert db.sql(LATEST).to_pylist() == [{"same": True}], f"{name}: entities lag the log"
                seen[name].append((row["txs"], row["records"], row["counter"]))
                iterations[name] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(n,)) for n in seen]
    for t in threads:
        t.start()
    try:
        k = 1
        while (k < 60 or min(iterations.values()) < 15) and k < 3000 and not errors:
            lg.append(batch(rng, k), meta={"k": k})
            if rng.random() < 0.05:
                lg.seal()
            k += 1
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    for name, totals in seen.items():
        assert totals == sorted(totals), f"{name} reader saw totals go down"
        assert len(set(totals)) >= 5, f"{name} reader never overlapped the writer: {totals[:3]}"
    final = lg.sql(TOTALS).to_pylist()[0]
    assert final["txs"] == lg.head.tx == k
    assert lg.verify().ok
    lg.close()


def answers(db: Database) -> dict[str, Any]:
    """Everything a client could ask a Database value."""
    return {
        "log": db.sql("SELECT tx, seq, id, kind, action, data, valid_time, tx_time FROM log ORDER BY tx, seq")
        .to_pylist(),
        "entities": db.sql("SELECT e, state, tx, tx_time FROM entities ORDER BY e").to_pylist(),
        "transactions": db.sql("SELECT * FROM transactions ORDER BY tx").to_pylist(),
        "quarantine": db.sql("SELECT count(*) AS n FROM quarantine").to_pylist(),
        "valid_at": db.sql("SELECT count(*) AS n FROM log", valid_at="2024-01-01T00:00:00Z").to_pylist(),
        "entity": {e: db.entity(e) for e in ("acct-1", "acct-2", "acct-3")},
        "entity_valid_at": db.entity("acct-1", valid_at="2024-01-01T00:00:00Z"),
        "history": {e: db.history(e) for e in ("acct-1", "acct-2", "acct-3")},
        "basis": db.basis_tx,
    }


def test_a_database_value_answers_the_same_forever(tmp_path: Path) -> None:
    root = tmp_path / "ledger"
    lg = Ledger.open(root, seal_every=10**9)

    def event(e: str, action: str = "balance-set", valid: str | None = None, **data: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"kind": "event", "action": action, "data": {"id": e, **data}}
        if valid:
            rec["timestamp"] = valid
        return rec

    lg.append([event("acct-1", balance=10, owner="ann"), event("acct-2", balance=5)])
    lg.append([event("acct-1", balance=20, valid="2023-06-01T00:00:00+02:00")])
    lg.seal()  # the value below spans a segment and the tail
    lg.append([{"kind": "command", "action": "close", "data": {"id": "acct-2"}},
               event("acct-2", balance=None), event("acct-3", balance=1)])
    t = lg.head.tx
    at_t = lg.head.tx_time
    db = lg.as_of(t)
    before = answers(db)
    assert before["entity"]["acct-1"] == {"balance": 20, "owner": "ann"}
    assert before["entity"]["acct-2"] is None

    lg.append([event("acct-1", balance=99), event("acct-3", action="account-deleted")])
    lg.seal()
    lg.append([event("acct-2", balance=7, owner="bob"), event("acct-4", balance=0)])
    lg.append([event("acct-1", balance=1, valid="2020-01-01T00:00:00Z")])
    assert lg.entity("acct-3") is None and lg.entity("acct-1") == {"balance": 1, "owner": "ann"}

    assert answers(db) == before  # the same value, after appends and seals
    assert answers(lg.as_of(t)) == before  # a new value at the same basis
    assert answers(lg.as_of(at_t)) == before  # ... named by its transaction time
    assert answers(lg.as_of(at_t.isoformat())) == before
    lg.close()

    with Ledger.open(root) as again:
        assert answers(again.as_of(t)) == before
        again.append([event("acct-1", balance=-1)])
        assert answers(again.as_of(at_t)) == before
    with Ledger.open(root, read_only=True) as snapshot:
        assert answers(snapshot.as_of(t)) == before


def test_appends_go_on_while_a_seal_writes_its_segment(tmp_path: Path, monkeypatch: Any) -> None:
    """A seal started by append() writes its Parquet files on its own thread: appends and reads
    go on meanwhile, and close() waits for it to finish registering."""
    from ledger.storage import segments

    writing, release = threading.Event(), threading.Event()
    real_write = segments.write_segment
    sealing: list[int] = []  # (first_tx, last_tx) of the seal

    def paused_write(*args: Any) -> dict[str, str]:
        sealing.extend(args[2:4])
        writing.set()
        assert release.wait(30), "the test never released the seal"
        return real_write(*args)

    monkeypatch.setattr(segments, "write_segment", paused_write)
    rng = random.Random(3)
    lg = Ledger.open(tmp_path / "ledger", seal_every=100)
    k = 0
    while not writing.is_set():  # appends until one of them starts a seal
        lg.append(batch(rng, k))
        k += 1
    assert writing.wait(10)
    first, sealed_through = sealing
    head = lg.head.tx
    for _ in range(5):  # the seal is paused mid-write: appends still commit, reads see them
        lg.append(batch(rng, k))
        k += 1
    assert first == 1 and lg.head.tx == head + 5
    assert lg.sql(TORN).to_pylist() == []
    assert lg.cursor().execute("SELECT count(*) FROM segments").fetchall() == [(0,)]  # the catalog
    release.set()
    lg.close()  # waits for the seal
    with Ledger.open(tmp_path / "ledger") as again:
        catalog = again.cursor()
        assert catalog.execute("SELECT max(last_tx) FROM segments").fetchall() == [(sealed_through,)]
        assert catalog.execute("SELECT min(tx) FROM tail_transactions").fetchall() == [(sealed_through + 1,)]
        assert again.head.tx == k and again.verify().ok
        assert again.sql(TORN).to_pylist() == []


def test_a_background_seal_keeps_up_with_the_appends(tmp_path: Path) -> None:
    """Appends that fill the tail while a seal runs get sealed by the same thread afterwards."""
    rng = random.Random(5)
    with Ledger.open(tmp_path / "ledger", seal_every=50) as lg:
        for k in range(40):
            lg.append(batch(rng, k))
        assert lg._sealer is not None
        lg._sealer.join()
        (tail,) = lg.cursor().execute("SELECT count(*) FROM tail_records").fetchone() or (None,)
        assert tail is not None and tail < 50
        assert lg.sql(TORN).to_pylist() == [] and lg.verify().ok


def test_verify_while_the_writer_appends_and_seals(tmp_path: Path) -> None:
    """verify() reads the entity index before its snapshot: transactions committed meanwhile are
    not reported as damage."""
    rng = random.Random(11)
    stop = threading.Event()
    with Ledger.open(tmp_path / "ledger", seal_every=200) as lg:
        lg.append(batch(rng, 0))

        def write() -> None:
            k = 1
            while not stop.is_set():
                lg.append(batch(rng, k))
                k += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            reports = [lg.verify() for _ in range(4)]
            # On a busy box all four can run before the writer's first append commits (CI saw it
            # once): go on until a verify has overlapped some appends.
            while lg.head.tx < 4 and writer.is_alive() and len(reports) < 1000:
                reports.append(lg.verify())
            reports.append(lg.verify())
        finally:
            stop.set()
            writer.join()
        assert all(r.ok for r in reports), [r for r in reports if not r.ok]
        assert reports[-1].checked > 1 and lg.verify().checked == lg.head.tx


def test_a_superseded_checkpoint_stays_until_the_snapshots_reading_it_end(tmp_path: Path) -> None:
    lg = Ledger.open(tmp_path / "ledger", seal_every=10**9)
    lg.append([{"kind": "event", "action": "set", "data": {"id": "e", "x": 1}}])
    lg.seal()
    state = tmp_path / "ledger" / "state"
    with lg.snapshot() as (_, files):
        assert [tx for tx, _ in files.states] == [1]
        lg.append([{"kind": "event", "action": "set", "data": {"id": "e", "x": 2}}])
        lg.seal()  # writes the checkpoint at tx 2; this snapshot still sees the one at tx 1
        assert sorted(p.name for p in state.iterdir()) == [
            "000000000001.entities.parquet", "000000000001.parquet",
            "000000000002.entities.parquet", "000000000002.parquet"]
    assert sorted(p.name for p in state.iterdir()) == [
        "000000000002.entities.parquet", "000000000002.parquet"]
    assert lg.sql("select state->>'x' as x from entities").to_pylist() == [{"x": "2"}]
    assert lg.as_of(1).sql("select state->>'x' as x from entities").to_pylist() == [{"x": "1"}]
    lg.close()
