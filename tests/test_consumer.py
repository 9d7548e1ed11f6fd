"""The Kafka consumer in-process against a real broker: bad input goes to quarantine (and ingestion
goes on), a broker that lost its topics (offsets went backwards) starts a new generation whose
records are all ingested, a rebalance in the middle of an append loses and duplicates nothing, and
lag is reported per partition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaProducer

from ledger import Ledger, LedgerError
from ledger.broker import Broker, create_topics_async
from ledger.consumer import ID_NAMESPACE, Consumer, partition_lag
from ledger.groups import group_header, membership

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence
    from pathlib import Path

# Tansu delays a group join by half the session timeout; 10 s by default.
FAST = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


async def produce(
    bootstrap: str, topic: str, values: Sequence[bytes | None], *, partition: int | None = 0,
    keys: Sequence[bytes | None] | None = None, headers: list[tuple[str, bytes]] | None = None,
    partitions: int = 3,
) -> None:
    """Send values to one partition, or (partition=None) round-robin over `partitions`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = []
        for i, value in enumerate(values):
            p = partition if partition is not None else i % partitions
            key = keys[i] if keys is not None else f"key-{i}".encode()
            futures.append(await producer.send(topic, value, key=key, partition=p, headers=headers))
        for fut in futures:
            await fut
    finally:
        await producer.stop()


def env(action: str = "deposit", **fields: Any) -> bytes:
    return json.dumps({"action": action, "data": fields.pop("data", {"n": 1}), **fields}).encode()


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def count(lg: Ledger, where: str = "true") -> int:
    return int(lg.sql(f"SELECT count(*) AS n FROM log WHERE {where}").to_pylist()[0]["n"])


def consumer_of(ledger: Ledger, broker: Broker, topic: str, *, group: str) -> Consumer:
    """A consumer of one topic, quick to join its group."""
    return Consumer(ledger, bootstrap=broker.bootstrap, group=group, topics=(topic,), kafka_options=FAST)


@contextlib.asynccontextmanager
async def running(consumer: Consumer) -> AsyncIterator[Consumer]:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(lambda: consumer.assigned_event.is_set() or task.done(), 30, "an assignment")
        if task.done():
            task.result()
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "ledger") as lg:
        yield lg


# ------------------------------------------------------------------------------------ bad input
BAD = {
    # name: (raw value, the start of the reason)
    "invalid utf-8": (b'{"action": "deposit", "data": {"n": "\xff\xfe"}}', "value is not valid UTF-8"),
    "not json": (b"deposit 10 to acct-1", "value is not JSON"),
    "json array": (b'[{"action": "deposit"}]', "value is a JSON array, not an object"),
    "json string": (b'"deposit"', "value is a JSON string, not an object"),
    "missing action": (b'{"data": {"n": 1}}', "field 'action' is missing"),
    "non-string action": (b'{"action": 7, "data": {"n": 1}}', "field 'action' must be a non-empty string"),
    "empty action": (b'{"action": "", "data": {"n": 1}}', "field 'action' must be a non-empty string"),
    "data not an object": (b'{"action": "deposit", "data": [1, 2]}', "field 'data' must be a JSON object"),
    "missing data": (b'{"action": "deposit"}', "field 'data' must be a JSON object"),
    "oversized": (env(data={"blob": "x" * 20_000}), "value is 200"),
    "tombstone": (None, "message has no value (a tombstone)"),
    "invalid id": (env(id="not-a-uuid"), "field 'id': 'not-a-uuid' is not a UUID"),
    "id not a string": (env(id=12), "field 'id': must be a UUID"),
    "naive timestamp": (env(timestamp="2024-01-01T00:00:00"), "field 'timestamp':"),
    # Only an absent timestamp takes the broker's: these were stored with it, silently.
    "empty timestamp": (env(timestamp=""), "field 'timestamp':"),
    "timestamp 0": (env(timestamp=0), "field 'timestamp':"),
    "NaN in data": (b'{"action": "deposit", "data": {"n": NaN}}', "field 'data': data.n is nan"),
    "lone surrogate": (b'{"action": "deposit", "data": {"n": "\\ud800"}}', "field 'data':"),
    # Deeper than Python's recursion limit: json.loads raised RecursionError, which stopped the
    # consumer at this message for ever (every restart re-read it).
    "nested 5,000 deep": (b'{"action": "deposit", "data": {"n": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
                          "value nests deeper than 128 levels"),
    # Parses, but hashing and validation recurse per level: the limit keeps append() safe.
    "nested 200 deep": (b'{"action": "deposit", "data": {"n": ' + b"[" * 200 + b"]" * 200 + b"}}",
                        "value nests deeper than 128 levels"),
    # json.loads keeps the last value: the ledger would store 500 where a reader keeping the first
    # sees 5. (Before: stored, silently, as 500.)
    "repeated key": (b'{"action": "deposit", "data": {"amount": 5, "amount": 500}}',
                     "value repeats the key 'amount' in one object"),
    "repeated key, spaced": (b'{"action": "deposit", "data": {"a": 1, "b" :2, "b"\n:3}, "x": "\\":"}',
                             "value repeats the key 'b' in one object"),
}


