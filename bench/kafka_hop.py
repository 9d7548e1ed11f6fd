"""What one Kafka hop costs on the bundled Tansu broker.

Two numbers matter for sizing the ledger's ingest path:

* latency: produce one message, wait until a consumer sees it (p50/p99), with the
  consumer polling at fetch_max_wait_ms=5;
* throughput: how fast a consumer can pull and discard 200,000 ~300-byte records
  spread over 3 partitions (getmany with a large max_records).

Runs a fresh memory:// broker per run.  Usage:

    python bench/kafka_hop.py [--latency-n 2000] [--records 200000] [--size 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ledger.broker import Broker, create_topics


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def latency(bootstrap: str, n: int, warmup: int, fetch_max_wait_ms: int) -> None:
    # A fresh topic per run, or the consumer would replay an earlier run's records.
    topic = f"hop-latency-{fetch_max_wait_ms}"
    create_topics(bootstrap, {topic: 1})
    tp = TopicPartition(topic, 0)
    # acks=1 and linger 0: the message leaves as soon as send() is called.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    # Manual assignment, not a group: a group join costs ~6 s on Tansu and is
    # irrelevant to the steady-state hop.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        fetch_max_wait_ms=fetch_max_wait_ms,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([tp])
        hop: list[float] = []
        ack: list[float] = []
        payload = os.urandom(300)
        for i in range(warmup + n):
            t0 = time.perf_counter()
            delivered = await producer.send(topic, payload, partition=0)
            # getone() returns as soon as the next fetch brings the record back.
            record = await consumer.getone()
            t1 = time.perf_counter()
            await delivered
            assert record.value == payload
            if i >= warmup:
                hop.append((t1 - t0) * 1e3)
            # Separately: the producer's own round trip (send_and_wait, acks=1).
            t3 = time.perf_counter()
            await producer.send_and_wait(topic, payload, partition=0)
            t4 = time.perf_counter()
            await consumer.getone()  # keep the consumer in step
            if i >= warmup:
                ack.append((t4 - t3) * 1e3)
        _report(f"hop      fetch_max_wait_ms={fetch_max_wait_ms}", hop)
        _report(f"ack      fetch_max_wait_ms={fetch_max_wait_ms}", ack)
    finally:
        await consumer.stop()
        await producer.stop()


def _report(label: str, samples: list[float]) -> None:
    samples = sorted(samples)
    print(
        f"{label}: n={len(samples)} "
        f"p50={_pct(samples, 0.50):.2f} ms  p90={_pct(samples, 0.90):.2f} ms  "
        f"p99={_pct(samples, 0.99):.2f} ms  max={samples[-1]:.2f} ms  "
        f"mean={statistics.fmean(samples):.2f} ms"
    )


async def produce_bulk(bootstrap: str, topic: str, records: int, size: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=5,
        max_batch_size=1024 * 1024,
        acks=1,
    )
    await producer.start()
    payload = os.urandom(size)
    t0 = time.perf_counter()
    try:
        pending = []
        for i in range(records):
            pending.append(await producer.send(topic, payload, partition=i % 3))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    dt = time.perf_counter() - t0
    print(f"produce  {records} x {size} B: {dt:.2f} s = {records / dt:,.0f} rec/s")


async def consume_bulk(
    bootstrap: str, topic: str, records: int, size: int, max_partition_fetch_bytes: int
) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        fetch_max_wait_ms=5,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(3)])
        seen = 0
        t0 = time.perf_counter()
        while seen < records:
            batches = await consumer.getmany(timeout_ms=1000, max_records=100_000)
            seen += sum(len(batch) for batch in batches.values())
        dt = time.perf_counter() - t0
    finally:
        await consumer.stop()
    print(
        f"consume  max_partition_fetch_bytes={max_partition_fetch_bytes >> 10} KiB: "
        f"{seen} rec in {dt:.2f} s = {seen / dt:,.0f} rec/s, {seen * size / dt / 1e6:.1f} MB/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=300)
    args = parser.parse_args()

    with Broker() as broker:
        await latency(broker.bootstrap, args.latency_n, warmup=100, fetch_max_wait_ms=5)
        # Does the broker answer a waiting fetch as soon as data arrives?
        await latency(broker.bootstrap, args.latency_n // 10, warmup=10, fetch_max_wait_ms=100)

    with Broker() as broker:
        topic = "hop-throughput"
        create_topics(broker.bootstrap, {topic: 3})
        await produce_bulk(broker.bootstrap, topic, args.records, args.size)
        for fetch_bytes in (1024 * 1024, 8 * 1024 * 1024):
            await consume_bulk(broker.bootstrap, topic, args.records, args.size, fetch_bytes)


if __name__ == "__main__":
    asyncio.run(main())
