"""The README's examples run as tests: every ```python block as is, and the plain-DuckDB recipe (the
```sql block) against a ledger with sealed segments and an unsealed tail."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pytest

from ledger import Ledger
from ledger.storage.catalog import RELATIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


PYTHON = blocks("python")


def test_readme_opens_with_the_two_commands() -> None:
    first = re.search(r"^```\w*\n(.*?)^```", README, re.S | re.M)
    assert first is not None
    assert first[1].split("\n")[:-1] == ["make serve", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=[f"python-{i + 1}" for i in range(len(PYTHON))])
def test_python_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(PYTHON[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})


def test_there_are_examples() -> None:
    assert len(PYTHON) >= 2 and len(blocks("sql")) == 1


def _statements(sql: str) -> list[duckdb.Statement]:
    return duckdb.extract_statements(sql)


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """./data with two sealed segments and two tail transactions, plus the debris of a seal in progress."""
    root = tmp_path / "data"
    with Ledger.open(root) as lg:
        for i in range(6):
            lg.append([
                {"kind": "command", "action": "deposit", "data": {"id": f"acct-{i % 2}", "amount": i}},
                {"kind": "event", "action": "deposited", "data": {"id": f"acct-{i % 2}", "balance": i}},
            ])
            if i in (1, 3):
                lg.seal()
    (first, *_) = sorted(root.glob("segments/[0-9]*"))
    shutil.copytree(first, root / "segments" / ".tmp-000000000007-000000000008")
    monkeypatch.chdir(tmp_path)
    return root


def test_duckdb_recipe_reads_the_directory_without_the_ledger(data: Path) -> None:
    (recipe,) = blocks("sql")
    statements = _statements(recipe)
    with Ledger.open(data, read_only=True) as lg:
        everything = [
            (r["tx"], r["action"], r["entity"]) for r in lg.sql(
                "SELECT tx, action, data->>'id' AS entity FROM log ORDER BY tx, seq"
            ).to_pylist()
        ]
        sealed_counts = {
            r["action"]: r["n"] for r in lg.sql(
                "SELECT action, count(*) AS n FROM log WHERE tx <= 4 GROUP BY action"
            ).to_pylist()
        }
    con = duckdb.connect()
    results = []
    for statement in statements:
        rel = con.execute(statement.query)
        if statement.type == duckdb.StatementType.SELECT:
            results.append(rel.fetchall())
    con.close()
    assert len(results) == 2
    assert dict(results[0]) == sealed_counts  # the .tmp- directory was not read
    assert results[-1] == everything
    assert len(everything) == 12


def test_sealed_part_of_the_recipe_runs_while_a_writer_holds_the_ledger(data: Path) -> None:
    (recipe,) = blocks("sql")
    first = _statements(recipe)[0]
    with Ledger.open(data) as lg:
        lg.append([{"kind": "event", "action": "deposited", "data": {"id": "acct-9", "balance": 1}}])
        rows = duckdb.sql(first.query).fetchall()
    assert dict(rows) == {"deposit": 4, "deposited": 4}


def test_documented_relations_match_the_code(tmp_path: Path) -> None:
    documented = {}  # relation -> the first backquoted list of columns in its table row
    for m in re.finditer(r"^\| `(\w+)`[^|]*\| (.*) \|$", README, re.M):
        columns = re.search(r"`([a-z_]+(?:, [a-z_]+)+)`", m[2])
        documented[m[1]] = columns[1].split(", ") if columns else []
    stored = {"log": "records", "datoms": "datoms", "transactions": "transactions",
              "quarantine": "quarantine"}
    for relation, table in stored.items():
        assert documented[relation] == [c for c, _ in RELATIONS[table]], relation
    with Ledger.open(tmp_path / "data") as lg:
        for relation in ("log", "commands", "events", "datoms", "entities", "transactions", "quarantine"):
            lg.sql(f"SELECT * FROM {relation}")
        entity_columns = lg.sql("SELECT * FROM entities").column_names
    assert entity_columns == ["e", "state", "tx", "tx_time"]
    assert all(f"`{c}`" in README for c in entity_columns)
