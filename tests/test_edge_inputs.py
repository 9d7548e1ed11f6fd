"""Edge inputs a reviewer found: edited or out-of-range cursors, `/views/{name}/changes` bounds,
CLI writes to a directory that holds no ledger, and command-line input that is not UTF-8."""

from __future__ import annotations

import base64
import io
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from ledger import Ledger, views
from ledger.cli import main
from tests.test_api import Server, assert_problem

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BALANCES = ("SELECT data->>'id' AS account, sum((data->>'amount')::INT) AS balance FROM events "
            "WHERE action = 'deposited' GROUP BY ALL")


def _deposit(account: str, amount: int) -> dict[str, Any]:
    return {"kind": "event", "action": "deposited", "data": {"id": account, "amount": amount}}


def _command(account: str) -> dict[str, Any]:
    return {"kind": "command", "action": "deposit", "data": {"id": account}}


def _fill(lg: Ledger) -> dict[str, int]:
    """Txs 1-2 before `balances` is defined, one deposit after; `gone` defined, then dropped."""
    lg.append([_command("a1"), _deposit("a1", 5)])
    lg.append([_command("a2"), _deposit("a2", 1)])
    views.define_view(lg, "balances", BALANCES)
    defined = lg.head.tx
    lg.append([_command("a1"), _deposit("a1", 7)])
    views.define_view(lg, "gone", "SELECT data->>'id' AS account FROM commands")
    gone = lg.head.tx
    views.drop_view(lg, "gone")
    return {"defined": defined, "gone": gone, "dropped": lg.head.tx}


@dataclass(frozen=True)
class Served:
    client: httpx.Client  # keep-alive: a new client per request costs more than the request
    txs: dict[str, int]

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, params=params)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("edge-api") / "data"
    with Ledger.open(root) as lg:
        txs = _fill(lg)
    server = Server(root).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield Served(client, txs)
    finally:
        server.stop()


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# ------------------------------------------------------------------------------------ cursors
EDITED_CURSORS = [
    _b64("9" * 60 + ".1"), _b64("1." + "9" * 60), _b64("-" + "9" * 41 + ".0"),  # out of range
    _b64(str(2**63) + ".0"), _b64("1." + str(2**31)),
    "MV8wLjA", _b64(" 1 . 2 "), "LTEuLTE",  # "1_0.0", spaces, "-1.-1"
    _b64("01.0"), _b64("+1.0"), _b64("1.0\n"), _b64("1.0.0"), _b64("1"), _b64("0.-1"),
    _b64("10.0") + "==", "MS4w!",  # padded, and a character base64 skips: other spellings of "1.0"
    _b64("\uff11.0"),  # a full-width 1 is not a digit here
]


def test_cursors_are_only_those_the_api_returned(served: Served) -> None:
    garbage = assert_problem(served.get("/commands", cursor="garbage"), 400, field="cursor")
    for path in ("/commands", "/events"):
        # what the API returns still pages through everything
        seen, cursor = [], None
        while True:
            page = served.get(path, limit=1, **({"cursor": cursor} if cursor else {})).json()
            seen += [(r["tx"], r["seq"]) for r in page["items"]]
            if (cursor := page["next_cursor"]) is None:
                break
        assert seen == sorted(seen) and len(seen) >= 3, seen
        # the largest position a cursor can hold is a valid (empty) page, not a DuckDB error
        assert served.get(path, cursor=_b64(f"{2**63 - 1}.{2**31 - 1}")).json()["items"] == []
        for bad in EDITED_CURSORS:
            body = assert_problem(served.get(path, cursor=bad), 400, field="cursor")
            assert body["field"] == "cursor" and body["type"] == garbage["type"], (path, bad, body)
            assert body["detail"] == f"cursor {bad!r} is not one this API returned", body


# ------------------------------------------------------------------------------ view changes
def test_view_changes_bounds(served: Served) -> None:
    txs = served.txs
    head = txs["dropped"]
    changes = "/views/balances/changes"
    # `from` is required, and named whether it is missing or empty
    for params in ({}, {"from": ""}, {"to": str(txs["defined"])}):
        body = assert_problem(served.get(changes, **params), 400, field="from")
        assert body["field"] == "from", body
    # `from` after `to`: as tx numbers, and as two instants within one tx
    for since, until in [(head, txs["defined"]), (txs["defined"] + 1, txs["defined"]),
                         ("2100-01-02T00:00:00Z", "2100-01-01T00:00:00Z")]:
        body = assert_problem(served.get(changes, **{"from": since, "to": until}), 400, field="from")
        assert body["field"] == "from" and "'from'" in body["detail"] and "'to'" in body["detail"], body
    # before the view was defined it reads as empty: at both points nothing changed
    for since, until in [(0, 0), (1, txs["defined"] - 1), (0, 1)]:
        r = served.get(changes, **{"from": since, "to": until})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["from_tx"], body["to_tx"]) == (since, until)
        assert (body["columns"], body["added"], body["removed"]) == (["account", "balance"], [], []), body
    # from before it was defined to after: every row added (as `from` before it always was)
    body = served.get(changes, **{"from": 0, "to": txs["defined"]}).json()
    assert sorted((r["account"], r["balance"]) for r in body["added"]) == [("a1", 5), ("a2", 1)]
    assert body["removed"] == []
    body = served.get(changes, **{"from": txs["defined"], "to": txs["defined"]}).json()
    assert (body["added"], body["removed"]) == ([], [])
    body = served.get(changes, **{"from": txs["defined"]}).json()
    assert [(r["account"], r["balance"]) for r in body["added"]] == [("a1", 12)]
    assert [(r["account"], r["balance"]) for r in body["removed"]] == [("a1", 5)]
    # after a view was dropped it reads as empty too: its rows were removed
    body = served.get("/views/gone/changes", **{"from": txs["gone"], "to": txs["dropped"]}).json()
    assert body["added"] == [] and len(body["removed"]) == 3, body
    # a name that was never a view is still 404
    assert_problem(served.get("/views/nope/changes", **{"from": 0, "to": 0}), 404)
    assert_problem(served.get("/views/nope/changes", **{"from": 0}), 404)


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("edge-cli") / "data"
    with Ledger.open(root) as lg:
        _fill(lg)
    return root


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err, (out, err)
    (line,) = err.splitlines()
    assert line.startswith("ledger: error: "), line
    return line


