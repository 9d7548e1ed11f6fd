"""Read-only and bounded SQL: only SELECT runs, no files beyond the ledger, time and row limits."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from ledger import InvalidQuery, Ledger, LedgerError, views
from ledger.errors import InvalidViewName

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def lg(tmp_path: Path) -> Ledger:
    ledger = Ledger.open(tmp_path / "data", seal_every=5)
    ledger.append([{"kind": "event", "action": "x", "data": {"id": f"e{i}", "n": i}} for i in range(8)])
    return ledger


@pytest.mark.parametrize("statement", [
    "DELETE FROM log", "INSERT INTO tail_records SELECT * FROM tail_records", "DROP TABLE offsets",
    "COPY (SELECT 1) TO '/tmp/x.csv'", "ATTACH '/tmp/other.duckdb' AS o", "INSTALL httpfs",
    "LOAD httpfs", "SET enable_external_access = true", "PRAGMA database_list",
    "SELECT 1; DELETE FROM log", "CHECKPOINT",
    # EXPLAIN ANALYZE runs the statement it explains (found by audit: these ran, and SET stuck)
    "EXPLAIN ANALYZE SET threads = 1", "EXPLAIN ANALYZE SET memory_limit = '40GB'",
    "explain  analyze\n RESET threads", "EXPLAIN ANALYZE CREATE TABLE zz AS SELECT 1",
    "EXPLAIN ANALYZE DROP TABLE IF EXISTS offsets", "EXPLAIN CREATE MACRO log() AS TABLE SELECT 1",
    "EXPLAIN (FORMAT json) SELECT 1", "/* x */ EXPLAIN ANALYZE SET threads = 1",
    "-- note\nEXPLAIN ANALYZE CREATE TABLE zz AS SELECT 1",
])
def test_only_select_runs(lg: Ledger, statement: str) -> None:
    settings = "SELECT current_setting('threads') AS t, current_setting('memory_limit') AS m"
    before = lg.sql(settings).to_pylist()
    with pytest.raises(InvalidQuery):
        lg.sql(statement)
    assert lg.sql("SELECT count(*) AS n FROM log").to_pylist() == [{"n": 8}]
    assert lg.sql(settings).to_pylist() == before
    assert lg.verify().ok


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('/tmp/../etc/x.parquet')", "SELECT * FROM glob('/*')",
])
def test_no_file_access_beyond_the_ledger(lg: Ledger, query: str) -> None:
    with pytest.raises(InvalidQuery):
        lg.sql(query)


@pytest.mark.parametrize("reader", ["read_blob", "read_text", "read_csv", "read_json_objects", "glob",
                                    "read_parquet", "parquet_metadata"])
@pytest.mark.parametrize("file", ["ledger.duckdb", "ledger.duckdb.wal", "*"])
def test_no_file_of_the_ledger_is_read_by_name(lg: Ledger, reader: str, file: str) -> None:
    """Found by audit: read_blob('<data>/ledger.duckdb.wal') returned the catalog's WAL (the
    database's own files pass allowed_directories); nor may a view read them."""
    query = f"SELECT * FROM {reader}('{lg.root / file}')"
    with pytest.raises(InvalidQuery, match=rf"function {reader}\(\) is not available"):
        lg.sql(query)
    with pytest.raises(InvalidQuery, match="is not available"):
        views.define_view(lg, "reader", query)


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM tail_records", "SELECT * FROM main.offsets", "SELECT * FROM ledger_meta",
    "SELECT l.tx FROM log l JOIN record_ids r ON l.id = r.id", "SELECT * FROM segments",
    "SELECT (SELECT count(*) FROM tail_index) FROM log", "SUMMARIZE tail_records",
    "EXPLAIN ANALYZE SELECT * FROM offsets",
    # A CTE of that name covers its own scope only, and not its own body unless recursive.
    "SELECT (WITH tail_records AS (SELECT 1) SELECT 1) AS x, * FROM tail_records",
    "WITH ledger_meta AS (SELECT * FROM ledger_meta) SELECT * FROM ledger_meta",
    "WITH a AS (SELECT * FROM b), b AS (SELECT * FROM tail_records) SELECT * FROM a",
])
def test_the_catalogs_own_tables_are_not_readable(lg: Ledger, query: str) -> None:
    # They hold rows newer than any as-of point, and offsets that are not the reader's business.
    with pytest.raises(InvalidQuery, match="unknown relation"):
        lg.as_of(1).sql(query)


