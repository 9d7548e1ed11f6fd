"""Views: versioned in the ledger, usable from any SQL as of any tx, materialized at a tx."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import InvalidQuery, Ledger
from ledger import views as v
from ledger.errors import InvalidViewName, UnknownView

if TYPE_CHECKING:
    from pathlib import Path


def deposit(lg: Ledger, acct: str, amount: int) -> int:
    return lg.append([{"kind": "event", "action": "deposited",
                       "data": {"id": acct, "account": acct, "amount": amount}}]).tx


def sorted_rows(table: Any) -> list[tuple[Any, ...]]:
    return sorted((tuple(r.values()) for r in table.to_pylist()), key=repr)


@pytest.fixture
def lg(tmp_path: Path) -> Ledger:
    return Ledger.open(tmp_path / "data", seal_every=3)


BALANCES = ("SELECT data->>'account' AS account, sum((data->>'amount')::BIGINT) AS balance "
            "FROM events WHERE action = 'deposited' GROUP BY ALL")


def test_definitions_are_versioned_and_reads_use_the_definition_at_t(lg: Ledger) -> None:
    deposit(lg, "a", 5)
    deposit(lg, "b", 7)
    first, created = v.define_view(lg, "balances", BALANCES, "per account")
    assert created and first.tx == lg.head.tx and first.description == "per account"
    t1 = lg.head.tx
    deposit(lg, "a", 1)
    second, created = v.define_view(lg, "balances", BALANCES.replace("sum(", "max("))
    assert not created and second.tx > t1
    t2 = lg.head.tx
    # The definition records are ordinary, hash-chained events.
    actions = lg.sql("SELECT action FROM events WHERE action LIKE 'ledger.view-%' ORDER BY tx").to_pylist()
    assert [r["action"] for r in actions] == ["ledger.view-defined"] * 2
    assert lg.verify().ok

    q = "SELECT * FROM balances ORDER BY account"
    assert lg.sql(q, as_of=t1).to_pylist() == [{"account": "a", "balance": 5}, {"account": "b", "balance": 7}]
    assert lg.sql(q).to_pylist() == [{"account": "a", "balance": 5}, {"account": "b", "balance": 7}]  # max
    # today's definition over past data, and the as-of definition over today's data
    assert sorted_rows(v.rows(lg, "balances", as_of=t1, definition="current")) == [("a", 5), ("b", 7)]
    assert sorted_rows(v.rows(lg, "balances", as_of=t2 - 1)) == [("a", 6), ("b", 7)]
    assert sorted_rows(v.rows(lg, "balances")) == [("a", 5), ("b", 7)]
    with pytest.raises(UnknownView):
        v.rows(lg, "balances", as_of=t1 - 1)
    with pytest.raises(InvalidQuery, match="balances"):
        lg.sql("SELECT * FROM balances", as_of=t1 - 1)
    assert [x.tx for x in v.history(lg, "balances")] == [t1, t2]


def test_views_on_views_drop_and_missing_dependencies(lg: Ledger) -> None:
    deposit(lg, "a", 5)
    deposit(lg, "b", 50)
    v.define_view(lg, "balances", BALANCES)
    t_base = lg.head.tx
    v.define_view(lg, "rich", "SELECT account FROM balances WHERE balance > 10")
    t_rich = lg.head.tx
    assert lg.sql("SELECT * FROM rich").to_pylist() == [{"account": "b"}]
    # a join between a view and a relation, and between two views
    joined = lg.sql("SELECT r.account, b.balance FROM rich r JOIN balances b USING (account)")
    assert joined.to_pylist() == [{"account": "b", "balance": 50}]
    # Redefining the base view changes what the dependent view answers from then on only.
    v.define_view(lg, "balances", BALANCES.replace("sum(", "-sum("))
    assert lg.sql("SELECT * FROM rich").to_pylist() == []
    assert lg.sql("SELECT * FROM rich", as_of=t_rich).to_pylist() == [{"account": "b"}]
    v.drop_view(lg, "rich")
    t_dropped = lg.head.tx
    with pytest.raises(InvalidQuery):
        lg.sql("SELECT * FROM rich")
    with pytest.raises(UnknownView):
        v.drop_view(lg, "rich")
    assert lg.sql("SELECT count(*) AS n FROM rich", as_of=t_dropped - 1).to_pylist() == [{"n": 0}]
    assert "rich" not in v.definitions(lg) and "rich" in v.definitions(lg, as_of=t_rich)
    assert set(v.definitions(lg, as_of=t_base)) == {"balances"}
    # A view whose dependency did not exist at T: a clear error naming it.
    v.define_view(lg, "later", "SELECT 1 AS x")
    v.define_view(lg, "uses_later", "SELECT * FROM later")
    v.drop_view(lg, "later")
    with pytest.raises(InvalidQuery, match="uses_later"):
        lg.sql("SELECT * FROM uses_later")
    # A column that happens to share a view's name does not break a query.
    assert lg.sql("SELECT 1 AS rich, 2 AS balances").num_rows == 1
    # Nor does a view that cannot be evaluated now (its dependency changed under it): a query that
    # only names it, or reads it as of a time when it worked, still answers (found by audit).
    v.define_view(lg, "base", "SELECT e, state AS n FROM entities")
    v.define_view(lg, "top", "SELECT * FROM base WHERE n IS NOT NULL")
    t_top = lg.head.tx
    v.define_view(lg, "base", "SELECT e AS ent FROM entities")
    assert lg.sql("SELECT 1 AS top, 'top' AS s").to_pylist() == [{"top": 1, "s": "top"}]
    then = lg.sql(f"SELECT count(*) AS n FROM top FOR SYSTEM_TIME AS OF {t_top}").to_pylist()
    assert then == lg.sql("SELECT count(*) AS n FROM entities", as_of=t_top).to_pylist() != [{"n": 0}]
    with pytest.raises(InvalidQuery, match="'top'.*cannot be evaluated"):
        lg.sql("SELECT * FROM top")
    # A definition may end in a -- comment.
    v.define_view(lg, "commented", "SELECT tx FROM log -- every record's tx")
    count = "SELECT count(*) AS n FROM {}"
    assert lg.sql(count.format("commented")).to_pylist() == lg.sql(count.format("log")).to_pylist()


def test_time_travel_on_a_view_uses_its_definition_then(lg: Ledger) -> None:
    deposit(lg, "a", 5)
    v.define_view(lg, "balances", BALANCES)
    t = lg.head.tx
    deposit(lg, "a", 5)
    rows = lg.sql(
        f"SELECT now.balance AS now, past.balance AS past FROM balances now "
        f"JOIN balances FOR SYSTEM_TIME AS OF {t} past USING (account)"
    ).to_pylist()
    assert rows == [{"now": 10, "past": 5}]


@pytest.mark.parametrize(
    ("name", "sql", "error", "match"),
    [
        ("Bad", "SELECT 1", InvalidViewName, "must match"),
        ("9lives", "SELECT 1", InvalidViewName, "must match"),
        ("x" * 64, "SELECT 1", InvalidViewName, "must match"),
        ("events", "SELECT 1", InvalidViewName, "shadow"),
        ("tail_records", "SELECT 1", InvalidViewName, "shadow"),
        ("segments", "SELECT 1", InvalidViewName, "shadow"),
        ("ok", "SELEC 1", InvalidQuery, "syntax"),
        ("ok", "SELECT nope FROM events", InvalidQuery, "nope"),
        ("ok", "SELECT * FROM no_such_view", InvalidQuery, "no_such_view"),
        ("ok", "DELETE FROM tail_records", InvalidQuery, "only SELECT"),
        ("ok", "SELECT 1; SELECT 2", InvalidQuery, "one SQL statement"),
        ("ok", "SELECT * FROM read_csv('/etc/passwd')", InvalidQuery, "not available"),
        ("ok", "  ", InvalidQuery, "non-empty"),
    ],
)
def test_dry_run_refuses_bad_definitions(
    lg: Ledger, name: str, sql: str, error: type[Exception], match: str
) -> None:
    before = lg.head.tx
    with pytest.raises(error, match=match):
        v.define_view(lg, name, sql)
    assert lg.head.tx == before  # nothing was recorded


def test_a_cycle_is_refused_naming_its_loop(lg: Ledger) -> None:
    v.define_view(lg, "a", "SELECT 1 AS x")
    v.define_view(lg, "b", "SELECT * FROM a")
    v.define_view(lg, "d", "SELECT * FROM b")
    with pytest.raises(InvalidQuery, match=r"view 'a' would depend on itself: a -> b -> a$"):
        v.define_view(lg, "a", "SELECT * FROM d JOIN b USING (x)")
    with pytest.raises(InvalidQuery, match=r"view 'c' would depend on itself: c -> c$"):
        v.define_view(lg, "c", "SELECT * FROM c")
    v.define_view(lg, "a", "SELECT 2 AS x")  # a view named in no loop still redefines
    assert lg.sql("SELECT * FROM d").to_pylist() == [{"x": 2}]


def test_view_records_from_kafka_define_nothing(lg: Ledger) -> None:
    lg.append([{"kind": "event", "action": v.DEFINED, "topic": "events", "partition": 0, "offset": 1,
                "data": {"name": "sneaky", "sql": "SELECT 1"}}])
    assert "sneaky" not in v.definitions(lg)


def test_changes_between_two_points(lg: Ledger) -> None:
    deposit(lg, "a", 5)
    v.define_view(lg, "balances", BALANCES)
    t = lg.head.tx
    deposit(lg, "a", 1)
    deposit(lg, "c", 3)
    added, removed = v.changes(lg, "balances", since=t)
    assert sorted_rows(added) == [("a", 6), ("c", 3)]
    assert sorted_rows(removed) == [("a", 5)]
    added, removed = v.changes(lg, "balances", since=0, until=t)  # did not exist at 0: all added
    assert sorted_rows(added) == [("a", 5)] and removed.num_rows == 0


def test_rebuild_writes_parquet_and_status_and_reads_use_it(lg: Ledger) -> None:
    for i in range(5):
        deposit(lg, f"a{i % 2}", i)
    v.define_view(lg, "big", "SELECT data->>'account' AS account, tx FROM events WHERE action = 'deposited'")
    v.define_view(lg, "balances", BALANCES)
    seen: list[float] = []
    status = v.rebuild(lg, "big", on_progress=lambda f, _m: seen.append(f))
    m = lg.head.tx
    assert status["state"] == "ready" and status["tx"] == m and status["rows"] == 5 and status["incremental"]
    assert seen[-1] == 1.0 and seen == sorted(seen)
    path = lg.root / "views" / "big" / f"{m}.parquet"
    assert path.exists() and json.loads((path.parent / "status.json").read_text())["state"] == "ready"
    deposit(lg, "a1", 100)
    assert v.status(lg, "big")["state"] == "ready"  # incremental: still fresh
    assert lg.sql("SELECT count(*) AS n FROM big").to_pylist() == [{"n": 6}]
    v.rebuild(lg, "balances")
    assert not v.read_status(lg.root, "balances")["incremental"]  # type: ignore[index]
    deposit(lg, "a0", 1)
    assert v.status(lg, "balances")["state"] == "stale"
    # The materialization really is what reads at T >= M use: empty it and see (T < M: the SQL).
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    assert lg.sql("SELECT count(*) AS n FROM big", as_of=m).to_pylist() == [{"n": 0}]
    assert lg.sql("SELECT count(*) AS n FROM big").to_pylist() == [{"n": 2}]  # + the 2 newer rows
    assert lg.sql("SELECT count(*) AS n FROM big", as_of=m - 1).to_pylist() == [{"n": 5}]
    path.unlink()
    assert lg.sql("SELECT count(*) AS n FROM big").to_pylist() == [{"n": 7}]  # gone: the SQL again
    v.drop_view(lg, "big")
    assert not path.parent.exists()


def test_a_long_rebuild_reports_progress_while_it_runs(lg: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress comes from DuckDB's estimate while the view's SQL runs, not only before and after."""
    import ledger.temporal

    monkeypatch.setattr(ledger.temporal, "PROGRESS_EVERY", 0.02)
    deposit(lg, "a", 1)
    # Slow on purpose: a scan of 15M generated rows per record.
    v.define_view(lg, "slow", "SELECT count(DISTINCT (r * 7919) % 1000003) AS n "
                              "FROM events, range(15000000) AS t(r)")
    seen: list[tuple[float, float]] = []

    def on_progress(fraction: float, _message: str) -> None:
        seen.append((fraction, v.status(lg, "slow")["progress"]))

    status = v.rebuild(lg, "slow", on_progress=on_progress)
    fractions = [f for f, _ in seen]
    during = [f for f in fractions if 0.05 < f < 0.8]
    assert during, fractions  # the old code reported 0.05, 0.8 and 1.0 only
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and status["state"] == "ready"
    assert all(abs(f - stored) < 1e-3 for f, stored in seen[:-1])  # GET /views/{name} shows each
    assert v.status(lg, "slow")["progress"] == 1.0


