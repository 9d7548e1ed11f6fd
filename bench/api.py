"""API benchmark: sync command round trips (POST /commands?sync=true through Kafka, the bank
processor and back through the ledger) at 1, 10 and 50 concurrent clients, and async POST
throughput. Prints a table and writes bench/results/api.json.

    .venv/bin/python bench/api.py [--seconds 10] [--clients 1,10,50] [--async-clients 10,50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from core import machine as core_machine  # noqa: E402
from http_client import Http  # noqa: E402

from tests.test_api import Server  # noqa: E402

TARGETS = {"sync_p50_ms_10": 15.0, "sync_p99_ms_10": 60.0, "async_per_s": 2000.0}


def machine() -> dict[str, Any]:
    """bench/core.py's machine details (no database peers here)."""
    with tempfile.TemporaryDirectory() as tmp:
        info = core_machine(Path(tmp), None)
    info.pop("postgres", None)
    info.pop("sqlite", None)
    return info


async def sync_load(url: str, clients: int, seconds: float, accounts: list[str]) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        rng = random.Random(i)
        http = Http(url)
        try:
            while time.perf_counter() < deadline:
                a, b = rng.sample(accounts, 2)
                body = {"action": "transfer-money", "data": {"from_account": a, "to_account": b, "amount": 1}}
                t0 = time.perf_counter()
                status, answer = await http.request("POST", "/commands?sync=true&timeout=10", body)
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
                assert status != 201 or answer["children"], answer
        finally:
            http.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"clients": clients, "requests": len(latencies), "per_s": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies), "p99_ms": q[98], "statuses": statuses}


async def async_load(url: str, clients: int, seconds: float) -> dict[str, Any]:
    count = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal count
        http = Http(url)
        try:
            while time.perf_counter() < deadline:
                body = {"action": "ping", "data": {"n": count}}
                status, answer = await http.request("POST", "/commands", body)
                assert status == 202, answer
                count += 1
        finally:
            http.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"clients": clients, "requests": count, "per_s": count / (time.perf_counter() - started)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--clients", default="1,10,50", help="sync load levels (comma-separated)")
    parser.add_argument("--async-clients", default="10,50", help="async load levels ('' for none)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    async_levels = [int(c) for c in args.async_clients.split(",") if c.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    srv = Server(tmp / "data", "--demo").start()
    try:
        accounts = [f"acct-{i}" for i in range(100)]
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            for a in accounts:
                await http.post("/commands", params={"sync": "true"}, json={
                    "action": "open-account", "data": {"account": a, "owner": a}})
                await http.post("/commands", params={"sync": "true"}, json={
                    "action": "deposit", "data": {"account": a, "amount": 10**9}})
        rows = [await sync_load(srv.url, c, args.seconds, accounts) for c in levels]
        asyncs = [await async_load(srv.url, c, args.seconds) for c in async_levels]
    finally:
        srv.stop()
    print(f"{'mode':<8}{'clients':>8}{'req':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{'sync':<8}{r['clients']:>8}{r['requests']:>8}{r['per_s']:>10.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    for r in asyncs:
        print(f"{'async':<8}{r['clients']:>8}{r['requests']:>8}{r['per_s']:>10.0f}")
    ten = next((r for r in rows if r["clients"] == 10), None)
    checks = {}
    if ten is not None:
        checks["sync p50 <= 15 ms @10"] = ten["p50_ms"] <= TARGETS["sync_p50_ms_10"]
        checks["sync p99 <= 60 ms @10"] = ten["p99_ms"] <= TARGETS["sync_p99_ms_10"]
    if asyncs:
        checks["async >= 2000/s"] = max(r["per_s"] for r in asyncs) >= TARGETS["async_per_s"]
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    out = REPO / "bench" / "results" / "api.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv),
                               "seconds": args.seconds, "sync": rows, "async": asyncs,
                               "targets": TARGETS, "checks": checks,
                               "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                     text=True, cwd=REPO).stdout.strip()}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
