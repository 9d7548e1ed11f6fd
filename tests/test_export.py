"""Export (CLI and HTTP) read back by plain DuckDB; the CLI's binary formats and view commands."""

from __future__ import annotations

import io
import json
import zipfile
from typing import TYPE_CHECKING

import duckdb
import httpx
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from ledger import Ledger
from ledger import views as v
from ledger.cli import main
from ledger.errors import InvalidQuery
from ledger.export import export_zip
from tests.test_api import Server, post_command, wait_for

if TYPE_CHECKING:
    from pathlib import Path

RELATIONS = ["log", "commands", "events", "datoms", "entities", "transactions", "quarantine"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    with Ledger.open(root, seal_every=3) as lg:
        for i in range(7):
            lg.append([{"kind": "event", "action": "deposited",
                        "data": {"id": f"a{i % 2}", "amount": i}}])
        v.define_view(lg, "amounts", "SELECT data->>'id' AS id, (data->>'amount')::INT AS amount "
                                     "FROM events WHERE action = 'deposited'")
    return root


def test_cli_export_is_readable_by_plain_duckdb(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["export", "--as-of", "5", "--out", str(out), "--data-dir", str(data)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["as_of_tx"] == 5 and list(manifest["tables"]) == RELATIONS
    with Ledger.open(data) as lg:
        assert manifest["digest"]["hash"] == lg.tx_range(5, 6)[0].hash
        for name, entry in manifest["tables"].items():
            plain = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out / entry['file']}')").fetchall()
            assert plain == [(entry["rows"],)]
            assert entry["rows"] == lg.sql(f"SELECT count(*) AS n FROM {name}", as_of=5).to_pylist()[0]["n"]
    assert duckdb.sql(f"SELECT max(tx) FROM read_parquet('{out / 'log.parquet'}')").fetchall() == [(5,)]
    # a view, as of a tx when it exists
    out2 = tmp_path / "out2"
    assert main(["export", "--out", str(out2), "--tables", "amounts,log", "--data-dir", str(data)]) == 0
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["tables"]["amounts"] == {"file": "amounts.parquet", "kind": "view", "rows": 7}
    assert main(["export", "--as-of", "3", "--out", str(out2), "--tables", "amounts",
                 "--data-dir", str(data)]) == 1  # not defined at tx 3
    # Exporting again into the same directory leaves no table of the earlier export behind (a
    # reader of *.parquet there would have read it as current); files it did not write stay.
    (out2 / "notes.txt").write_text("mine")
    assert main(["export", "--out", str(out2), "--tables", "log", "--data-dir", str(data)]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["log.parquet", "manifest.json", "notes.txt"]


def test_cli_output_inside_the_data_directory_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by audit: an export into a segment's directory overwrote its files, `sql --out` onto
    the catalog replaced it, and --out "" wrote into the working directory."""
    segment = next((data / "segments").glob("[0-9]*"))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    for argv in (["export", "--out", str(segment)], ["export", "--out", str(data)], ["export", "--out", ""],
                 ["sql", "SELECT 1 AS a", "--format", "csv", "--out", str(data / "ledger.duckdb")],
                 ["sql", "SELECT 1 AS a", "--format", "parquet", "--out", str(data / "x.parquet")]):
        assert main([*argv, "--data-dir", str(data)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("inside the data directory" in err or "empty" in err), err
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    with Ledger.open(data, read_only=True) as lg:
        assert lg.verify().ok
    (tmp_path / "afile").write_text("x")
    assert main(["export", "--out", str(tmp_path / "afile" / "sub"), "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err  # one line naming the path, no Python exception name
    assert "Not a directory" in err and "Error" not in err, err


def test_cli_sql_binary_formats_and_views(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq_file, arrow_file = tmp_path / "r.parquet", tmp_path / "r.arrow"
    assert main(["sql", "SELECT * FROM amounts", "--format", "parquet", "--out", str(pq_file),
                 "--data-dir", str(data)]) == 0
    assert pq.read_table(pq_file).num_rows == 7
    assert main(["sql", "SELECT * FROM amounts", "--as-of", "8", "--format", "arrow", "--out",
                 str(arrow_file), "--data-dir", str(data)]) == 0
    assert ipc.open_stream(arrow_file.read_bytes()).read_all().num_rows == 7
    capsys.readouterr()
    assert main(["views", "list", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.startswith("amounts\tdefined at tx 8\tnone")
    assert main(["views", "--data-dir", str(data), "list"]) == 0  # the option before the action too
    assert capsys.readouterr().out.startswith("amounts\tdefined at tx 8\tnone")
    assert main(["views", "rebuild", "amounts", "--data-dir", str(data)]) == 0
    assert "7 rows at tx 8" in capsys.readouterr().out
    assert main(["views", "show", "amounts", "--data-dir", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tx"] == 8 and shown["materialization"]["state"] == "ready"
    assert main(["views", "show", "nope", "--data-dir", str(data)]) == 1
    assert "no view named 'nope'" in capsys.readouterr().err


def test_http_export_zip_is_readable_by_plain_duckdb(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data").start()
    try:
        assert post_command(srv, {"action": "export-test", "data": {"n": 1}}).status_code == 202
        head = wait_for(lambda: httpx.get(srv.url + "/ready").json()["tx"])
        r = httpx.put(srv.url + "/views/tests", json={
            "sql": "SELECT data->>'n' AS n FROM commands WHERE action = 'export-test'"})
        assert r.status_code == 201
        resp = httpx.get(srv.url + "/export", params={"as_of": head, "tables": "log,transactions"})
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(resp.content)) as z:
            z.extractall(tmp_path / "unzipped")
        manifest = json.loads((tmp_path / "unzipped" / "manifest.json").read_text())
        assert manifest["as_of_tx"] == head and set(manifest["tables"]) == {"log", "transactions"}
        tx = httpx.get(f"{srv.url}/tx/{head}").json()
        assert manifest["digest"] == {"tx": head, "tx_time": tx["tx_time"], "hash": tx["hash"]}
        log = duckdb.sql(f"SELECT action FROM read_parquet('{tmp_path / 'unzipped' / 'log.parquet'}')")
        assert ("export-test",) in log.fetchall()
        whole = httpx.get(srv.url + "/export", params={"tables": "tests,events"})
        with zipfile.ZipFile(io.BytesIO(whole.content)) as z:
            assert json.loads(z.read("manifest.json"))["tables"]["tests"]["rows"] == 1
    finally:
        srv.stop()


def test_export_runs_each_table_under_the_time_limit(data: Path, tmp_path: Path) -> None:
    with Ledger.open(data) as lg:
        v.define_view(lg, "slow", "SELECT count(*) AS n FROM range(100000000000) a, log")
        with (tmp_path / "out.zip").open("wb") as out, pytest.raises(InvalidQuery, match="0.3 s limit"):
            export_zip(lg, out, tables=["log", "slow"], timeout=0.3)
        lg.append([{"kind": "event", "action": "deposited", "data": {"id": "a0", "amount": 9}}])
        with (tmp_path / "out.zip").open("wb") as out:  # the ledger is still usable
            assert export_zip(lg, out, tables=["amounts"], timeout=0.3)["tables"]["amounts"]["rows"] == 8


# DuckDB types Parquet cannot hold (or that the Arrow route would write wrongly), and what a
# plain DuckDB reads back from the export: each casts back to the original exactly.
AWKWARD = {
    "span": ("max(tx_time) - min(tx_time)", "VARCHAR"),
    "fixed": ("INTERVAL '1 year 2 months -3 days 04:05:06.789123'", "VARCHAR"),
    "total": ("sum(tx)", "DECIMAL(38,0)"),  # HUGEINT
    "big": ("340282366920938463463374607431768211455::UHUGEINT", "VARCHAR"),
    "bits": ("'0101'::BIT", "VARCHAR"),
    "huge": ("'-123456789012345678901234567890'::BIGNUM", "VARCHAR"),
    "ttz": ("TIMETZ '12:34:56.5+02:30'", "VARCHAR"),
    "u": ("union_value(n := 2)::UNION(n INTEGER, s VARCHAR)", "VARCHAR"),
    "nested": ("{'d': INTERVAL 3 days, 'l': [INTERVAL 1 hour], 'interval': 1, "
               "'m': MAP {'k': INTERVAL 1 day}}",
               'STRUCT(d VARCHAR, l VARCHAR[], "interval" INTEGER, m MAP(VARCHAR, VARCHAR))'),
    "id": ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::UUID", "VARCHAR"),
    "j": ("'{\"a\": [1]}'::JSON", "VARCHAR"),
    "var": ("{'a': 1}::VARIANT", "VARCHAR"),  # as JSON text
    "mood": ("'ok'::ENUM('sad', 'ok')", "VARCHAR"),
    "clock": ("TIME '12:34:56.123456'", "TIME"),
    "ts": ("max(tx_time)", "TIMESTAMP WITH TIME ZONE"),
    "arr": ("[1, 2, 3]::INTEGER[3]", "INTEGER[]"),
    "geom": ("'POINT(1 2)'::GEOMETRY", "BLOB"),  # WKB
}
AWKWARD_SQL = "SELECT " + ", ".join(f"{e} AS {c}" for c, (e, _) in AWKWARD.items()) + " FROM log"


def _check_awkward(lg: Ledger, file: Path, as_of: int) -> None:
    original = lg.sql("DESCRIBE SELECT * FROM awkward", as_of=as_of).to_pylist()
    types = {r["column_name"]: r["column_type"] for r in original}
    plain = duckdb.connect()
    exported = plain.sql(f"DESCRIBE SELECT * FROM read_parquet('{file}')").fetchall()
    assert {c: t for c, t, *_ in exported} == {c: t for c, (_, t) in AWKWARD.items()}
    text = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" for c in AWKWARD)
    want = lg.sql(f"SELECT {text} FROM awkward", as_of=as_of).to_pylist()
    restore = {c: f"CAST({c} AS {t})" for c, t in types.items()} | {"var": "var::JSON::VARIANT"}
    back = ", ".join(f"CAST({restore[c]} AS VARCHAR) AS {c}" for c in AWKWARD)
    got = plain.sql(f"SELECT {back} FROM read_parquet('{file}')").fetchall()
    assert [dict(zip(AWKWARD, row, strict=True)) for row in got] == want
    assert want[0]["span"] != "00:00:00" and want[0]["big"] == "340282366920938463463374607431768211455"


def test_query_results_hold_what_arrow_would_get_wrong_as_duckdb_text(data: Path) -> None:
    """DuckDB's Arrow export wraps a UHUGEINT over 2**127 (to -1 here), drops a TIMETZ's offset and
    hands over BIT, BIGNUM and VARIANT as their internal bytes: sql() results carry those (at any
    depth) as DuckDB's text for them instead, which casts back exactly; the others keep their type."""
    with Ledger.open(data) as lg:
        result = lg.sql(AWKWARD_SQL + " LIMIT 1")
        got = result.to_pylist()[0]
        text = ", ".join(f"CAST({e} AS VARCHAR) AS {c}" for c, (e, _) in AWKWARD.items())
        want = lg.sql(f"SELECT {text} FROM log LIMIT 1").to_pylist()[0]
        for column in ("big", "bits", "huge", "ttz"):
            assert got[column] == want[column], column
        assert got["big"] == str(2**128 - 1) and got["ttz"] == "12:34:56.5+02:30"
        assert got["var"] == '{"a":1}'  # JSON text, marked as JSON columns are:
        assert result.schema.field("var").metadata == result.schema.field("j").metadata is not None
        nested = f"SELECT {{'n': '{2**127 + 1}'::UHUGEINT, 'l': [TIMETZ '01:00:00+01']}} AS s"
        assert lg.sql(nested).to_pylist() == [{"s": {"n": str(2**127 + 1), "l": ["01:00:00+01"]}}]
        kept = lg.sql("SELECT INTERVAL 3 DAY AS i, 7::HUGEINT AS h, [1, 2] AS l").schema
        assert [str(t) for t in kept.types] == [
            "month_day_nano_interval", "decimal128(38, 0)", "list<l: int32>"]


def test_export_writes_types_parquet_cannot_hold_in_a_form_plain_duckdb_reads_back(
    data: Path, tmp_path: Path
) -> None:
    with Ledger.open(data) as lg:
        v.define_view(lg, "awkward", AWKWARD_SQL)
        head = lg.head.tx
    out = tmp_path / "out"
    assert main(["export", "--out", str(out), "--tables", "awkward,log", "--data-dir", str(data)]) == 0
    with Ledger.open(data) as lg:
        _check_awkward(lg, out / "awkward.parquet", head)


def test_http_export_of_a_view_with_an_interval_column(data: Path, tmp_path: Path) -> None:
    with Ledger.open(data) as lg:
        v.define_view(lg, "awkward", AWKWARD_SQL)
        head = lg.head.tx
    srv = Server(data).start()
    try:
        resp = httpx.get(srv.url + "/export", params={"tables": "awkward"})
        assert resp.status_code == 200, resp.text
        with zipfile.ZipFile(io.BytesIO(resp.content)) as z:
            z.extractall(tmp_path / "unzipped")
    finally:
        srv.stop()
    with Ledger.open(data) as lg:
        _check_awkward(lg, tmp_path / "unzipped" / "awkward.parquet", head)