def test_a_rebuild_stops_at_its_time_limit_and_when_its_view_is_dropped(lg: Ledger) -> None:
    """Found by audit: a rebuild ran unbounded, and dropping its view left it running (and its
    directory, recreated by the failed status, on disk)."""
    endless = "SELECT count(*) AS n FROM range(1000000000000)"
    v.define_view(lg, "endless", endless)
    started = time.monotonic()
    with pytest.raises(InvalidQuery, match="interrupted"):
        v.rebuild(lg, "endless", timeout=0.5)
    assert time.monotonic() - started < 10
    assert v.status(lg, "endless")["state"] == "failed" and not v.building(lg, "endless")

    assert v.start_rebuild(lg, "endless")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(v.rebuild, lg, "endless", claimed=True)
        time.sleep(0.5)
        assert not running.done()
        v.drop_view(lg, "endless")
        with pytest.raises(InvalidQuery, match="cancelled"):
            running.result(timeout=10)
    assert not (lg.root / v.VIEWS_DIR / "endless").exists()
    v.define_view(lg, "endless", "SELECT 1 AS n")  # the name is free again
    assert v.rebuild(lg, "endless")["rows"] == 1


def test_a_materialization_keeps_json_columns_json(lg: Ledger) -> None:
    """Read from its Parquet file (and with newer records appended), a view's JSON columns are
    still JSON, as when its SQL runs over the log (found by audit: they came back as text)."""
    from ledger.temporal import JSON_TYPE

    deposit(lg, "a", 1)
    v.define_view(lg, "deps", 'SELECT tx, data, data AS "odd ""name" FROM events')

    def json_columns() -> list[str]:
        table = lg.sql("SELECT * FROM deps")
        return [f.name for f in table.schema if f.metadata == JSON_TYPE]

    assert json_columns() == ["data", 'odd "name']
    v.rebuild(lg, "deps")
    assert json_columns() == ["data", 'odd "name']
    deposit(lg, "b", 2)  # incremental: the file plus the newer rows
    assert v.status(lg, "deps")["state"] == "ready" and json_columns() == ["data", 'odd "name']
    count = "SELECT count(*) AS n FROM {}"
    assert lg.sql(count.format("deps")).to_pylist() == lg.sql(count.format("events")).to_pylist()


