"""Round-trip properties: what goes in through append() comes back identical through tx_range() and
entity(), from the DuckDB tail, from sealed Parquet and after reopening; bad input is refused whole."""

from __future__ import annotations

import math
import struct
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ledger import InvalidRecord, Ledger, LedgerError

if TYPE_CHECKING:
    from pathlib import Path

# NUL, astral planes (emoji, Gothic, a tag character), line/paragraph separators, BOM, quotes
SPECIAL_TEXT = [
    "", "\x00", "a\x00b", "\U0001f600", "\U00010348\U000e0001", "\u2028\u2029", "\ufeff", "é", '\\"',
]
characters = st.characters(codec="utf-8") | st.sampled_from("\x00\U0001f600\U00010348\u2028\ufeff")
text = st.text(alphabet=characters, max_size=12) | st.sampled_from(SPECIAL_TEXT)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**40])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([-0.0, 0.0, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308, 1e-300, 0.1])
    | text
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=25,
)
json_objects = st.dictionaries(text, json_values, max_size=6)

SETTINGS = settings(max_examples=50, deadline=None)


class Ledgers:
    """A fresh ledger every few examples (each example seals one tiny segment, and a ledger with
    hundreds of them makes every read slow); remembers what each stored, to check after reopening."""

    EVERY = 10

    def __init__(self, base: Path) -> None:
        self.base = base
        self.done: list[tuple[Path, list[Any]]] = []
        self._start()

    def _start(self) -> None:
        self.root = self.base / f"ledger-{len(self.done)}"
        self.lg = Ledger.open(self.root, seal_every=10**9)
        self.stored: list[Any] = []

    def current(self) -> Ledger:
        if len(self.stored) >= self.EVERY:
            self.lg.close()
            self.done.append((self.root, self.stored))
            self._start()
        return self.lg

    def finish(self) -> list[tuple[Path, list[Any]]]:
        self.lg.close()
        self.done.append((self.root, self.stored))
        return self.done


def same(a: Any, b: Any) -> bool:
    """Equality that also tells 1 from 1.0 from True, -0.0 from 0.0, and key order apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def expected_entity(data: dict[str, Any]) -> dict[str, Any] | None:
    return {a: v for a, v in data.items() if a != "id" and v is not None} or None


def check_data(lg: Ledger, tx: int, eid: str, data: dict[str, Any], where: str) -> None:
    (got,) = lg.tx_range(tx, tx + 1)
    assert got.tx == tx and len(got.records) == 1, where
    assert same(got.records[0].data, data), f"{where}: {got.records[0].data!r} != {data!r}"
    entity = lg.entity(eid)
    want = expected_entity(data)
    assert entity == want, where
    if want is not None:
        assert entity is not None and all(same(entity[a], v) for a, v in want.items()), where


def test_json_values_round_trip_through_tail_parquet_and_reopen(tmp_path: Path) -> None:
    ledgers = Ledgers(tmp_path)

    @SETTINGS
    @given(data=json_objects)
    @example(data={"": {"": []}, "a\x00b": "\x00\U0001f600", "z": -0.0, "big": 2**70, "neg": -(2**90),
                   "tiny": 5e-324, "huge": 1.7976931348623157e308, "t": True, "f": False, "n": None,
                   "e": "", "o": {}, "l": [[], {}, [None]], "i": 1, "x": 1.0})
    def round_trip(data: dict[str, Any]) -> None:
        eid = str(uuid.uuid4())
        data = {"id": eid, **{k: v for k, v in data.items() if k != "id"}}
        lg = ledgers.current()
        report = lg.append([{"kind": "event", "action": "set", "data": data}])
        check_data(lg, report.tx, eid, data, "tail")
        lg.seal()
        check_data(lg, report.tx, eid, data, "parquet")
        ledgers.stored.append((report.tx, eid, data))

    round_trip()
    for root, stored in ledgers.finish():
        with Ledger.open(root) as again:
            for tx, eid, data in stored:
                check_data(again, tx, eid, data, "reopened")
            assert again.verify().ok


# Whole seconds: real zones have offsets such as +00:19:32 (Amsterdam's LMT), never finer, and
# CPython 3.11's fromisoformat drops sub-second offsets.
offsets = st.integers(-86_399, 86_399).map(lambda s: timedelta(seconds=s))
zones = st.builds(timezone, offsets) | st.sampled_from(
    [ZoneInfo(z) for z in ("Asia/Kathmandu", "America/St_Johns", "Pacific/Chatham", "Europe/Dublin")]
)
instants = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=zones,
)


def test_aware_timestamps_come_back_as_the_same_instant_in_utc(tmp_path: Path) -> None:
    ledgers = Ledgers(tmp_path)

    def check(db: Ledger, tx: int, ts: datetime, kts: datetime, where: str) -> None:
        (rec,) = db.tx_range(tx, tx + 1)[0].records
        for got, sent in ((rec.valid_time, ts), (rec.kafka_timestamp, kts)):
            assert got is not None and got.utcoffset() == timedelta(0), where
            assert got == sent.astimezone(UTC), f"{where}: {got} != {sent}"
        (row,) = db.sql("SELECT valid_time FROM log WHERE tx = ?", params=[tx]).to_pylist()
        assert row["valid_time"] == ts.astimezone(UTC), where

    @SETTINGS
    @given(ts=instants, kts=instants)
    @example(ts=datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
             kts=datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(-timedelta(hours=9, seconds=1))))
    def round_trip(ts: datetime, kts: datetime) -> None:
        lg = ledgers.current()
        report = lg.append([{"kind": "command", "action": "at", "data": {}, "timestamp": ts,
                             "kafka_timestamp": kts.isoformat()}])
        check(lg, report.tx, ts, kts, "tail")
        lg.seal()
        check(lg, report.tx, ts, kts, "parquet")
        ledgers.stored.append((report.tx, ts, kts))

    round_trip()
    for root, stored in ledgers.finish():
        with Ledger.open(root) as again:
            for tx, ts, kts in stored:
                check(again, tx, ts, kts, "reopened")
            assert again.verify().ok


VALID = {"kind": "command", "action": "ok", "data": {"n": 1}}


def nested(depth: int) -> list[Any]:
    """A list nested `depth` levels deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value