async def test_bad_input_is_quarantined_with_provenance_and_ingestion_goes_on(
    broker: Broker, ledger: Ledger
) -> None:
    topic = "bad-input"
    await create_topics_async(broker.bootstrap, {topic: 1})
    # good, bad, good, bad, ...: one fetch, so one batch (checked below via the tx numbers).
    values: list[bytes | None] = []
    expected: dict[int, tuple[str, bytes | None, str]] = {}  # offset -> (name, value, reason)
    for i, (name, (value, reason)) in enumerate(BAD.items()):
        values.append(env(data={"good": i}))
        expected[len(values)] = (name, value, reason)
        values.append(value)
    values.append(env(data={"good": len(BAD)}))
    keys = [None if i == 1 else f"key-{i}".encode() for i in range(len(values))]
    await produce(broker.bootstrap, topic, values, keys=keys, headers=[("source", b"test")])

    consumer = Consumer(ledger, bootstrap=broker.bootstrap, group="bad", topics=(topic,),
                        kinds={topic: "command"}, max_value_bytes=16_384, kafka_options=FAST)
    async with running(consumer):
        await eventually(lambda: consumer.status.records + consumer.status.quarantined >= len(values),
                         30, "the batch")
        rows = {r["kafka_offset"]: r for r in ledger.sql(
            "SELECT * FROM quarantine ORDER BY kafka_offset").to_pylist()}
        assert set(rows) == set(expected)
        for offset, (name, value, reason) in expected.items():
            row = rows[offset]
            assert row["reason"].startswith(reason), (name, row["reason"])
            assert row["value"] == value, name  # the raw bytes, as produced
            assert row["key"] == (None if offset == 1 else f"key-{offset}".encode()), name
            assert (row["kafka_topic"], row["kafka_partition"]) == (topic, 0), name
            assert json.loads(row["headers"]) == [["source", "test"]], name
            assert row["kafka_timestamp"] is not None, name
        good = ledger.sql("SELECT kafka_offset, data, kind, tx FROM log ORDER BY kafka_offset").to_pylist()
        assert [r["kafka_offset"] for r in good] == [o for o in range(len(values)) if o not in expected]
        assert [json.loads(r["data"])["good"] for r in good] == list(range(len(BAD) + 1))
        assert {r["kind"] for r in good} == {"command"}
        # Quarantine and good records of the batch commit together, and the offsets cover both.
        txs = {r["tx"] for r in good} | {r["tx"] for r in rows.values()}
        assert len(txs) == 1, txs
        assert ledger.offsets("bad")[(topic, 0)].next_offset == len(values)
        assert consumer.status.quarantined == len(BAD)

        # Ingestion goes on after bad input. (One record refused only by the ledger's own
        # validation: the consumer quarantines it and retries the batch without it.)
        await produce(broker.bootstrap, topic, [b"\x00garbage", env(data={"good": "after"}),
                                                env(id="nope"), env(data={"good": "last"})])
        await eventually(lambda: count(ledger) == len(BAD) + 3, 20, "the records after the bad ones")
        assert consumer.status.quarantined == len(BAD) + 2
        last = ledger.sql("SELECT reason, kafka_offset FROM quarantine ORDER BY kafka_offset DESC LIMIT 2"
                          ).to_pylist()
        assert [r["kafka_offset"] for r in last] == [len(values) + 2, len(values)]
        assert last[0]["reason"] == "field 'id': 'nope' is not a UUID"
    assert ledger.verify().ok


def test_decode_keeps_the_envelope_and_kafka_provenance() -> None:
    from aiokafka.structs import ConsumerRecord

    from ledger.consumer import decode

    rid = str(uuid.uuid4())
    value = json.dumps({"id": rid, "action": "open", "data": {"id": "acct-1"}, "parent": "p-1",
                        "timestamp": "2024-05-01T12:00:00+02:00", "user": "ann", "system": "web",
                        "extra": "ignored"}).encode()
    msg = ConsumerRecord("events", 2, 41, 1_700_000_000_123, 0, b"acct-1", value, None, len(b"acct-1"),
                         len(value), [("trace", b"abc")])
    rec = decode(msg, kind=None, generation=0, max_value_bytes=1 << 20)
    assert isinstance(rec, dict)
    assert rec["id"] == rid and rec["kind"] == "event" and rec["parent"] == "p-1"
    assert rec["timestamp"] == "2024-05-01T12:00:00+02:00"
    assert (rec["topic"], rec["partition"], rec["offset"], rec["key"]) == ("events", 2, 41, "acct-1")
    assert rec["headers"] == (("trace", "abc"), ("user", "ann"), ("system", "web"))
    assert rec["kafka_timestamp"].timestamp() == 1_700_000_000.123
    # No envelope id: derived from topic/partition/generation/offset, so a redelivery is recognised
    # and a recreated topic's record at the same offset is not.
    bare = ConsumerRecord("events", 2, 41, 0, 0, None, env(), None, 0, 0, [])
    a = decode(bare, kind="command", generation=0, max_value_bytes=1 << 20)
    b = decode(bare, kind="command", generation=1, max_value_bytes=1 << 20)
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["id"] == str(uuid.uuid5(ID_NAMESPACE, "events/2/0/41")) != b["id"]
    assert a["kind"] == "command"


@pytest.mark.parametrize("value", [
    b'{"action": "a", "data": {"s": "x\\":y", "t": "\\" : \\"", "n": [{"k": 1}, {"k": 2}]}}',
    b'{ "action" : "a" ,\n "data" :\t{"k" :\r\n{"k": {"k": []}}} }',
    b'{"action":"a","data":{"\\u0061":1,"b":"{{}}"}}',
])
def test_keys_repeated_only_across_objects_or_inside_strings_are_no_repeats(value: bytes) -> None:
    from aiokafka.structs import ConsumerRecord

    from ledger.consumer import decode

    msg = ConsumerRecord("events", 0, 0, 0, 0, None, value, None, 0, len(value), [])
    rec = decode(msg, kind=None, generation=0, max_value_bytes=1 << 20)
    assert isinstance(rec, dict), rec
    assert rec["data"] == json.loads(value)["data"]