def test_a_materialization_keeps_types_parquet_cannot_hold(lg: Ledger) -> None:
    """A view with an INTERVAL column (or one inside a STRUCT or a LIST, or a UHUGEINT) is
    materialized as text DuckDB casts back: read from its file, alone or with the newer rows, it
    has the rows and column types of its SQL over the log (found by audit: the rebuild failed
    with ArrowNotImplementedError)."""
    deposit(lg, "a", 1)
    deposit(lg, "b", 2)
    spans = ("SELECT max(tx_time) - min(tx_time) AS span, "
             "{'span': max(tx_time) - min(tx_time), 'n': count(*)::UHUGEINT} AS s FROM log")
    ages = ("SELECT tx, tx_time - TIMESTAMPTZ '2000-01-01 00:00:00+00' AS since_2000, "
            "[INTERVAL 1 DAY * tx, NULL] AS days, {'big': tx::UHUGEINT} AS s FROM events")
    v.define_view(lg, "spans", spans)
    v.define_view(lg, "ages", ages)

    def same(name: str, sql: str, as_of: int | None = None) -> None:
        for got in (v.rows(lg, name, as_of=as_of), lg.sql(f"SELECT * FROM {name}", as_of=as_of)):
            want = lg.sql(sql, as_of=as_of)
            assert [(f.name, f.type) for f in got.schema] == [(f.name, f.type) for f in want.schema]
            assert sorted_rows(got) == sorted_rows(want), name

    for name, sql in (("spans", spans), ("ages", ages)):
        assert v.rebuild(lg, name)["state"] == "ready"
        assert v.status(lg, name)["state"] == "ready"
        m = lg.head.tx
        schema = pq.read_schema(lg.root / "views" / name / f"{m}.parquet")
        assert schema.field("s").metadata is not None  # the file holds the portable form
        same(name, sql)
    deposit(lg, "c", 3)
    assert v.status(lg, "spans")["state"] == "stale" and v.status(lg, "ages")["state"] == "ready"
    same("spans", spans, as_of=m)  # the file, as of its tx
    same("ages", ages)  # incremental: the file plus the newer rows
    same("ages", ages, as_of=m)
    count = "SELECT count(*) AS n FROM {}"
    assert lg.sql(count.format("ages")).to_pylist() == lg.sql(count.format("events")).to_pylist()


