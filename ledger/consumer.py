"""Kafka ingestion: an aiokafka consumer group appending every command and event to the ledger
exactly once, with bad input quarantined instead of dropped.

Exactly-once comes from the ledger, not from Kafka: each batch's offsets are committed in the same
ledger transaction as its records, partitions are sought to the ledger's offsets on assignment,
and record ids are deterministic (envelope id, else topic/partition/generation/offset), so a
redelivered message is recognised as a duplicate. Kafka's own commit is advisory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.structs import OffsetAndMetadata

from ledger.errors import InvalidRecord, LedgerError
from ledger.fetching import FetchWait, unless_stopped
from ledger.groups import Holdback
from ledger.kafka_raw import UnparsedRecord, find_unparsable
from ledger.records import MAX_DEPTH, OffsetMark, Quarantined, json_type, validate

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from aiokafka.structs import ConsumerRecord

    from ledger.ledger import Ledger
    from ledger.records import TxReport

    _Work = tuple[TopicPartition, list[ConsumerRecord[bytes, bytes]], OffsetMark]  # one partition's records

log = logging.getLogger("ledger.consumer")
ID_NAMESPACE = uuid.UUID("6f1c1f7e-3f4b-4d0e-9a55-1e6c0b8c4a10")
ENVELOPE = {"id", "action", "data", "parent", "timestamp", "user", "system", "kind"}
# Extra AIOKafkaConsumer settings as a JSON object (e.g. SASL/SSL for a production cluster, or
# short session timeouts for tests); the settings exactly-once depends on cannot be overridden.
KAFKA_OPTIONS_ENV = "LEDGER_KAFKA_OPTIONS"
_FIXED_OPTIONS = frozenset({"group_id", "enable_auto_commit", "auto_offset_reset", "bootstrap_servers"})
# How long a partition's log end (highwater) may stay below the ledger's stored offset before the
# log counts as replaced. Kafka answers a fetch past the log end with OffsetOutOfRange (and the
# reset to "earliest" shows offsets going back at once); some brokers (Tansu) just return nothing.
# The grace covers a new Kafka leader whose highwater briefly lags behind the old one's: a false
# "replaced" would re-ingest the whole partition as a new generation.
LOG_END_GRACE_S = 3.0
GROUP_WAIT_S = 2.0  # the longest a record waits for the rest of its group (see ledger.groups)
MAX_JSON_DEPTH = MAX_DEPTH + 1  # containers in a value; deeper ones are quarantined (see decode)
MAX_VALUE_BYTES = 1 << 20  # larger values are quarantined (the default of Consumer's max_value_bytes)
_REFUSALS_BEFORE_CHECKING_ALL = 3  # see Consumer._append


# Settings that say how to reach and authenticate to Kafka, not how to consume: a producer beside
# the consumer (the API's, for POST /commands) takes these from $LEDGER_KAFKA_OPTIONS too.
_CONNECTION_OPTIONS = frozenset({
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "client_id", "api_version",
    "connections_max_idle_ms", "metadata_max_age_ms", "retry_backoff_ms",
})


def connection_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `options` a producer needs as much as the consumer (see _CONNECTION_OPTIONS)."""
    return {k: v for k, v in options.items() if k in _CONNECTION_OPTIONS}


# ...and those only Python can give (kafka_options=), for the consumer's own short-lived client.
_CLIENT_OPTIONS = _CONNECTION_OPTIONS | {"ssl_context", "sasl_oauth_token_provider", "request_timeout_ms"}