# -------------------------------------------------------------------------------- broker restart
@pytest.fixture
async def private_broker() -> AsyncIterator[Broker]:
    """A broker of this test's own, to kill and restart."""
    b = await asyncio.to_thread(Broker().start)
    try:
        yield b
    finally:
        await asyncio.to_thread(b.stop)


async def restart_empty(broker: Broker, topic: str, partitions: int) -> None:
    """SIGKILL the broker and start it again on the same port: memory storage, so every topic is
    gone; recreate ours (a consumer's metadata request may have auto-created it first)."""
    await asyncio.to_thread(broker.kill)
    await asyncio.to_thread(broker.restart)
    await create_topics_async(broker.bootstrap, {topic: partitions})


def generations(lg: Ledger, topic: str) -> dict[str, list[int]]:
    """phase -> offsets, in (tx, seq) order."""
    return {r["phase"]: r["offsets"] for r in lg.sql(
        "SELECT data->>'phase' AS phase, list(kafka_offset ORDER BY tx, seq) AS offsets FROM log "
        "WHERE kafka_topic = $t GROUP BY ALL", params={"t": topic}).to_pylist()}


def phase(name: str, n: int) -> list[bytes]:
    """n envelopes without ids: their ids are derived from the offset (and the generation)."""
    return [env(data={"phase": name, "i": i}) for i in range(n)]


async def test_broker_restart_while_consuming_starts_a_new_generation(
    private_broker: Broker, ledger: Ledger
) -> None:
    """The broker dies and comes back empty while the consumer runs; the new records reuse offsets
    0.. and carry no ids, so only a new generation keeps them apart from the old ones."""
    topic, bs = "restart-live", private_broker.bootstrap
    await create_topics_async(bs, {topic: 1})
    await produce(bs, topic, phase("before", 30))
    consumer = Consumer(ledger, bootstrap=bs, group="live", topics=(topic,), kafka_options=FAST)
    async with running(consumer):
        await eventually(lambda: count(ledger) == 30, 20, "the first records")
        await restart_empty(private_broker, topic, 1)
        await produce(bs, topic, phase("after", 12))  # fewer than before: offsets went back
        await eventually(lambda: count(ledger) == 42, 40, "the records after the restart")
        await produce(bs, topic, phase("later", 25))  # past the old offset 30, same generation
        await eventually(lambda: count(ledger) == 67, 20, "more records")
    assert generations(ledger, topic) == {
        "before": list(range(30)), "after": list(range(12)), "later": list(range(12, 37))}
    ids = ledger.sql("SELECT data->>'phase' AS phase, kafka_offset AS o, id FROM log").to_pylist()
    assert len({r["id"] for r in ids}) == 67
    for r in ids:
        gen = 0 if r["phase"] == "before" else 1
        assert r["id"] == str(uuid.uuid5(ID_NAMESPACE, f"{topic}/0/{gen}/{r['o']}")), r
    assert ledger.offsets("live")[(topic, 0)].generation == 1
    assert consumer.status.generations_started == 1
    assert ledger.verify().ok


async def test_broker_restart_with_more_new_records_than_the_old_offset(
    private_broker: Broker, ledger: Ledger
) -> None:
    """While the consumer is away, the broker restarts empty and gets more new records than the
    ledger's stored offset: offsets did not go backwards, only the stored digest of the last
    message tells the new log from the old one."""
    topic, bs = "restart-digest", private_broker.bootstrap
    await create_topics_async(bs, {topic: 1})
    await produce(bs, topic, phase("before", 20))
    consumer = Consumer(ledger, bootstrap=bs, group="digest", topics=(topic,), kafka_options=FAST)
    async with running(consumer):
        await eventually(lambda: count(ledger) == 20, 20, "the first records")
    await restart_empty(private_broker, topic, 1)
    await produce(bs, topic, phase("after", 50))
    consumer = Consumer(ledger, bootstrap=bs, group="digest", topics=(topic,), kafka_options=FAST)
    async with running(consumer):
        await eventually(lambda: count(ledger) == 70, 30, "the new generation")
        await asyncio.sleep(0.3)
    assert generations(ledger, topic) == {"before": list(range(20)), "after": list(range(50))}
    assert ledger.offsets("digest")[(topic, 0)].generation == 1
    assert ledger.verify().ok


async def test_broker_restart_while_consuming_with_more_new_records_than_the_old_offset(
    private_broker: Broker, ledger: Ledger
) -> None:
    """As above, but the consumer stays up: the new records are produced right after the restart,
    so the consumer's first fetch after reconnecting finds offset 20 full of new records, before
    its group session notices the restart (heartbeats every 2 s here) and re-joins."""
    topic, bs = "restart-digest-live", private_broker.bootstrap
    await create_topics_async(bs, {topic: 1})
    await produce(bs, topic, phase("before", 20))
    slow_heartbeat = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}
    consumer = Consumer(ledger, bootstrap=bs, group="digest-live", topics=(topic,),
                        kafka_options=slow_heartbeat)
    async with running(consumer):
        await eventually(lambda: count(ledger) == 20, 20, "the first records")
        await restart_empty(private_broker, topic, 1)
        await produce(bs, topic, phase("after", 50))
        await eventually(lambda: count(ledger) >= 70, 30, "the new generation")
        await asyncio.sleep(0.5)
    assert generations(ledger, topic) == {"before": list(range(20)), "after": list(range(50))}
    assert ledger.verify().ok