@pytest.mark.parametrize("query", [
    "SELECT * FROM query_table('tail_records')", "SELECT * FROM query('SELECT * FROM offsets')",
    "SELECT count(*) FROM log WHERE tx IN (SELECT tx FROM query_table('tail_transactions'))",
    "SELECT * FROM duckdb_tables()", "SELECT path FROM duckdb_databases()",
    "SELECT * FROM pragma_table_info('tail_records')", "SELECT * FROM Query_Table('record_ids')",
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT * FROM tail_records'))",
    "SELECT * FROM checkpoint()",
])
def test_functions_that_reach_the_catalog_are_refused(lg: Ledger, query: str) -> None:
    with pytest.raises(InvalidQuery, match=r"function \w+\(\) is not available"):
        lg.as_of(1).sql(query)
    with pytest.raises(InvalidQuery, match="is not available"):  # nor as a view
        views.define_view(lg, "sneaky", query)


@pytest.mark.parametrize("name", ["group", "all", "select", "order", "union", "table"])
def test_a_view_may_not_take_an_sql_keyword_as_its_name(lg: Ledger, name: str) -> None:
    with pytest.raises(InvalidViewName, match="SQL keyword"):
        views.define_view(lg, name, "SELECT 1 AS x")
    rows = lg.sql("SELECT kind, count(*) AS n FROM log GROUP BY ALL UNION ALL SELECT 'none', 0 ORDER BY ALL")
    assert rows.to_pylist() == [{"kind": "event", "n": 8}, {"kind": "none", "n": 0}]


def test_recursive_ctes_see_themselves(lg: Ledger) -> None:
    query = ("WITH RECURSIVE offsets(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM offsets WHERE n < 3), "
             "later AS (SELECT n FROM offsets) SELECT sum(n) AS s FROM later")
    assert lg.sql(query).to_pylist() == [{"s": 6}]


def test_a_view_recorded_under_a_keyword_name_breaks_nothing(lg: Ledger) -> None:
    # Earlier versions let a view be named `group`: its definition stays in the log for ever.
    lg.append([{"kind": "event", "action": views.DEFINED,
                "data": {"name": "group", "sql": "SELECT 7 AS x", "description": ""}}])
    defined = lg.head.tx
    lg.append([{"kind": "event", "action": "x", "data": {"id": "e9", "n": 9}}])
    counts = lg.sql("SELECT kind, count(*) AS n FROM log GROUP BY kind ORDER BY kind").to_pylist()
    assert counts == [{"kind": "event", "n": 10}]
    assert lg.sql('SELECT x FROM "group"').to_pylist() == [{"x": 7}]
    assert lg.sql(f'SELECT x FROM "group" FOR SYSTEM_TIME AS OF {defined}').to_pylist() == [{"x": 7}]
    assert views.rows(lg, "group").to_pylist() == [{"x": 7}]


def test_a_cte_may_take_a_catalog_tables_name(lg: Ledger) -> None:
    rows = lg.sql("WITH offsets AS (SELECT count(*) AS n FROM log) SELECT n FROM offsets").to_pylist()
    assert rows == [{"n": 8}]


def test_explain_explains_a_select_after_comments_too(lg: Ledger) -> None:
    for query in ("EXPLAIN SELECT count(*) FROM log", "-- why so slow?\nEXPLAIN ANALYZE SELECT * FROM log",
                  "/* plan */ explain select 1"):
        assert lg.sql(query).num_rows >= 1, query


