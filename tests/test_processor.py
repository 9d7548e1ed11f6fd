"""The command-processor toolkit against a real Tansu broker: events carry their parent and
deterministic ids, offsets are committed after the events, state is rebuilt from the events, and a
redelivered or half-produced command never has a double effect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ledger.broker import Broker, create_topics_async
from ledger.processor import BATCH_HEADER, Command, Event, Processor, command_envelope, event_id

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from aiokafka.structs import ConsumerRecord

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def kafka() -> Iterator[Broker]:
    with Broker() as b:
        yield b


# ---------------------------------------------------------------------------------------- helpers
async def fresh_topics(bootstrap: str, commands: int = 1, events: int = 4) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    names = (f"commands-{tag}", f"events-{tag}")
    await create_topics_async(bootstrap, {names[0]: commands, names[1]: events})
    return names


async def send(bootstrap: str, topic: str, values: list[bytes], key: bytes | None = b"k") -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    await producer.start()
    try:
        for v in values:
            await producer.send(topic, v, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every message in ``topic`` up to the current highwater of each partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        remaining = set(tps)
        while remaining:
            for msgs in (await consumer.getmany(timeout_ms=100)).values():
                out.extend(msgs)
            for tp in list(remaining):
                hw = consumer.highwater(tp)
                if hw is not None and await consumer.position(tp) >= hw:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


def envelopes(msgs: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(m.value) for m in msgs]


async def run_until(processor: Processor[Any], done: Callable[[], bool], timeout: float = 20) -> None:
    """Run ``processor`` until ``done()`` holds, then stop it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if task.done():
                task.result()  # surface the processor's exception
                raise AssertionError("processor stopped by itself")
            assert time.monotonic() < deadline, f"timed out; status {processor.status.as_dict()}"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def counter(bootstrap: str, commands: str, events: str, **kw: Any) -> Processor[dict[str, Any]]:
    """A stateful processor: `add {counter, n}` -> `added {id: counter, n, total}`."""
    p = Processor(bootstrap=bootstrap, group=kw.pop("group", "counter"), name="counter",
                  commands_topic=commands, events_topic=events, join_group=kw.pop("join_group", False),
                  **kw)

    @p.handler("add")
    def add(command: Command, totals: dict[str, Any]) -> list[Event]:
        name, n = command.data["counter"], command.data["n"]
        return [Event("added", {"id": name, "n": n, "total": totals.get(name, 0) + n})]

    @p.on_event("added")
    def added(event: Event, totals: dict[str, Any]) -> None:
        totals[event.data["id"]] = event.data["total"]

    return p


# ------------------------------------------------------------------------------------------ tests
async def test_events_have_parent_deterministic_ids_and_entity_keys(kafka: Broker) -> None:
    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs, commands=2)
    p = Processor(bootstrap=bs, group=f"g-{uuid.uuid4().hex[:6]}", name="greeter",
                  commands_topic=commands, events_topic=events)  # joins the group for real
    seen_async: list[str] = []

    @p.handler("greet")
    def greet(command: Command, state: dict[str, Any]) -> list[Event]:
        return [Event("greeted", {"id": command.data["who"], "by": command.user}),
                Event("greeting-logged", {"text": f"hello {command.data['who']}"})]

    @p.handler("*")
    async def other(command: Command, state: dict[str, Any]) -> list[Event]:
        seen_async.append(command.action)
        return [] if command.action == "ignore-me" else [Event("noted", {"id": 7})]

    ids = [str(uuid.uuid4()) for _ in range(3)]
    await send(bs, commands, [
        command_envelope("greet", {"who": "ada"}, command_id=ids[0], user="u1"),
        b"not json",
        json.dumps({"action": "greet", "data": {}}).encode(),  # no id: malformed, skipped
        command_envelope("ignore-me", {}, command_id=ids[1]),
        command_envelope("something", {}, command_id=ids[2]),
    ])
    await send(bs, commands, [b"[1, 2]"], key=b"other-partition")
    await run_until(p, lambda: p.status.commands == 3)
    assert p.status.malformed == 3 and p.status.failed == 0
    assert seen_async == ["ignore-me", "something"]

    msgs = await read_all(bs, events)
    by_id = {json.loads(m.value)["id"]: m for m in msgs}
    expected = {event_id(ids[0], 0, processor="greeter"), event_id(ids[0], 1, processor="greeter"),
                event_id(ids[2], 0, processor="greeter")}
    assert set(by_id) == expected and len(msgs) == 3
    first = by_id[event_id(ids[0], 0, processor="greeter")]
    env = json.loads(first.value)
    assert env["action"] == "greeted" and env["parent"] == ids[0] and env["data"] == {"id": "ada", "by": "u1"}
    assert env["system"] == "greeter" and env["user"] == "u1" and env["timestamp"].endswith("Z")
    assert first.key == b"ada"  # the entity id
    second = by_id[event_id(ids[0], 1, processor="greeter")]
    assert second.key == ids[0].encode()  # no entity id: the command id
    # Both events of the two-event command carry the whole batch, for crash recovery.
    for m in (first, second):
        batch = json.loads(dict(m.headers)[BATCH_HEADER])
        assert [e["action"] for e in batch["events"]] == ["greeted", "greeting-logged"]
    assert BATCH_HEADER not in dict(by_id[event_id(ids[2], 0, processor="greeter")].headers)
    assert json.loads(by_id[event_id(ids[2], 0, processor="greeter")].key) == 7  # int entity id

    # Every command offset was committed once its events were acknowledged.
    per_partition = [0, 0]
    for m in await read_all(bs, commands):
        per_partition[m.partition] += 1
    consumer = AIOKafkaConsumer(bootstrap_servers=bs, group_id=p.group, enable_auto_commit=False)
    await consumer.start()
    try:
        committed = [await consumer.committed(TopicPartition(commands, i)) or 0 for i in range(2)]
    finally:
        await consumer.stop()
    assert committed == per_partition and sum(committed) == 6