async def test_odd_but_valid_kafka_messages_do_not_stop_ingestion(broker: Broker, ledger: Ledger) -> None:
    """A null header value, a broker time past the year 9999 and an empty key each stopped the
    consumer for ever (it died on the same message after every restart), or quarantined it."""
    topic = "odd"
    await create_topics_async(broker.bootstrap, {topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, env(data={"n": 1}), key=b"k", headers=[("h", None)])
        await producer.send_and_wait(topic, env(data={"n": 2}), key=b"k", timestamp_ms=253402300800000)
        await producer.send_and_wait(topic, env(data={"n": 3}), key=b"")
    finally:
        await producer.stop()
    consumer = Consumer(ledger, bootstrap=broker.bootstrap, group="odd", topics=(topic,), kafka_options=FAST)
    async with running(consumer):
        await eventually(lambda: count(ledger) == 3, 30, "the three records")
    rows = ledger.sql("SELECT data->>'n' AS n, headers, key, kafka_timestamp FROM log ORDER BY kafka_offset"
                      ).to_pylist()
    assert [r["n"] for r in rows] == ["1", "2", "3"]
    assert json.loads(rows[0]["headers"]) == [["h", ""]]
    assert rows[1]["kafka_timestamp"] is None  # beyond what a timestamp can hold
    assert rows[2]["key"] is None
    assert ledger.sql("SELECT count(*) AS n FROM quarantine").to_pylist() == [{"n": 0}]
    assert ledger.verify().ok


# A header name whose bytes are not UTF-8 (aiokafka's pure-Python encoder asks the str for them).
# aiokafka's consumer cannot parse such a record: getmany() raises UnicodeDecodeError at it.
PRODUCE_BAD_HEADER_NAME = """
import asyncio, json, sys
from aiokafka import AIOKafkaProducer
class Name(str):
    def encode(self, *args, **kwargs):
        return b"\\xff\\xfe"
async def main(bootstrap, topic, values, bad):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=200)
    await producer.start()
    try:
        sent = [await producer.send(topic, v.encode(), key=b"key-%d" % i, partition=0,
                                    headers=[(Name("h") if i in bad else "h", b"v")])
                for i, v in enumerate(values)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])))
"""


def produce_bad_header_names(bootstrap: str, topic: str, values: Sequence[bytes], bad: Sequence[int]) -> None:
    """Send `values` (as one batch) to partition 0, keys key-0.., those at the indexes `bad` with a
    header name that is not UTF-8, the others with the header ("h", b"v")."""
    subprocess.run([sys.executable, "-c", PRODUCE_BAD_HEADER_NAME, bootstrap, topic,
                    json.dumps([v.decode() for v in values]), json.dumps(list(bad))],
                   check=True, timeout=60, env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"})


async def test_a_header_name_that_is_not_utf8_is_quarantined_and_ingestion_goes_on(
    broker: Broker, ledger: Ledger,
) -> None:
    """aiokafka decodes header names strictly: getmany() raised at such a record on every fetch, and
    the consumer failed at every restart. Its record batch is read raw now, the bad record
    quarantined with the batch's other records, and aiokafka parses all the other batches."""
    topic, group = "bad-header-name", "bad-header"
    await create_topics_async(broker.bootstrap, {topic: 1})
    await produce(broker.bootstrap, topic, [env(data={"n": n}) for n in range(2)])  # a batch of its own
    await asyncio.to_thread(produce_bad_header_names, broker.bootstrap, topic,
                            [env(data={"n": n}) for n in range(2, 7)], [0, 3])  # offsets 2 and 5
    async with running(consumer_of(ledger, broker, topic, group=group)):
        await eventually(lambda: count(ledger) == 5, 30, "the good records around the bad ones")
        # The last stored record is in a batch aiokafka cannot parse when the consumer stops.
        await asyncio.to_thread(produce_bad_header_names, broker.bootstrap, topic,
                                [env(data={"n": 7}), env(data={"n": 8})], [1])
        await eventually(lambda: ledger.offsets(group)[(topic, 0)].next_offset == 9, 30, "the third batch")
    async with running(consumer_of(ledger, broker, topic, group=group)) as again:
        await produce(broker.bootstrap, topic, [env(data={"n": 9})])
        await eventually(lambda: count(ledger) == 7, 30, "a record produced after the restart")
        assert again.status.quarantined == 0 and again.status.records == 1
    rows = ledger.sql("SELECT * FROM quarantine ORDER BY kafka_offset").to_pylist()
    assert [(r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]) for r in rows] == [
        (topic, 0, 2), (topic, 0, 5), (topic, 0, 8)]
    for r, key in zip(rows, [b"key-0", b"key-3", b"key-1"], strict=True):
        assert r["reason"] == "header name b'\\xff\\xfe' is not UTF-8"
        assert (r["key"], r["value"]) == (key, env(data={"n": r["kafka_offset"]}))  # the raw bytes
        assert json.loads(r["headers"]) == [["\\xff\\xfe", "v"]] and r["kafka_timestamp"] is not None
    good = ledger.sql("SELECT kafka_offset AS o, data->>'n' AS n, headers, tx FROM log ORDER BY o"
                      ).to_pylist()
    assert [(r["o"], r["n"]) for r in good] == [(o, str(o)) for o in (0, 1, 3, 4, 6, 7, 9)]
    assert [json.loads(r["headers"]) for r in good[2:6]] == [[["h", "v"]]] * 4  # read raw, the same
    # Each bad record commits with the records fetched with it, and each record is stored once.
    txs = {r["kafka_offset"]: r["tx"] for r in rows} | {r["o"]: r["tx"] for r in good}
    assert len({txs[o] for o in range(7)}) == 1 and txs[7] == txs[8] != txs[9]
    assert ledger.offsets(group)[(topic, 0)].next_offset == 10
    assert ledger.verify().ok


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_the_raw_reader_reads_a_batch_as_aiokafka_would(codec: str) -> None:
    """kafka_raw's parser against aiokafka's own on the same batch, the bad header name aside."""
    from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchBuilderPy
    from aiokafka.structs import TopicPartition

    from ledger.kafka_raw import UnparsedRecord, first_unparsable

    class Name(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            return b"\xff\xfe"

    def batch(name: str) -> bytes:  # aiokafka's pure-Python builder asks the str for its bytes
        builder = _DefaultRecordBatchBuilderPy(2, ["none", "gzip", "snappy", "lz4", "zstd"].index(codec),
                                               0, -1, -1, -1, 1 << 20)
        builder.append(0, 1_700_000_000_000, b"k", b"v0", [("h", b"x"), ("n", None)])
        builder.append(1, 1_700_000_000_009, None, None, [(name, b"y")])
        builder.append(2, 1_700_000_000_004, b"", b"v2", [])
        return bytes(builder.build())

    def fields(r: Any) -> tuple[Any, ...]:
        return r.offset, r.timestamp, r.timestamp_type, r.key, r.value, [tuple(h) for h in r.headers]

    bad, good = batch(Name("h")), batch("h")
    with pytest.raises(UnicodeDecodeError):
        list(DefaultRecordBatch(bad))
    tp = TopicPartition("t", 0)
    assert first_unparsable(good + good, tp, 0) is None
    found = first_unparsable(good + bad, tp, 1)  # (two batches at the same offsets: fine here)
    assert found is not None and found.before == [1, 2] and found.end == 3
    expected = [fields(r) for r in DefaultRecordBatch(good)][1:]  # from offset 1 on
    expected[0][5][0] = ("\\xff\\xfe", b"y")
    assert [fields(r) for r in found.records] == expected
    assert [type(r) is UnparsedRecord for r in found.records] == [True, False]


async def test_a_message_reusing_a_stored_id_for_other_content_is_quarantined(
    broker: Broker, ledger: Ledger,
) -> None:
    """A repeat of a stored record (a producer's retry) is dropped; a different message under the
    same id was dropped too, leaving no trace. Now it is quarantined, however many come at once."""
    topic = "reused-ids"
    await create_topics_async(broker.bootstrap, {topic: 1})
    ids = [str(uuid.uuid4()) for _ in range(6)]
    first = [env(id=i, data={"n": 1}) for i in ids]
    again = [env(id=ids[0], data={"n": 1}, timestamp="2024-01-01T00:00:00Z")]  # a repeat
    other = [env(id=i, data={"n": 2}) for i in ids]  # more than the refusals before checking all
    await produce(broker.bootstrap, topic, first)
    consumer = consumer_of(ledger, broker, topic, group="reuse")
    async with running(consumer):
        await eventually(lambda: count(ledger) == len(ids), 30, "the first records")
        await produce(broker.bootstrap, topic, again + other)
        await eventually(
            lambda: ledger.sql("SELECT count(*) AS n FROM quarantine").to_pylist()[0]["n"] == len(other),
            30, "the reused ids in quarantine")
    assert ledger.sql("SELECT DISTINCT data->>'n' AS n FROM log").to_pylist() == [{"n": "1"}]
    rows = ledger.sql("SELECT kafka_offset AS o, reason FROM quarantine ORDER BY 1").to_pylist()
    assert [r["o"] for r in rows] == list(range(len(ids) + 1, 2 * len(ids) + 1))
    assert all("is already in the ledger as another record" in r["reason"] for r in rows), rows
    assert ledger.offsets("reuse")[(topic, 0)].next_offset == 2 * len(ids) + 1
    assert ledger.verify().ok


async def test_a_stored_message_that_comes_alone_does_not_stall_its_partition(
    broker: Broker, ledger: Ledger,
) -> None:
    """A message too big to share a fetch (5 MiB: quarantined) is the stored one the next records
    are checked against; they never came in the same fetch, and the partition stalled for ever."""
    topic = "big-then-small"
    await create_topics_async(broker.bootstrap, {topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=8 << 20)
    await producer.start()
    try:
        await producer.send_and_wait(topic, env(data={"blob": "x" * (5 << 20)}))
        await producer.send_and_wait(topic, env(data={"n": 1}))
    finally:
        await producer.stop()
    consumer = consumer_of(ledger, broker, topic, group="big")
    async with running(consumer):
        await eventually(lambda: count(ledger) == 1, 30, "the record after the big one")
        await produce(broker.bootstrap, topic, [env(data={"n": 2})])
        await eventually(lambda: count(ledger) == 2, 30, "a record produced later")
    assert ledger.sql("SELECT kafka_offset AS o FROM quarantine").to_pylist() == [{"o": 0}]


async def test_every_compression_codec_a_producer_may_use_is_ingested(broker: Broker, ledger: Ledger) -> None:
    """A snappy, lz4 or zstd batch stopped the consumer for ever (aiokafka needs cramjam for them)."""
    topic = "codecs"
    codecs = ["gzip", "snappy", "lz4", "zstd"]
    await create_topics_async(broker.bootstrap, {topic: 1})
    for codec in codecs:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, compression_type=codec)
        await producer.start()
        try:
            await producer.send_and_wait(topic, env(data={"codec": codec}), key=b"k")
        finally:
            await producer.stop()
    consumer = consumer_of(ledger, broker, topic, group="codecs")
    async with running(consumer):
        await eventually(lambda: count(ledger) == len(codecs), 30, "a record per codec")
    got = ledger.sql("SELECT data->>'codec' AS c FROM log ORDER BY kafka_offset").column("c").to_pylist()
    assert got == codecs


# ------------------------------------------------------------------------------------------ lag
async def test_lag_per_partition(broker: Broker, ledger: Ledger) -> None:
    topic, group = "lag", "lag"
    await create_topics_async(broker.bootstrap, {topic: 3})
    per_partition = {0: 40, 1: 25, 2: 0}
    for p, n in per_partition.items():
        await produce(broker.bootstrap, topic, phase(f"p{p}", n), partition=p)

    # Nothing consumed yet: records waiting in partitions the ledger has no offsets for are lag.
    rows = await partition_lag(ledger, bootstrap=broker.bootstrap, group=group, topics=(topic,))
    assert [(r["partition"], r["next_offset"], r["highwater"], r["lag"]) for r in rows] == [
        (0, 0, 40, 40), (1, 0, 25, 25), (2, 0, 0, 0)]
    assert await partition_lag(ledger, bootstrap=broker.bootstrap, group=group) == []

    consumer = Consumer(ledger, bootstrap=broker.bootstrap, group=group, topics=(topic,),
                        kafka_options=FAST)

    def status() -> list[tuple[int, int, int | None, int | None]]:
        return [(p["partition"], p["next_offset"], p["highwater"], p["lag"])
                for p in consumer.status.as_dict()["partitions"]]

    async with running(consumer):
        await eventually(lambda: status() == [(0, 40, 40, 0), (1, 25, 25, 0), (2, 0, 0, 0)], 20,
                         "lag 0 in the status")
        # Caught up: the status and partition_lag agree.
        rows = await partition_lag(ledger, bootstrap=broker.bootstrap, group=group, topics=(topic,))
        assert [(r["partition"], r["next_offset"], r["highwater"], r["lag"]) for r in rows] == status()
        # While the consumer runs, a backlog shows as lag in its status before it is worked off.
        await produce(broker.bootstrap, topic, phase("burst", 30_000), partition=1)
        await eventually(lambda: any((p[3] or 0) > 0 for p in status()), 20, "lag > 0 in the status")
        await eventually(lambda: status()[1] == (1, 30_025, 30_025, 0), 60, "the backlog worked off")
    await produce(broker.bootstrap, topic, phase("waiting", 7), partition=2)
    rows = await partition_lag(ledger, bootstrap=broker.bootstrap, group=group, topics=(topic,))
    assert [(r["partition"], r["next_offset"], r["highwater"], r["lag"]) for r in rows] == [
        (0, 40, 40, 0), (1, 30_025, 30_025, 0), (2, 0, 7, 7)]
    # Without `topics`: only the partitions the ledger holds offsets for (partition 2 never had a
    # record while the consumer ran, so nothing was stored for it).
    rows = await partition_lag(ledger, bootstrap=broker.bootstrap, group=group)
    assert [(r["partition"], r["lag"]) for r in rows] == [(0, 0), (1, 0)]


# ------------------------------------------------------------------------------------ rebalance
async def test_rebalance_in_the_middle_of_appends_loses_and_duplicates_nothing(
    broker: Broker, ledger: Ledger
) -> None:
    """A pattern subscription rebalances when a matching topic appears. Here it appears while the
    consumer works off a backlog (appends take ~1 s each), so the new assignment lands while a
    batch is being appended: it must neither re-read stale offsets nor take the redelivery that
    follows for a recreated topic."""
    first, second = "rb-first", "rb-second"
    await create_topics_async(broker.bootstrap, {first: 3})
    await produce(broker.bootstrap, first, phase("first", 30_000), partition=None)
    consumer = Consumer(ledger, bootstrap=broker.bootstrap, group="rb", pattern=r"^rb-.*",
                        kafka_options={**FAST, "metadata_max_age_ms": 500})
    async with running(consumer):
        await eventually(lambda: consumer.status.transactions >= 1, 30, "the first append")
        await create_topics_async(broker.bootstrap, {second: 2})
        await produce(broker.bootstrap, second, phase("second", 2_000), partition=None, partitions=2)
        await eventually(lambda: consumer.status.records >= 32_000 and all(
            p["lag"] == 0 for p in consumer.status.as_dict()["partitions"]) and len(
            consumer.status.assigned) == 5, 45, "everything")
        await asyncio.sleep(0.5)
    rows = ledger.sql(
        "SELECT kafka_topic AS t, kafka_partition AS p, list(kafka_offset ORDER BY tx, seq) AS o "
        "FROM log GROUP BY ALL ORDER BY ALL").to_pylist()
    assert [(r["t"], r["p"]) for r in rows] == [(first, 0), (first, 1), (first, 2), (second, 0), (second, 1)]
    for r in rows:
        assert r["o"] == list(range(len(r["o"]))), (r["t"], r["p"])
    assert sum(len(r["o"]) for r in rows) == 32_000
    assert count(ledger) == 32_000 and consumer.status.generations_started == 0
    assert ledger.sql("SELECT count(*) AS n FROM transactions WHERE meta LIKE '%rb-second%'"
                      ).to_pylist()[0]["n"] >= 1


# ------------------------------------------------------------------------------------- ordering
async def test_partitions_of_one_batch_are_interleaved_by_timestamp(broker: Broker, ledger: Ledger) -> None:
    """Within a transaction each partition keeps its offset order, and partitions are merged by
    Kafka timestamp: records produced one after another come out in that order."""
    topic = "interleave"
    await create_topics_async(broker.bootstrap, {topic: 3})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
    await producer.start()
    try:
        base = int(time.time() * 1000)
        futures = [await producer.send(topic, env(data={"i": i}), partition=(i * 7) % 3,
                                       timestamp_ms=base + i) for i in range(30)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    consumer = consumer_of(ledger, broker, topic, group="interleave")
    async with running(consumer):
        await eventually(lambda: count(ledger) == 30, 20, "the records")
    rows = ledger.sql("SELECT tx, CAST(data->>'i' AS INTEGER) AS i FROM log ORDER BY tx, seq").to_pylist()
    assert len({r["tx"] for r in rows}) == 1  # one fetch, one batch
    assert [r["i"] for r in rows] == list(range(30))


async def test_the_apis_producer_takes_the_connection_settings_of_ledger_kafka_options() -> None:
    """SASL credentials given for the consumer reach the producer of POST /commands too; consumer
    settings stay with the consumer (AIOKafkaProducer would refuse them)."""
    from aiokafka import AIOKafkaProducer

    from ledger.consumer import connection_options

    given = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
             "sasl_plain_password": "p", "client_id": "ledger", "fetch_max_wait_ms": 5,
             "max_poll_records": 10, "session_timeout_ms": 9000}
    kept = connection_options(given)
    assert kept == {k: given[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                          "sasl_plain_password", "client_id")}
    await AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **kept).stop()  # takes them (never started)
    with pytest.raises(TypeError):
        AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **given)


