"""The bundled Tansu broker, exercised for real with aiokafka (no mocks)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ledger.broker import Broker, BrokerError, create_topics
from ledger.errors import LedgerError

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker() as b:
        yield b


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    # Idempotence stays off: Tansu rejects InitProducerId v0.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send(topic, value, key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _topics(bootstrap: str) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await consumer.stop()


async def _highwaters(bootstrap: str, topic: str, partitions: int) -> list[int | None]:
    # end_offsets() is unreliable on Tansu; highwater() is filled in by a fetch.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, fetch_max_wait_ms=5, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.getmany(timeout_ms=500)
        return [consumer.highwater(tp) for tp in tps]
    finally:
        await consumer.stop()


async def test_produce_then_consume_with_group(broker: Broker) -> None:
    create_topics(broker.bootstrap, {"roundtrip": 3})
    sent = [f"message-{i}".encode() for i in range(100)]
    await _produce(broker.bootstrap, "roundtrip", sent)

    consumer = AIOKafkaConsumer(
        "roundtrip",
        bootstrap_servers=broker.bootstrap,
        group_id="roundtrip-group",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    received: list[bytes] = []
    partitions: set[int] = set()
    try:
        # The group join alone takes ~6 s on Tansu, hence the generous deadline.
        deadline = time.monotonic() + 20
        while len(received) < len(sent) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for tp, records in batches.items():
                partitions.add(tp.partition)
                received.extend(r.value for r in records if r.value is not None)
        assert consumer.partitions_for_topic("roundtrip") == {0, 1, 2}
    finally:
        await consumer.stop()

    assert sorted(received) == sorted(sent)
    assert partitions == {0, 1, 2}  # keyed messages spread over all three


async def test_restart_keeps_port_and_drops_memory_storage(broker: Broker) -> None:
    bootstrap, old_pid = broker.bootstrap, broker.pid
    create_topics(bootstrap, {"volatile": 3})
    await _produce(bootstrap, "volatile", [b"x"] * 12)
    before = await _highwaters(bootstrap, "volatile", 3)
    assert sum(h or 0 for h in before) == 12

    broker.restart()

    assert broker.bootstrap == bootstrap
    assert broker.pid != old_pid
    assert broker.running
    # memory:// forgets everything: the topic is gone.  (Fetching from it would
    # auto-create it empty with 4 partitions, so check the topic list first.)
    assert "volatile" not in await _topics(bootstrap)
    assert await _highwaters(bootstrap, "volatile", 3) == [0, 0, 0]


async def test_restart_after_kill(broker: Broker) -> None:
    bootstrap = broker.bootstrap
    broker.kill()
    assert not broker.running
    broker.kill()  # idempotent
    broker.restart()
    assert broker.bootstrap == bootstrap
    create_topics(bootstrap, {"after-crash": 1})
    await _produce(bootstrap, "after-crash", [b"alive"])
    assert await _highwaters(bootstrap, "after-crash", 1) == [1]


async def test_two_brokers_run_side_by_side() -> None:
    with Broker() as first, Broker() as second:
        assert first.bootstrap != second.bootstrap
        assert first.pid != second.pid
        create_topics(first.bootstrap, {"only-on-first": 2})
        create_topics(second.bootstrap, {"only-on-second": 2})
        await _produce(first.bootstrap, "only-on-first", [b"a"] * 5)
        await _produce(second.bootstrap, "only-on-second", [b"b"] * 7)

        first_topics, second_topics = await asyncio.gather(
            _topics(first.bootstrap), _topics(second.bootstrap)
        )
        assert "only-on-first" in first_topics and "only-on-first" not in second_topics
        assert "only-on-second" in second_topics and "only-on-second" not in first_topics

        first.stop()
        assert not first.running and second.running
        assert sum(h or 0 for h in await _highwaters(second.bootstrap, "only-on-second", 2)) == 7


def test_stop_is_idempotent_and_creating_existing_topics_is_fine() -> None:
    broker = Broker().start()
    try:
        create_topics(broker.bootstrap, {"dup": 2})
        create_topics(broker.bootstrap, {"dup": 2, "fresh": 1})  # "dup" exists: tolerated
        assert {"dup", "fresh"} <= asyncio.run(_topics(broker.bootstrap))
    finally:
        broker.stop()
    broker.stop()
    assert not broker.running


def test_unusable_storage_fails_fast_with_broker_output() -> None:
    # This Tansu build has no SQLite engine; the error must say so, not time out.
    started = time.monotonic()
    with pytest.raises(BrokerError, match="FeatureNotEnabled") as info:
        Broker(storage="sqlite:///nonexistent/ledger.db").start()
    assert isinstance(info.value, LedgerError)
    assert time.monotonic() - started < 10


def test_pinned_busy_port_is_reported() -> None:
    with Broker() as holder:
        with pytest.raises(BrokerError, match="could not bind"):
            Broker(port=holder.port).start()
        assert holder.running


async def test_ledger_broker_takes_the_runners_options() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger", "broker", "--port", str(port), "--topic", "cli-made:2"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"127.0.0.1:{port}"  # printed once it is ready
        consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}")
        await consumer.start()
        try:
            assert "cli-made" in await consumer.topics()
            assert consumer.partitions_for_topic("cli-made") == {0, 1}
        finally:
            await consumer.stop()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        proc.stdout.close()
