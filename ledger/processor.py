"""A toolkit for writing a command processor in Python: one handler per action turns a command into
events, produced to the events topic with ``parent`` set and ids derived from the command id.

    bank = Processor(bootstrap="localhost:9092", group="bank", state=dict)

    @bank.on_event("money-deposited")
    def _(event: Event, balances: dict[str, int]) -> None:
        balances[event.data["id"]] = event.data["balance"]

    @bank.handler("deposit")
    def deposit(command: Command, balances: dict[str, int]) -> list[Event]:
        ...

    asyncio.run(bank.run())

Delivery is at-least-once with exactly-once effects:

* State is only ever changed by folding events (``on_event``): on start the processor replays the
  events topic up to each partition's highwater, then folds its own events as it emits them.  There
  is no private store that could drift from the log.
* Event ids are ``uuid5`` of (command id, processor name, index), so a redelivered command would
  produce the same ids, which the ledger deduplicates.  Better still, a redelivered command is not
  handled again at all: replay remembers every command that already has events from this processor
  (by ``parent``) and skips it, so a deposit is never applied twice against the rebuilt state.
* Command offsets are committed only after the broker acknowledged (``acks=all``) every event of
  the fetched batch.  A crash in between means redelivery, which the rule above makes harmless.
* Events of one command can land on different partitions (the key is the entity id), so a crash can
  leave a command half-produced.  Every event of a multi-event command therefore carries the whole
  batch in a ``commander-batch`` header, and replay re-produces the missing events (same ids, same
  data) before handling new commands.  Each also carries a ``ledger-group`` header, so the ledger's
  consumer stores the events of one command in one transaction (see ``ledger.groups``).

The state is global to the instance, so run exactly one instance per processor name; partitions
are not a way to scale out a processor whose commands touch several entities.  The idempotent and
transactional producers are deliberately not used: some Kafka-compatible brokers (Tansu) reject
InitProducerId, and the guarantees above do not need them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from ledger.consumer import connection_options, kafka_options_from_env
from ledger.fetching import FetchWait, unless_stopped
from ledger.groups import group_header
from ledger.kafka_raw import UnparsedRecord, find_unparsable
from ledger.records import validate

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord

__all__ = [
    "BATCH_HEADER", "Command", "Event", "Processor", "ProcessorStatus", "command_envelope", "event_id",
]

log = logging.getLogger("ledger.processor")

S = TypeVar("S")
# Namespace for command ids that are not UUIDs themselves (the API always sends UUIDv7s).
_ID_NAMESPACE = uuid.UUID("0b7f6c52-4d0c-4f43-9a0e-3c1f5e2d8a61")
# Carried by every event of a multi-event command: the whole batch, so a half-produced command
# can be completed from any one of its events.
BATCH_HEADER = "commander-batch"
# Key + value + headers of one event: under Kafka's default 1 MiB message and request limits.
MAX_EVENT_BYTES = 1_000_000
_REPLAY_BATCH = 5_000
_FETCH_BYTES = 4 << 20  # max_partition_fetch_bytes of its consumers


@dataclass(frozen=True)
class Command:
    """A command as the processor receives it from the commands topic."""

    id: str
    action: str
    data: dict[str, Any]
    user: str | None = None
    system: str | None = None
    timestamp: str | None = None


@dataclass(frozen=True)
class Event:
    """An event: handlers return ``Event(action, data)``; folds also see its id, parent and origin."""

    action: str
    data: dict[str, Any]
    id: str | None = None
    parent: str | None = None
    timestamp: str | None = None
    system: str | None = None


@dataclass
class ProcessorStatus:
    """Counters for logs, readiness checks and tests."""

    ready: bool = False
    replayed: int = 0
    recovered: int = 0
    commands: int = 0
    events: int = 0
    redelivered: int = 0
    ignored: int = 0
    malformed: int = 0
    failed: int = 0
    fold_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Handler = Callable[[Command, S], "Iterable[Event] | Awaitable[Iterable[Event]]"]
Fold = Callable[[Event, S], None]


def event_id(command_id: str, index: int, *, processor: str) -> str:
    """The id of the ``index``-th event ``processor`` emits for ``command_id``: the same on every
    redelivery, and distinct between processors that react to the same command."""
    try:
        namespace = uuid.UUID(command_id)
    except ValueError:
        namespace = uuid.uuid5(_ID_NAMESPACE, command_id)
    return str(uuid.uuid5(namespace, f"{processor}/{index}"))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _envelope(value: bytes | None) -> dict[str, Any] | str:
    """The JSON envelope of a message, or why it is not one."""
    if value is None:
        return "message has no value"
    try:
        env = json.loads(value)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        return f"value is not JSON: {e}"
    if not isinstance(env, dict):
        return f"value is a JSON {type(env).__name__}, not an object"
    for name in ("id", "action"):
        if not isinstance(env.get(name), str) or not env[name]:
            return f"field {name!r} must be a non-empty string"
    if not isinstance(env.get("data"), dict):
        return "field 'data' must be a JSON object"
    return env


def _batch(raw: bytes) -> dict[str, Any] | None:
    """A ``commander-batch`` header as ``{"user", "timestamp", "events": [Event]}``, or None if it is
    not one (a foreign producer's header must not stop the replay)."""
    try:
        batch = json.loads(raw)
        events = [Event(e["action"], e["data"]) for e in batch["events"]]
        if not all(isinstance(e.action, str) and isinstance(e.data, dict) for e in events):
            return None
        return {"user": _opt_str(batch.get("user")), "timestamp": _opt_str(batch.get("timestamp")),
                "events": events}
    except (ValueError, TypeError, KeyError):
        log.warning("ignoring a malformed %s header", BATCH_HEADER)
        return None


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


class Processor(Generic[S]):
    """Consumes commands in its own consumer group, hands each to the handler for its action and
    produces the returned events; see the module docstring for the delivery guarantees."""

    @overload
    def __init__(
        self: Processor[dict[str, Any]], *, bootstrap: str, group: str,
        commands_topic: str = ..., events_topic: str = ..., fetch_max_wait_ms: int = ...,
        state: None = None, name: str | None = ..., replay: bool = ..., join_group: bool = ...,
        linger_ms: int = ..., max_batch: int = ..., kafka_options: Mapping[str, Any] | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self, *, bootstrap: str, group: str, commands_topic: str = ..., events_topic: str = ...,
        fetch_max_wait_ms: int = ..., state: Callable[[], S], name: str | None = ...,
        replay: bool = ..., join_group: bool = ..., linger_ms: int = ..., max_batch: int = ...,
        kafka_options: Mapping[str, Any] | None = ...,
    ) -> None: ...

    def __init__(
        self, *, bootstrap: str, group: str, commands_topic: str = "commands",
        events_topic: str = "events", fetch_max_wait_ms: int = 5,
        state: Callable[[], Any] | None = None, name: str | None = None, replay: bool = True,
        join_group: bool = True, linger_ms: int = 1, max_batch: int = 500,
        kafka_options: Mapping[str, Any] | None = None,
    ) -> None:
        """``state`` makes a fresh, empty state (default ``dict``); it is rebuilt from the events on
        every :meth:`run`.  ``name`` (default ``group``) is the processor's identity: it goes into
        every event id and the events' ``system`` field, so keep it stable.  ``replay=False`` skips
        the rebuild (only for stateless processors).  ``join_group=False`` reads every partition of
        the commands topic by manual assignment and uses the group only for committed offsets:
        no rebalance wait at start (about 5 s on Tansu), no failover.  ``max_batch`` caps the
        commands handled between two offset commits.  ``kafka_options`` are the settings that say
        how to reach and authenticate to Kafka (SASL, SSL, ``client_id``; the rest are refused),
        for its producer and consumers alike; default: those of ``$LEDGER_KAFKA_OPTIONS``, as
        ``ledger consume`` takes them."""
        self.bootstrap = bootstrap
        self.group = group
        self.name = name or group
        self.commands_topic = commands_topic
        self.events_topic = events_topic
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.replay = replay
        self.join_group = join_group
        self.linger_ms = linger_ms
        self.max_batch = max_batch
        self.kafka_options = _connection(kafka_options)
        self._make_state = cast("Callable[[], S]", state or dict)
        self.state: S = self._make_state()
        self.status = ProcessorStatus()
        self.ready = asyncio.Event()  # set once replay is done and command partitions are assigned
        self._handlers: dict[str, Handler[S]] = {}
        self._folds: dict[str | None, list[Fold[S]]] = {}
        self._done: set[str] = set()  # commands that already have events from this processor

    # ------------------------------------------------------------------------------ registration
    @property
    def actions(self) -> frozenset[str]:
        """The command actions this processor handles ("*": any)."""
        return frozenset(self._handlers)

    def handler(self, action: str) -> Callable[[Handler[S]], Handler[S]]:
        """Register ``fn(command, state) -> list[Event]`` (sync or async) for ``action``; ``"*"``
        catches actions with no handler of their own (by default those are ignored).  Handlers
        must not change the state: folds do, so replay and live processing cannot disagree."""

        def register(fn: Handler[S]) -> Handler[S]:
            if action in self._handlers:
                raise ValueError(f"action {action!r} already has a handler")
            self._handlers[action] = fn
            return fn

        return register

    @overload
    def on_event(self, action: Fold[S], /) -> Fold[S]: ...

    @overload
    def on_event(self, action: str, /) -> Callable[[Fold[S]], Fold[S]]: ...

    def on_event(self, action: str | Fold[S], /) -> Fold[S] | Callable[[Fold[S]], Fold[S]]:
        """Register ``fn(event, state)`` to fold events into the state: ``@on_event`` sees every
        event, ``@on_event("money-deposited")`` only that action.  Folds run for replayed events
        and for the processor's own events right after it produces them."""
        if callable(action):
            self._folds.setdefault(None, []).append(action)
            return action
        key = action

        def register(fn: Fold[S]) -> Fold[S]:
            self._folds.setdefault(key, []).append(fn)
            return fn

        return register

    # ------------------------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event | None = None, *, seed: Iterable[Event] = ()) -> None:
        """Rebuild the state, then handle commands until ``stop`` is set (or forever).

        ``seed`` are events to fold before the events topic, for when the broker's copy of the log
        is not the whole log (e.g. an in-memory broker restarted while the ledger kept everything);
        events with the same id in both are folded once.
        """
        stop = stop or asyncio.Event()
        self.state = self._make_state()
        self._done = set()
        self.status = ProcessorStatus()
        self.ready.clear()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False,
            linger_ms=self.linger_ms, max_batch_size=256 * 1024, **self.kafka_options,
        )
        try:  # (stopped also when start fails: its connections are let go)
            await producer.start()
            if self.replay:
                await self._rebuild(producer, seed, stop)
            if not stop.is_set():
                await self._consume(producer, stop)
        finally:
            self.ready.clear()
            self.status.ready = False
            await producer.stop()

    # --------------------------------------------------------------------------------- replay
    async def _rebuild(
        self, producer: AIOKafkaProducer, seed: Iterable[Event], stop: asyncio.Event
    ) -> None:
        seen: set[str] = set()  # event ids folded so far: duplicates in the log are folded once
        partial: dict[str, dict[str, Any]] = {}  # parent -> its batch, until all its events are seen
        for event in seed:
            if event.id is None or event.id not in seen:
                self._note_replayed(event, None, seen, partial)
        kafka = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.fetch_max_wait_ms,
            max_partition_fetch_bytes=_FETCH_BYTES, **self.kafka_options,
        )
        try:
            await kafka.start()
            tps = [TopicPartition(self.events_topic, p)
                   for p in sorted(await producer.partitions_for(self.events_topic))]
            kafka.assign(tps)
            await kafka.seek_to_beginning(*tps)
            # Read to the highwater each partition reported in its first fetch: that is the log as
            # of startup.  (end_offsets() is wrong on Tansu; highwater comes with every fetch.)
            target: dict[TopicPartition, int] = {}
            remaining = set(tps)
            resume: dict[TopicPartition, int | None] = dict.fromkeys(tps)  # after what was folded
            while remaining:
                if stop.is_set():
                    return
                try:
                    batch = await kafka.getmany(timeout_ms=200, max_records=_REPLAY_BATCH)
                except UnicodeDecodeError as e:
                    batch = await self._past_unparsable(kafka, resume, e)
                for tp, msgs in batch.items():
                    for msg in msgs:
                        self._replay_message(msg, seen, partial)
                    resume[tp] = msgs[-1].offset + 1 if msgs else resume[tp]
                for tp in list(remaining):
                    hw = kafka.highwater(tp)
                    if hw is not None and await kafka.position(tp) >= target.setdefault(tp, hw):
                        remaining.discard(tp)
        finally:
            await kafka.stop()
        if partial:
            await self._complete(producer, partial, seen)
        log.info("%s: state rebuilt from %d events (%d commands done)",
                 self.name, self.status.replayed, len(self._done))

    def _replay_message(
        self, msg: ConsumerRecord[bytes, bytes], seen: set[str], partial: dict[str, dict[str, Any]]
    ) -> None:
        env = _envelope(msg.value)
        if isinstance(env, str):
            log.warning("%s: skipping event at %s/%s@%s: %s",
                        self.name, msg.topic, msg.partition, msg.offset, env)
            return
        if env["id"] in seen:
            return
        event = Event(
            action=env["action"], data=env["data"], id=env["id"], parent=_opt_str(env.get("parent")),
            timestamp=_opt_str(env.get("timestamp")), system=_opt_str(env.get("system")),
        )
        raw = next((v for k, v in msg.headers or () if k == BATCH_HEADER), None)
        self._note_replayed(event, None if raw is None else _batch(raw), seen, partial)

    def _note_replayed(
        self, event: Event, batch: dict[str, Any] | None, seen: set[str],
        partial: dict[str, dict[str, Any]],
    ) -> None:
        if event.id is not None:
            seen.add(event.id)
        self.status.replayed += 1
        self._fold(event)
        if event.system != self.name or event.parent is None:
            return
        self._done.add(event.parent)
        if batch is not None:
            partial.setdefault(event.parent, batch)
        pending = partial.get(event.parent)
        if pending is not None and all(
            event_id(event.parent, i, processor=self.name) in seen
            for i in range(len(pending["events"]))
        ):
            del partial[event.parent]

    async def _complete(
        self, producer: AIOKafkaProducer, partial: dict[str, dict[str, Any]], seen: set[str]
    ) -> None:
        """Produce the events a crash kept from reaching the log, with their original ids and data.

        Nothing newer can exist for their entities: a later event with the same key would have been
        produced after them on the same partition."""
        sent = []
        for parent, batch in partial.items():
            events: list[Event] = batch["events"]
            timestamp: str = batch["timestamp"] or _now()
            raw = self._batch_header(batch["user"], events, timestamp)
            missing = [i for i in range(len(events))
                       if event_id(parent, i, processor=self.name) not in seen]
            log.warning("%s: command %s was half-produced; producing its events %s again",
                        self.name, parent, missing)
            staged = self._stage(parent, batch["user"], events, missing, raw, timestamp)
            sent += await self._send(producer, staged)
            self.status.recovered += len(missing)
        await asyncio.gather(*(f for f, _ in sent))
        for _, event in sent:
            self._fold(event)

    # ------------------------------------------------------------------------------- commands
    async def _consume(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        kafka = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.fetch_max_wait_ms,
            max_partition_fetch_bytes=_FETCH_BYTES, **self.kafka_options,
        )
        try:
            await kafka.start()
            if self.join_group:
                processor = self

                class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
                    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                        pass  # nothing to flush: offsets are committed before the next fetch

                    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                        processor._set_ready()

                kafka.subscribe([self.commands_topic], listener=Listener())
            else:
                parts = await producer.partitions_for(self.commands_topic)
                kafka.assign([TopicPartition(self.commands_topic, p) for p in sorted(parts)])
                self._set_ready()
            stopper = asyncio.ensure_future(stop.wait())
            waiting = FetchWait(kafka, self.fetch_max_wait_ms)
            try:
                while not stop.is_set():
                    done, batch = await unless_stopped(self._fetch(kafka), stopper)
                    if not done or batch is None:
                        break
                    if batch:
                        await self._handle(kafka, producer, batch)
                    waiting.observe(got_records=bool(batch), lagging=await _lagging(kafka))
            finally:
                stopper.cancel()
        finally:
            await kafka.stop()

    async def _fetch(
        self, kafka: AIOKafkaConsumer
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        try:
            batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await kafka.getmany(
                timeout_ms=200, max_records=self.max_batch)
            return batch
        except UnicodeDecodeError as e:  # back to the committed offsets: redelivery is harmless
            return await self._past_unparsable(
                kafka, {tp: await kafka.committed(tp) for tp in kafka.assignment()}, e)

    async def _past_unparsable(
        self, kafka: AIOKafkaConsumer, resume: Mapping[TopicPartition, int | None], error: UnicodeDecodeError,
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """The next records after getmany() raised on a record aiokafka cannot parse (a header name
        that is not UTF-8, see ledger.kafka_raw), having lost what it took from other partitions:
        each partition goes back to `resume` (None: its start); then aiokafka's records before the
        batch that holds the bad record, or that batch read raw, its bad records left out as
        malformed (the ledger quarantines them)."""
        for tp, offset in resume.items():
            if offset is None:
                await kafka.seek_to_beginning(tp)
            else:
                kafka.seek(tp, offset)
        positions = {tp: await kafka.position(tp) for tp in sorted(resume)}
        hit = await find_unparsable(self.bootstrap, self.kafka_options, positions, _FETCH_BYTES)
        if hit is None:
            raise error  # not the record we know how to read past
        tp, found = hit
        if found.before:
            before: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await kafka.getmany(
                tp, timeout_ms=1000, max_records=len(found.before))
            return before
        good = [m for m in found.records if not isinstance(m, UnparsedRecord)]
        for m in found.records:
            if isinstance(m, UnparsedRecord):
                log.warning("%s: skipping %s/%s at offset %s: %s", self.name, tp.topic, tp.partition,
                            m.offset, m.reason)
                self.status.malformed += 1
        kafka.seek(tp, found.end)
        return {tp: good} if good else {}

    def _set_ready(self) -> None:
        if not self.ready.is_set():
            log.info("%s: handling commands from %s", self.name, self.commands_topic)
        self.status.ready = True
        self.ready.set()

    async def _handle(
        self, kafka: AIOKafkaConsumer, producer: AIOKafkaProducer,
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    ) -> None:
        sent: list[tuple[asyncio.Future[Any], Event]] = []
        for msgs in batch.values():
            for msg in msgs:
                sent += await self._handle_one(msg, producer)
        # At-least-once: the offsets move only once every event of the batch is acknowledged.
        await asyncio.gather(*(f for f, _ in sent))
        self.status.events += len(sent)
        offsets = {tp: OffsetAndMetadata(msgs[-1].offset + 1, "") for tp, msgs in batch.items()}
        try:
            await kafka.commit(offsets)
        except KafkaError as e:  # e.g. a rebalance: the batch is redelivered and skipped as done
            log.warning("%s: commit failed (%s); the batch will be redelivered", self.name, e)

    async def _handle_one(
        self, msg: ConsumerRecord[bytes, bytes], producer: AIOKafkaProducer
    ) -> list[tuple[asyncio.Future[Any], Event]]:
        env = _envelope(msg.value)
        if isinstance(env, str):
            self.status.malformed += 1
            log.warning("%s: skipping command at %s/%s@%s: %s",
                        self.name, msg.topic, msg.partition, msg.offset, env)
            return []
        command = Command(
            id=env["id"], action=env["action"], data=env["data"], user=_opt_str(env.get("user")),
            system=_opt_str(env.get("system")), timestamp=_opt_str(env.get("timestamp")),
        )
        if command.id in self._done:
            self.status.redelivered += 1
            return []
        fn = self._handlers.get(command.action) or self._handlers.get("*")
        if fn is None:
            self.status.ignored += 1
            return []
        try:
            result = fn(command, self.state)
            if inspect.isawaitable(result):
                result = await result
            events = list(result)
            for e in events:
                if not isinstance(e, Event) or not isinstance(e.data, dict):
                    raise TypeError(f"a handler must return Event(action, data) objects, not {e!r}")
            timestamp = _now()
            staged = self._stage(command.id, command.user, events, range(len(events)),
                                 self._batch_header(command.user, events, timestamp), timestamp)
        except Exception:
            # One bad command must not stop the processor; it is logged and its offset committed.
            self.status.failed += 1
            log.exception("%s: handler for %r failed on command %s", self.name, command.action, command.id)
            return []
        # A failure from here on is the broker's, not the command's: it stops the processor
        # before the offset is committed, so the command is handled again after a restart.
        sent = await self._send(producer, staged)
        self._done.add(command.id)
        self.status.commands += 1
        for _, event in sent:  # consecutive commands see each other's effects
            self._fold(event)
        return sent

    # ------------------------------------------------------------------------------- produce
    @staticmethod
    def _batch_header(user: str | None, events: list[Event], timestamp: str) -> bytes | None:
        if len(events) < 2:
            return None
        batch = {"user": user, "timestamp": timestamp,
                 "events": [{"action": e.action, "data": e.data} for e in events]}
        return json.dumps(batch, separators=(",", ":")).encode()

    def _stage(
        self, parent: str, user: str | None, events: list[Event], indexes: Iterable[int],
        batch: bytes | None, timestamp: str | None,
    ) -> list[tuple[bytes, bytes, list[tuple[str, bytes]], Event]]:
        """Key, value, headers and the full event of each of ``events[indexes]``.

        Everything is encoded before the first send, so a handler returning data that is not JSON
        fails before anything of its command reaches the log."""
        headers = [] if batch is None else [(BATCH_HEADER, batch)]
        group = event_id(parent, 0, processor=self.name)  # one name per command and processor
        timestamp = timestamp or _now()
        staged = []
        for i in indexes:
            e = events[i]
            event = Event(e.action, e.data, id=event_id(parent, i, processor=self.name),
                          parent=parent, timestamp=timestamp, system=self.name)
            env: dict[str, Any] = {"id": event.id, "action": event.action, "data": event.data,
                                   "parent": parent, "timestamp": timestamp, "system": self.name}
            if user is not None:
                env["user"] = user
            entity = e.data.get("id")
            key = str(entity) if isinstance(entity, (str, int)) and not isinstance(entity, bool) else parent
            # As the ledger will check it: an event it would quarantine never leaves (handler's fault).
            validate(i, {"kind": "event", "id": event.id, "action": event.action, "data": event.data,
                         "parent": parent, "timestamp": timestamp})
            value = json.dumps(env, separators=(",", ":")).encode()
            # The ledger stores the events of one command in one transaction (see ledger.groups).
            own = headers if len(events) < 2 else [*headers, group_header(i, len(events), group)]
            size = len(key.encode()) + len(value) + sum(len(k) + len(v) for k, v in own)
            if size > MAX_EVENT_BYTES:  # else the send fails, again on every redelivery
                raise ValueError(f"event {i} ({event.action!r}) is {size:,} bytes encoded; "
                                 f"at most {MAX_EVENT_BYTES:,} reach the events topic")
            staged.append((key.encode(), value, own, event))
        return staged

    async def _send(
        self, producer: AIOKafkaProducer, staged: list[tuple[bytes, bytes, list[tuple[str, bytes]], Event]]
    ) -> list[tuple[asyncio.Future[Any], Event]]:
        """Hand staged events to the producer in order; returns each ack future with its event."""
        sent = []
        for key, value, headers, event in staged:
            future = await producer.send(self.events_topic, value, key=key, headers=headers)
            sent.append((future, event))
        return sent

    def _fold(self, event: Event) -> None:
        for fn in (*self._folds.get(None, ()), *self._folds.get(event.action, ())):
            try:
                fn(event, self.state)
            except Exception:
                # A malformed event (perhaps from another producer) must not stop the processor.
                self.status.fold_errors += 1
                log.exception("%s: folding event %s (%s) failed", self.name, event.id, event.action)


def _connection(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return connection_options(kafka_options_from_env())
    if not isinstance(options, Mapping):
        raise TypeError(f"kafka_options must be a mapping, got {type(options).__name__}")
    if other := sorted(set(options) - set(connection_options(options))):
        raise ValueError(f"kafka_options may only say how to reach Kafka; not {', '.join(other)}")
    return dict(options)


def command_envelope(
    action: str, data: Mapping[str, Any], *, command_id: str | None = None, user: str | None = None
) -> bytes:
    """A command message value as the API writes it, for scripts and tests that bypass the API."""
    env: dict[str, Any] = {"id": command_id or str(uuid.uuid4()), "action": action, "data": dict(data),
                           "timestamp": _now()}
    if user is not None:
        env["user"] = user
    return json.dumps(env, separators=(",", ":")).encode()


async def _lagging(kafka: AIOKafkaConsumer) -> bool:
    """Whether any assigned partition has records past the consumer's position."""
    for tp in kafka.assignment():
        hw = kafka.highwater(tp)
        if hw is not None and hw > await kafka.position(tp):
            return True
    return False