def test_topic_kinds_follow_the_configured_topic_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger.cli import build_parser, kafka_settings
    from ledger.consumer import topic_kinds

    monkeypatch.delenv("LEDGER_KINDS", raising=False)
    assert topic_kinds("orders-commands", "orders-events") == {
        "orders-commands": "command", "orders-events": "event"}
    assert topic_kinds(spec="audit=command, payments=event")["audit"] == "command"
    with pytest.raises(LedgerError, match="LEDGER_KINDS: 'audit=commands'"):
        topic_kinds(spec="audit=commands")
    # `ledger consume` takes the names (and the fetch wait) from the same settings as `ledger serve`.
    monkeypatch.setenv("LEDGER_COMMANDS_TOPIC", "orders-commands")
    monkeypatch.setenv("LEDGER_EVENTS_TOPIC", "orders-events")
    monkeypatch.setenv("LEDGER_KINDS", "payments=event")
    monkeypatch.setenv("LEDGER_FETCH_MAX_WAIT_MS", "20")
    got = kafka_settings(build_parser().parse_args(["consume"]))
    assert got["topics"] == ("orders-commands", "orders-events") and got["fetch_max_wait_ms"] == 20
    assert got["kinds"] == {"orders-commands": "command", "orders-events": "event", "payments": "event"}