INVALID = [
    ({"kind": "event", "action": "x", "data": {"v": math.nan}}, "data"),
    ({"kind": "event", "action": "x", "data": {"deep": [{"v": -math.inf}]}}, "data"),
    ({"kind": "event", "action": "x", "data": {}, "timestamp": datetime(2024, 1, 1, 12)}, "timestamp"),
    ({"kind": "event", "action": "x", "data": {}, "timestamp": "2024-01-01T12:00:00"}, "timestamp"),
    ({"kind": "event", "action": "x", "data": {1: "one"}}, "data"),
    ({"kind": "event", "action": "x", "data": {"o": {(1, 2): 3}}}, "data"),
    ({"kind": "event", "action": "x", "data": {}, "colour": "red"}, "colour"),
    ({"kind": "event", "action": "", "data": {}}, "action"),
    ({"kind": "event", "action": "  ", "data": {}}, "action"),
    ({"kind": "fact", "action": "x", "data": {}}, "kind"),
    ({"action": "x", "data": {}}, "kind"),
    ({"kind": "event", "action": "x", "data": {}, "id": "not-a-uuid"}, "id"),
    ({"kind": "event", "action": "x", "data": {}, "id": 12}, "id"),
    ({"kind": "event", "action": "x", "data": []}, "data"),
    ({"kind": "event", "action": "x", "data": {"s": "\ud800"}}, "data"),  # lone surrogate: not UTF-8
    ({"kind": "event", "action": "x\udfff", "data": {}}, "action"),
    ({"kind": "event", "action": "x", "data": {},  # a real instant that has no UTC year
      "timestamp": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))}, "timestamp"),
    ({"kind": "event", "action": "x", "data": {}, "kafka_timestamp": "9999-12-31T23:00:00-05:00"},
     "kafka_timestamp"),
    # Deeper than the Kafka path accepts: verify recursed per level and broke from 499 on.
    ({"kind": "event", "action": "x", "data": {"a": nested(127)}}, "data"),
    ({"kind": "event", "action": "x", "data": {"a": nested(3000)}}, "data"),
    ({"kind": "event", "action": "x", "data": {}, "partition": 1 << 31}, "partition"),
    ({"kind": "event", "action": "x", "data": {}, "offset": 1 << 63}, "offset"),
]