@pytest.mark.parametrize("make", [False, True], ids=["missing", "empty"])
def test_views_rebuild_refuses_a_directory_without_a_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: bool,
) -> None:
    target = tmp_path / "nonexistent"
    if make:
        target.mkdir()
    assert main(["verify", "--data-dir", str(target)]) == 1
    read_error = _error(capsys)
    assert "no ledger at" in read_error
    assert main(["views", "rebuild", "balances", "--data-dir", str(target)]) == 1
    assert _error(capsys) == read_error  # the same one line as every read command
    assert (sorted(target.iterdir()) == []) if make else not target.exists()


def test_views_rebuild_still_works_on_a_ledger(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["views", "rebuild", "balances", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.startswith("balances: 2 rows at tx ")


def test_input_that_is_not_utf8_is_one_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Undecodable bytes reach Python as lone surrogates (PEP 383): "\udcff" is the byte 0xFF.
    d = ["--data-dir", str(data_dir)]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe"), encoding="utf-8",
                                                        errors="surrogateescape"))
    assert main(["sql", "-", *d]) == 1
    assert "the query on stdin is not valid UTF-8 (byte 0xFF" in _error(capsys)
    assert main(["sql", "SELECT '\udcff'", *d]) == 2
    assert "argument query: not valid UTF-8 (byte 0xFF" in _error(capsys)
    for params in ('["\udcff"]', '["\\ud800"]'):  # a raw byte; a JSON escape of a lone surrogate
        assert main(["sql", "SELECT $1", "--params", params, *d]) == 2
        line = _error(capsys)
        assert "--params" in line and "not valid UTF-8" in line, line
    out = tmp_path / "x" / "\udcff"
    assert main(["export", "--out", str(out), *d]) == 2
    line = _error(capsys)
    assert "--out" in line and "\\xff' is not valid UTF-8" in line, line
    assert not out.parent.exists()
    assert main(["info", "--data-dir", str(tmp_path / "\udcff")]) == 2
    assert "--data-dir" in (line := _error(capsys)) and "not valid UTF-8" in line, line
    # valid UTF-8 beyond ASCII is fine, on stdin too
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("SELECT 'é' AS e".encode()),
                                                        encoding="utf-8"))
    assert main(["sql", "-", "--format", "json", *d]) == 0
    assert capsys.readouterr().out == '{"e": "é"}\n'


def test_csv_of_an_infinite_time_is_one_line_naming_the_column(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed `<value out of range: 2147483647>` (or a year-32103 timestamp) as if a value."""
    for sql in ("SELECT 'infinity'::DATE AS d", "SELECT '-infinity'::TIMESTAMPTZ AS d"):
        assert main(["sql", sql, "--format", "csv", "--data-dir", str(data_dir)]) == 1
        assert "column 'd' holds infinity" in _error(capsys)
    assert main(["sql", "SELECT DATE '2020-01-01' AS d", "--format", "csv", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == ['"d"', "2020-01-01"]


def test_table_and_json_output_hold_only_what_they_can(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by audit: table and json raised OverflowError for times beyond Python's range, json
    printed NaN (not JSON), and the table passed ESC and BEL to the terminal."""
    d = ["--data-dir", str(data_dir)]
    for sql in ("SELECT 'infinity'::TIMESTAMP AS t", "SELECT DATE '10000-01-01' AS t"):
        for fmt in ("table", "json"):
            assert main(["sql", sql, "--format", fmt, *d]) == 1
            assert "column 't' holds a value out of Python's range" in _error(capsys)
    for sql in ("SELECT 'nan'::DOUBLE AS x", "SELECT '-inf'::DOUBLE AS x", "SELECT 'nan'::JSON AS x"):
        assert main(["sql", sql, "--format", "json", *d]) == 1
        assert "NaN or infinite" in _error(capsys)
    assert main(["sql", "SELECT chr(27) || '[31mred' || chr(7) || chr(127) AS y", *d]) == 0
    out = capsys.readouterr().out
    assert "\\x1B[31mred\\x07\\x7F" in out and not any(c in out for c in "\x1b\x07\x7f")


def test_cli_names_a_file_given_as_data_dir_and_a_bad_bootstrap(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["info", "--data-dir", str(tmp_path / "afile")]) == 1
    assert "is a file, not a directory" in _error(capsys)  # it said the directory does not exist
    assert main(["info", "--bootstrap", ":::", "--data-dir", str(data_dir)]) == 2
    assert "is not HOST:PORT" in _error(capsys)  # it was "ValueError: invalid literal for int()"
