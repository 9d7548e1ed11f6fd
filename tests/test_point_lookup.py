"""`SELECT ... FROM entities WHERE e = x` is answered from the entity index without DuckDB
(Database._lookup): it must give exactly what DuckDB gives for the same query — rows, JSON text and
schema — at any as-of, since and valid-at, from the tail and from sealed segments."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import InvalidQuery, Ledger
from ledger.temporal import Database

START = datetime(2024, 1, 1, tzinfo=UTC)
ENTITIES = ["a", "b", "é"]
# Attribute names and values DuckDB writes as we do, and some it may not (escapes, floats, big ints):
# those must fall back to DuckDB, not differ.
names = st.sampled_from(["x", "y", "ü", 'q"t', "tab\t"])
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4)
    | st.sampled_from(["plain", "é\u2028", "\x7f", 'a"b', "c\\d", "/"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
event = st.fixed_dictionaries({
    "action": st.sampled_from(["set", "set", "set", "thing-deleted"]),
    "e": st.sampled_from(ENTITIES),
    "attrs": st.dictionaries(names, values, max_size=3),
    "valid_day": st.integers(min_value=-3, max_value=3),
})
txs = st.lists(st.tuples(st.lists(event, min_size=1, max_size=4), st.booleans()), min_size=1, max_size=6)

# Answered from the index; compared with one DuckDB scan per pin (ORDER BY is not a point lookup).
FAST = ["SELECT * FROM entities WHERE e = $e", "select state as s, t.tx from entities t where $e = t.e"]
SCAN = "SELECT * FROM entities WHERE e IN ('a', 'b', 'é', 'nobody') ORDER BY e"


def build(root: Path, batches: list[tuple[list[dict[str, Any]], bool]]) -> Ledger:
    lg = Ledger.open(root, seal_every=10**9)
    for events, seal in batches:
        lg.append([
            {"kind": "event", "action": ev["action"], "data": {"id": ev["e"], **ev["attrs"]},
             "timestamp": START + timedelta(days=ev["valid_day"])}
            for ev in events
        ])
        if seal:
            lg.seal()
    return lg


def pins(lg: Ledger) -> list[tuple[Database, str | None]]:
    head = lg.head.tx
    out: list[tuple[Database, str | None]] = []
    for t in range(head + 1):
        db = lg.as_of(t)
        out += [(db, None), (db, (START + timedelta(days=1)).isoformat())]
        if t:
            out.append((lg.since(t - 1).as_of(t), None))
    return out


@settings(max_examples=25, deadline=None)
@given(txs)
def test_point_lookup_from_the_index_equals_duckdb(batches: list[tuple[list[dict[str, Any]], bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lg = build(Path(tmp) / "ledger", batches)
        try:
            for db, valid_at in pins(lg):
                scanned = db.sql(SCAN, valid_at=valid_at)
                for e in [*ENTITIES, "nobody"]:
                    want = scanned.filter(pc.equal(scanned["e"], e))
                    narrow = want.select(["state", "tx"]).rename_columns(["s", "tx"])
                    for query, expected in zip(FAST, [want, narrow], strict=True):
                        got = db.sql(query, params={"e": e}, valid_at=valid_at)
                        assert got.equals(expected, check_metadata=True), (db, valid_at, e, got, expected)
        finally:
            lg.close()


def test_the_index_answers_plain_values_and_leaves_the_rest_to_duckdb(tmp_path: Path) -> None:
    lg = Ledger.open(tmp_path / "ledger")
    lg.append([
        {"kind": "event", "action": "set", "data": {"id": "a", "n": 1, "s": "x", "l": [1, {"k": None}]}},
        {"kind": "event", "action": "set", "data": {"id": "b", "f": 0.1}},
        {"kind": "event", "action": "set", "data": {"id": "c", "s": 'quote"d'}},
    ])
    answered: list[str] = []
    lookup = Database._lookup

    def spy(self: Database, e: str, columns: list[tuple[str, str]], pin: Any) -> pa.Table | None:
        table = lookup(self, e, columns, pin)
        if table is not None:
            answered.append(e)
        return table

    Database._lookup = spy  # type: ignore[method-assign]
    try:
        for e in ("a", "b", "c"):
            lg.sql("SELECT state FROM entities WHERE e = $e", params={"e": e})
        lg.sql("SELECT state FROM entities WHERE e = 'a' AND tx > 0")  # not a point lookup
        with pytest.raises(InvalidQuery, match="excess parameters"):  # DuckDB's error, as before
            lg.sql("SELECT state FROM entities WHERE e = $e", params={"e": "a", "other": 1})
        with pytest.raises(InvalidQuery, match="not found"):  # an alias hides the table's name
            lg.sql("SELECT entities.state FROM entities t WHERE t.e = 'a'")
    finally:
        Database._lookup = lookup  # type: ignore[method-assign]
    assert answered == ["a"]  # b holds a float, c a string DuckDB escapes: DuckDB writes those
    assert lg.sql("SELECT state FROM entities WHERE e = 'a'").to_pylist() == [
        {"state": '{"l":[1,{"k":null}],"n":1,"s":"x"}'}
    ]
    lg.close()
