"""Rules that turn events into datoms: the entity id at a path in `data`, one assertion per other
top-level field, a retraction for a field set to null, and whole-entity retraction for deletions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ledger.errors import LedgerError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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

    def entity_of(self, data: dict[str, Any]) -> str | None:
        """The entity id of an event, or None when the path is missing or not a scalar."""
        value: Any = data
        for part in self.entity_path.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        return str(value)

    def is_deletion(self, action: str) -> bool:
        return re.fullmatch(self.deletion, action) is not None


def derive(
    rules: Rules, action: str, data: dict[str, Any], current: Callable[[str], set[str]]
) -> Iterator[tuple[str, str, Any, bool]]:
    """Yield (e, a, v, op) for one event. `current(e)` gives the attributes e has right now,
    needed only to expand a deletion into one retraction per attribute (Datomic's retractEntity)."""
    e = rules.entity_of(data)
    if e is None:
        return
    if rules.is_deletion(action):
        for a in sorted(current(e)):
            yield e, a, None, False
        return
    top = rules.entity_path.split(".")[0] if "." not in rules.entity_path else None
    for a, v in data.items():
        if a != top:
            yield e, a, v, v is not None