def test_a_rebuild_cut_short_by_a_crash_is_failed_not_building(lg: Ledger) -> None:
    """A status file left saying "building" by a process that died: the writer knows no one else
    can be building it (before, it said "building" for 24 hours; found by audit)."""
    deposit(lg, "a", 1)
    v.define_view(lg, "b", BALANCES)
    assert v.start_rebuild(lg, "b") and v.status(lg, "b")["state"] == "building"
    with v._building_lock:
        v._building.pop((str(lg.root), "b"))  # as after a kill -9 and a restart
    st = v.status(lg, "b")
    assert st["state"] == "failed" and "interrupted" in st["error"]
    assert v.rebuild(lg, "b")["state"] == "ready" and v.status(lg, "b")["error"] is None


def test_stale_materializations_are_rebuilt_at_most_every_interval(lg: Ledger) -> None:
    for i in range(4):
        deposit(lg, f"a{i % 2}", 10)
    v.define_view(lg, "balances", BALANCES)
    v.define_view(lg, "recent", "SELECT id FROM events")  # incremental: never stale
    v.rebuild(lg, "balances")
    v.rebuild(lg, "recent")
    assert v.refresh_stale(lg, 0) == []  # nothing behind
    head = deposit(lg, "a0", 5)
    assert v.status(lg, "balances")["state"] == "stale"
    assert v.refresh_stale(lg, 3600) == []  # rebuilt too recently
    took = float(v.status(lg, "balances")["seconds"])
    assert v.refresh_stale(lg, 0) == [] or took == 0  # and never more than a tenth of the time
    time.sleep(10 * took + 0.05)
    assert v.refresh_stale(lg, 0) == ["balances"]
    st = v.status(lg, "balances")
    assert (st["state"], st["tx"]) == ("ready", head)
    assert sorted_rows(lg.sql("SELECT * FROM balances")) == [("a0", 25), ("a1", 20)]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM events WHERE action = 'x'", True),
        ("SELECT id, data->>'a' AS a FROM log e WHERE e.kind = 'event'", True),
        ("SELECT * FROM commands", True),
        ("SELECT count(*) FROM events", False),
        ("SELECT DISTINCT action FROM events", False),
        ("SELECT * FROM events LIMIT 3", False),
        ("SELECT * FROM events, log", False),
        ("SELECT * FROM events JOIN log USING (id)", False),
        ("SELECT * FROM entities", False),
        ("SELECT * FROM events WHERE tx > (SELECT max(tx) - 2 FROM log)", False),
        ("SELECT * FROM events WHERE valid_time > now()", False),
        ("SELECT *, row_number() OVER () FROM events", False),
        ("SELECT * FROM events UNION ALL SELECT * FROM events", False),
        ("SELECT * FROM events QUALIFY true", False),
        ("SELECT * FROM events WHERE action = 'x' ORDER BY tx DESC", False),  # new rows go first
    ],
)
def test_incremental_detection_is_conservative(sql: str, expected: bool) -> None:
    assert v.incremental(sql) is expected


