"""The rules that name an event's entity (ledger.datoms.Rules)."""

from __future__ import annotations

from typing import Any

import pytest

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
