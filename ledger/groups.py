"""Records produced together are stored together: the consumer holds back the messages of a group
(the events one command caused) until the whole group has been fetched, then appends it in one
transaction.

Kafka spreads a group over partitions (its events are keyed by entity, which keeps each entity's
events in order), and a fetch can bring one partition's part before another's. Appended as they
came, a bank transfer's debit and credit could land in two transactions, and a read as of the tx
between them would see money that is in neither account.

A producer marks each message of a group with the header ``ledger-group: <index>/<count> <group>``
(the processor toolkit does so for every command with two or more events). Holding a message back
holds back the rest of its partition too, so each partition stays in offset order. A group that is
still incomplete after ``wait_s`` (its producer died half-way, or a member is in a partition or
topic this consumer does not read) is released as it is, and so is everything once more than
``max_held`` messages wait. Held messages are not stored: the stored offsets stay before them, so a
crash re-reads them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from aiokafka import TopicPartition

GROUP_HEADER = "ledger-group"
MAX_GROUP = 10_000  # members of one group
_REMEMBER_SPLIT = 10_000  # groups released incomplete, whose late members are not held again
log = logging.getLogger("ledger.consumer")


def group_header(index: int, count: int, group: str) -> tuple[str, bytes]:
    """The header that makes a message member `index` of the `count` messages of `group`."""
    return GROUP_HEADER, f"{index}/{count} {group}".encode()


def membership(headers: Iterable[tuple[str, bytes]] | None) -> tuple[str, int, int] | None:
    """(group, index, count) from a message's headers; None if it names no group, or names one
    in a form the producer did not mean (a foreign header must not hold anything back)."""
    for name, value in headers or ():
        if name != GROUP_HEADER:
            continue
        try:
            position, group = value.decode("ascii").split(" ", 1)
            index, count = (int(n) for n in position.split("/"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None
        if not 0 <= index < count <= MAX_GROUP or not 2 <= count or not group:
            return None
        return group, index, count
    return None


@dataclass
class _Group:
    count: int
    indexes: set[int] = field(default_factory=set)
    members: list[tuple[TopicPartition, int]] = field(default_factory=list)


class Holdback:
    """The messages fetched but held back for their group, per partition, in offset order."""

    def __init__(self, wait_s: float, max_held: int) -> None:
        self.wait_s = wait_s
        self.max_held = max_held
        self.held: dict[TopicPartition, list[Any]] = {}
        self._first_seen: dict[str, float] = {}  # group -> when its first member was fetched
        self._split: dict[str, None] = {}  # groups released incomplete (insertion-ordered set)

    def __len__(self) -> int:
        return sum(len(msgs) for msgs in self.held.values())

    def take(self, tp: TopicPartition | None = None) -> dict[TopicPartition, list[Any]]:
        """Stop holding (for `tp`, or for every partition), and return what was held: to store
        now, without waiting for the rest of its groups."""
        taken = dict(self.held) if tp is None else {tp: self.held[tp]} if tp in self.held else {}
        for t in taken:
            del self.held[t]
        if tp is None:
            self._first_seen.clear()
        seen: dict[str, tuple[set[int], int]] = {}
        for msgs in taken.values():
            for msg in msgs:
                if (member := membership(msg.headers)) is not None:
                    seen.setdefault(member[0], (set(), member[2]))[0].add(member[1])
        for name, (indexes, count) in seen.items():
            if len(indexes) < count:
                self._note_split(name, len(indexes), count)
        return taken

    def _note_split(self, name: str, stored: int, count: int) -> None:
        if name in self._split:
            return
        log.warning("group %s is stored in more than one transaction (%s of its %s messages in "
                    "this one)", name, stored, count)
        self._split[name] = None
        if len(self._split) > _REMEMBER_SPLIT:
            del self._split[next(iter(self._split))]

    def release(
        self, fetched: dict[TopicPartition, list[Any]], whole_topics: set[str], now: float
    ) -> dict[TopicPartition, list[Any]]:
        """What to append now, per partition: the held messages and the newly fetched ones up to
        the first member of a group still waiting for members. The rest is held. `whole_topics`
        are the topics all of whose partitions this consumer reads: a group elsewhere cannot
        complete here, and is not waited for."""
        lists = {tp: self.held.pop(tp, []) + fetched.get(tp, []) for tp in {*self.held, *fetched}}
        groups: dict[str, _Group] = {}
        for tp, msgs in lists.items():
            for i, msg in enumerate(msgs):
                if not msg.headers:
                    continue
                member = membership(msg.headers)
                if member is None:
                    continue
                name, index, count = member
                g = groups.setdefault(name, _Group(count))
                g.indexes.add(index)
                g.members.append((tp, i))
        cut = {tp: len(msgs) for tp, msgs in lists.items()}
        waiting = set()
        for name, g in groups.items():
            first = self._first_seen.setdefault(name, now)
            if (len(g.indexes) < g.count and name not in self._split and now - first < self.wait_s
                    and all(tp.topic in whole_topics for tp, _ in g.members)):
                waiting.add(name)
                for tp, i in g.members:
                    cut[tp] = min(cut[tp], i)
        # A group appended at all is appended whole: one member held holds all of them.
        _settle(cut, groups.values(), lower=True)
        # But no longer than the wait: a group first fetched that long ago goes now, with what is
        # before it on its partitions (which may split a group still waiting; a chain of groups
        # that each hold the one before would otherwise hold all of them for ever).
        overdue = [g for name, g in groups.items() if now - self._first_seen[name] >= self.wait_s]
        for g in overdue:
            for tp, i in g.members:
                cut[tp] = max(cut[tp], i + 1)
        if overdue:
            _settle(cut, (g for g in groups.values() if len(g.indexes) == g.count), lower=False)
        if sum(len(msgs) - cut[tp] for tp, msgs in lists.items()) > self.max_held:
            log.warning("more than %s messages held back for their groups: storing them without "
                        "waiting for groups %s", self.max_held, sorted(waiting)[:5])
            cut = {tp: len(msgs) for tp, msgs in lists.items()}
        ready = {tp: msgs[:cut[tp]] for tp, msgs in lists.items() if cut[tp]}
        self.held = {tp: msgs[cut[tp]:] for tp, msgs in lists.items() if cut[tp] < len(msgs)}
        waited = {}
        for name, g in groups.items():
            released = [(tp, i) for tp, i in g.members if i < cut[tp]]
            if not released:
                waited[name] = self._first_seen[name]
            elif len(released) < g.count:
                self._note_split(name, len(released), g.count)
                if len(released) < len(g.members):
                    waited[name] = self._first_seen[name]
        self._first_seen = waited
        return ready


def _settle(cut: dict[TopicPartition, int], groups: Iterable[_Group], *, lower: bool) -> None:
    """Move the cuts until no group in `groups` is cut through: down to its first member held
    (lower), or up past its last member (raise)."""
    groups = list(groups)
    changed = True
    while changed:
        changed = False
        for g in groups:
            if any(i >= cut[tp] for tp, i in g.members) and any(i < cut[tp] for tp, i in g.members):
                for tp, i in g.members:
                    if lower and i < cut[tp]:
                        cut[tp], changed = i, True
                    elif not lower and i >= cut[tp]:
                        cut[tp], changed = i + 1, True
