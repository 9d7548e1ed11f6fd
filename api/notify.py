"""Wake-ups for everything that waits on the ledger: sync commands, SSE and WebSocket streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledger import Ledger, TxReport


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

    def _from_writer(self, report: TxReport) -> None:
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
    """Resolves sync-command waiters when an event whose parent is their command lands.

    One query per commit covers every waiter, however many there are.
    """

    def __init__(self, ledger: Ledger, notifier: Notifier) -> None:
        self.ledger = ledger
        self.notifier = notifier
        self._waiters: dict[str, asyncio.Future[list[str]]] = {}
        self._seen = ledger.head.tx
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for fut in self._waiters.values():
            fut.cancel()

    def register(self, command_id: str) -> asyncio.Future[list[str]]:
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._waiters[command_id] = fut
        return fut

    def forget(self, command_id: str) -> None:
        self._waiters.pop(command_id, None)

    async def _run(self) -> None:
        while True:
            await self.notifier.wait_past(self._seen, timeout=3600)
            upto = self.notifier.tx
            if self._waiters:
                found = await asyncio.to_thread(self._children, self._seen, upto, list(self._waiters))
                for parent, ids in found.items():
                    fut = self._waiters.pop(parent, None)
                    if fut is not None and not fut.done():
                        fut.set_result(ids)
            self._seen = upto

    def _children(self, after: int, upto: int, parents: list[str]) -> dict[str, list[str]]:
        rows: list[dict[str, Any]] = self.ledger.sql(
            "SELECT parent, list(id ORDER BY tx, seq) AS ids FROM events "
            "WHERE tx > $after AND parent IN (SELECT unnest($parents::VARCHAR[])) GROUP BY parent",
            as_of=upto, params={"after": after, "parents": parents},
        ).to_pylist()
        return {r["parent"]: r["ids"] for r in rows}
