"""SQL:2011 time travel inside one query: `rel FOR SYSTEM_TIME AS OF <tx | TIMESTAMP '...'>`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ledger import InvalidTime, Ledger

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def lg(tmp_path: Path) -> Ledger:
    ledger = Ledger.open(tmp_path / "data", seal_every=4)
    for i in range(1, 9):
        data = {"id": f"acct-{i % 3}", "balance": i}
        ledger.append([{"kind": "event", "action": "balance-set", "data": data}])
    return ledger


@pytest.mark.parametrize("relation", ["log", "events", "datoms", "entities", "transactions"])
def test_each_relation_as_of_a_tx_matches_the_pinned_database(lg: Ledger, relation: str) -> None:
    for t in range(0, lg.head.tx + 1):
        inline = lg.sql(f"SELECT * FROM {relation} FOR SYSTEM_TIME AS OF {t} ORDER BY ALL")
        pinned = lg.sql(f"SELECT * FROM {relation} ORDER BY ALL", as_of=t)
        assert inline.to_pylist() == pinned.to_pylist()


def test_yesterday_and_today_in_one_query(lg: Ledger) -> None:
    t3 = lg.tx_range(3, 4)[0].tx_time
    rows = lg.sql(
        "SELECT now.e, now.state->>'balance' AS now, past.state->>'balance' AS past "
        "FROM entities now LEFT JOIN entities FOR SYSTEM_TIME AS OF TIMESTAMP "
        f"'{t3.isoformat()}' past ON past.e = now.e ORDER BY now.e"
    ).to_pylist()
    assert rows == [
        {"e": "acct-0", "now": "6", "past": "3"},
        {"e": "acct-1", "now": "7", "past": "1"},
        {"e": "acct-2", "now": "8", "past": "2"},
    ]


def test_a_database_value_never_sees_past_its_basis(lg: Ledger) -> None:
    db = lg.as_of(2)
    assert db.sql("SELECT count(*) AS n FROM log FOR SYSTEM_TIME AS OF 7").to_pylist() == [{"n": 2}]


def test_a_naive_timestamp_is_refused(lg: Ledger) -> None:
    with pytest.raises(InvalidTime):
        lg.sql("SELECT * FROM log FOR SYSTEM_TIME AS OF TIMESTAMP '2026-01-01 00:00:00'")


def test_the_clause_inside_a_string_or_a_comment_is_left_alone(lg: Ledger) -> None:
    rows = lg.sql("SELECT 'log FOR SYSTEM_TIME AS OF 3' AS s, count(*) AS n "
                  "FROM log FOR SYSTEM_TIME AS OF 2 -- not log FOR SYSTEM_TIME AS OF 5\n").to_pylist()
    assert rows == [{"s": "log FOR SYSTEM_TIME AS OF 3", "n": 2}]