def test_data_may_nest_127_levels_and_records_and_meta_must_have_their_types(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger") as lg:
        lg.append([{"kind": "event", "action": "x", "data": {"a": nested(126)}}])
        for records, meta in ((None, None), ({"kind": "event"}, None), ("abc", None), ([VALID], [1, 2]),
                              ([VALID], "ab")):
            with pytest.raises(LedgerError, match="must be"):
                lg.append(records, meta)  # type: ignore[arg-type]
        assert lg.head.tx == 1 and lg.verify().ok


def test_invalid_records_are_refused_by_index_and_field_and_nothing_is_written(tmp_path: Path) -> None:
    lg = Ledger.open(tmp_path / "ledger", seal_every=10**9)
    lg.append([VALID])

    @SETTINGS
    @given(case=st.sampled_from(INVALID), before=st.integers(0, 3), after=st.integers(0, 2))
    def refused(case: tuple[dict[str, Any], str], before: int, after: int) -> None:
        bad, field = case
        ids = [str(uuid.uuid4()) for _ in range(before + after)]
        good = [{**VALID, "id": i} for i in ids]
        head = lg.head
        with pytest.raises(InvalidRecord) as info:
            lg.append([*good[:before], bad, *good[before:]])
        assert (info.value.index, info.value.field) == (before, field), str(info.value)
        assert f"record {before}" in str(info.value) and repr(field) in str(info.value)
        assert lg.head == head
        assert lg.sql("SELECT count(*) AS n FROM transactions").column("n")[0].as_py() == head.tx
        if ids:  # the good records of the refused batch were not half-stored: they are not duplicates
            report = lg.append(good)
            assert report.ids == tuple(ids) and report.duplicates == ()

    refused()
    assert lg.verify().ok
    lg.close()


class Text(str):
    """Like numpy.str_: a str subclass, as notebooks hand them over."""


class Number(int):
    pass


def test_subclasses_of_json_types_are_stored_as_the_plain_values_they_stand_for(tmp_path: Path) -> None:
    """They used to fail deep in hashing with a TypeError (or as "a non-string key"): now the
    record, its hash and its datoms are those of the same record built from plain values."""
    parent, rid = str(uuid.uuid4()), str(uuid.uuid4())
    plain = {"kind": "event", "action": "opened", "id": rid, "parent": parent, "key": "k",
             "headers": [("h", "v")], "timestamp": "2026-01-01T00:00:00Z",
             "data": {"id": "acct", "n": 7, "f": 0.5, "tags": ["a", {"b": 2}], "m": {"x": "y"}}}
    fancy = {**plain, "kind": Text("event"), "action": Text("opened"), "id": Text(rid),
             "parent": Text(parent), "key": Text("k"), "headers": [(Text("h"), Text("v"))],
             "data": {Text("id"): Text("acct"), "n": Number(7), "f": 0.5,
                      "tags": (Text("a"), {Text("b"): Number(2)}), "m": MappingProxyType({"x": Text("y")})}}
    with Ledger.open(tmp_path / "a") as a, Ledger.open(tmp_path / "b") as b:
        a.append([plain], {"by": "ann", "n": 1})
        b.append([fancy], {Text("by"): Text("ann"), "n": Number(1)})
        assert b.verify().ok
        (ra,), (rb,) = a.tx_range()[0].records, b.tx_range()[0].records
        assert rb.hash == ra.hash and replace(rb, tx_time=ra.tx_time) == ra
        assert b.tx_range()[0].meta == {"by": "ann", "n": 1}
        assert type(rb.action) is str and rb.data["tags"] == ["a", {"b": 2}]
        assert b.entity("acct") == a.entity("acct") == {"n": 7, "f": 0.5, "tags": ["a", {"b": 2}],
                                                        "m": {"x": "y"}}


def test_tx_time_strictly_increases_when_the_wall_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ledger.ledger as ledger_module

    wall = [datetime(2030, 1, 1, 12, tzinfo=UTC)]

    class SteppingClock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> SteppingClock:  # type: ignore[override]
            return wall[0]  # type: ignore[return-value]

    with Ledger.open(tmp_path / "data") as lg:
        monkeypatch.setattr(ledger_module, "datetime", SteppingClock)
        first = lg.append([{"kind": "command", "action": "a", "data": {}}]).tx_time
        wall[0] -= timedelta(hours=1)  # NTP steps the clock back
        second = lg.append([{"kind": "command", "action": "b", "data": {}}]).tx_time
        third = lg.append([{"kind": "command", "action": "c", "data": {}}]).tx_time
        assert first == datetime(2030, 1, 1, 12, tzinfo=UTC)
        assert first < second < third and third - first == timedelta(microseconds=2)
        monkeypatch.undo()
        assert [t.tx_time for t in lg.tx_range()] == [first, second, third]
        assert lg.as_of(second).basis_tx == 2  # instants still resolve to one tx each
