"""What one Kafka hop costs on the bundled Tansu broker.

Numbers that matter for sizing the ledger's ingest path:

* hop latency: produce one message, wait until a consumer sees it (p50/p99),
  with the consumer polling at fetch_max_wait_ms=5 (and, for comparison, at
  larger waits); plus the producer's own acks=1 round trip;
* throughput: how fast a consumer pulls and discards 200,000 ~300-byte records
  spread over 3 partitions (getmany with a large max_records);
* fetch cost vs. partition length: Tansu's memory store gets slower to fetch
  from as a partition accumulates batches.  When one fetch takes longer than the
  consumer's fetch_max_wait_ms, Tansu answers with an empty record set and a
  highwater beyond the consumer's position, every time: the consumer livelocks.
  Measured stall points (single-record batches in one partition): wait=5 ms
  stalls by 10,000, wait=20 by 40,000, wait=100 by 80,000; wait=500 still
  worked at 80,000 (320 ms per fetch).  Each latency run therefore uses a fresh
  broker and guards getone() with a timeout; the last section reproduces this.

Usage:

    python bench/kafka_hop.py [--latency-n 1000] [--waits 5,20,100,500]
                              [--records 200000] [--size 300]
                              [--scaling 5000,10000,20000,40000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ledger.broker import Broker, create_topics_async

STALL_SECONDS = 5.0


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _report(label: str, samples: list[float]) -> None:
    samples = sorted(samples)
    print(
        f"{label}: n={len(samples)}  p50={_pct(samples, 0.50):.2f} ms  "
        f"p90={_pct(samples, 0.90):.2f} ms  p99={_pct(samples, 0.99):.2f} ms  "
        f"max={samples[-1]:.2f} ms  mean={statistics.fmean(samples):.2f} ms",
        flush=True,
    )


async def latency(n: int, warmup: int, fetch_max_wait_ms: int, size: int) -> None:
    """Produce→consume hop and producer ack latency on a fresh broker and topic."""
    with Broker() as broker:
        bootstrap, topic = broker.bootstrap, "hop-latency"
        await create_topics_async(bootstrap, {topic: 1})
        tp = TopicPartition(topic, 0)
        # acks=1, linger 0: the message leaves as soon as send() is called.
        # (No idempotence: Tansu rejects InitProducerId v0.)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        # Manual assignment, not a group: a group join costs ~6 s on Tansu and
        # says nothing about the steady-state hop.
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
            payload = os.urandom(size)

            async def next_record() -> None:
                try:
                    await asyncio.wait_for(consumer.getone(), STALL_SECONDS)
                except TimeoutError:
                    raise SystemExit(
                        f"consumer stalled at offset {await consumer.position(tp)} "
                        f"(highwater {consumer.highwater(tp)}): Tansu fetch slower than "
                        f"fetch_max_wait_ms={fetch_max_wait_ms}"
                    ) from None

            hop: list[float] = []
            for i in range(warmup + n):
                t0 = time.perf_counter()
                delivered = await producer.send(topic, payload, partition=0)
                await next_record()
                t1 = time.perf_counter()
                await delivered
                if i >= warmup:
                    hop.append((t1 - t0) * 1e3)
            ack: list[float] = []
            for i in range(warmup + n):
                t0 = time.perf_counter()
                await producer.send_and_wait(topic, payload, partition=0)
                if i >= warmup:
                    ack.append((time.perf_counter() - t0) * 1e3)
        finally:
            await consumer.stop()
            await producer.stop()
    _report(f"hop  fetch_max_wait_ms={fetch_max_wait_ms:<4}", hop)
    _report("ack  (producer acks=1)     ", ack)


async def throughput(records: int, size: int) -> None:
    """Bulk-produce ``records`` over 3 partitions, then consume-and-discard them."""
    with Broker() as broker:
        bootstrap, topic = broker.bootstrap, "hop-throughput"
        await create_topics_async(bootstrap, {topic: 3})
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1024 * 1024, acks=1
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
        print(f"produce  {records} x {size} B: {dt:.2f} s = {records / dt:,.0f} rec/s", flush=True)

        for fetch_bytes in (1024 * 1024, 8 * 1024 * 1024):
            consumer = AIOKafkaConsumer(
                bootstrap_servers=bootstrap,
                fetch_max_wait_ms=5,
                fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=fetch_bytes,
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
                f"consume  max_partition_fetch_bytes={fetch_bytes >> 10} KiB: {seen} rec in "
                f"{dt:.2f} s = {seen / dt:,.0f} rec/s, {seen * size / dt / 1e6:.1f} MB/s",
                flush=True,
            )


async def _tail_fetch(bootstrap: str, tp: TopicPartition, offset: int, fetch_max_wait_ms: int) -> str:
    """How long a fresh consumer takes to get the record at ``offset``, or STALL."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        fetch_max_wait_ms=fetch_max_wait_ms,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(consumer.getone(), STALL_SECONDS)
        except TimeoutError:
            return "STALL"
        return f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
    finally:
        await consumer.stop()


async def scaling(points: list[int], waits: list[int], size: int) -> None:
    """Tail-fetch time per fetch_max_wait_ms as a partition grows by single-record batches."""
    with Broker() as broker:
        bootstrap, topic = broker.bootstrap, "hop-scaling"
        await create_topics_async(bootstrap, {topic: 1})
        tp = TopicPartition(topic, 0)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        await producer.start()
        payload = os.urandom(size)
        written = 0
        try:
            for target in points:
                while written < target:
                    await producer.send_and_wait(topic, payload, partition=0)
                    written += 1
                cells = [f"wait={w}: {await _tail_fetch(bootstrap, tp, written - 1, w)}" for w in waits]
                print(f"tail fetch, {written:>6}-batch partition: " + ", ".join(cells), flush=True)
        finally:
            await producer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-n", type=int, default=1000)
    parser.add_argument("--waits", default="5,20,100,500")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--scaling", default="5000,10000,20000,40000")
    args = parser.parse_args()

    waits = [int(w) for w in args.waits.split(",") if w]
    for wait in waits:
        await latency(args.latency_n, warmup=50, fetch_max_wait_ms=wait, size=args.size)
    await throughput(args.records, args.size)
    if args.scaling:
        await scaling([int(p) for p in args.scaling.split(",")], waits, args.size)


if __name__ == "__main__":
    asyncio.run(main())