@pytest.mark.parametrize("query", ["DESCRIBE log", "SUMMARIZE entities", "DESCRIBE SELECT tx FROM log"])
def test_describe_and_summarize_work(lg: Ledger, query: str) -> None:
    rows = lg.sql(query).to_pylist()
    assert rows and all("column_name" in r for r in rows)
    if query.startswith("SUMMARIZE"):
        assert {r["column_name"]: r["count"] for r in rows}["e"] == 8


def test_long_queries_are_interrupted_and_rows_are_capped(lg: Ledger) -> None:
    with pytest.raises(InvalidQuery, match="interrupted"):
        lg.sql("SELECT count(*) FROM range(100000000000) a", timeout=0.3)
    table = lg.sql("SELECT * FROM log ORDER BY tx, seq", limit=3)
    assert table.num_rows == 3 and table.schema.metadata == {b"truncated": b"true"}
    assert lg.sql("SELECT * FROM log", limit=100).num_rows == 8
    assert lg.sql("SELECT 42 AS answer", timeout=5).to_pylist() == [{"answer": 42}]


@pytest.mark.parametrize(("query", "expect"), [
    ("SELECT nope FROM log", 'column "nope" not found'),
    ("SELECT * FROM log WHERE", "LINE 1: SELECT * FROM log WHERE"),
    ("SELECT CAST(action AS INTEGER) FROM log", "LINE 1: SELECT CAST(action AS INTEGER) FROM log"),
    ("SELECT n FROM entities WHERE e = 'e1'", 'column "n" not found'),
])
def test_errors_point_into_the_callers_own_text(lg: Ledger, query: str, expect: str) -> None:
    """Plain SELECTs run with the relations as CTEs above them; errors still quote the query as
    written, with its own line numbers."""
    with pytest.raises(InvalidQuery, match=re.escape(expect)) as err:
        lg.sql(query)
    assert "AS NOT MATERIALIZED" not in str(err.value)


def test_entity_lookups_in_sql_agree_however_they_are_spelled(lg: Ledger) -> None:
    """`e = x` / `e IN (...)` is served from the entity index; the same rows either way."""
    lg.append([{"kind": "event", "action": "x-deleted", "data": {"id": "e3"}},
               {"kind": "event", "action": "x", "data": {"id": "e'4", "n": None}}])
    spellings = [
        ("SELECT e, state FROM entities WHERE e = 'e1'", None),
        ("SELECT e, state FROM entities WHERE e = $e", {"e": "e1"}),
        ("SELECT e, state FROM entities AS s WHERE tx > 0 AND s.e = ?", ["e1"]),
        ("SELECT e, state FROM entities WHERE e IN ('e1', 'e3', 'nobody')", None),
    ]
    scanned = lg.sql("SELECT e, state FROM entities WHERE e || '' = 'e1'").to_pylist()
    assert scanned and scanned[0]["state"] == '{"n":1}'
    for query, params in spellings:
        assert lg.sql(query, params=params).to_pylist() == scanned, query
    query = "SELECT * FROM datoms WHERE e = $e ORDER BY tx, seq, a"
    for e in ("e3", "e'4", "nobody"):
        assert lg.sql(query, params={"e": e}).to_pylist() == \
            lg.sql(query.replace("e = $e", "e || '' = $e"), params={"e": e}).to_pylist()
    assert lg.sql("SELECT * FROM entities WHERE e = 'e3'").num_rows == 0


def test_a_view_as_of_an_earlier_tx_runs_under_the_time_limit_too(lg: Ledger) -> None:
    from ledger import views

    views.define_view(lg, "slow", "SELECT count(*) AS n FROM range(100000000000) a, log")
    defined = lg.head.tx
    lg.append([{"kind": "event", "action": "x", "data": {"id": "e9", "n": 9}}])
    with pytest.raises(InvalidQuery, match="interrupted"):
        lg.sql(f"SELECT * FROM slow FOR SYSTEM_TIME AS OF {defined}", timeout=0.3)