@pytest.mark.parametrize("call", [
    "uuid()", "uuidv4()", "uuidv7()", "gen_random_uuid()", "random()", "setseed(0.5)", "nextval('s')",
    "setval('s', 1)", "now()", "current_timestamp", "current_date", "current_time", "localtimestamp",
    "current_localtimestamp()", "current_localtime()", "today()", "get_current_timestamp()",
    "get_current_time()", "transaction_timestamp()", "age(tx_time)", "ago('1 hour')",
    "pg_postmaster_start_time()", "current_setting('TimeZone')", "getvariable('x')", "txid_current()",
])
def test_a_filter_calling_the_clock_or_chance_is_not_incremental(call: str) -> None:
    # Kept fresh incrementally, its old rows would keep the value of their own evaluation.
    assert not v.incremental(f"SELECT tx, {call} AS x FROM events")
    assert not v.incremental(f"SELECT tx FROM log WHERE {call} IS NOT NULL")


def test_a_materialized_view_over_a_moving_window_is_stale_not_incremental(lg: Ledger) -> None:
    deposit(lg, "a", 1)
    v.define_view(lg, "last_second", "SELECT tx FROM events WHERE tx_time > ago('1 second')")
    assert v.rebuild(lg, "last_second")["rows"] == 2 and not v.status(lg, "last_second")["incremental"]
    time.sleep(1.1)  # the first deposit leaves the window
    t = deposit(lg, "a", 2)
    assert v.status(lg, "last_second")["state"] == "stale"
    assert lg.sql("SELECT tx FROM last_second").to_pylist() == [{"tx": t}]  # the SQL, not file + delta