async def test_state_is_folded_live_and_rebuilt_after_restart(kafka: Broker) -> None:
    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs)
    await send(bs, commands, [command_envelope("add", {"counter": "c", "n": i}) for i in range(1, 51)])
    p = counter(bs, commands, events)
    await run_until(p, lambda: p.status.commands == 50)
    # Consecutive commands of one fetched batch saw each other's effects.
    totals = [e["data"]["total"] for e in envelopes(await read_all(bs, events))]
    assert totals == [sum(range(1, i + 1)) for i in range(1, 51)]

    # A new instance rebuilds the state from the events alone and carries on from there.
    await send(bs, commands, [command_envelope("add", {"counter": "c", "n": 1000})])
    q = counter(bs, commands, events)
    await run_until(q, lambda: q.status.commands == 1)
    assert q.status.replayed == 50 and q.status.redelivered == 0
    assert q.state == {"c": 1275 + 1000}
    assert envelopes(await read_all(bs, events))[-1]["data"]["total"] == 2275


async def test_redelivery_has_no_double_effect_and_reproduces_the_same_ids(kafka: Broker) -> None:
    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs, commands=3)
    cmds = [command_envelope("add", {"counter": f"c{i % 4}", "n": i}) for i in range(1, 41)]
    await send(bs, commands, cmds, key=None)
    p = counter(bs, commands, events, group="first")
    await run_until(p, lambda: p.status.commands == 40)
    first = envelopes(await read_all(bs, events))
    assert len(first) == 40

    # A group with no committed offsets sees every command again (as after a crash before the
    # commit): replay knows they all have events, so none is handled twice.
    q = counter(bs, commands, events, group="second")
    await run_until(q, lambda: q.status.redelivered == 40)
    assert q.status.commands == 0 and q.state == p.state
    assert len(await read_all(bs, events)) == 40

    # Without replay the handlers do run again: the event ids come out the same, so the ledger
    # deduplicates them (the totals differ, which is why replay skips them in the first place).
    r = counter(bs, commands, events, group="third", replay=False)
    await run_until(r, lambda: r.status.commands == 40)
    log = envelopes(await read_all(bs, events))
    assert len(log) == 80
    assert Counter(e["id"] for e in log) == {e["id"]: 2 for e in first}
    assert {(e["id"], e["parent"]) for e in log} == {(e["id"], e["parent"]) for e in first}


