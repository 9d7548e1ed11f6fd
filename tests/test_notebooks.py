"""Every notebook in notebooks/ runs top to bottom: its code cells, in order, in one namespace (what
"Run All" does in Jupyter), in a fresh directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook() -> None:
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__notebook__"}
    cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(cells, 1):
        exec(compile("".join(cell["source"]), f"{path.name} cell {i}", "exec"), namespace)
    state = namespace["then_and_now"]
    assert state == [
        {"e": "acct-1", "then_state": '{"amount":500,"balance":500,"owner":"Ann"}',
         "now_state": '{"amount":120,"balance":380,"owner":"Ann"}'},
    ]
