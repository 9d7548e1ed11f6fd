"""Crash safety with real processes: a child appends (and seals) in a loop and is SIGKILLed at random
moments, at explicit seals and at each step inside a seal; after every kill the reopened ledger must
hold every acknowledged tx whole, no torn tx, no gap in tx numbers, a valid hash chain, and no
leftover segment directories."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ledger import Ledger

CHILD = Path(__file__).with_name("crash_child.py")
STAGES = ("tmp-file", "tmp-dir", "renamed", "state", "committed")
EPOCH = 4  # kills per ledger


class Child:
    """One run of crash_child.py, its stdout read line by line on a thread."""

    def __init__(self, data_dir: Path, run: str, seed: int, stage: str | None, log: Path) -> None:
        args = [sys.executable, str(CHILD), str(data_dir), run, str(seed)]
        if stage:
            args.append(stage)
        self.stderr = log.open("w")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.log = log
        self.heard: list[str] = []
        self.eof = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next complete line, or None at the deadline; fails if the child died by itself."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return None
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            self.eof = True
            self.proc.wait()
            raise AssertionError(f"child exited by itself ({self.proc.returncode}): {self.log.read_text()}")
        self.heard.append(line)
        return line

    def kill(self) -> list[str]:
        """SIGKILL; then every complete line it printed (including those not yet consumed)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.stderr.close()
        while not self.eof and (line := self.lines.get()) is not None:
            self.heard.append(line)
        return [x for x in self.heard if x.endswith("\n")]


def run_round(child: Child, how: str, rng: random.Random) -> None:
    """Let the child run until this round's kill moment."""
    if how == "timer":
        # After a random number of acknowledged txs (0: while it opens the ledger), then a random
        # moment: counted in txs, not seconds, so a slow machine kills no earlier in the work.
        acks, started = rng.randrange(25), None
        deadline = time.monotonic() + 30
        while (line := child.next_line(deadline)) is not None:
            if line.startswith("READY"):
                started = time.monotonic()
            elif line.startswith("ACK "):
                acks -= 1
            if started is not None and acks <= 0:
                deadline = min(deadline, time.monotonic() + rng.uniform(0.0, 0.05))
        assert started is not None, "child never became ready"
        return
    deadline = time.monotonic() + 30
    marker = "SEAL\n" if how == "seal" else "STAGE"
    skip = rng.randrange(2) if how == "seal" else 0
    while True:
        line = child.next_line(deadline)
        assert line is not None, f"child never printed {marker!r} (round {how})"
        if line.startswith(marker):
            if skip:
                skip -= 1
                continue
            if how == "seal":
                time.sleep(rng.uniform(0, 0.03))  # somewhere inside the seal (or just after)
            return


def acknowledged(lines: list[str]) -> dict[int, tuple[str, int, int]]:
    acks = {}
    for line in lines:
        if line.startswith("ACK "):
            _, tx, run, k, n = line.split()
            acks[int(tx)] = (run, int(k), int(n))
    return acks


def leftovers(root: Path) -> tuple[set[str], set[str]]:
    """(temp dirs, dirs the manifest does not list) under segments/."""
    segs = root / "segments"
    names = {p.name for p in segs.iterdir()} if segs.is_dir() else set()
    manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").exists() else {}
    listed = {s["dir"] for s in manifest.get("segments", [])}
    return {n for n in names if n.startswith(".tmp-")}, {n for n in names - listed if not n.startswith(".")}


