"""The ledger against a plain in-memory model of the log: random transactions (entities, nulls,
deletions, duplicate ids, past and future valid times), sealing and reopening, checked on every
temporal read."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ledger import InvalidRecord, Ledger

ENTITIES = ["e0", "e1", "e2", "e3"]
ATTRS = ["a", "b", "c"]
VALID_ATS = [None, datetime(2025, 6, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC),
             datetime(2027, 3, 1, tzinfo=UTC)]
values = st.one_of(
    st.none(), st.integers(-10**20, 10**20), st.text(max_size=5), st.booleans(),
    st.lists(st.integers(0, 3), max_size=2),
)


@st.composite
def event(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"id": draw(st.sampled_from(ENTITIES))}
    for a in draw(st.lists(st.sampled_from(ATTRS), unique=True, max_size=3)):
        data[a] = draw(values)
    action = draw(st.sampled_from(["thing-changed", "thing-changed", "thing-deleted"]))
    rec: dict[str, Any] = {"kind": "event", "action": action, "data": data}
    if draw(st.booleans()):
        rec["timestamp"] = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=draw(st.integers(-400, 400)))
    return rec


command = st.fixed_dictionaries(
    {"kind": st.just("command"), "action": st.sampled_from(["deposit", "withdraw"]),
     "data": st.fixed_dictionaries({"amount": st.integers(0, 100)})}
)


@dataclass
class ModelRecord:
    id: str
    kind: str
    action: str
    data: dict[str, Any]
    valid_time: datetime
    tx: int
    seq: int


@dataclass
class ModelDatom:
    e: str
    a: str
    v: Any
    op: bool
    tx: int
    seq: int
    valid_time: datetime


@dataclass
class Model:
    records: list[ModelRecord] = field(default_factory=list)
    datoms: list[ModelDatom] = field(default_factory=list)
    tx_times: dict[int, datetime] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)  # tx-order current state

    def append(self, tx: int, tx_time: datetime, batch: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        self.tx_times[tx] = tx_time
        known = {r.id for r in self.records}
        stored, dups = [], []
        for rec in batch:
            rid = rec["id"]
            if rid in known:
                dups.append(rid)
                continue
            known.add(rid)
            seq = len(stored)
            stored.append(rid)
            vt = rec.get("timestamp", tx_time)
            self.records.append(ModelRecord(rid, rec["kind"], rec["action"], rec["data"], vt, tx, seq))
            if rec["kind"] != "event":
                continue
            e = rec["data"]["id"]
            attrs = self.state.setdefault(e, {})
            if rec["action"].endswith("-deleted"):
                for a in sorted(attrs):
                    self.datoms.append(ModelDatom(e, a, None, False, tx, seq, vt))
                attrs.clear()
                continue
            for a, v in rec["data"].items():
                if a == "id":
                    continue
                self.datoms.append(ModelDatom(e, a, v, v is not None, tx, seq, vt))
                if v is None:
                    attrs.pop(a, None)
                else:
                    attrs[a] = v
        return stored, dups

    def entity(self, e: str, as_of: int, valid_at: datetime | None) -> dict[str, Any] | None:
        latest: dict[str, ModelDatom] = {}
        for d in self.datoms:
            if d.e != e or d.tx > as_of or (valid_at is not None and d.valid_time > valid_at):
                continue
            cur = latest.get(d.a)
            key = (d.valid_time, d.tx, d.seq) if valid_at is not None else (d.tx, d.seq)
            if cur is None or key > ((cur.valid_time, cur.tx, cur.seq) if valid_at is not None
                                     else (cur.tx, cur.seq)):
                latest[d.a] = d
        out = {a: d.v for a, d in latest.items() if d.op}
        return out or None

    def history(self, e: str, since: int, until: int) -> list[tuple[str, Any, int, bool]]:
        rows = [d for d in self.datoms if d.e == e and since < d.tx <= until]
        rows.sort(key=lambda d: (d.tx, d.seq, d.a))
        return [(d.a, d.v, d.tx, d.op) for d in rows]


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ledger-model-")
        self.lg = Ledger.open(self.dir, seal_every=10_000)
        self.model = Model()
        self.pinned: list[tuple[int, dict[str, Any]]] = []  # (tx, answers) seen earlier

    def teardown(self) -> None:
        self.lg.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def head(self) -> int:
        return self.lg.head.tx

    @rule(
        batch=st.lists(st.one_of(event(), event(), command), max_size=6),
        dup_old=st.booleans(), dup_new=st.booleans(),
    )
    def append(self, batch: list[dict[str, Any]], dup_old: bool, dup_new: bool) -> None:
        batch = [dict(r, id=str(uuid.uuid4())) for r in batch]
        if dup_old and self.model.records and batch:  # a record stored before, again
            old = self.model.records[len(batch) % len(self.model.records)]
            batch[0] = {"id": old.id, "kind": old.kind, "action": old.action, "data": old.data}
        if dup_new and len(batch) > 1:  # a record twice in one batch (a valid time of its own)
            batch[-1] = {k: v for k, v in batch[0].items() if k != "timestamp"}
        rep = self.lg.append(batch)
        stored, dups = self.model.append(rep.tx, rep.tx_time, batch)
        assert list(rep.ids) == stored
        assert sorted(rep.duplicates) == sorted(dups)
        assert rep.tx == len(self.model.tx_times)
        self.check_state()

    @precondition(lambda self: self.head > 0)
    @rule(data=st.data())
    def append_reusing_an_id(self, data: st.DataObject) -> None:
        """A record reusing a stored id with other content is refused, and nothing is written."""
        old = data.draw(st.sampled_from(self.model.records)) if self.model.records else None
        if old is None:
            return
        other = {"id": old.id, "kind": "command", "action": "other", "data": {"n": len(old.data)}}
        with pytest.raises(InvalidRecord, match=f"record 1: field 'id': {old.id} is already in the ledger"):
            self.lg.append([{"kind": "command", "action": "ok", "data": {}}, other])
        assert self.lg.head.tx == len(self.model.tx_times)

    @rule()
    def seal(self) -> None:
        self.lg.seal()
        self.check_state()

    @rule()
    def reopen(self) -> None:
        self.lg.close()
        self.lg = Ledger.open(self.dir, seal_every=10_000)
        self.check_state()

    @precondition(lambda self: self.head > 0)
    @rule(data=st.data())
    def remember(self, data: st.DataObject) -> None:
        """Pin some answers as of a tx; they must never change (invariant 1)."""
        t = data.draw(st.integers(0, self.head))
        self.pinned.append((t, self._answers(t)))

    def _answers(self, t: int) -> dict[str, Any]:
        db = self.lg.as_of(t)
        return {
            "entities": {e: db.entity(e) for e in ENTITIES},
            "count": db.sql("select count(*) n from log").column("n")[0].as_py(),
        }

    @precondition(lambda self: self.head > 0)
    @rule(data=st.data())
    def check_reads(self, data: st.DataObject) -> None:
        t = data.draw(st.integers(0, self.head + 2))
        basis = min(t, self.head)
        e = data.draw(st.sampled_from(ENTITIES))
        for valid_at in VALID_ATS:
            for ent in ENTITIES:
                assert self.lg.entity(ent, as_of=t, valid_at=valid_at) == \
                    self.model.entity(ent, basis, valid_at), (ent, valid_at)
            self._check_sql_lookup(e, t, valid_at)
        # as_of by instant: the tx committed at or before that time
        tt = self.model.tx_times.get(basis)
        if tt is not None:
            assert self.lg.entity(e, as_of=tt) == self.model.entity(e, basis, None)
            assert self.lg.entity(e, as_of=tt - timedelta(microseconds=1)) == \
                self.model.entity(e, basis - 1, None)
        since = data.draw(st.integers(0, self.head))
        got = [(d.a, d.v, d.tx, d.op) for d in self.lg.history(e, since=since, until=t)]
        assert got == self.model.history(e, since, basis)
        # a since() database only holds what came after
        n = self.lg.since(since).sql("select count(*) n from log").column("n")[0].as_py()
        assert n == sum(1 for r in self.model.records if r.tx > since)
        assert self.lg.since(since).entity(e) == self._entity_since(e, since)

    def _check_sql_lookup(self, e: str, t: int, valid_at: datetime | None) -> None:
        """SQL that pins one entity (served from the entity index) answers as the model does, and
        row for row as the same SQL written so that it scans the datoms."""
        def rows(query: str) -> list[dict[str, Any]]:
            return self.lg.sql(query, as_of=t, valid_at=valid_at, params={"e": e}).to_pylist()

        got = rows("select state from entities where e = $e")
        want = self.model.entity(e, min(t, self.head), valid_at)
        assert [json.loads(r["state"]) for r in got] == ([want] if want else [])
        for query in ("select * from entities where e = $e",
                      "select * from datoms where e = $e order by tx, seq, a"):
            scanned = query.replace("e = $e", "e || '' = $e")
            assert rows(query) == rows(scanned), query

    def _entity_since(self, e: str, since: int) -> dict[str, Any] | None:
        sub = Model(datoms=[d for d in self.model.datoms if d.tx > since])
        return sub.entity(e, self.head, None)

    @precondition(lambda self: self.head > 0)
    @rule(data=st.data())
    def check_tx_range(self, data: st.DataObject) -> None:
        lo = data.draw(st.integers(0, self.head + 1))
        hi = data.draw(st.integers(lo, self.head + 2))
        txs = self.lg.tx_range(lo, hi)
        assert [t.tx for t in txs] == list(range(max(lo, 1), min(hi, self.head + 1)))
        for t in txs:
            want = [(r.id, r.action, r.data, r.valid_time) for r in self.model.records if r.tx == t.tx]
            got = [(r.id, r.action, r.data, r.valid_time) for r in t.records]
            assert got == want
            assert t.tx_time == self.model.tx_times[t.tx]

    @precondition(lambda self: self.head > 0)
    @rule(data=st.data())
    def check_tx_range_by_instant(self, data: st.DataObject) -> None:
        """Instants bound the range the same way: tx_time >= start, tx_time < end."""
        times = sorted(self.model.tx_times.values())
        one = timedelta(microseconds=1)
        candidates = [t + d for t in times for d in (-one, timedelta(0), one)]
        start, end = sorted(data.draw(st.lists(st.sampled_from(candidates), min_size=2, max_size=2)))
        want = [tx for tx, tt in sorted(self.model.tx_times.items()) if start <= tt < end]
        assert [t.tx for t in self.lg.tx_range(start, end)] == want
        assert [t.tx for t in self.lg.tx_range(start.isoformat())] == [
            tx for tx, tt in sorted(self.model.tx_times.items()) if tt >= start]

    def check_state(self) -> None:
        """After each step that changes the ledger (the others only read it)."""
        self.aggregates_match()
        self.chain_verifies()

    def aggregates_match(self) -> None:
        got = {(r["kind"], r["action"]): r["n"] for r in self.lg.sql(
            "select kind, action, count(*) n from log group by all").to_pylist()}
        want: dict[tuple[str, str], int] = {}
        for r in self.model.records:
            want[(r.kind, r.action)] = want.get((r.kind, r.action), 0) + 1
        assert got == want
        ents = {r["e"] for r in self.lg.sql("select e from entities").to_pylist()}
        assert ents == {e for e in ENTITIES if self.model.entity(e, self.head, None)}
        txs = self.lg.sql("select count(*) n, coalesce(max(tx), 0) m from transactions").to_pylist()[0]
        assert txs == {"n": self.head, "m": self.head}

    @invariant()
    def pinned_answers_never_change(self) -> None:
        for t, answers in self.pinned[-3:]:
            assert self._answers(t) == answers

    def chain_verifies(self) -> None:
        rep = self.lg.verify()
        assert rep.ok, rep
        assert rep.checked == self.head


LedgerMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestLedgerModel = LedgerMachine.TestCase