async def test_a_half_produced_command_is_completed_with_its_original_events(kafka: Broker) -> None:
    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs)
    cid = str(uuid.uuid4())
    batch = [Event("split", {"id": cid, "n": 3}),
             Event("added", {"id": "a", "n": 1, "total": 1}),
             Event("added", {"id": "b", "n": 2, "total": 2})]
    header = json.dumps({"user": "u", "timestamp": "2024-01-01T00:00:00Z",
                         "events": [{"action": e.action, "data": e.data} for e in batch]})
    # The crash left only the last event of the three in the log.
    producer = AIOKafkaProducer(bootstrap_servers=bs, acks="all")
    await producer.start()
    try:
        env = {"id": event_id(cid, 2, processor="counter"), "action": "added", "data": batch[2].data,
               "parent": cid, "system": "counter", "timestamp": "2024-01-01T00:00:00Z"}
        await producer.send_and_wait(events, json.dumps(env).encode(), key=b"b",
                                     headers=[(BATCH_HEADER, header.encode())])
    finally:
        await producer.stop()
    await send(bs, commands, [command_envelope("split", {}, command_id=cid),
                              command_envelope("add", {"counter": "a", "n": 10})])
    p = counter(bs, commands, events)

    @p.handler("split")
    def split(command: Command, state: dict[str, Any]) -> list[Event]:
        raise AssertionError("a command that already has events must not be handled again")

    await run_until(p, lambda: p.status.commands == 1)
    assert p.status.recovered == 2 and p.status.redelivered == 1 and p.status.failed == 0
    log = envelopes(await read_all(bs, events))
    mine = sorted((e for e in log if e["parent"] == cid), key=lambda e: e["id"])
    assert len(mine) == 3 and len({e["id"] for e in mine}) == 3
    assert {e["id"]: (e["action"], e["data"]) for e in mine} == {
        event_id(cid, i, processor="counter"): (e.action, e.data) for i, e in enumerate(batch)
    }
    assert all(e.get("user") == "u" for e in mine if e["id"] != env["id"])
    assert {e["timestamp"] for e in mine} == {"2024-01-01T00:00:00Z"}  # the original valid time
    # The recovered events were folded before the next command: a = 1 + 10.
    assert p.state == {"a": 11, "b": 2}


async def test_bad_handlers_and_bad_events_do_not_stop_the_processor(kafka: Broker) -> None:
    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs)
    # A foreign event with the right action but the wrong shape: its fold fails and is logged.
    await send(bs, events, [json.dumps({"id": "x", "action": "added", "data": {}}).encode(), b"\xff"])
    producer = AIOKafkaProducer(bootstrap_servers=bs, acks="all")
    await producer.start()
    try:  # claims to be ours, with a batch header that is not one: ignored, not fatal
        env = {"id": "y", "action": "noise", "data": {}, "parent": "p", "system": "counter"}
        await producer.send_and_wait(events, json.dumps(env).encode(), headers=[(BATCH_HEADER, b"{")])
    finally:
        await producer.stop()
    p = counter(bs, commands, events)

    @p.handler("boom")
    def boom(command: Command, state: dict[str, Any]) -> list[Event]:
        raise RuntimeError("handler bug")

    @p.handler("not-events")
    def not_events(command: Command, state: dict[str, Any]) -> list[Event]:
        return [{"action": "x", "data": {}}]  # type: ignore[list-item]

    @p.handler("not-json")
    def not_json(command: Command, state: dict[str, Any]) -> list[Event]:
        return [Event("ok", {"id": "fine"}), Event("bad", {"value": {1, 2}})]

    # What the ledger would quarantine, and an event no broker takes (found by audit): each
    # used to be produced anyway, or to stop the processor on every redelivery.
    @p.handler("unstorable")
    def unstorable(command: Command, state: dict[str, Any]) -> list[Event]:
        kind = command.data["kind"]
        data = {"nan": {"x": float("nan")}, "surrogate": {"x": "\ud800"}, "huge": {"x": "x" * (1100 * 1024)}}
        return [Event(None, {"x": 1}) if kind == "no-action" else Event("ok", data[kind])]  # type: ignore[arg-type]

    bad = ["boom", "not-events", "not-json"]
    kinds = ["nan", "surrogate", "huge", "no-action"]
    await send(bs, commands, [command_envelope(a, {}) for a in bad]
               + [command_envelope("unstorable", {"kind": k}) for k in kinds]
               + [command_envelope("add", {"counter": "c", "n": 5})])
    await run_until(p, lambda: p.status.commands == 1)
    assert p.status.failed == len(bad) + len(kinds) and p.status.fold_errors == 1
    # Nothing of a failed command reached the log, not even the encodable first event.
    log = [m.value for m in await read_all(bs, events) if m.value != b"\xff"]
    assert sorted(json.loads(v)["action"] for v in log) == ["added", "added", "noise"]
    assert p.state == {"c": 5}