async def test_ingestion_goes_on_while_every_default_pool_thread_is_busy(
    broker: Broker, ledger: Ledger
) -> None:
    """Queries, rebuilds and exports run on asyncio's default pool; appends have their own thread."""
    topic = "busy-pool"
    await create_topics_async(broker.bootstrap, {topic: 1})
    consumer = Consumer(ledger, bootstrap=broker.bootstrap, group="busy", topics=(topic,),
                        kafka_options=FAST)
    loop = asyncio.get_running_loop()
    async with running(consumer):
        # Occupy every thread of the default pool (as long queries would) until released.
        gate = threading.Event()
        blockers = [asyncio.to_thread(gate.wait) for _ in range(64)]
        busy = asyncio.gather(*blockers)
        loop.call_later(60, gate.set)  # never leave threads behind, whatever happens
        try:
            await produce(broker.bootstrap, topic, [env(data={"n": i}) for i in range(20)])
            await eventually(lambda: consumer.status.records == 20, 30, "20 records while the pool is busy")
        finally:
            gate.set()
            await busy
    assert count(ledger) == 20


async def test_the_fetch_wait_backs_off_while_fetches_come_back_empty_and_returns_once_caught_up(
    broker: Broker,
) -> None:
    """A wait backed off under load stayed at 2 s for good: on the bundled broker, which answers a
    fetch when its wait ends, every later record took 2 s to arrive (found by audit)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from ledger.fetching import EMPTY_FETCHES_BEFORE_BACKOFF, FetchWait

    await create_topics_async(broker.bootstrap, {"fetch-wait": 1})
    kafka = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=5)
    await kafka.start()
    try:
        kafka.assign([TopicPartition("fetch-wait", 0)])
        await kafka.getmany(timeout_ms=50)  # (aiokafka fails to stop a consumer that never polled)
        wait = FetchWait(kafka, 5, cap_ms=40)
        applied = lambda: kafka._fetcher._fetch_max_wait_ms  # noqa: E731  (what aiokafka sends)
        for expected in (10, 20, 40, 40):
            for _ in range(EMPTY_FETCHES_BEFORE_BACKOFF):
                wait.observe(got_records=False, lagging=True)
            assert wait.wait_ms == applied() == expected
        wait.observe(got_records=True, lagging=True)  # records, still behind: the wait stays
        assert applied() == 40
        wait.observe(got_records=True, lagging=False)  # caught up
        assert wait.wait_ms == applied() == 5
    finally:
        await kafka.stop()


# ---------------------------------------------------------------------------------------- groups
def tx_of(lg: Ledger) -> dict[str, int]:
    return {r["n"]: r["tx"] for r in lg.sql("SELECT data->>'n' AS n, tx FROM log").to_pylist()}


async def test_a_group_spread_over_partitions_is_stored_in_one_transaction(
    broker: Broker, ledger: Ledger
) -> None:
    """Members of a group (ledger.groups) come on three partitions, far apart in time: each waits,
    with what follows it on its partition, for the others; what other partitions hold before the
    group is stored meanwhile."""
    topic = "grouped"
    await create_topics_async(broker.bootstrap, {topic: 3})

    async def send(n: str, partition: int, member: int | None = None) -> None:
        headers = None if member is None else [group_header(member, 3, "g-1")]
        await produce(broker.bootstrap, topic, [env(data={"n": n})], partition=partition, headers=headers)

    consumer = Consumer(ledger, bootstrap=broker.bootstrap, group="grouped", topics=(topic,),
                        kafka_options=FAST, group_wait_s=60)
    async with running(consumer):
        for p in range(3):
            await send(f"before-{p}", p)
        await send("member-0", 0, member=0)
        await send("after-0", 0)
        await eventually(lambda: count(ledger) == 3 and consumer.status.held == 2, 20, "member 0 held")
        await send("member-1", 1, member=1)
        await send("between-2", 2)  # before the last member on its partition: not held
        await eventually(lambda: count(ledger) == 4 and consumer.status.held == 3, 20, "member 1 held")
        await asyncio.sleep(0.5)
        assert count(ledger) == 4
        await send("member-2", 2, member=2)
        await eventually(lambda: count(ledger) == 8, 20, "the whole group")
        assert consumer.status.held == 0
    txs = tx_of(ledger)
    assert txs["member-0"] == txs["member-1"] == txs["member-2"] == txs["after-0"]
    assert max(txs[f"before-{p}"] for p in range(3)) < txs["between-2"] < txs["member-0"]
    rows = ledger.sql("SELECT kafka_partition AS p, list(kafka_offset ORDER BY tx, seq) AS o "
                      "FROM log GROUP BY ALL").to_pylist()
    assert all(r["o"] == list(range(len(r["o"]))) for r in rows)
    assert ledger.verify().ok


async def test_an_incomplete_group_is_stored_after_the_wait_and_a_restart_holds_it_again(
    broker: Broker, ledger: Ledger
) -> None:
    """A group whose other member never comes is stored after `group_wait_s` (nothing is held for
    ever). Held records are not stored: a consumer stopped while it holds them leaves the ledger's
    offsets before them, and the next one reads them again (once)."""
    topic = "partial"
    await create_topics_async(broker.bootstrap, {topic: 2})
    await produce(broker.bootstrap, topic, [env(data={"n": "lone"})], partition=0,
                  headers=[group_header(0, 2, "g-lone")])
    await produce(broker.bootstrap, topic, [env(data={"n": "next"})], partition=0)
    first = Consumer(ledger, bootstrap=broker.bootstrap, group="partial", topics=(topic,),
                     kafka_options=FAST, group_wait_s=60)
    async with running(first):
        await eventually(lambda: first.status.held == 2, 20, "the lone member held")
    assert count(ledger) == 0 and ledger.offsets("partial") == {}

    second = Consumer(ledger, bootstrap=broker.bootstrap, group="partial", topics=(topic,),
                      kafka_options=FAST, group_wait_s=2.0)
    async with running(second):
        await eventually(lambda: second.status.held == 2, 20, "the lone member held again")
        await eventually(lambda: count(ledger) == 2, 20, "the lone member, after the wait")
        assert second.status.held == 0
        # Its late partner is not held for the wait again: the group is already split.
        await produce(broker.bootstrap, topic, [env(data={"n": "late"})], partition=1,
                      headers=[group_header(1, 2, "g-lone")])
        await eventually(lambda: count(ledger) == 3, 1.8, "the late member, without a wait")
    txs = tx_of(ledger)
    assert txs["lone"] == txs["next"] < txs["late"]
    assert ledger.sql("SELECT count(DISTINCT id) AS n FROM log").to_pylist() == [{"n": 3}]


def test_a_malformed_group_header_holds_nothing_back() -> None:
    assert membership([("ledger-group", b"1/3 g")]) == ("g", 1, 3)
    for value in (b"3/3 g", b"0/1 g", b"1/3", b"1/3 ", b"a/3 g", b"\xff", b"-1/3 g", b"0/10001 g"):
        assert membership([("ledger-group", value)]) is None, value


async def test_held_records_are_stored_when_the_broker_loses_its_log(
    private_broker: Broker, ledger: Ledger
) -> None:
    """A memory broker restarted empty cannot give held records again: they are stored (with the
    rebalance or the new generation that follows), not dropped. (Found by review: they were lost.)"""
    topic, bs = "held-lost", private_broker.bootstrap
    await create_topics_async(bs, {topic: 2})
    consumer = Consumer(ledger, bootstrap=bs, group="hl", topics=(topic,), kafka_options=FAST,
                        group_wait_s=60)
    async with running(consumer):
        await produce(bs, topic, [env(data={"n": "lone"})], partition=0, headers=[group_header(0, 2, "g")])
        await produce(bs, topic, [env(data={"n": "next"})], partition=0)
        await eventually(lambda: consumer.status.held == 2, 20, "held")
        await restart_empty(private_broker, topic, 2)
        await produce(bs, topic, [env(data={"n": "after"})], partition=0)
        await eventually(lambda: count(ledger) == 3, 40, "every record")
    txs = tx_of(ledger)
    assert txs["lone"] == txs["next"] < txs["after"]
    assert ledger.verify().ok
