"""Settings and the long-lived resources of one API process, opened and closed in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from api.notify import ChildWatcher, Notifier
from api.registry import SchemaRegistry
from ledger import Ledger, views
from ledger.broker import Broker, create_topics_async
from ledger.consumer import MAX_VALUE_BYTES, Consumer, connection_options, topic_kinds

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from litestar import Litestar

log = logging.getLogger("api")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class Settings:
    """Every setting has a LEDGER_* environment variable; `ledger serve` flags override them."""

    data_dir: Path = field(default_factory=lambda: Path(_env("LEDGER_DATA_DIR", "./data")))
    bootstrap: str = field(default_factory=lambda: _env("LEDGER_KAFKA_BOOTSTRAP", ""))
    group: str = field(default_factory=lambda: _env("LEDGER_KAFKA_GROUP", "ledger"))
    commands_topic: str = field(default_factory=lambda: _env("LEDGER_COMMANDS_TOPIC", "commands"))
    events_topic: str = field(default_factory=lambda: _env("LEDGER_EVENTS_TOPIC", "events"))
    topics: tuple[str, ...] = field(  # default: the commands and events topics
        default_factory=lambda: tuple(t.strip() for t in _env("LEDGER_TOPICS", "").split(",") if t.strip())
    )
    topic_pattern: str | None = field(default_factory=lambda: os.environ.get("LEDGER_TOPIC_PATTERN") or None)
    schemas_dir: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("LEDGER_SCHEMAS_DIR")) else None
    )
    strict: bool = field(default_factory=lambda: _env("LEDGER_STRICT", "0").lower() in ("1", "true", "yes"))
    max_body_bytes: int = field(default_factory=lambda: int(_env("LEDGER_MAX_BODY_BYTES", str(1 << 20))))
    # Materialized views that cannot follow the log incrementally are rebuilt when stale, at most
    # this often (and at most a tenth of the time); 0 turns that off.
    view_refresh_s: float = field(default_factory=lambda: float(_env("LEDGER_VIEW_REFRESH_S", "60")))
    # An idle /updates stream sends a keep-alive comment this often (proxies drop silent connections).
    sse_keepalive_s: float = field(default_factory=lambda: float(_env("LEDGER_SSE_KEEPALIVE_S", "15")))
    produce_timeout: float = 5.0
    # How long a fetch may wait for data. Kafka answers as soon as data arrives, so this mostly
    # bounds idle polling; the bundled broker stalls if a fetch needs longer than this.
    # Default: 5 ms with the bundled broker (it answers only when the wait expires), else 100 ms.
    fetch_max_wait_ms: int | None = field(
        default_factory=lambda: int(w) if (w := os.environ.get("LEDGER_FETCH_MAX_WAIT_MS")) else None
    )
    demo: bool = False
    ledger: Ledger | None = None  # already open (ledger serve opens it first); else opened at start
    embedded_broker: bool = False  # the bootstrap is a bundled broker the caller started
    partitions: int = 3  # for topics the embedded broker creates


CONSUMER_SETTLE_S = 10.0  # /ready says not ready for this long after the consumer failed


class Services:
    """What handlers need: the ledger, the producer, the consumer and the wake-up machinery."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker: Broker | None = None
        self.ledger: Ledger
        self.producer: AIOKafkaProducer | None = None
        self.consumer: Consumer
        self.notifier: Notifier
        self.children: ChildWatcher
        self.schemas: SchemaRegistry
        self.bootstrap = settings.bootstrap
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._produced: dict[tuple[str, int], int] = {}
        self._broker_check: tuple[float, asyncio.Future[bool]] | None = None  # (asked at, answer)
        self._consumer_failed_at = -float("inf")  # monotonic time of the consumer's last failure

    async def start(self) -> None:
        s = self.settings
        if not self.bootstrap:
            # The embedded default: a bundled broker on loopback (memory storage; the ledger is
            # the durable copy, and the consumer notices the empty topics after a restart).
            self.broker = await asyncio.to_thread(Broker().start)
            self.bootstrap = self.broker.bootstrap
            topics = {s.commands_topic: s.partitions, s.events_topic: s.partitions}
            await create_topics_async(self.bootstrap, topics)
        self.ledger = s.ledger if s.ledger is not None else await asyncio.to_thread(Ledger.open, s.data_dir)
        extra: tuple[Path, ...] = (s.schemas_dir,) if s.schemas_dir else ()
        if s.demo:
            from examples.bank import SCHEMAS

            extra = (SCHEMAS, *extra)
        self.schemas = SchemaRegistry(s.data_dir / "schemas", strict=s.strict, extra_dirs=extra)
        self.notifier = Notifier(self.ledger)
        self.children = ChildWatcher(self.ledger)
        self.consumer = Consumer(
            self.ledger, bootstrap=self.bootstrap, group=s.group,
            topics=s.topics or (s.commands_topic, s.events_topic), pattern=s.topic_pattern,
            kinds=topic_kinds(s.commands_topic, s.events_topic), fetch_max_wait_ms=self._fetch_wait(),
        )
        # Kafka may be down: the API still serves reads, answers 503 to commands and /ready
        # reports it, while these tasks keep trying to connect.
        self._tasks.append(asyncio.create_task(self._keep_producer(), name="producer"))
        self._tasks.append(asyncio.create_task(self._keep_running(self._run_consumer), name="consumer"))
        if s.view_refresh_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_views(), name="views"))
        if s.demo:
            from examples.bank import build

            processor = build(self.bootstrap, commands_topic=s.commands_topic, events_topic=s.events_topic)
            # Seed the bank's state from the ledger's events: the bundled broker keeps its topics
            # in memory, the ledger is the durable copy (events seen in both are folded once).
            seed = await asyncio.to_thread(self._ledger_events)

            async def run_bank(stop: asyncio.Event) -> None:
                await processor.run(stop, seed=seed)

            self._tasks.append(asyncio.create_task(self._keep_running(run_bank), name="bank"))
            if self.broker is not None or s.embedded_broker:
                self._tasks.append(asyncio.create_task(self._resend_pending(processor), name="resend"))

    async def _refresh_views(self) -> None:
        interval = self.settings.view_refresh_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(interval, 5.0))
            if self._stop.is_set():
                return
            try:
                rebuilt = await asyncio.to_thread(views.refresh_stale, self.ledger, interval)
            except Exception:  # a view that fails to rebuild says so in its status
                log.exception("refreshing stale materialized views failed")
                continue
            if rebuilt:
                log.info("rebuilt stale materialized views: %s", ", ".join(rebuilt))

    async def _resend_pending(self, processor: Any) -> None:
        """Commands the ledger holds but the bank never answered were on the in-memory broker that
        stopped with the last run: send them again, once the bank is ready. Same ids: the ledger
        keeps one copy, and the bank's event ids derive from the command id."""
        await processor.ready.wait()
        pending = await asyncio.to_thread(self._pending_commands, processor.actions)
        while self.producer is None and not self._stop.is_set():
            await asyncio.sleep(0.1)
        for command in pending:
            if self.producer is None or self._stop.is_set():
                return
            key = self.schemas.entity_key(command["action"], command["data"]) or command["id"]
            try:
                await self.producer.send_and_wait(
                    self.settings.commands_topic, msgspec.json.encode(command), key=key.encode())
            except KafkaError as e:  # the next start tries again: they stay unanswered in the ledger
                log.warning("could not send unanswered command %s again: %s", command["id"], e)
                return
        if pending:
            log.info("sent %d commands the bank had not answered to %s again", len(pending),
                     self.settings.commands_topic)

    def _pending_commands(self, actions: frozenset[str]) -> list[dict[str, Any]]:
        rows = self.ledger.sql(
            "SELECT id, action, data, valid_time, headers FROM commands c "
            "WHERE ($any OR list_contains($actions, action)) "
            "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.parent = c.id) ORDER BY tx, seq",
            params={"actions": sorted(actions), "any": "*" in actions}, timeout=None,
        ).to_pylist()
        out = []
        for r in rows:
            headers = dict(json.loads(r["headers"] or "[]"))
            out.append({"id": r["id"], "action": r["action"], "data": json.loads(r["data"]),
                        "timestamp": r["valid_time"].isoformat(),
                        **{k: headers[k] for k in ("user", "system") if k in headers}})
        return out

    def _ledger_events(self) -> list[Any]:
        from ledger.processor import Event

        rows = self.ledger.sql(
            "SELECT id, action, data, parent, valid_time, headers FROM events ORDER BY tx, seq",
            timeout=None,
        ).to_pylist()
        return [
            Event(action=r["action"], data=json.loads(r["data"]), id=r["id"], parent=r["parent"],
                  timestamp=r["valid_time"].isoformat(),
                  system=dict(json.loads(r["headers"] or "[]")).get("system"))
            for r in rows
        ]

    def _fetch_wait(self) -> int:
        if self.settings.fetch_max_wait_ms is not None:
            return self.settings.fetch_max_wait_ms
        return 5 if self.broker is not None or self.settings.embedded_broker else 100

    async def _keep_producer(self) -> None:
        while not self._stop.is_set():
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", linger_ms=1, enable_idempotence=False,
                request_timeout_ms=int(self.settings.produce_timeout * 1000), max_batch_size=256 * 1024,
                max_request_size=MAX_VALUE_BYTES + (64 << 10),  # the API's limit is on the value
                **connection_options(self.consumer.kafka_options),
            )
            try:
                await producer.start()
            except Exception as e:  # noqa: BLE001 - any failure to connect means "retry"
                log.warning("Kafka at %s is not reachable (%s); retrying", self.bootstrap, e)
                with contextlib.suppress(Exception):
                    await producer.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 2)
                continue
            self.producer = producer
            return

    async def _run_consumer(self, stop: asyncio.Event) -> None:
        try:
            await self.consumer.run(stop)
        except Exception as e:
            self.consumer.status.last_error = f"{type(e).__name__}: {e}"
            self._consumer_failed_at = time.monotonic()
            raise

    async def _keep_running(self, run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        while not self._stop.is_set():
            try:
                await run(self._stop)
            except Exception as e:  # noqa: BLE001 - log, back off, reconnect
                log.warning("%s failed (%s); restarting", run, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 2)

    def produced(self, topic: str, partition: int, offset: int) -> None:
        """Remember the furthest offset this process wrote, so shutdown can wait for the ledger."""
        key = (topic, partition)
        self._produced[key] = max(self._produced.get(key, 0), offset + 1)

    def _unconsumed(self) -> bool:
        stored = self.ledger.offsets(self.settings.group)
        return any(
            (m := stored.get(tp)) is None or m.next_offset < n for tp, n in self._produced.items()
        ) or self._lagging()

    async def stop(self, drain_seconds: float = 10.0) -> None:
        """Let the consumer store everything this process accepted, then close everything."""
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and await asyncio.to_thread(self._unconsumed):
            await asyncio.sleep(0.05)
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        await self.children.close()
        self.notifier.close()
        await asyncio.to_thread(self.ledger.close)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)

    def _lagging(self) -> bool:
        parts = self.consumer.status.as_dict()["partitions"]
        return any((p["lag"] or 0) > 0 for p in parts)

    async def _broker_answers(self) -> bool:
        """Whether the broker answered a metadata request within the last second (the producer's
        cached metadata outlives a dead broker); probes in that second share the answer."""
        if self.producer is None:
            return False
        now = time.monotonic()
        if self._broker_check is None or now - self._broker_check[0] > 1.0:
            self._broker_check = (now, asyncio.ensure_future(self._ask_broker(self.producer)))
        return await asyncio.shield(self._broker_check[1])

    @staticmethod
    async def _ask_broker(producer: AIOKafkaProducer) -> bool:
        try:
            async with asyncio.timeout(2.0):
                await producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError, OSError):
            return False
        return True

    async def ready(self) -> dict[str, Any]:
        status = self.consumer.status.as_dict()
        checks = {
            "ledger": not self.ledger.read_only,
            # (not when it failed lately: one that fails again on every restart is not ready)
            "consumer": status["running"] and bool(status["partitions"])
            and time.monotonic() - self._consumer_failed_at > CONSUMER_SETTLE_S,
            "broker": await self._broker_answers(),
        }
        return {"ready": all(checks.values()), "checks": checks, "tx": self.ledger.head.tx,
                "sync_waiters": self.children.waiting, "consumer": status}


@contextlib.asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    services: Services = app.state.services
    await services.start()
    try:
        yield
    finally:
        await services.stop()
