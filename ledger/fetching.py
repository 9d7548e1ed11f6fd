"""How long a consumer's fetch may wait at the broker: short for latency, longer when the broker
cannot answer in time.

Kafka answers a fetch as soon as data arrives, so the wait only bounds idle polls. Some brokers (the
bundled Tansu) answer only when the wait expires, so a short wait is what keeps latency low — and they
return nothing at all when reading a large partition takes longer than the wait, which would stall a
consumer for ever. `FetchWait` starts short and doubles the wait whenever fetches come back empty
while a partition still has unread records, and goes back to the short wait once the consumer has
caught up (a wait left long would be the latency of every later record: 2 s on Tansu).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")

log = logging.getLogger("ledger.fetching")
EMPTY_FETCHES_BEFORE_BACKOFF = 3


class FetchWait:
    def __init__(self, kafka: Any, base_ms: int, cap_ms: int = 2_000) -> None:
        self._fetcher = getattr(kafka, "_fetcher", None)  # aiokafka reads this per fetch request
        self.base_ms = self.wait_ms = base_ms
        self.cap_ms = max(cap_ms, base_ms)
        self._empty = 0

    def observe(self, *, got_records: bool, lagging: bool) -> None:
        """Call after each poll: whether it returned records, and whether any partition lags."""
        if not lagging and self.wait_ms > self.base_ms:
            self._set(self.base_ms)
            log.info("caught up; fetch_max_wait_ms is back to %s", self.wait_ms)
        if got_records or not lagging:
            self._empty = 0
            return
        self._empty += 1
        if self._empty < EMPTY_FETCHES_BEFORE_BACKOFF or self.wait_ms >= self.cap_ms:
            return
        self._empty = 0
        self._set(min(self.cap_ms, self.wait_ms * 2))
        log.warning("fetches return nothing while records wait; fetch_max_wait_ms is now %s", self.wait_ms)

    def _set(self, wait_ms: int) -> None:
        self.wait_ms = wait_ms
        if self._fetcher is not None and hasattr(self._fetcher, "_fetch_max_wait_ms"):
            self._fetcher._fetch_max_wait_ms = wait_ms


async def unless_stopped(work: Awaitable[T], stopper: asyncio.Future[Any]) -> tuple[bool, T | None]:
    """Await `work` unless `stopper` finishes first (then `work` is cancelled): (done, result)."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False, None
    return True, task.result()
