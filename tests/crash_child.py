"""Crash-test child: appends transactions to a ledger in a loop until the parent kills it (SIGKILL).

Usage: python tests/crash_child.py DATA_DIR RUN SEED [STAGE]

Every line is flushed as soon as it is printed, so everything the parent reads was really said:
  READY <head_tx>            the ledger is open
  ACK <tx> <run> <k> <n>     append() returned: tx <tx> holds records (run, k, i) for i in 0..n-1
  SEAL                       about to call seal() explicitly
  SEALED <last_tx>           seal() returned
  STAGE <stage>              (only with STAGE) a seal reached <stage>; the child then sleeps there

STAGE pauses inside a real seal so the parent can kill it at a known step; the wrapped functions
still run the real code, only later. Stages, in the order a seal passes them:
  tmp-file   a Parquet file in the `.tmp-` directory is written and fsynced (others may not be)
  tmp-dir    every file is written; the `.tmp-` directory is fsynced but not yet renamed
  renamed    the segment directory has its final name; the catalog does not know it yet
  state      the entity state checkpoint's `.tmp-` file is written and fsynced, not yet renamed
  committed  the catalog transaction committed; manifest.json has not been rewritten yet
"""

from __future__ import annotations

import random
import sys
import time
from typing import TYPE_CHECKING

from ledger import Ledger
from ledger.storage import segments

if TYPE_CHECKING:
    from pathlib import Path

SEAL_EVERY = 150  # tail records; with 1..50 records per tx, an automatic seal every ~6 txs
ENTITIES = 4


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def install_stage(stage: str, rng: random.Random) -> None:
    """Sleep (until killed) the first time a seal reaches `stage`, after a few seals have passed."""
    sealing = False
    skip = rng.randrange(3)  # not always the first seal of the run
    real_fsync, real_manifest, real_seal = segments.fsync_path, segments.write_manifest, Ledger.seal

    def reached(name: str) -> None:
        nonlocal skip
        if sealing and name == stage:
            if skip:
                skip -= 1
                return
            say(f"STAGE {name}")
            time.sleep(60)

    def fsync_path(path: Path) -> None:
        real_fsync(path)
        if path.parent.name == segments.STATE_DIR:
            reached("state")
        elif path.parent.name.startswith(".tmp-"):
            reached("tmp-file")
        elif path.name.startswith(".tmp-"):
            reached("tmp-dir")
        elif path.name == segments.SEGMENTS_DIR:
            reached("renamed")

    def write_manifest(root: Path, manifest: dict[str, object]) -> None:
        reached("committed")
        real_manifest(root, manifest)

    def seal(self: Ledger) -> int | None:
        nonlocal sealing
        sealing = True
        try:
            return real_seal(self)
        finally:
            sealing = False

    segments.fsync_path = fsync_path  # type: ignore[assignment]
    segments.write_manifest = write_manifest  # type: ignore[assignment]
    Ledger.seal = seal  # type: ignore[method-assign]


def main() -> None:
    data_dir, run, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    if len(sys.argv) > 4:
        install_stage(sys.argv[4], rng)
    lg = Ledger.open(data_dir, seal_every=SEAL_EVERY)
    say(f"READY {lg.head.tx}")
    k = 0
    while True:
        n = rng.randint(1, 50)
        records = []
        for i in range(n):
            if rng.random() < 0.3:
                records.append({
                    "kind": "event", "action": "balance-set",
                    "data": {"id": f"acct-{rng.randrange(ENTITIES)}", "run": run, "k": k, "i": i,
                             "balance": rng.randint(-10**6, 10**6)},
                })
            else:
                records.append({
                    "kind": "command", "action": "transfer",
                    "data": {"run": run, "k": k, "i": i, "note": "x" * rng.randrange(64)},
                })
        report = lg.append(records, meta={"run": run, "k": k})
        say(f"ACK {report.tx} {run} {k} {n}")
        k += 1
        if rng.random() < 0.2:
            say("SEAL")
            say(f"SEALED {lg.seal()}")


if __name__ == "__main__":
    main()
