"""Wake-ups for everything that waits on the ledger: sync commands, SSE and WebSocket streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ledger import Ledger, TxReport
    from ledger.records import NewRecord


class Notifier:
    """Tracks the latest committed tx; waiters sleep until it moves past what they have seen."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.tx = ledger.head.tx
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._remove = ledger.add_listener(self._from_writer)

    def close(self) -> None:
        self._remove()
        self._event.set()

    def _from_writer(self, report: TxReport, stored: Sequence[NewRecord]) -> None:
        self._loop.call_soon_threadsafe(self._bump, report.tx)

    def _bump(self, tx: int) -> None:
        self.tx = max(self.tx, tx)
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_past(self, tx: int, timeout: float) -> bool:
        """True once a tx after `tx` is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.tx <= tx:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)
        return True


class ChildWatcher:
    """Resolves sync-command waiters once their command and an event whose parent is their command
    are both committed (the event can commit first: its tx is then not the command's).

    The writer's listener hands over each tx's records, so no query is needed per commit.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[str, asyncio.Future[list[str]]] = {}
        self._stored: set[str] = set()  # waiting commands already in the ledger
        self._children: dict[str, list[str]] = {}  # their events in the ledger so far
        self._remove = ledger.add_listener(self._from_writer)

    async def close(self) -> None:
        self._remove()
        for fut in self._waiters.values():
            fut.cancel()

    def register(self, command_id: str) -> asyncio.Future[list[str]]:
        fut: asyncio.Future[list[str]] = self._loop.create_future()
        self._waiters[command_id] = fut
        return fut

    def forget(self, command_id: str) -> None:
        self._waiters.pop(command_id, None)
        self._stored.discard(command_id)
        self._children.pop(command_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _from_writer(self, report: TxReport, stored: Sequence[NewRecord]) -> None:
        if not self._waiters:
            return
        commands = [r.id for r in stored if r.kind == "command" and r.id in self._waiters]
        found: dict[str, list[str]] = {}
        for r in stored:
            if r.kind == "event" and r.parent in self._waiters:
                found.setdefault(r.parent, []).append(r.id)
        if commands or found:
            self._loop.call_soon_threadsafe(self._resolve, commands, found)

    def _resolve(self, commands: list[str], found: dict[str, list[str]]) -> None:
        for command_id in commands:
            if command_id in self._waiters:
                self._stored.add(command_id)
        for parent, ids in found.items():
            if parent in self._waiters:
                self._children.setdefault(parent, []).extend(ids)
        for command_id in [c for c in self._stored if self._children.get(c)]:
            fut = self._waiters.get(command_id)
            kids = self._children[command_id]
            self.forget(command_id)
            if fut is not None and not fut.done():
                fut.set_result(kids)
