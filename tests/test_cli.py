"""The `ledger` command, run for real in a subprocess: output formats, time flags, verify, info, and
every error as one line on stderr with a non-zero exit code."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from ledger import Ledger
from ledger.cli import main

ROOT = Path(__file__).resolve().parents[1]


def ledger_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def ledger(*args: str, cwd: Path | None = None, stdin: str | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:
    """Run `ledger ARGS` as its own process (`python -m ledger` is the console script's main)."""
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args], cwd=cwd, input=stdin, capture_output=True,
        text=True, env=ledger_env(**env), timeout=120,
    )


@dataclass(frozen=True)
class Built:
    root: Path
    tx_times: dict[int, str]  # tx -> ISO tx_time
    sealed_through: int
    head: dict[str, object]


def _event(e: str, action: str, **fields: object) -> dict[str, object]:
    return {"kind": "event", "action": action, "data": {"id": e, **fields}}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Two sealed transactions, then two in the unsealed tail."""
    root = tmp_path_factory.mktemp("cli") / "data"
    with Ledger.open(root) as lg:
        reps = [
            lg.append([{"kind": "command", "action": "open-account", "data": {"id": "acct-1"}},
                       _event("acct-1", "account-opened", owner="ann", balance=0)]),
            lg.append([_event("acct-2", "account-opened", owner="bob, \"the\" builder", balance=5)]),
        ]
        sealed = lg.seal()
        reps += [
            lg.append([_event("acct-1", "money-deposited", balance=100)], meta={"teller": 7}),
            lg.append([{**_event("acct-2", "money-deposited", balance=50),
                        "timestamp": "2001-01-01T00:00:00Z"}]),
        ]
        head = lg.digest()
    assert sealed == 2
    return Built(root, {r.tx: r.tx_time.isoformat() for r in reps}, sealed, head)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ledger: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------ sql
def test_sql_table_is_aligned_text(built: Built) -> None:
    r = ledger("sql", "SELECT tx, action, kind FROM log ORDER BY tx, seq", "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["tx", "action", "kind"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert [line.split() for line in lines[2:-1]] == [
        ["1", "open-account", "command"], ["1", "account-opened", "event"],
        ["2", "account-opened", "event"], ["3", "money-deposited", "event"],
        ["4", "money-deposited", "event"],
    ]
    assert lines[-1] == "(5 rows)"
    # columns line up: every value of the action column starts where its header does
    start = lines[0].index("action")
    assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines[2:-1])


def test_sql_csv(built: Built) -> None:
    r = ledger("sql", "SELECT tx, e, a, v FROM datoms ORDER BY tx, seq, a", "--format", "csv",
               "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows[0] == {"tx": "1", "e": "acct-1", "a": "balance", "v": "0"}
    assert {"tx": "2", "e": "acct-2", "a": "owner", "v": '"bob, \\"the\\" builder"'} in rows
    assert len(rows) == 6


def test_sql_json_lines(built: Built) -> None:
    r = ledger("sql", "SELECT tx, action, data, tx_time, [tx, 1] AS pair, sum(tx) OVER () AS total, "
               "'[1, {\"b\": null}]'::JSON AS j, NULL::JSON AS nothing, '{\"a\": 1}' AS text "
               "FROM log ORDER BY tx, seq", "--format", "json", "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 5
    assert rows[0]["tx"] == 1 and rows[0]["action"] == "open-account"
    assert rows[0]["data"] == {"id": "acct-1"}  # a JSON column is a JSON value, not text holding JSON
    assert rows[0]["tx_time"] == built.tx_times[1]
    assert rows[0]["pair"] == [1, 1]
    assert rows[0]["total"] == 11  # a HUGEINT (Arrow decimal) comes out as a JSON number
    assert (rows[0]["j"], rows[0]["nothing"], rows[0]["text"]) == ([1, {"b": None}], None, '{"a": 1}')


def test_sql_empty_result(built: Built) -> None:
    r = ledger("sql", "SELECT tx FROM log WHERE false", "--data-dir", str(built.root))
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == "(0 rows)"
    r = ledger("sql", "SELECT tx FROM log WHERE false", "--format", "json", "--data-dir", str(built.root))
    assert (r.returncode, r.stdout) == (0, "")


@pytest.mark.parametrize("as_of", ["1", "tx_time of 1"])
def test_sql_as_of(built: Built, as_of: str) -> None:
    t = built.tx_times[1] if as_of.startswith("tx_time") else as_of
    r = ledger("sql", "SELECT e, state FROM entities ORDER BY e", "--as-of", t, "--format", "json",
               "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["e"], x["state"]) for x in rows] == [("acct-1", {"balance": 0, "owner": "ann"})]


def test_sql_as_of_reaches_into_the_tail(built: Built) -> None:
    r = ledger("sql", "SELECT max(tx) AS t FROM transactions", "--as-of", built.tx_times[3],
               "--format", "csv", "--data-dir", str(built.root))
    assert r.stdout.splitlines() == ["\"t\"", "3"]


def test_sql_valid_at(built: Built) -> None:
    r = ledger("sql", "SELECT count(*) AS n FROM log", "--valid-at", "2002-01-01T00:00:00+00:00",
               "--format", "csv", "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == "1"  # only the back-dated deposit was valid then


def test_sql_params(built: Built) -> None:
    args = ["--format", "csv", "--data-dir", str(built.root)]
    r = ledger("sql", "SELECT count(*) AS n FROM log WHERE tx > $1", "--params", "[2]", *args)
    assert r.stdout.splitlines()[1] == "2"
    r = ledger("sql", "SELECT count(*) AS n FROM events WHERE data->>'id' = $e", "--params",
               '{"e": "acct-2"}', *args)
    assert r.stdout.splitlines()[1] == "2"


def test_query_from_stdin(built: Built) -> None:
    r = ledger("sql", "-", "--format", "csv", "--data-dir", str(built.root),
               stdin="SELECT count(*) AS n\nFROM transactions\n")
    assert r.stdout.splitlines() == ["\"n\"", "4"]


def test_data_dir_from_env_and_flag_overrides_it(built: Built, tmp_path: Path) -> None:
    r = ledger("sql", "SELECT count(*) AS n FROM log", "--format", "csv",
               LEDGER_DATA_DIR=str(built.root))
    assert r.stdout.splitlines()[1] == "5"
    r = ledger("sql", "SELECT 1", "--data-dir", str(tmp_path / "nope"), LEDGER_DATA_DIR=str(built.root))
    assert "nope" in assert_one_line_error(r, 1)


def test_default_data_dir_is_dot_data(built: Built) -> None:
    r = ledger("info", "--json", cwd=built.root.parent)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tx"] == 4


# ------------------------------------------------------------------------- verify and info
def test_verify_ok(built: Built) -> None:
    r = ledger("verify", "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"ok: checked 4 transactions; latest tx 4 hash {built.head['hash']}"]


def test_verify_proves_a_published_digest(built: Built) -> None:
    head = built.head["hash"]
    r = ledger("verify", "--digest", f"4:{head}", "--data-dir", str(built.root))
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"ok: checked 4 transactions; latest tx 4 hash {head}; tx 4 has the published hash\n"
    r = ledger("verify", "--digest", f"3:{head}", "--data-dir", str(built.root))
    assert r.returncode == 1
    assert r.stdout.startswith("FAILED: tx 3 has hash "), r.stdout
    assert f"not the published {head}" in r.stdout
    r = ledger("verify", "--digest", f"5:{head}", "--data-dir", str(built.root))
    assert r.returncode == 1
    assert r.stdout.startswith("FAILED: tx 5 is not in this ledger; checked 4"), r.stdout
    r = ledger("verify", "--digest", f"4:{head.upper()}", "--data-dir", str(built.root))
    assert r.returncode == 0, r.stdout
    for bad in ("4", f"x:{head}", "4:ABC", f"4:{head}0", f" :{head}"):
        r = ledger("verify", "--digest", bad, "--data-dir", str(built.root))
        assert r.returncode == 2 and "is not TX:HASH" in r.stderr, (bad, r.stderr)


def test_verify_names_a_value_changed_in_duckdb(built: Built, tmp_path: Path) -> None:
    root = shutil.copytree(built.root, tmp_path / "data")
    con = duckdb.connect(str(root / "ledger.duckdb"))
    con.execute("""UPDATE tail_records SET data = '{"id":"acct-1","balance":1000000}' WHERE tx = 3""")
    con.close()
    r = ledger("verify", "--data-dir", str(root))
    assert r.returncode == 1
    assert r.stderr == ""
    assert r.stdout == "FAILED at tx 3: tx hash does not match its contents\n", r.stdout


def test_verify_names_a_modified_segment(built: Built, tmp_path: Path) -> None:
    root = shutil.copytree(built.root, tmp_path / "data")
    (parquet,) = root.glob("segments/*/records.parquet")
    raw = bytearray(parquet.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    parquet.write_bytes(bytes(raw))
    r = ledger("verify", "--data-dir", str(root))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    (line,) = r.stdout.splitlines()
    m = re.match(r"FAILED at tx (\d+): ", line)
    assert m and 1 <= int(m[1]) <= built.sealed_through, line


def test_verify_names_a_deleted_segment(built: Built, tmp_path: Path) -> None:
    root = shutil.copytree(built.root, tmp_path / "data")
    (segment,) = root.glob("segments/[0-9]*")
    shutil.rmtree(segment)
    r = ledger("verify", "--data-dir", str(root))
    assert (r.returncode, r.stderr) == (1, "")
    assert re.fullmatch(r"FAILED at tx 1: segment \S+: \w+\.parquet is missing\n", r.stdout), r.stdout


def test_info(built: Built) -> None:
    r = ledger("info", "--data-dir", str(built.root))
    assert r.returncode == 0, r.stderr
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.stdout.splitlines())
    assert fields["latest tx"] == "4"
    assert fields["latest hash"] == built.head["hash"]
    assert fields["transactions"] == "4"
    assert (fields["records"], fields["commands"], fields["events"]) == ("5", "1", "4")
    assert (fields["segments"], fields["sealed through tx"]) == ("1", "2")
    assert int(fields["bytes on disk"].replace(",", "")) > 0


def test_info_json(built: Built) -> None:
    r = ledger("info", "--json", "--data-dir", str(built.root))
    info = json.loads(r.stdout)
    assert {k: info[k] for k in ("tx", "tx_time", "hash")} == built.head
    assert (info["records"], info["transactions"], info["segments"], info["complete"]) == (5, 4, 1, True)
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in built.root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["sql", "SELEC 1"], 1, "syntax error"),
        (["sql", "SELECT * FROM no_such_table"], 1, "no_such_table"),
        (["sql", "DELETE FROM log"], 1, "only SELECT"),
        (["sql", "SELECT 1; SELECT 2"], 1, "one SQL statement"),
        (["sql", "SELECT $1", "--params", "[1, 2]"], 1, "Parameter"),
        (["sql", "SELECT 1", "--as-of", "yesterday"], 2, "--as-of"),
        (["sql", "SELECT 1", "--as-of", "2024-01-01T00:00:00"], 2, "no timezone"),
        (["sql", "SELECT 1", "--as-of", "-1"], 2, "--as-of"),
        (["sql", "SELECT 1", "--valid-at", "7"], 2, "--valid-at"),
        (["sql", "SELECT 1", "--params", "{not json"], 2, "--params"),
        (["sql", "SELECT 1", "--params", "42"], 2, "JSON array"),
        (["sql", "SELECT 1", "--format", "xml"], 2, "--format"),
        (["sql", "SELECT 1", "--timeout", "-1"], 2, "--timeout"),
        (["sql", "SELECT 1", "--timeout", "nan"], 2, "not a number of seconds"),
        (["sql", "SELECT count(*) FROM range(10000000000000)", "--timeout", "0.3"], 1, "0.3 s limit"),
        (["sql"], 2, "query"),
        (["frobnicate"], 2, "frobnicate"),
        ([], 2, "COMMAND"),
        (["info", "--bogus"], 2, "--bogus"),
    ],
)
def test_errors_are_one_line(built: Built, args: list[str], code: int, says: str) -> None:
    data = ["--data-dir", str(built.root)] if args and args[0] in ("sql", "info") else []
    line = assert_one_line_error(ledger(*args, *data), code)
    assert says in line


@pytest.mark.parametrize("command", ["sql", "verify", "info"])
def test_missing_data_dir_is_an_error_and_is_not_created(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "missing"
    args = [command, "SELECT 1"] if command == "sql" else [command]
    line = assert_one_line_error(ledger(*args, "--data-dir", str(missing)), 1)
    assert str(missing) in line
    assert not missing.exists()


def test_a_directory_that_is_not_a_ledger(tmp_path: Path) -> None:
    line = assert_one_line_error(ledger("verify", "--data-dir", str(tmp_path)), 1)
    assert "no ledger" in line


def test_a_damaged_catalog_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ledger.duckdb").write_bytes(b"this is not a database" * 100)
    assert_one_line_error(ledger("info", "--data-dir", str(tmp_path)), 1)


def test_help_exits_zero() -> None:
    r = ledger("sql", "--help")
    assert r.returncode == 0
    assert "--as-of" in r.stdout and "LEDGER_DATA_DIR" in r.stdout


# ------------------------------------------------------------------ in-process formatting
def test_table_renders_nulls_nesting_and_newlines(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sql", "SELECT NULL AS n, {'a': [1, 2]} AS s, 'two' || chr(10) || 'lines' AS t, "
                 "'\\x00\\xFF'::BLOB AS b, 1.50::DECIMAL(5, 2) AS d", "--data-dir", str(built.root)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[2].split() == ["NULL", '{"a":[1,2]}', "two\\nlines", "\\x00\\xFF", "1.50"]


def test_csv_holds_types_csv_cannot(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sql", "SELECT [1, 2] AS l, {'a': 1} AS s, 'x'::BLOB AS b", "--format", "csv",
                 "--data-dir", str(built.root)])
    assert code == 0
    assert list(csv.reader(io.StringIO(capsys.readouterr().out))) == [
        ["l", "s", "b"], ["[1,2]", '{"a":1}', "x"],
    ]


def test_console_script_is_declared() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["ledger"] == "ledger.cli:main"


def test_serve_refuses_a_port_out_of_range_and_a_data_dir_another_process_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    for port in ("99999", "0", "http"):
        assert main(["serve", "--data-dir", str(tmp_path / "d"), "--port", port]) == 2
        assert capsys.readouterr().err.startswith("ledger: error: ")
    with Ledger.open(tmp_path / "d"):  # this process writes it
        done = subprocess.run(
            [sys.executable, "-m", "ledger", "serve", "--data-dir", str(tmp_path / "d"), "--port", "1"],
            capture_output=True, text=True, timeout=120, env=ledger_env(),
        )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "is being written by process" in done.stderr, done.stderr


def test_info_says_when_the_broker_for_the_lag_is_unreachable(tmp_path: Path) -> None:
    Ledger.open(tmp_path / "d").close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = ledger("info", "--data-dir", str(tmp_path / "d"), "--bootstrap", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.startswith("ledger: error: Kafka at") and done.stderr.count("\n") == 1, done.stderr
    shown = ledger("info", "--data-dir", str(tmp_path / "d"), "--json")
    assert json.loads(shown.stdout)["tx_time"] is None  # no transaction yet (was year 1)
