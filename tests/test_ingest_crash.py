"""Exactly-once Kafka ingestion with real processes: `python -m ledger consume` is SIGKILLed at random
moments while it ingests and is restarted; a standby process takes over the same ledger when the
active one dies. At the end the ledger holds every Kafka record exactly once, per partition in
offset order, and its hash chain verifies."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ledger import Ledger
from ledger.broker import create_topics
from ledger.groups import group_header

if TYPE_CHECKING:
    from pathlib import Path

    from ledger.broker import Broker

pytestmark = pytest.mark.slow

PARTITIONS = 3
# Short group sessions: Tansu delays every join by half the session timeout, and a SIGKILLed
# member is only dropped when its session expires (10 s by default). Batches (transactions) of at
# most 2,000 records instead of 10,000, so a consumer commits several times before it is killed.
KAFKA_OPTIONS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500, "max_poll_records": 2000}
NS = uuid.UUID("0b5e3c52-8f1e-4c59-a7a4-7d1d6e0f9c11")
ASSIGNED = "Setting newly assigned partitions"


def envelope(i: int, kind: str) -> bytes:
    """A small Commander envelope; every other one carries its own id, the rest get a derived one."""
    env: dict[str, Any] = {"action": "deposit" if kind == "command" else "deposited",
                           "kind": kind, "data": {"i": i, "amount": i % 997, "id": f"acct-{i % 50}"}}
    if i % 2 == 0:
        env["id"] = str(uuid.uuid5(NS, f"{kind}-{i}"))
    return json.dumps(env).encode()


class Producer:
    """Produces `plan` [(topic, first, count)] (envelopes first..first+count-1) in chunks, from its
    own thread and event loop, paced so the stream keeps flowing while consumers are killed.
    `sent[(topic, partition)]` counts what was acknowledged."""

    def __init__(self, bootstrap: str, plan: list[tuple[str, int, int]], chunk: int, pause: float) -> None:
        self.bootstrap, self.plan, self.chunk, self.pause = bootstrap, plan, chunk, pause
        self.sent: collections.Counter[tuple[str, int]] = collections.Counter()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "producer did not finish"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as e:  # re-raised by join()
            self.error = e

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5,
                                    max_batch_size=256 * 1024, acks="all")
        await producer.start()
        try:
            for topic, first, count in self.plan:
                kind = "event" if topic.endswith("events") else "command"
                for start in range(first, first + count, self.chunk):
                    futures = []
                    for i in range(start, min(first + count, start + self.chunk)):
                        p = i % PARTITIONS
                        # Events come in groups of three, one on each partition (see ledger.groups).
                        grouped = kind == "event"
                        headers = [group_header(p, PARTITIONS, f"g{i // PARTITIONS}")] if grouped else None
                        futures.append((p, await producer.send(topic, envelope(i, kind), partition=p,
                                                               key=f"k{i}".encode(), headers=headers)))
                    for p, fut in futures:
                        await fut
                        self.sent[(topic, p)] += 1
                    await asyncio.sleep(self.pause)
        finally:
            await producer.stop()


class ConsumeProcess:
    """One `python -m ledger consume` child; stderr is kept and watched for the group assignment."""

    def __init__(self, data_dir: Path, bootstrap: str, group: str, topics: str, log: Path,
                 *, standby: bool = False) -> None:
        argv = [sys.executable, "-m", "ledger", "consume", "--data-dir", str(data_dir),
                "--bootstrap", bootstrap, "--group", group, "--topics", topics]
        if standby:
            argv.append("--standby")
        env = {**os.environ, "LEDGER_KAFKA_OPTIONS": json.dumps(KAFKA_OPTIONS)}
        self.log = log
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.assigned = threading.Event()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr, self.log.open("a") as out:
            for line in self.proc.stderr:
                out.write(line)
                self.lines.append(line)
                if ASSIGNED in line:
                    self.assigned.set()

    def tail(self) -> str:
        return "".join(list(self.lines)[-40:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.reader.join(5)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"consumer ignored SIGTERM:\n{self.tail()}") from None
        self.reader.join(5)
        return code


async def _committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    # The consumer commits to Kafka after each ledger commit (advisory): a cheap progress signal
    # that needs no access to the ledger the child holds locked.
    kafka = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await kafka.start()
    try:
        return {tp: (await kafka.committed(tp)) or 0 for tp in tps}
    finally:
        await kafka.stop()


def wait_caught_up(proc: ConsumeProcess, data_dir: Path, bootstrap: str, group: str,
                   sent: collections.Counter[tuple[str, int]], timeout: float) -> None:
    tps = [TopicPartition(t, p) for t, p in sent]
    deadline = time.monotonic() + timeout
    committed: dict[TopicPartition, int] = {}
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, f"consumer exited ({proc.proc.returncode}):\n{proc.tail()}"
        committed = asyncio.run(_committed(bootstrap, group, tps))
        if all(committed[tp] >= sent[(tp.topic, tp.partition)] for tp in tps):
            return
        time.sleep(0.3)
    tail = proc.tail()
    proc.kill()
    with Ledger.open(data_dir, read_only=True) as lg:
        stored = {k: m.next_offset for k, m in lg.offsets(group).items()}
    raise AssertionError(f"consumer did not catch up: committed to Kafka {committed}, stored in the "
                         f"ledger {stored}, sent {dict(sent)}\n{tail}")


def check_prefix(data_dir: Path, group: str) -> int:
    """Between runs (no writer): what the ledger holds is, per partition, offsets 0..k-1 exactly
    once, and the stored offsets say k. Returns the number of records."""
    if not (data_dir / "ledger.duckdb").exists():
        return 0
    with Ledger.open(data_dir, read_only=True) as lg:
        marks = lg.offsets(group)
        rows = lg.sql(
            "SELECT kafka_topic AS t, kafka_partition AS p, count(*) AS n, "
            "count(DISTINCT kafka_offset) AS offsets, count(DISTINCT id) AS ids, "
            "min(kafka_offset) AS lo, max(kafka_offset) AS hi FROM log GROUP BY ALL"
        ).to_pylist()
    for r in rows:
        n = r["n"]
        assert (r["offsets"], r["ids"], r["lo"], r["hi"]) == (n, n, 0, n - 1), r
        assert marks[(r["t"], r["p"])].next_offset == n, (r, marks)
    return sum(r["n"] for r in rows)


def assert_exactly_once(data_dir: Path, sent: collections.Counter[tuple[str, int]],
                        counts: dict[str, int]) -> None:
    """Every produced record once, per partition offsets 0..n-1 in (tx, seq) order, chain ok."""
    total = sum(sent.values())
    assert total == sum(counts.values())
    with Ledger.open(data_dir, read_only=True) as lg:
        assert lg.complete
        row = lg.sql("SELECT count(*) AS n, count(DISTINCT id) AS ids FROM log").to_pylist()[0]
        assert row == {"n": total, "ids": total}
        per_partition = {
            (r["kafka_topic"], r["kafka_partition"]): r["offsets"]
            for r in lg.sql(
                "SELECT kafka_topic, kafka_partition, list(kafka_offset ORDER BY tx, seq) AS offsets "
                "FROM log GROUP BY ALL"
            ).to_pylist()
        }
        assert set(per_partition) == set(sent)
        for tp, offsets in per_partition.items():
            assert offsets == list(range(sent[tp])), f"{tp}: not exactly offsets 0..{sent[tp] - 1} in order"
        # The payloads themselves: each produced i once per topic, with the producer's own ids kept.
        for r in lg.sql(
            "SELECT kafka_topic AS topic, count(DISTINCT data->>'i') AS distinct_i, count(*) AS n "
            "FROM log GROUP BY ALL"
        ).to_pylist():
            assert r["distinct_i"] == r["n"] == counts[r["topic"]], r
        explicit = {str(uuid.uuid5(NS, f"{'event' if t.endswith('events') else 'command'}-{i}"))
                    for t, c in counts.items() for i in range(0, c, 2)}
        stored = {r["id"] for r in lg.sql("SELECT id FROM log").to_pylist()}
        assert explicit <= stored
        kinds = {r["kafka_topic"]: r["kinds"] for r in lg.sql(
            "SELECT kafka_topic, list(DISTINCT kind) AS kinds FROM log GROUP BY ALL").to_pylist()}
        assert {t: ["event" if t.endswith("events") else "command"] for t in counts} == kinds
        assert lg.sql("SELECT count(*) AS q FROM quarantine").to_pylist() == [{"q": 0}]
        groups = lg.sql(f"SELECT CAST(data->>'i' AS INTEGER) // {PARTITIONS} AS g, count(DISTINCT tx) AS txs "
                        "FROM events GROUP BY ALL").to_pylist()
        assert len(groups) * PARTITIONS == sum(n for t, n in counts.items() if t.endswith("events"))
        assert [r for r in groups if r["txs"] != 1] == [], "a group's events are in one transaction"
        report = lg.verify()
        assert report.ok, report
        assert report.checked == lg.head.tx


def test_sigkill_at_random_moments_exactly_once(broker: Broker, tmp_path: Path) -> None:
    """100,000 commands over 3 partitions (and some events); the consumer process is SIGKILLed at
    random moments at least 10 times while records stream in, and restarted each time."""
    seed = int(os.environ.get("LEDGER_TEST_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print(f"seed {seed} (LEDGER_TEST_SEED={seed} replays the kill schedule)")
    commands, events, group = "crash-commands", "crash-events", "crash"
    create_topics(broker.bootstrap, {commands: PARTITIONS, events: PARTITIONS})
    counts = {commands: 100_000, events: 600}
    # ~40 s of traffic at ~2,500 records/s: the consumer, when it runs, keeps up in small batches.
    producer = Producer(broker.bootstrap, [(events, 0, 300), (commands, 0, 100_000), (events, 300, 300)],
                        chunk=1_000, pause=0.35).start()
    data_dir, log = tmp_path / "ledger", tmp_path / "consume.log"
    progress = [0]  # records in the ledger after each kill
    kills_while_consuming = 0
    started = time.monotonic()
    while kills_while_consuming < 10 or producer.thread.is_alive():
        proc = ConsumeProcess(data_dir, broker.bootstrap, group, f"{commands},{events}", log)
        if rnd.random() < 0.15:
            time.sleep(rnd.uniform(0.0, 1.5))  # sometimes mid-startup or mid-join
        else:
            assert proc.assigned.wait(30), f"no partition assignment:\n{proc.tail()}"
            time.sleep(rnd.uniform(0.2, 2.5))
        assert proc.proc.poll() is None, f"consumer died by itself:\n{proc.tail()}"
        consuming = proc.assigned.is_set()
        proc.kill()
        kills_while_consuming += consuming
        progress.append(check_prefix(data_dir, group))
        assert time.monotonic() - started < 120, "kill phase took too long"
    elapsed = time.monotonic() - started
    print(f"{len(progress) - 1} kills ({kills_while_consuming} after assignment) in {elapsed:.1f} s; "
          f"records in the ledger after each: {progress[1:]}")
    # The kills really interrupted ingestion: most runs committed something before they died.
    assert sum(b > a for a, b in itertools.pairwise(progress)) >= 6, progress
    producer.join(30)
    assert sum(producer.sent.values()) == sum(counts.values())

    final = ConsumeProcess(data_dir, broker.bootstrap, group, f"{commands},{events}", log)
    assert final.assigned.wait(30), final.tail()  # (and its SIGTERM handler is installed)
    wait_caught_up(final, data_dir, broker.bootstrap, group, producer.sent, timeout=60)
    assert final.terminate() == 0, final.tail()
    assert_exactly_once(data_dir, producer.sent, counts)


def test_standby_takes_over_when_the_active_consumer_dies(broker: Broker, tmp_path: Path) -> None:
    """Two consumers in one group on one ledger: the second (--standby) starts mid-stream and waits
    for the ledger; the first is SIGKILLed; the second takes the ledger and the partitions over."""
    commands, events, group = "failover-commands", "failover-events", "failover"
    create_topics(broker.bootstrap, {commands: PARTITIONS, events: PARTITIONS})
    counts = {commands: 30_000, events: 300}
    producer = Producer(broker.bootstrap, [(commands, 0, 30_000), (events, 0, 300)],
                        chunk=1_000, pause=0.2).start()
    data_dir, topics = tmp_path / "ledger", f"{commands},{events}"
    first = ConsumeProcess(data_dir, broker.bootstrap, group, topics, tmp_path / "first.log")
    assert first.assigned.wait(30), first.tail()
    time.sleep(1.0)
    second = ConsumeProcess(data_dir, broker.bootstrap, group, topics, tmp_path / "second.log",
                            standby=True)
    deadline = time.monotonic() + 20
    while not any("standby" in line for line in second.lines):
        assert time.monotonic() < deadline and second.proc.poll() is None, second.tail()
        time.sleep(0.05)
    time.sleep(0.7)
    assert producer.thread.is_alive(), "the stream ended before the failover; slow the producer"
    first.kill()
    assert second.assigned.wait(30), second.tail()
    producer.join(60)
    wait_caught_up(second, data_dir, broker.bootstrap, group, producer.sent, timeout=60)
    assert second.terminate() == 0, second.tail()
    assert_exactly_once(data_dir, producer.sent, counts)
