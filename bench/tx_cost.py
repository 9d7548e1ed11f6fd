"""What one small transaction costs: `Ledger.append` latency by records per tx, with the tail
tables filled through bound parameters or through an Arrow batch (ledger.ledger._SMALL_BATCH picks
between them), and the share of each DuckDB statement. Prints a table and writes
bench/results/tx_cost.json.

    .venv/bin/python bench/tx_cost.py [--txs 120] [--sizes 1,2,5,10,40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from core import machine  # noqa: E402
from ingest import envelope  # noqa: E402

import ledger.ledger as ledger_module  # noqa: E402
from ledger import Ledger  # noqa: E402


class Timed:
    """The writer's connection, timing each statement by its first words."""

    def __init__(self, con: Any, stats: dict[str, list[float]]) -> None:
        self._con, self._stats = con, stats

    def execute(self, query: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._con.execute(query, *args)
        finally:
            self._stats[" ".join(query.split()[:3])].append(time.perf_counter() - t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def run(size: int, txs: int, arrow: bool) -> dict[str, Any]:
    ledger_module._SMALL_BATCH = 0 if arrow else 10**9
    stats: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        lg = Ledger.open(Path(tmp) / "data", seal_every=10**9)
        lg._con = Timed(lg._con, stats)  # type: ignore[assignment]
        latencies = []
        n = 0
        for _ in range(txs):
            batch = []
            for _ in range(size):
                env = json.loads(envelope(n, 300))
                batch.append({"kind": "command", "action": env["action"], "data": env["data"]})
                n += 1
            t0 = time.perf_counter()
            lg.append(batch)
            latencies.append(time.perf_counter() - t0)
        lg.close()
    skip = min(10, txs // 5)  # warm-up
    return {
        "records_per_tx": size, "path": "arrow" if arrow else "parameters", "txs": txs,
        "append_ms_p50": round(statistics.median(latencies[skip:]) * 1000, 3),
        "statement_ms_p50": {k: round(statistics.median(v) * 1000, 3) for k, v in stats.items()
                             if not k.startswith(("SELECT", "CHECKPOINT"))},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--txs", type=int, default=120)
    ap.add_argument("--sizes", default="1,2,5,10,40")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tx_cost.json")
    args = ap.parse_args()
    shipped = ledger_module._SMALL_BATCH
    rows = [run(size, args.txs, arrow) for size in map(int, args.sizes.split(",")) for arrow in (False, True)]
    print(f"{'records/tx':>10}  {'parameters ms':>14}  {'arrow ms':>9}  shipped (Arrow from {shipped} rows)")
    for i in range(0, len(rows), 2):
        p, a = rows[i], rows[i + 1]
        used = a if p["records_per_tx"] >= shipped else p
        print(f"{p['records_per_tx']:>10}  {p['append_ms_p50']:>14.2f}  {a['append_ms_p50']:>9.2f}  "
              f"{used['path']}")
    print("statements (ms, p50) at 1 record/tx, parameters:", rows[0]["statement_ms_p50"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        info = machine(Path(tmp), None)
    args.out.write_text(json.dumps({
        "command": "python bench/tx_cost.py " + " ".join(sys.argv[1:]), "machine": info,
        "shipped_small_batch": shipped, "runs": rows,
    }, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
