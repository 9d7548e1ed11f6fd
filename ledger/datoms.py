"""Rules that turn events into datoms: the entity id at a path in `data`, one assertion per other
top-level field, a retraction for a field set to null, and whole-entity retraction for deletions.

The ledger indexes an event by its entity as one row whose `attrs` is a JSON object {a: v}: the
event's `data` itself (the entity key is not an attribute), or {a: null} for every attribute a
deletion retracts. A datom's op is therefore always `v is not null`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ledger.errors import LedgerError

if TYPE_CHECKING:
    from collections.abc import Iterable

DEFAULT_ENTITY_PATH = "id"
DEFAULT_DELETION = r".*-deleted"


@dataclass(frozen=True, slots=True)
class Rules:
    """How events become datoms; fixed when a ledger is created (changing them would rewrite history)."""

    entity_path: str = DEFAULT_ENTITY_PATH  # dotted path inside `data`
    deletion: str = DEFAULT_DELETION  # regex; a matching action retracts the whole entity

    def __post_init__(self) -> None:
        if not self.entity_path or any(not p for p in self.entity_path.split(".")):
            raise LedgerError(f"entity path {self.entity_path!r} must be a dotted path such as 'id'")
        try:
            re.compile(self.deletion)
        except re.error as e:
            raise LedgerError(f"deletion rule {self.deletion!r} is not a valid regex: {e}") from e

    @property
    def entity_key(self) -> str | None:
        """The top-level field holding the entity id (not an attribute), None for a nested path."""
        return None if "." in self.entity_path else self.entity_path

    def entity_of(self, data: dict[str, Any]) -> str | None:
        """The entity id of an event, or None when the path is missing or not a scalar."""
        value: Any = data
        for part in _parts(self.entity_path):
            if not isinstance(value, dict):
                return None
            value = value.get(part)  # a missing part ends as None, which is no id
        if type(value) is str:
            return value
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        return str(value)

    def is_deletion(self, action: str) -> bool:
        return _matches(self.deletion, action)


@lru_cache(maxsize=64)
def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


@lru_cache(maxsize=4096)
def _matches(pattern: str, action: str) -> bool:
    return re.fullmatch(pattern, action) is not None


def attributes(attrs: dict[str, Any], entity_key: str | None) -> Iterable[tuple[str, Any]]:
    """The (a, v) datoms of one index row, in field order; v None is a retraction."""
    return ((a, v) for a, v in attrs.items() if a != entity_key)


def current(rows: Iterable[dict[str, Any]], entity_key: str | None) -> set[str]:
    """The attributes an entity has after index rows (attrs objects) applied in order."""
    state: set[str] = set()
    for attrs in rows:
        for a, v in attributes(attrs, entity_key):
            if v is None:
                state.discard(a)
            else:
                state.add(a)
    return state
