"""What `verify()` costs: a full check of a ledger of N records (every record hash, the chain, the
datoms and the entity index), against a floor in the same run: reading every record row into Python
and hashing its data once (what any Python re-check must at least do). Prints a table and writes
bench/results/verify.json.

    .venv/bin/python bench/verify.py [--records 1000000] [--repeat 2] [--data-dir DIR]

The ledger is generated with bench/query.py's bank events (N/10 accounts, 10,000 records per tx)
into a temporary directory, or into --data-dir (reused when it already holds a ledger).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from core import machine  # noqa: E402
from query import generate  # noqa: E402

from ledger import Ledger  # noqa: E402


def build(root: Path, records: int) -> float:
    t0 = time.perf_counter()
    with Ledger.open(root) as lg:
        for batch in generate(records, max(1, records // 10), 11):
            lg.append(batch)
    return time.perf_counter() - t0


def floor(lg: Ledger) -> tuple[float, int]:
    """Every record row into Python, its data hashed once."""
    t0 = time.perf_counter()
    n = 0
    with lg.snapshot() as (cur, files):
        from ledger.storage.catalog import union_sql

        result = cur.execute(f"SELECT * FROM ({union_sql('records', files['records'])}) ORDER BY tx, seq")
        while rows := result.fetchmany(100_000):
            for row in rows:
                hashlib.sha256(row[6].encode()).digest()
            n += len(rows)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp) / "data"
        built = None if (root / "ledger.duckdb").exists() else build(root, args.records)
        runs: list[dict[str, Any]] = []
        with Ledger.open(root, read_only=True) as lg:
            for _ in range(args.repeat):
                fs, n = floor(lg)
                t0 = time.perf_counter()
                report = lg.verify()
                vs = time.perf_counter() - t0
                assert report.ok, report
                runs.append({"records": n, "txs": report.checked, "verify_s": round(vs, 2),
                             "floor_s": round(fs, 2), "ratio": round(vs / fs, 1)})
        info = machine(Path(tmp), None)
    print(f"{'records':>10}  {'txs':>5}  {'verify (s)':>10}  {'floor (s)':>9}  {'verify/floor':>12}")
    for r in runs:
        print(f"{r['records']:>10,}  {r['txs']:>5}  {r['verify_s']:>10.2f}  {r['floor_s']:>9.2f}  "
              f"{r['ratio']:>12.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python bench/verify.py " + " ".join(sys.argv[1:]), "machine": info,
        "build_s": None if built is None else round(built, 1), "runs": runs,
    }, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