def kafka_options_from_env() -> dict[str, Any]:
    """The extra consumer settings in $LEDGER_KAFKA_OPTIONS (a JSON object), or {}."""
    text = os.environ.get(KAFKA_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as e:
        raise LedgerError(f"{KAFKA_OPTIONS_ENV} is not valid JSON: {e}") from e
    if not isinstance(options, dict):
        raise LedgerError(f"{KAFKA_OPTIONS_ENV} must be a JSON object of aiokafka consumer settings")
    return options


KINDS_ENV = "LEDGER_KINDS"


def topic_kinds(commands_topic: str = "commands", events_topic: str = "events",
                spec: str | None = None) -> dict[str, str]:
    """Which kind each topic's records are: the commands and events topics, plus `spec`
    ("topic=kind,...", default $LEDGER_KINDS). Other topics take the envelope's `kind`, else event."""
    kinds = {commands_topic: "command", events_topic: "event"}
    text = os.environ.get(KINDS_ENV, "") if spec is None else spec
    for item in filter(None, (i.strip() for i in text.split(","))):
        topic, _, kind = item.partition("=")
        if not topic.strip() or kind.strip() not in ("command", "event"):
            raise LedgerError(f"{KINDS_ENV}: {item!r} is not topic=command or topic=event")
        kinds[topic.strip()] = kind.strip()
    return kinds


@dataclass
class PartitionStatus:
    topic: str
    partition: int
    next_offset: int = 0
    highwater: int | None = None
    generation: int = 0

    @property
    def lag(self) -> int | None:
        return None if self.highwater is None else max(0, self.highwater - self.next_offset)


@dataclass
class ConsumerStatus:
    """What the consumer is doing; `ledger info` and /ready read it."""

    group: str
    assigned: dict[str, PartitionStatus] = field(default_factory=dict)
    records: int = 0
    quarantined: int = 0
    duplicates: int = 0
    transactions: int = 0
    generations_started: int = 0
    held: int = 0  # records fetched but held back until the rest of their group comes (see groups)
    last_tx: int | None = None
    last_error: str | None = None
    running: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group, "running": self.running, "records": self.records,
            "quarantined": self.quarantined, "duplicates": self.duplicates,
            "transactions": self.transactions, "last_tx": self.last_tx,
            "generations_started": self.generations_started, "held": self.held,
            "last_error": self.last_error,
            "partitions": [
                {"topic": p.topic, "partition": p.partition, "next_offset": p.next_offset,
                 "highwater": p.highwater, "lag": p.lag, "generation": p.generation}
                for p in sorted(self.assigned.values(), key=lambda p: (p.topic, p.partition))
            ],
        }


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether JSON `value` has containers nested more than `limit` deep (without recursing)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


_KEY_END = re.compile(rb'"[ \t\r\n]*:')  # the end of every key in JSON text (and of strings holding '":')
_WHITESPACE_AS_SPACE = bytes.maketrans(b"\t\r\n", b"   ")  # (a translate: faster here than a regex search)