def test_a_query_and_its_params_must_have_their_types(lg: Ledger, tmp_path: Path) -> None:
    for query, params in ((None, None), ("SELECT $1 AS x", 5), ("SELECT $1 AS x", "x")):
        with pytest.raises(InvalidQuery, match="query is SQL text|params must be"):
            lg.sql(query, params=params)  # type: ignore[arg-type]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(LedgerError, match="is a file"):
        Ledger.open(tmp_path / "a-file")
    for odd in ("d*", "d?z", "d[1]"):  # DuckDB patterns: `d*` read another ledger's files (audit)
        with pytest.raises(LedgerError, match="file pattern"):
            Ledger.open(tmp_path / odd)
        assert not (tmp_path / odd).exists()


def test_a_remembered_parse_decides_nothing_on_its_own(lg: Ledger, tmp_path: Path) -> None:
    # The same text, asked again, is checked again against what this ledger holds at this point.
    query = "SELECT count(*) AS n FROM recent"
    other = Ledger.open(tmp_path / "other")
    for ledger in (lg, other, lg):
        with pytest.raises(InvalidQuery, match="unknown relation 'recent'"):
            ledger.sql(query)
    views.define_view(lg, "recent", "SELECT * FROM log WHERE action = 'x'")
    assert lg.sql(query).to_pylist() == [{"n": 8}]
    with pytest.raises(InvalidQuery, match="unknown relation 'recent'"):
        other.sql(query)
    with pytest.raises(InvalidQuery, match="unknown relation 'recent'"):
        lg.sql(query, as_of=1)  # before the view was defined
    for _ in range(2):
        with pytest.raises(InvalidQuery, match="only SELECT"):
            lg.sql("DELETE FROM log")
    other.close()


def test_bad_arguments_to_reads_are_ledger_errors_not_python_ones(lg: Ledger) -> None:
    """Each of these raised a TypeError, UnicodeEncodeError, OverflowError or sqlite3 error (or a
    timeout silently did nothing); a read after close() sometimes even answered."""
    for kwargs in ({"limit": "1"}, {"limit": 1.5}, {"limit": -1}, {"limit": True}, {"timeout": "5"},
                   {"timeout": 0}, {"timeout": float("nan")}):
        with pytest.raises(InvalidQuery, match="limit|timeout"):
            lg.sql("SELECT 1 AS x", **kwargs)  # type: ignore[arg-type]
    assert lg.sql("SELECT 1 AS x", limit=0).num_rows == 0
    for read in (lambda: lg.entity("\ud800"), lambda: lg.history("\ud800"),
                 lambda: lg.sql("SELECT '\ud800' AS x"),
                 lambda: lg.sql("SELECT state FROM entities WHERE e = $e", params={"e": "\ud800"}),
                 lambda: lg.sql("SELECT $e AS x", params={"e": "\ud800"})):
        with pytest.raises(InvalidQuery, match="UTF-8"):
            read()
    for i in range(3):
        lg.append([{"kind": "event", "action": "x", "data": {"id": "acct-1", "n": i}}])
    every = [t.tx for t in lg.tx_range()]
    assert [t.tx for t in lg.tx_range("0001-01-01T00:00:00Z")] == every
    assert lg.tx_range(None, "0001-01-01T00:00:00Z") == []
    head = lg.head.tx
    for chain in (lg.since(head - 1).since(1), lg.since(1).since(head - 1)):  # a chain narrows
        assert chain.sql("SELECT count(*) AS n FROM transactions").to_pylist() == [{"n": 1}]
    lg.entity("acct-1")
    lg.close()
    for read in (lambda: lg.entity("acct-1"), lambda: lg.history("acct-1"),
                 lambda: lg.sql("SELECT state FROM entities WHERE e = 'acct-1'")):
        with pytest.raises(LedgerError, match="closed"):
            read()
