"""The rules that name an event's entity (ledger.datoms.Rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ledger import InvalidQuery, Ledger, LedgerError
from ledger.datoms import Rules


class Text(str):
    pass


@pytest.mark.parametrize(("data", "entity"), [
    ({"id": "acct-1", "n": 1}, "acct-1"),
    ({"id": 42}, "42"),
    ({"id": 2**70}, str(2**70)),
    ({"id": Text("acct-2")}, "acct-2"),
    ({"id": True}, None),
    ({"id": 1.5}, None),
    ({"id": None}, None),
    ({"id": ["acct-1"]}, None),
    ({"id": {"id": "acct-1"}}, None),
    ({"n": 1}, None),
    ({}, None),
])
def test_the_entity_is_a_top_level_string_or_integer(data: dict[str, Any], entity: str | None) -> None:
    found = Rules().entity_of(data)
    assert found == entity
    assert found is None or type(found) is str


@pytest.mark.parametrize(("data", "entity"), [
    ({"account": {"no": "acct-1"}}, "acct-1"),
    ({"account": {"no": 7}}, "7"),
    ({"account": {"no": None}}, None),
    ({"account": {"other": "acct-1"}}, None),
    ({"account": "acct-1"}, None),
    ({"account": None}, None),
    ({"account": ["acct-1"]}, None),
    ({"account": {"no": {"x": 1}}}, None),
    ({"no": "acct-1"}, None),
])
def test_a_dotted_path_reaches_into_nested_objects(data: dict[str, Any], entity: str | None) -> None:
    assert Rules(entity_path="account.no").entity_of(data) == entity


def test_entity_reads_take_the_ids_events_give(tmp_path: Path) -> None:
    lg = Ledger.open(tmp_path / "ledger")
    try:
        lg.append([{"kind": "event", "action": "set", "data": {"id": 42, "n": 1}}])
        assert lg.entity(42) == lg.entity("42") == {"n": 1}
        assert [d.e for d in lg.history(42)] == ["42"]
        for wrong in (None, 1.5, True, b"42"):
            with pytest.raises(InvalidQuery, match="entity id: expected a string or an integer"):
                lg.entity(wrong)  # type: ignore[arg-type]
            with pytest.raises(InvalidQuery, match="entity id"):
                lg.as_of(1).history(wrong)  # type: ignore[arg-type]
    finally:
        lg.close()


def test_an_empty_rule_is_taken_as_given_not_as_the_default(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="entity path '' must be a dotted path"):
        Ledger.open(tmp_path / "a", entity_path="")
    lg = Ledger.open(tmp_path / "b", deletion="")  # no action deletes an entity
    try:
        lg.append([{"kind": "event", "action": "thing-deleted", "data": {"id": "t", "n": 1}}])
        assert lg.entity("t") == {"n": 1}
    finally:
        lg.close()
    Ledger.open(tmp_path / "b", deletion="").close()  # the same rule reopens
