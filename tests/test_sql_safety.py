"""Read-only and bounded SQL: only SELECT runs, no files beyond the ledger, time and row limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ledger import InvalidQuery, Ledger

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
])
def test_only_select_runs(lg: Ledger, statement: str) -> None:
    with pytest.raises(InvalidQuery):
        lg.sql(statement)
    assert lg.sql("SELECT count(*) AS n FROM log").to_pylist() == [{"n": 8}]
    assert lg.verify().ok


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('/tmp/../etc/x.parquet')", "SELECT * FROM glob('/*')",
])
def test_no_file_access_beyond_the_ledger(lg: Ledger, query: str) -> None:
    with pytest.raises(InvalidQuery):
        lg.sql(query)


def test_long_queries_are_interrupted_and_rows_are_capped(lg: Ledger) -> None:
    with pytest.raises(InvalidQuery, match="interrupted"):
        lg.sql("SELECT count(*) FROM range(100000000000) a", timeout=0.3)
    table = lg.sql("SELECT * FROM log ORDER BY tx, seq", limit=3)
    assert table.num_rows == 3 and table.schema.metadata == {b"truncated": b"true"}
    assert lg.sql("SELECT * FROM log", limit=100).num_rows == 8
    assert lg.sql("SELECT 42 AS answer", timeout=5).to_pylist() == [{"answer": 42}]