async def test_seed_events_fold_once_and_mark_their_commands_done(kafka: Broker) -> None:
    # For a broker that lost its log (memory storage restarted) while the ledger kept it all.
    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs)
    old = str(uuid.uuid4())
    in_both = Event("added", {"id": "a", "n": 1, "total": 1}, id=str(uuid.uuid4()))
    await send(bs, events, [json.dumps({"id": in_both.id, "action": "added", "data": in_both.data}).encode()])
    seed = [in_both, Event("added", {"id": "b", "n": 5, "total": 5}, id=event_id(old, 0, processor="counter"),
                           parent=old, system="counter")]
    await send(bs, commands, [command_envelope("add", {"counter": "b", "n": 5}, command_id=old),
                              command_envelope("add", {"counter": "b", "n": 1})])
    p = counter(bs, commands, events)
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop, seed=seed))
    try:
        async with asyncio.timeout(20):
            while p.status.commands < 1:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    assert p.status.replayed == 2 and p.status.redelivered == 1
    assert p.state == {"a": 1, "b": 6}


async def test_connection_settings_reach_the_processors_kafka_clients(kafka: Broker,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SASL settings (given, or from $LEDGER_KAFKA_OPTIONS like `ledger consume`) are used: this
    broker offers no PLAIN mechanism, so the processor cannot connect; without them it runs.
    Settings that are not about reaching Kafka are refused up front."""
    from aiokafka.errors import KafkaConnectionError

    from examples.bank import build

    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "u", "sasl_plain_password": "p"}
    commands, events = await fresh_topics(kafka.bootstrap)
    proc = Processor(bootstrap=kafka.bootstrap, group="sasl", commands_topic=commands,
                     events_topic=events, kafka_options=sasl)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(proc.run(), 20)
    monkeypatch.setenv("LEDGER_KAFKA_OPTIONS", json.dumps({**sasl, "max_poll_records": 10}))
    bank = build(kafka.bootstrap, commands_topic=commands, events_topic=events)
    assert bank.kafka_options == sasl  # the consumer-only setting stays with `ledger consume`
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(bank.run(), 20)
    with pytest.raises(ValueError, match="max_poll_records"):
        Processor(bootstrap=kafka.bootstrap, group="g", kafka_options={"max_poll_records": 10})
    monkeypatch.delenv("LEDGER_KAFKA_OPTIONS")
    stop = asyncio.Event()
    bank = build(kafka.bootstrap, commands_topic=commands, events_topic=events)
    task = asyncio.create_task(bank.run(stop))
    await asyncio.wait_for(bank.ready.wait(), 30)
    stop.set()
    await task


async def test_a_record_aiokafka_cannot_parse_is_skipped_not_a_stall(kafka: Broker) -> None:
    """A header name that is not UTF-8 made getmany() raise on every fetch: the processor failed
    for ever at that command (or, in replay, at that event). Now it is skipped as malformed (the
    ledger quarantines it), and the commands and events around it are handled."""
    from tests.test_consumer import produce_bad_header_names

    bs = kafka.bootstrap
    commands, events = await fresh_topics(bs)
    add = [command_envelope("add", {"counter": "c", "n": n}) for n in (1, 2, 100, 3, 4)]
    await send(bs, commands, add[:1])
    await asyncio.to_thread(produce_bad_header_names, bs, commands, add[1:4], [1])  # n=100 is bad
    await send(bs, commands, add[4:])
    p = counter(bs, commands, events)
    await run_until(p, lambda: p.status.commands == 4)
    assert p.status.malformed == 1 and p.state == {"c": 10}
    assert [e["data"]["total"] for e in envelopes(await read_all(bs, events))] == [1, 3, 6, 10]

    forged = json.dumps({"id": str(uuid.uuid4()), "action": "added",
                         "data": {"id": "c", "n": 1, "total": 999}})
    await asyncio.to_thread(produce_bad_header_names, bs, events, [forged.encode()], [0])
    await send(bs, commands, [command_envelope("add", {"counter": "c", "n": 5})])
    q = counter(bs, commands, events)
    await run_until(q, lambda: q.status.commands == 1)
    assert q.status.replayed == 4 and q.status.malformed == 1 and q.state == {"c": 15}