# ---------------------------------------------------------------------------------- property
SHAPES = {
    # name: (view definitions in order, oracle over the log with no views)
    "filter": (
        [("big", "SELECT data->>'account' AS account, (data->>'amount')::BIGINT AS amount, tx "
                 "FROM events WHERE action = 'deposited' AND (data->>'amount')::BIGINT >= 3")],
        "SELECT data->>'account' AS account, (data->>'amount')::BIGINT AS amount, tx "
        "FROM events WHERE action = 'deposited' AND (data->>'amount')::BIGINT >= 3",
    ),
    "aggregate": (
        [("totals", "SELECT data->>'account' AS account, count(*) AS n, sum((data->>'amount')::BIGINT) "
                    "AS total FROM events WHERE action = 'deposited' GROUP BY ALL")],
        "SELECT data->>'account' AS account, count(*) AS n, sum((data->>'amount')::BIGINT) AS total "
        "FROM events WHERE action = 'deposited' GROUP BY ALL",
    ),
    "latest": (
        [("latest", "SELECT e, state->>'amount' AS amount FROM entities")],
        "SELECT e, state->>'amount' AS amount FROM entities",
    ),
    "latest_event": (
        [("last_dep", "SELECT data->>'account' AS account, arg_max(data->>'amount', tx) AS amount "
                      "FROM events WHERE action = 'deposited' GROUP BY ALL")],
        "SELECT data->>'account' AS account, arg_max(data->>'amount', tx) AS amount "
        "FROM events WHERE action = 'deposited' GROUP BY ALL",
    ),
    "join": (
        [("counts", "SELECT data->>'account' AS account, count(*) AS n FROM events "
                    "WHERE action = 'deposited' GROUP BY ALL"),
         ("joined", "SELECT c.account, c.n, l.amount FROM counts c JOIN "
                    "(SELECT e, state->>'amount' AS amount FROM entities) l ON l.e = c.account")],
        "WITH counts AS (SELECT data->>'account' AS account, count(*) AS n FROM events "
        "WHERE action = 'deposited' GROUP BY ALL) SELECT c.account, c.n, l.amount FROM counts c JOIN "
        "(SELECT e, state->>'amount' AS amount FROM entities) l ON l.e = c.account",
    ),
}

steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from(["a", "b", "c"]), st.integers(0, 9)),
        st.just(("seal",)),
        st.just(("rebuild",)),
    ),
    min_size=1, max_size=14,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(sorted(SHAPES)), program=steps)
def test_materialized_view_equals_its_sql_over_the_log(
    tmp_path_factory: pytest.TempPathFactory, shape: str, program: list[tuple[Any, ...]]
) -> None:
    lg = Ledger.open(tmp_path_factory.mktemp("prop") / "data", seal_every=1000)
    try:
        defs, oracle = SHAPES[shape]
        deposit(lg, "a", 1)
        for name, sql in defs:
            v.define_view(lg, name, sql)
        view = defs[-1][0]
        for step in program:
            if step[0] == "append":
                deposit(lg, step[1], step[2])
            elif step[0] == "seal":
                lg.seal()
            else:
                v.rebuild(lg, view)
        for t in range(1, lg.head.tx + 1):
            got = v.rows(lg, view, as_of=t) if view in v.definitions(lg, as_of=t) else None
            if got is not None:
                assert sorted_rows(got) == sorted_rows(lg.sql(oracle, as_of=t)), (shape, t)
    finally:
        lg.close()