def _keys(value: Any) -> int:
    """How many keys the objects in JSON `value` hold, all levels."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        if type(v) is dict:
            n += len(v)
            v = v.values()
        for c in v:
            if type(c) is dict or type(c) is list:
                stack.append(c)
    return n


def _repeated_key(raw: bytes, text: str, value: dict[str, Any]) -> str | None:
    """A key that one object of the JSON text repeats (json.loads keeps the last value, so the
    record would not be what was written), or None. Each key in the text ends with `"`, maybe
    whitespace, and `:`; a text with no more such ends than the decoded value has keys repeats none.
    Only otherwise (a string holding '":' is the other cause) is it parsed again, object by object:
    measured here, the check adds 3-4 us to a 35 us decode, the parse 11 us."""
    spaced = b" :" in raw.translate(_WHITESPACE_AS_SPACE)  # whitespace before a colon (rare)
    data = value.get("data")
    # Two "{" and two objects (the envelope and its data): there is no other object to count.
    keys = len(value) + len(data) if type(data) is dict and raw.count(b"{") == 2 else _keys(value)
    if (len(_KEY_END.findall(raw)) if spaced else raw.count(b'":')) == keys:
        return None
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) < len(items) and not repeated:
            seen: set[str] = set()
            for k, _ in items:
                if k in seen:
                    repeated.append(k)
                    break
                seen.add(k)
        return obj

    json.loads(text, object_pairs_hook=pairs)
    return repeated[0] if repeated else None


def message_digest(msg: ConsumerRecord[bytes, bytes]) -> str:
    """Identity of one Kafka message, to recognise it again after a rebalance or broker restart."""
    h = hashlib.sha256()
    for part in (msg.key or b"", msg.value or b"", str(msg.timestamp).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _headers(msg: ConsumerRecord[bytes, bytes]) -> tuple[tuple[str, str], ...]:
    """Header values as text (bytes that are not UTF-8 as \\x escapes; a null value as "")."""
    return tuple(
        (k, "" if v is None else v.decode("utf-8", "backslashreplace")) for k, v in msg.headers or ()
    )


def _broker_time(msg: ConsumerRecord[bytes, bytes]) -> datetime | None:
    """The broker timestamp, None when absent or outside the years 1-9999 (a datetime cannot hold it)."""
    if msg.timestamp is None or msg.timestamp < 0:
        return None
    try:
        return datetime.fromtimestamp(msg.timestamp / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _rejected(msg: ConsumerRecord[bytes, bytes], reason: str) -> Quarantined:
    headers, broker_time = _headers(msg), _broker_time(msg)
    return Quarantined(
        reason=reason, value=msg.value, key=msg.key, topic=msg.topic, partition=msg.partition,
        offset=msg.offset, headers=headers, kafka_timestamp=broker_time,
    )


def decode(
    msg: ConsumerRecord[bytes, bytes], *, kind: str | None, generation: int, max_value_bytes: int,
    check: bool = True,
) -> dict[str, Any] | Quarantined:
    """A Commander envelope as a ledger record, or the reason it cannot be one.

    `check=False` skips the record validation that Ledger.append() repeats anyway (the envelope
    checks still run); the caller must then quarantine what append() refuses (see Consumer)."""
    if isinstance(msg, UnparsedRecord):
        return _rejected(msg, msg.reason)
    headers, broker_time = _headers(msg), _broker_time(msg)

    def reject(reason: str) -> Quarantined:
        return _rejected(msg, reason)

    value = msg.value
    if value is None:
        return reject("message has no value (a tombstone), not a command or event")
    if len(value) > max_value_bytes:
        return reject(f"value is {len(value)} bytes, over the limit of {max_value_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return reject(f"value is not valid UTF-8: {e}")
    try:
        env = json.loads(text)
    except ValueError as e:
        return reject(f"value is not JSON: {e}")
    except RecursionError:
        return reject(f"value nests deeper than {MAX_JSON_DEPTH} levels")
    # Hashing, validation and reads recurse once per level: a deeper value would raise in
    # append() and stop ingestion at this message for ever.
    if value.count(b"[") + value.count(b"{") > MAX_JSON_DEPTH and _nests_deeper(env, MAX_JSON_DEPTH):
        return reject(f"value nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(env, dict):
        return reject(f"value is a JSON {json_type(env)}, not an object")
    if (repeated := _repeated_key(value, text, env)) is not None:
        return reject(f"value repeats the key {repeated!r} in one object (JSON readers differ on "
                      "which value counts)")
    action = env.get("action")
    if not isinstance(action, str) or not action:
        what = "is missing" if action is None else "must be a non-empty string"
        return reject(f"field 'action' {what}")
    if not isinstance(env.get("data"), dict):
        return reject("field 'data' must be a JSON object")
    rec_kind = kind or env.get("kind") or "event"
    rid = env.get("id")
    if rid is None:
        rid = str(uuid.uuid5(ID_NAMESPACE, f"{msg.topic}/{msg.partition}/{generation}/{msg.offset}"))
    extra = [(name, v if isinstance(v := env[name], str) else json.dumps(v))  # headers are text
             for name in ("user", "system") if env.get(name) is not None]
    record = {
        "id": rid, "kind": rec_kind, "action": action, "data": env["data"],
        "parent": env.get("parent"),
        # Only an absent timestamp defaults to the broker's: "" or 0 is bad input (quarantined).
        "timestamp": broker_time if env.get("timestamp") is None else env["timestamp"],
        "key": msg.key.decode("utf-8", "backslashreplace") if msg.key else None,  # b"": no key
        "headers": headers + tuple(extra), "topic": msg.topic, "partition": msg.partition,
        "offset": msg.offset, "kafka_timestamp": broker_time,
    }
    if check:
        try:
            validate(0, record)
        except InvalidRecord as e:
            return reject(invalid_reason(e))
    return record


def invalid_reason(e: InvalidRecord) -> str:
    return f"field {e.field!r}: {e.reason}"


class Consumer:
    """Consumes topics in a consumer group and appends each fetched batch as one transaction."""

    def __init__(
        self, ledger: Ledger, *, bootstrap: str, group: str = "ledger",
        topics: tuple[str, ...] = ("commands", "events"), pattern: str | None = None,
        kinds: dict[str, str] | None = None, max_batch: int = 10_000,
        max_value_bytes: int = MAX_VALUE_BYTES, fetch_max_wait_ms: int = 100,
        kafka_options: Mapping[str, Any] | None = None, group_wait_s: float = GROUP_WAIT_S,
    ) -> None:
        """`kafka_options` are extra AIOKafkaConsumer settings (default: $LEDGER_KAFKA_OPTIONS);
        `max_poll_records` among them also lowers `max_batch`, the records fetched per transaction
        (a transaction can take up to twice as many more, held back for their groups: see
        ledger.groups, which waits up to `group_wait_s` for the rest of a group)."""
        options = dict(kafka_options_from_env() if kafka_options is None else kafka_options)
        fixed = sorted(_FIXED_OPTIONS & set(options))
        if fixed:
            raise LedgerError(f"kafka option {fixed[0]!r} is set by the consumer and cannot be changed")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LedgerError(f"topic pattern {pattern!r} is not a valid regex: {e}") from e
        self.ledger = ledger
        self.bootstrap = bootstrap
        self.group = group
        self.topics = topics
        self.pattern = pattern
        self.kinds = topic_kinds() if kinds is None else kinds
        # aiokafka's own name for "records per getmany()" caps the batch (one tx) too.
        self.max_batch = min(max_batch, int(options.get("max_poll_records") or max_batch))
        self.max_value_bytes = max_value_bytes
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.kafka_options = options
        self.status = ConsumerStatus(group=group)
        self._kafka: AIOKafkaConsumer | None = None
        self._marks: dict[tuple[str, int], OffsetMark] = {}
        # tp -> offset of the last stored message, re-read to prove the log is still the same one
        self._probing: dict[tuple[str, int], int] = {}
        # next_offset of partitions whose stored message came alone, checked, while newer records
        # exist: those did not fit in that fetch, and the next batch from there is taken.
        self._checked: dict[tuple[str, int], int] = {}
        self._short_log: dict[tuple[str, int], float] = {}  # tp -> since when highwater < next_offset
        # tp -> (next_offset, digest) after the record batch aiokafka cannot parse, and the offset
        # after that batch: once it is stored, the next fetch starts there (see _fetch_to_unparsed)
        self._unparsed: dict[tuple[str, int], tuple[tuple[int, str | None], int]] = {}
        self._fetch_bytes = 0  # max_partition_fetch_bytes, set by run()
        # Records fetched but not yet appended (their group is incomplete). self._marks are where
        # fetching goes on, past them; the ledger's stored offsets stay before them.
        self._holdback = Holdback(group_wait_s, 2 * self.max_batch)
        # Held records of a partition whose log is gone (a new generation): stored with the next
        # append, under their old generation, since the broker cannot give them again.
        self._orphans: list[_Work] = []
        self.assigned_event = asyncio.Event()
        # A rebalance can run (in aiokafka's coordinator task) while a batch is being appended, or
        # between getmany() returning and the batch being appended. The lock keeps the assignment
        # (ledger offsets read + seek) from interleaving with an append, and the epoch lets a batch
        # fetched before the latest assignment be dropped: its partitions were re-sought, so it
        # comes again (and a stale batch would otherwise look like "offsets went backwards").
        self._lock = asyncio.Lock()
        self._appender: ThreadPoolExecutor | None = None  # while run() runs
        self._epoch = 0
        self._reread_requested = False  # set by _check_generation for the batch being checked
        # Offsets stored in the ledger but not yet committed to Kafka (advisory, for tools that
        # watch the group's lag): a commit that fails (e.g. during a rebalance) is retried later,
        # or an idle partition would show its old offset in Kafka for ever.
        self._uncommitted: dict[TopicPartition, int] = {}
        self._commit_retry_at = 0.0
        self._committing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ partition assignment
    def _on_assigned(self, kafka: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        self._epoch += 1
        stored = self.ledger.offsets(self.group)
        self.status.assigned = {}
        self._holdback.take()  # (stored when the partitions were revoked) from the ledger's offsets
        self.status.held = 0
        # Partitions taken away are someone else's to commit; ours start from the ledger's offsets.
        self._uncommitted = {tp: o for tp, o in self._uncommitted.items() if tp in assigned}
        for tp in assigned:
            mark = stored.get((tp.topic, tp.partition), OffsetMark(0))
            self._marks[(tp.topic, tp.partition)] = mark
            if mark.next_offset > 0:
                self._uncommitted[tp] = mark.next_offset
            self.status.assigned[f"{tp.topic}/{tp.partition}"] = PartitionStatus(
                tp.topic, tp.partition, mark.next_offset, kafka.highwater(tp), mark.generation
            )
            self._short_log.pop((tp.topic, tp.partition), None)
            self._reread_last(kafka, tp)
        self.assigned_event.set()

    def _reread_last(self, kafka: AIOKafkaConsumer, tp: TopicPartition) -> int:
        """Position `tp` at the last message stored (or at 0 if none), so the next fetch starts
        with it: only records that come in the same fetch response as an unchanged copy of that
        message are known to continue the same log. Otherwise a broker that lost the topic and
        refilled it past our offset (a memory broker restarted, a topic recreated) would hand us
        its new records at offsets we have not stored yet, and we would skip its first ones."""
        key = (tp.topic, tp.partition)
        mark = self._marks.get(key, OffsetMark(0))
        self._checked.pop(key, None)
        unparsed = self._unparsed.get(key)
        if unparsed is not None and unparsed[0] == (mark.next_offset, mark.last_digest):
            # Fetching it to compare would fail again: the next batch continues the log from after
            # it uncompared (as one after a stored message that came alone, see _check_generation).
            self._probing.pop(key, None)
            self._checked[key] = mark.next_offset
            _seek(kafka, tp, unparsed[1])
            return unparsed[1]
        if mark.next_offset > 0 and mark.last_digest is not None:
            self._probing[key] = mark.next_offset - 1
            _seek(kafka, tp, mark.next_offset - 1)
            return mark.next_offset - 1
        self._probing.pop(key, None)
        _seek(kafka, tp, mark.next_offset)
        return mark.next_offset

    def _new_generation(self, kafka: AIOKafkaConsumer, tp: TopicPartition, reason: str) -> None:
        key = (tp.topic, tp.partition)
        old = self._marks.get(key, OffsetMark(0))
        log.warning("%s/%s: %s; starting generation %s", tp.topic, tp.partition, reason, old.generation + 1)
        self._marks[key] = OffsetMark(0, old.generation + 1, None)
        self._orphans += [(t, msgs, old) for t, msgs in self._holdback.take(tp).items()]
        self.status.held = len(self._holdback)
        self._probing.pop(key, None)
        self._short_log.pop(key, None)
        self.status.generations_started += 1
        st = self.status.assigned.get(f"{tp.topic}/{tp.partition}")
        if st is not None:
            st.next_offset, st.generation = 0, old.generation + 1
        _seek(kafka, tp, 0)

    # ------------------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until `stop` is set (or forever); each fetched batch becomes one transaction."""
        stop = stop or asyncio.Event()
        settings: dict[str, Any] = {
            "fetch_max_wait_ms": self.fetch_max_wait_ms, "max_partition_fetch_bytes": 4 << 20,
            "metadata_max_age_ms": 5_000, **self.kafka_options,
        }
        self._fetch_bytes = settings["max_partition_fetch_bytes"]
        kafka = AIOKafkaConsumer(  # topics go to subscribe() below, with the rebalance listener
            bootstrap_servers=self.bootstrap,
            group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest", **settings,
        )
        consumer = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                consumer.assigned_event.clear()
                consumer._epoch += 1  # batches fetched until now are stale: drop them
                # What is held is stored now: the partitions may not come back, and a broker that
                # lost its log (the usual cause of a rejoin) could not give those records again.
                async with consumer._lock:
                    held = consumer._holdback.take().items()
                    try:
                        await consumer._store(kafka, [*consumer._take_orphans(), *(
                            (tp, msgs, consumer._marks[(tp.topic, tp.partition)]) for tp, msgs in held)])
                    except Exception as e:  # (the ledger closed under a stopping consumer): re-read later
                        log.warning("could not store the records held back at a rebalance: %s", e)

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                async with consumer._lock:  # after the append in flight, if any, has committed
                    consumer._on_assigned(kafka, assigned)  # a quick catalog read; seek must run here

        try:
            await kafka.start()
        except BaseException:
            await kafka.stop()  # (an unreachable broker: close what start() opened)
            raise
        self._kafka = kafka
        if self.pattern:
            kafka.subscribe(pattern=self.pattern, listener=Listener())
        else:
            kafka.subscribe(list(self.topics), listener=Listener())
        self.status.running = True
        stopper = asyncio.ensure_future(stop.wait())
        waiting = FetchWait(kafka, self.fetch_max_wait_ms)
        # Appends get a thread of their own: queries, view rebuilds and exports in the same process
        # share asyncio's default pool, and must never keep a batch waiting for a thread.
        self._appender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-append")
        try:
            while not stop.is_set():
                done, fetched = await unless_stopped(self._fetch(kafka), stopper)
                if not done or fetched is None:
                    break
                epoch, batch = fetched
                if batch or self._holdback.held or self._orphans:
                    await self._ingest(kafka, batch, epoch)
                self._refresh_lag(kafka)
                if self._uncommitted and time.monotonic() >= self._commit_retry_at:
                    self._commit_in_background(kafka)
                waiting.observe(got_records=bool(batch), lagging=any(  # unread (not: unstored) records
                    (st.highwater or 0) > self._marks.get((st.topic, st.partition), OffsetMark(0)).next_offset
                    for st in self.status.assigned.values()))
        except Exception as e:
            self.status.last_error = f"{type(e).__name__}: {e}"  # for `ledger info` and /ready
            raise
        finally:
            stopper.cancel()
            self.status.running = False
            if self._committing is not None:  # bounded by its own timeout
                await asyncio.gather(self._committing, return_exceptions=True)
            await kafka.stop()
            self._kafka = None
            self._appender.shutdown(wait=False)  # idle: every append was awaited

    def _refresh_lag(self, kafka: AIOKafkaConsumer) -> None:
        """Highwater per partition (from the latest fetch); and a partition whose log ends before
        what we already stored was recreated (or the broker lost its log): waiting for it to grow
        would skip its first records. After LOG_END_GRACE_S, start a new generation."""
        now = time.monotonic()
        assigned = kafka.assignment()  # during a rebalance, less than status.assigned
        for st in list(self.status.assigned.values()):
            tp = TopicPartition(st.topic, st.partition)
            if tp not in assigned:
                continue  # highwater() would raise
            hw = kafka.highwater(tp)
            if hw is None:
                continue
            st.highwater = hw
            key = (st.topic, st.partition)
            mark = self._marks.get(key)
            if mark is None or hw >= mark.next_offset:
                self._short_log.pop(key, None)
            elif now - self._short_log.setdefault(key, now) >= LOG_END_GRACE_S:
                self._new_generation(
                    kafka, tp, f"the broker's end offset {hw} is before the stored {mark.next_offset}"
                )

    async def _fetch(
        self, kafka: AIOKafkaConsumer
    ) -> tuple[int, dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]:
        try:
            batch = await kafka.getmany(timeout_ms=200, max_records=self.max_batch)
        except UnicodeDecodeError as e:  # a header name that is not UTF-8 (see kafka_raw)
            batch = await self._fetch_to_unparsed(kafka, e)
        return self._epoch, batch  # the assignment the batch was fetched under

    async def _fetch_to_unparsed(
        self, kafka: AIOKafkaConsumer, error: UnicodeDecodeError
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """The batch of the partition getmany() failed on: aiokafka's records up to the record
        batch it cannot parse, and that one's records read raw (see kafka_raw; decode() quarantines
        the bad ones). Only aiokafka's records when they are more than a batch, or did not all come.

        The records getmany() had taken from other partitions are lost with the exception: every
        partition goes back to the ledger's offsets first, as after an append."""
        positions = {tp: self._reread_last(kafka, tp) for tp in sorted(kafka.assignment())}
        client_options = {k: v for k, v in self.kafka_options.items() if k in _CLIENT_OPTIONS}
        hit = await find_unparsable(self.bootstrap, client_options, positions, self._fetch_bytes)
        if hit is None:
            raise error  # not the record we know how to read past: stop, as before
        tp, found = hit
        key = (tp.topic, tp.partition)
        mark = self._marks.get(key, OffsetMark(0))
        last = found.records[-1] if found.records else None
        stored_after = (mark.next_offset, mark.last_digest) if last is None else (
            last.offset + 1, message_digest(last))
        self._unparsed[key] = (stored_after, found.end)
        if stored_after == (mark.next_offset, mark.last_digest) and not found.before:
            self._reread_last(kafka, tp)  # all stored already (before a restart): go on after it
            return {}  # (and come back here if getmany() fails further on)
        want = found.before[:self.max_batch]
        msgs: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + 10
        while len(msgs) < len(want) and time.monotonic() < deadline and tp in kafka.assignment():
            got = await kafka.getmany(tp, timeout_ms=200, max_records=len(want) - len(msgs))
            msgs.extend(got.get(tp, ()))
        if [m.offset for m in msgs] == found.before:
            for m in found.records:
                if isinstance(m, UnparsedRecord):
                    log.warning("%s/%s: quarantining the record at offset %s: %s",
                                tp.topic, tp.partition, m.offset, m.reason)
            msgs.extend(found.records)
        return {tp: msgs} if msgs else {}  # else: getmany() fails on it again, and we come back

    async def _ingest(
        self, kafka: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        epoch: int,
    ) -> None:
        async with self._lock:
            if epoch != self._epoch:
                log.info("dropping a batch fetched before the latest partition assignment")
                return
            fetched = {}
            self._reread_requested = False
            for tp, msgs in batch.items():
                msgs = self._check_generation(kafka, tp, msgs)  # may seek: stays on the loop
                if msgs:
                    fetched[tp] = msgs
            if fetched and self._reread_requested:
                # Records that arrived together stay together (one tx, interleaved by timestamp,
                # see _append): fetch the others again too rather than commit them ahead.
                for tp in fetched:
                    self._reread_last(kafka, tp)
                return
            for tp, msgs in fetched.items():
                key = (tp.topic, tp.partition)
                mark = self._marks.get(key, OffsetMark(0))
                self._marks[key] = OffsetMark(msgs[-1].offset + 1, mark.generation, message_digest(msgs[-1]))
                if key in self._unparsed:
                    self._reread_last(kafka, tp)  # past the batch aiokafka cannot parse, if that was it
                else:
                    # The next batch must start with this one's last message, the one about to be
                    # stored or held (see _reread_last): asked for now, it is fetched during the append.
                    self._checked.pop(key, None)
                    self._probing[key] = msgs[-1].offset
                    _seek(kafka, tp, msgs[-1].offset)
            ready = self._holdback.release(fetched, _whole_topics(kafka), time.monotonic())
            await self._store(kafka, [*self._take_orphans(), *(
                (tp, msgs, self._marks[(tp.topic, tp.partition)]) for tp, msgs in ready.items())])

    def _take_orphans(self) -> list[_Work]:
        orphans, self._orphans = self._orphans, []
        return orphans

    async def _store(
        self, kafka: AIOKafkaConsumer,
        work: list[_Work],
    ) -> None:
        """Append `work` as one transaction (the caller holds the lock), and count it."""
        self.status.held = len(self._holdback)
        if not work:
            return
        # Decoding is CPU work: with the append, off the event loop (heartbeats, the API).
        assert self._appender is not None, "run() starts the appender"
        loop = asyncio.get_running_loop()
        report, offsets = await loop.run_in_executor(self._appender, self._append, work)
        for (_, topic, partition), mark in offsets.items():
            st = self.status.assigned.get(f"{topic}/{partition}")
            if st is not None:
                st.next_offset, st.generation = mark.next_offset, mark.generation
            self._uncommitted[TopicPartition(topic, partition)] = mark.next_offset
        s = self.status
        s.records += len(report.ids)
        s.duplicates += len(report.duplicates)
        s.quarantined += report.quarantined
        s.transactions += 1
        s.last_tx = report.tx
        self._commit_in_background(kafka)

    def _commit_in_background(self, kafka: AIOKafkaConsumer) -> None:
        """Start the advisory commit unless one is in flight: the next fetch need not wait for
        a Kafka round trip (what one misses, the next one after it commits)."""
        if self._committing is None or self._committing.done():
            self._committing = asyncio.ensure_future(self._commit_to_kafka(kafka))

    async def _commit_to_kafka(self, kafka: AIOKafkaConsumer) -> None:
        """Commit the ledger's offsets to Kafka. Advisory only (the ledger's offsets are the truth),
        so bounded: while the broker is down, aiokafka's commit() waits for a coordinator for ever,
        and so would shutdown. On failure, retried a second later."""
        assigned = kafka.assignment()  # empty while a rebalance is under way: keep the rest for later
        pending = {tp: o for tp, o in self._uncommitted.items() if tp in assigned}
        if not pending:
            return
        try:
            await asyncio.wait_for(kafka.commit(
                {tp: OffsetAndMetadata(o, "") for tp, o in pending.items()}), timeout=5)
        except Exception as e:  # any failure: keep the offsets, retry later
            log.debug("advisory Kafka commit failed (%s); will retry", e)
            self._commit_retry_at = time.monotonic() + 1.0
            return
        for tp, o in pending.items():
            if self._uncommitted.get(tp) == o:
                del self._uncommitted[tp]

    def _append(
        self, work: list[_Work]
    ) -> tuple[TxReport, dict[tuple[str, str, int], OffsetMark]]:
        """Decode one batch and append it, with its quarantine and offsets, as one transaction.

        Records are validated once, by append() (validation is a third of the ingest CPU): a record
        it refuses is quarantined with the reason and the batch retried; past a few of those, every
        record is validated up front instead (as decode(check=True) would). A record reusing a
        stored id for other content is refused by append() only: each one costs a retry."""
        decoded: list[list[tuple[ConsumerRecord[bytes, bytes], dict[str, Any]]]] = []
        quarantine: list[Quarantined] = []
        offsets: dict[tuple[str, str, int], OffsetMark] = {}
        covered: dict[str, list[int]] = {}
        for tp, msgs, mark in work:
            kind = self.kinds.get(tp.topic)
            part = []
            for msg in msgs:
                item = decode(msg, kind=kind, generation=mark.generation,
                              max_value_bytes=self.max_value_bytes, check=False)
                if isinstance(item, Quarantined):
                    quarantine.append(item)
                else:
                    part.append((msg, item))
            decoded.append(part)
            last = msgs[-1]
            offsets[(self.group, tp.topic, tp.partition)] = OffsetMark(
                last.offset + 1, mark.generation, message_digest(last)
            )
            covered[f"{tp.topic}/{tp.partition}"] = [msgs[0].offset, last.offset]
        # Partitions interleaved by Kafka timestamp: each partition keeps its offset order (merge
        # never reorders one input), and the tx comes closer to the order things happened in.
        merged = list(heapq.merge(*decoded, key=lambda pair: pair[0].timestamp))
        sources = [msg for msg, _ in merged]  # the message of each record
        records = [rec for _, rec in merged]
        meta = {"consumer": self.group, "offsets": covered}
        refusals = 0
        while True:
            if refusals == _REFUSALS_BEFORE_CHECKING_ALL:
                kept = []
                for rec, msg in zip(records, sources, strict=True):
                    try:
                        validate(0, rec)
                        kept.append((rec, msg))
                    except InvalidRecord as e:
                        quarantine.append(_rejected(msg, invalid_reason(e)))
                records, sources = [r for r, _ in kept], [m for _, m in kept]
            quarantine.sort(key=lambda q: (q.topic or "", q.partition or 0, q.offset or 0))
            try:
                return self.ledger.append(records, meta, quarantine=quarantine, offsets=offsets), offsets
            except InvalidRecord as e:
                if refusals >= _REFUSALS_BEFORE_CHECKING_ALL and e.field != "id":
                    raise  # cannot happen: every record was validated; append checks reused ids
                records.pop(e.index)
                quarantine.append(_rejected(sources.pop(e.index), invalid_reason(e)))
                refusals += 1

    def _check_generation(
        self, kafka: AIOKafkaConsumer, tp: TopicPartition, msgs: list[ConsumerRecord[bytes, bytes]]
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """The part of a fetched batch that continues what the ledger stored, or [] (after a seek:
        to re-read the last stored message with the new ones, or to 0 for a new generation)."""
        key = (tp.topic, tp.partition)
        mark = self._marks.get(key, OffsetMark(0))
        probe = self._probing.pop(key, None)
        first, stored = msgs[0], mark.next_offset
        if first.offset < stored - 1 or (first.offset == stored - 1 and mark.last_digest is None):
            # Offsets went back: the broker reset us to "earliest" of a log shorter than ours.
            self._new_generation(kafka, tp, f"offset went back from {stored} to {first.offset}")
            return []
        if first.offset == stored - 1:
            if message_digest(first) == mark.last_digest:
                if len(msgs) == 1 and (kafka.highwater(tp) or 0) > stored:
                    # Newer records exist but did not come with it (together they pass the fetch
                    # size): they would never come together. The next batch, from the offset
                    # after it, continues the log just checked (a refill between the two fetches
                    # is the one case this lets through).
                    self._checked[key] = stored
                return msgs[1:]  # one fetch response: the rest continues the log we stored
            self._new_generation(kafka, tp, f"message at offset {first.offset} is not the one stored")
            return []
        if stored == 0 or mark.last_digest is None:
            return msgs  # nothing stored in this generation: nothing to compare with
        if self._checked.pop(key, None) == stored:
            return msgs
        if probe is None:
            self._reread_last(kafka, tp)  # new records without the last stored one: fetch again
            self._reread_requested = True
            return []
        # We asked for offset stored-1 and the log starts later (retention) or skips it
        # (compaction): it cannot be compared; these records are all past the stored offset.
        log.warning("%s/%s: offset %s is no longer in the log (retention or compaction); "
                    "continuing at %s without comparing it", tp.topic, tp.partition, probe, first.offset)
        return msgs


def _whole_topics(kafka: AIOKafkaConsumer) -> set[str]:
    """The topics all of whose partitions are assigned to this consumer."""
    assigned = kafka.assignment()
    return {topic for topic in {tp.topic for tp in assigned}
            if all(TopicPartition(topic, p) in assigned for p in kafka.partitions_for_topic(topic) or ())}


def _seek(kafka: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    """Seek, unless a rebalance took `tp` away meanwhile (seek would raise): the next assignment
    positions it from the ledger's offsets anyway."""
    if tp in kafka.assignment():
        kafka.seek(tp, offset)


def run_forever(consumer: Consumer) -> None:
    """Run a consumer until SIGINT/SIGTERM (the `ledger consume` command)."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        started = time.monotonic()
        await consumer.run(stop)
        log.info("consumer stopped after %.1f s: %s", time.monotonic() - started, consumer.status.as_dict())

    asyncio.run(main())




async def partition_lag(
    ledger: Ledger, *, bootstrap: str, group: str, timeout: float = 5.0,
    topics: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Lag per partition: broker highwater minus the ledger's next offset, for every partition the
    group has stored offsets for and every partition of `topics` (those not consumed yet count
    from 0, so records waiting for a consumer that never ran show up as lag). Uses `highwater()`
    from a fetch (some brokers answer `end_offsets()` wrongly).

    A snapshot beside a running writer (not `complete`) holds only the offsets of its sealed
    transactions: there the group's offsets committed to Kafka, which the consumer commits right
    after each ledger commit, count where they are further on."""
    marks = ledger.offsets(group)
    if not marks and not topics:  # nothing to ask, but an unreachable broker is still an error
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await client.bootstrap()
        finally:
            await client.close()
        return []
    kafka = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None if ledger.complete else group,
                             fetch_max_wait_ms=50, request_timeout_ms=int(timeout * 1000))
    try:
        await kafka.start()
    except BaseException:
        await kafka.stop()
        raise
    try:
        if topics:
            existing = await kafka.topics()  # metadata only: asking never creates a topic
            for topic in topics:
                if topic in existing:
                    for p in kafka.partitions_for_topic(topic) or ():
                        marks.setdefault((topic, p), OffsetMark(0))
        tps = [TopicPartition(t, p) for t, p in marks]
        if not tps:
            return []
        kafka.assign(tps)
        for tp in tps:
            kafka.seek(tp, max(0, marks[(tp.topic, tp.partition)].next_offset - 1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(kafka.highwater(tp) is None for tp in tps):
            # A record aiokafka cannot parse (see kafka_raw) fails getmany() after its fetch
            # response brought the highwater.
            with contextlib.suppress(UnicodeDecodeError):
                await kafka.getmany(timeout_ms=100, max_records=1)
        rows = []
        for tp in sorted(tps):
            hw = kafka.highwater(tp)
            nxt = marks[(tp.topic, tp.partition)].next_offset
            if not ledger.complete:
                nxt = max(nxt, await kafka.committed(tp) or 0)
            rows.append({"topic": tp.topic, "partition": tp.partition, "next_offset": nxt,
                         "highwater": hw, "lag": None if hw is None else max(0, hw - nxt)})
        return rows
    finally:
        await kafka.stop()