def check_ledger(root: Path, acks: dict[int, tuple[str, int, int]], why: str) -> int:
    """Reopen as the writer would and check every invariant; returns the head tx."""
    with Ledger.open(root) as lg:
        head = lg.head.tx
        txs = lg.sql("SELECT tx FROM transactions ORDER BY tx").column("tx").to_pylist()
        assert txs == list(range(1, head + 1)), f"{why}: tx numbers have gaps"
        assert max(acks, default=0) <= head, f"{why}: acknowledged tx {max(acks)} lost (head {head})"

        torn = lg.sql(
            "SELECT coalesce(t.tx, l.tx) AS tx, t.record_count, l.n FROM transactions t "
            "FULL OUTER JOIN (SELECT tx, count(*) AS n FROM log GROUP BY tx) l ON t.tx = l.tx "
            "WHERE t.tx IS NULL OR l.tx IS NULL OR t.record_count <> l.n"
        ).to_pylist()
        assert torn == [], f"{why}: partial transactions {torn[:5]}"

        content = {
            r["tx"]: r for r in lg.sql(
                "SELECT tx, min(data->>'run') AS run, count(DISTINCT data->>'run') AS runs, "
                "min((data->>'k')::INT) AS k, count(DISTINCT data->>'k') AS ks, count(*) AS n, "
                "min((data->>'i')::INT) AS lo, max((data->>'i')::INT) AS hi, "
                "count(DISTINCT (data->>'i')::INT) AS distinct_i FROM log GROUP BY tx"
            ).to_pylist()
        }
        for tx, (run, k, n) in acks.items():
            assert content[tx] == {"tx": tx, "run": run, "runs": 1, "k": k, "ks": 1, "n": n, "lo": 0,
                                   "hi": n - 1, "distinct_i": n}, f"{why}: acknowledged tx {tx} differs"
        for row in content.values():  # committed but unacknowledged txs must be whole too
            assert (row["runs"], row["ks"], row["lo"], row["hi"], row["distinct_i"]) == (
                1, 1, 0, row["n"] - 1, row["n"]), f"{why}: tx {row['tx']} is not one whole batch"
        batches = lg.sql("SELECT count(*) AS c FROM (SELECT DISTINCT data->>'run', data->>'k' FROM log)")
        assert batches.column("c")[0].as_py() == head, f"{why}: a batch was stored twice"

        last_events = lg.sql(
            "SELECT data->>'id' AS e, data FROM events "
            "QUALIFY row_number() OVER (PARTITION BY data->>'id' ORDER BY tx DESC, seq DESC) = 1"
        ).to_pylist()
        for row in last_events:
            expected = {a: v for a, v in json.loads(row["data"]).items() if a != "id"}
            assert lg.entity(row["e"]) == expected, f"{why}: entity {row['e']} is not its last event"

        report = lg.verify()
        assert report.ok and report.checked == head, f"{why}: {report}"
    tmp, unregistered = leftovers(root)
    assert not tmp and not unregistered, f"{why}: leftover segment dirs {tmp | unregistered}"
    assert not list(root.glob("state/.tmp-*")), f"{why}: a checkpoint's .tmp- file was left"
    return head


def test_sigkill_never_loses_or_tears_a_transaction(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    plan = ["timer"] * 9 + ["seal"] * 7 + [s for s in STAGES for _ in range(2)]
    rng.shuffle(plan)
    acks: dict[int, tuple[str, int, int]] = {}
    total = 0
    for i, how in enumerate(plan):
        if i % EPOCH == 0:  # a fresh ledger now and then keeps each reopen-and-verify cheap
            root = tmp_path / f"ledger-{i}"
            total += len(acks)
            acks = {}
        stage = how if how in STAGES else None
        why = f"round {i} ({how}), CRASH_SEED={seed}"
        child = Child(root, f"r{i}", rng.randrange(2**32), stage, tmp_path / f"child-{i}.err")
        try:
            run_round(child, "stage" if stage else how, rng)
        finally:
            lines = child.kill()
        new = acknowledged(lines)
        assert not set(new) & set(acks), f"{why}: a tx number was acknowledged twice"
        acks.update(new)
        if stage:  # the kill really interrupted that step of a seal: these kills are not benign
            tmp, unlisted = leftovers(root)
            if stage in ("tmp-file", "tmp-dir"):
                assert tmp and not unlisted, f"{why}: expected a .tmp- segment dir, found {tmp, unlisted}"
            else:  # renamed, state: not in the catalog yet; committed: in the catalog, not the manifest
                assert unlisted and not tmp, f"{why}: expected an unlisted segment, found {tmp, unlisted}"
            if stage == "state":
                assert list((root / "state").glob(".tmp-*")), f"{why}: expected a .tmp- checkpoint"
        check_ledger(root, acks, why)
    total += len(acks)
    assert total > 100, f"only {total} acknowledged transactions; the kills proved little"


EXIT_WITHOUT_CLOSE = """
import sys
from ledger import Ledger
lg = Ledger.open(sys.argv[1], seal_every=500)
for i in range(4):
    lg.append([{"kind": "event", "action": "set", "data": {"id": f"e{j % 50}", "n": j}}
               for j in range(i * 400, (i + 1) * 400)])
"""  # a seal starts on its own thread at the second append; the script ends without close()


def test_a_process_that_exits_without_closing_its_ledger_exits_cleanly(tmp_path: Path) -> None:
    """A seal still running when the interpreter finalized aborted the process (exit 134,
    "terminate called after throwing"); open writers are now closed at exit, the seal finished."""
    for run in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, str(tmp_path / f"d{run}")],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert done.returncode == 0, done.stderr[-2000:]
        with Ledger.open(tmp_path / f"d{run}") as lg:
            assert lg.verify().ok
            assert lg.sql("SELECT count(*) AS n FROM log").to_pylist() == [{"n": 1600}]
            assert lg.info()["segments"] >= 1
