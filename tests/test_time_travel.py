"""SQL:2011 time travel inside one query: `rel FOR SYSTEM_TIME AS OF <tx | TIMESTAMP '...'>`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ledger import InvalidQuery, InvalidTime, Ledger, views

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


def test_quoted_names_and_timestamptz_literals_travel_too(lg: Ledger) -> None:
    t3 = lg.tx_range(3, 4)[0].tx_time.isoformat()
    rows = lg.sql('SELECT (SELECT count(*) FROM "log" FOR SYSTEM_TIME AS OF 2) AS n, '
                  f"(SELECT max(tx) FROM log FOR SYSTEM_TIME AS OF TIMESTAMPTZ '{t3}') AS m").to_pylist()
    assert rows == [{"n": 2, "m": 3}]


@pytest.mark.parametrize("point", ["2+3", "5.5", "$1", "(SELECT 2)", "now()", "2 + 1", "2 || 'x'", "2 - 1"])
def test_a_point_that_is_not_a_literal_says_how_to_write_it(lg: Ledger, point: str) -> None:
    with pytest.raises(InvalidQuery, match="FOR SYSTEM_TIME is written"):
        lg.sql(f"SELECT * FROM log FOR SYSTEM_TIME AS OF {point}", params=[1] if "$" in point else None)


def test_an_unknown_relation_as_of_a_tx_is_named_as_written(lg: Ledger) -> None:
    with pytest.raises(InvalidQuery, match=r"unknown relation 'hist' \(as of tx 4\)"):
        lg.sql("SELECT * FROM hist FOR SYSTEM_TIME AS OF 4")


def test_a_view_may_not_travel_but_a_query_may_pin_a_view(lg: Ledger) -> None:
    with pytest.raises(InvalidQuery, match="a view cannot use FOR SYSTEM_TIME"):
        views.define_view(lg, "early", "SELECT * FROM log FOR SYSTEM_TIME AS OF 2")
    views.define_view(lg, "counted", "SELECT count(*) AS n FROM events WHERE action = 'balance-set'")
    defined = lg.head.tx
    lg.append([{"kind": "event", "action": "balance-set", "data": {"id": "acct-9", "balance": 9}}])
    assert lg.sql(f"SELECT n FROM counted FOR SYSTEM_TIME AS OF {defined}").to_pylist() == [{"n": 8}]
    assert lg.sql("SELECT n FROM counted").to_pylist() == [{"n": 9}]


def test_comments_and_dollar_strings_around_the_clause(lg: Ledger) -> None:
    rows = lg.sql("SELECT $$ log FOR SYSTEM_TIME AS OF 1 $$ AS s, count(*) AS n "
                  "FROM log FOR SYSTEM_TIME AS OF 2-- two\n").to_pylist()
    assert rows == [{"s": " log FOR SYSTEM_TIME AS OF 1 ", "n": 2}]


def test_tagged_dollar_strings_block_comments_and_bare_relations_around_the_clause(lg: Ledger) -> None:
    """Each of these was rewritten inside the string, refused, or lost the relation's name."""
    two = lg.sql("SELECT count(*) AS n FROM log WHERE tx <= 2").to_pylist()
    assert lg.sql("SELECT $x$ log FOR SYSTEM_TIME AS OF 2 $x$ AS s").to_pylist() == [
        {"s": " log FOR SYSTEM_TIME AS OF 2 "}]
    assert lg.sql("SELECT $x$ it's $x$ AS s, count(*) AS n FROM log FOR SYSTEM_TIME AS OF 2").to_pylist() == [
        {"s": " it's ", **two[0]}]
    for sql in ("SELECT count(*) AS n FROM log FOR SYSTEM_TIME AS OF 2 /* c */",
                "SELECT count(*) AS n FROM log /* c */ FOR SYSTEM_TIME AS OF 2"):
        assert lg.sql(sql).to_pylist() == two, sql
    pinned = [r["tx"] for r in lg.sql("SELECT tx FROM log WHERE tx <= 2 ORDER BY tx").to_pylist()]
    for tail in ("SEMI JOIN events USING (id) ORDER BY 1", "TABLESAMPLE 100% ORDER BY 1"):
        rows = lg.sql(f"SELECT log.tx FROM log FOR SYSTEM_TIME AS OF 2 {tail}").to_pylist()
        assert [r["tx"] for r in rows] == pinned, tail
    assert lg.sql("DESCRIBE log FOR SYSTEM_TIME AS OF 2").num_rows == lg.sql("DESCRIBE log").num_rows
    summary = lg.sql("SUMMARIZE log FOR SYSTEM_TIME AS OF 2").to_pylist()
    assert next(r for r in summary if r["column_name"] == "tx")["max"] == "2"


def test_duckdbs_own_at_version_clause_is_refused_not_ignored(lg: Ledger) -> None:
    """It read current data on one path and failed on the other; the ledger's relations keep no
    DuckDB versions, so it names the clause to use instead."""
    for sql in ("SELECT count(*) AS n FROM log AT (VERSION => 1)",
                "WITH x AS (SELECT 1) SELECT count(*) AS n FROM log AT (TIMESTAMP => now())"):
        with pytest.raises(InvalidQuery, match="FOR SYSTEM_TIME AS OF"):
            lg.sql(sql)
    assert lg.sql("SELECT 'AT (VERSION => 1)' AS s").to_pylist() == [{"s": "AT (VERSION => 1)"}]


def test_an_entitys_tx_is_its_last_change_a_retraction_included(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "d") as lg:
        for data in ({"id": "a", "x": 1}, {"id": "a", "y": 2}, {"id": "a", "y": None}, {"id": "b", "x": 1}):
            lg.append([{"kind": "event", "action": "set", "data": data}])
        lg.append([{"kind": "event", "action": "thing-deleted", "data": {"id": "b"}}])
        rows = lg.sql("SELECT e, state, tx FROM entities ORDER BY e").to_pylist()
        assert rows == [{"e": "a", "state": '{"x":1}', "tx": 3}]  # b is gone; a's y retracted at 3
        assert lg.sql("SELECT e, tx FROM entities WHERE e = 'a'").to_pylist() == [{"e": "a", "tx": 3}]
