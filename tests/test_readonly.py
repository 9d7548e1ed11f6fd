"""A second process reading a ledger another process writes: a consistent sealed-only snapshot (and a
note saying so), or a one-line LedgerLocked naming the writer; never a lock traceback, never a torn read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ledger import Ledger, LedgerError, LedgerLocked

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]

# The writer: 10 sealed transactions, 3 more in the tail, then "ready"; then, until its stdin closes,
# either keeps appending (sealing every 5 transactions) or just holds the ledger open.
WRITER = textwrap.dedent("""
    import sys, threading, time
    from ledger import Ledger

    root, mode = sys.argv[1], sys.argv[2]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def append(lg):
        i = lg.head.tx + 1
        e = f"acct-{i % 7}"
        lg.append([{"kind": "command", "action": "deposit", "data": {"id": e, "amount": i}},
                   {"kind": "event", "action": "deposited", "data": {"id": e, "balance": i}}])

    lg = Ledger.open(root)
    for _ in range(10):
        append(lg)
    lg.seal()
    for _ in range(3):
        append(lg)
    print("ready", flush=True)
    if mode == "keep-writing":
        while not stop.is_set():
            append(lg)
            if lg.head.tx % 5 == 0:
                lg.seal()
            time.sleep(0.005)
    elif mode == "hold":
        stop.wait()
    print("done", lg.head.tx, flush=True)
    lg.close()
""")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Writer:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.final_tx: int | None = None

    def stop(self) -> int:
        """Ask the writer to finish; returns its last tx."""
        if self.final_tx is None:
            proc = self.proc
            assert proc.stdin and proc.stdout and proc.stderr
            proc.stdin.close()  # the signal to finish
            # read through the text wrappers (not communicate()): readline() may have buffered "done"
            with proc.stdout, proc.stderr:
                out, err = proc.stdout.read(), proc.stderr.read()
            assert proc.wait(timeout=60) == 0, err
            self.final_tx = int(out.split()[-1])
        return self.final_tx


@contextmanager
def writer(root: Path, mode: str) -> Iterator[Writer]:
    """A child process that owns `root` as its writer, running until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), mode], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )
    w = Writer(proc)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"writer failed to start: {line!r} {proc.communicate()[1]}")
        yield w
        w.stop()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()  # reaps it and closes the pipes


def assert_consistent(lg: Ledger) -> int:
    """Every visible tx is whole: tx is gap-free, each has all its records and datoms, verify is ok."""
    txs = lg.sql("SELECT tx, record_count FROM transactions ORDER BY tx").to_pylist()
    assert [t["tx"] for t in txs] == list(range(1, len(txs) + 1))
    assert lg.head.tx == len(txs)
    per_tx = {r["tx"]: r["n"] for r in lg.sql("SELECT tx, count(*) AS n FROM log GROUP BY tx").to_pylist()}
    assert per_tx == {t["tx"]: t["record_count"] for t in txs}
    assert all(t["record_count"] == 2 for t in txs)
    datoms = lg.sql("SELECT count(*) AS n, count(DISTINCT tx) AS t FROM datoms").to_pylist()[0]
    assert datoms == {"n": len(txs), "t": len(txs)}  # one balance datom per tx
    report = lg.verify()
    assert report.ok and report.checked == len(txs), report
    return len(txs)


def test_snapshot_while_another_process_writes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with writer(root, "keep-writing") as w:
        with Ledger.open(root, read_only=True) as lg:
            assert lg.read_only and lg.complete is False
            assert lg.note is not None and str(w.pid) in lg.note and "\n" not in lg.note
            seen = assert_consistent(lg)
            assert seen >= 10
            assert seen == lg.info()["sealed_through_tx"]
            assert f"through tx {seen}" in lg.note
            time.sleep(0.3)  # the writer keeps going; the snapshot does not move
            assert assert_consistent(lg) == seen
            entity = lg.entity("acct-3")
        final = w.stop()
    assert final > seen  # the writer was never blocked
    with Ledger.open(root, read_only=True) as after:
        assert after.complete is True
        assert assert_consistent(after) == final
        assert after.entity("acct-3", as_of=seen) == entity


def test_many_snapshots_in_a_row_are_each_whole(tmp_path: Path) -> None:
    root = tmp_path / "data"
    sizes = []
    with writer(root, "keep-writing"):
        for _ in range(5):
            with Ledger.open(root, read_only=True) as lg:
                sizes.append(assert_consistent(lg))
            time.sleep(0.05)
    assert sizes == sorted(sizes)


def test_a_second_writer_gets_one_line_naming_the_pid(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with writer(root, "hold") as w:
        with pytest.raises(LedgerLocked) as caught:
            Ledger.open(root)
        message = str(caught.value)
        assert "\n" not in message
        assert f"process {w.pid}" in message
        assert "read_only=True" in message and "HTTP API" in message
        with Ledger.open(root, read_only=True) as lg:  # the failed open left nothing behind
            assert lg.head.tx == 10
    assert w.final_tx == 13


def test_a_second_writer_in_the_same_process_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with Ledger.open(root) as lg:
        for i in range(3):
            lg.append([{"kind": "event", "action": "set", "data": {"id": "a", "n": i}}])
        lg.seal()
        tmp = root / "segments" / ".tmp-in-flight"  # as a seal under way would have it
        tmp.mkdir()
        with pytest.raises(LedgerLocked) as caught:
            Ledger.open(root)
        assert f"this process ({os.getpid()})" in str(caught.value) and "\n" not in str(caught.value)
        assert tmp.is_dir()  # the refused open cleaned up nothing
        tmp.rmdir()
        # A snapshot in the writer's own process: the sealed segments, and a note saying so.
        with Ledger.open(root, read_only=True) as snap:
            assert snap.complete is False and str(os.getpid()) in (snap.note or "")
            assert snap.entity("a") == {"n": 2}
        assert lg.append([{"kind": "event", "action": "set", "data": {"id": "a", "n": 9}}]).tx == 4
    with Ledger.open(root) as again:  # closing released it
        assert again.entity("a") == {"n": 9} and again.head.tx == 4


@pytest.mark.parametrize("manifest", ['{"segm', "[]", '{"format": 1}', '{"format": 1, "entity_path": "id", '
                                      '"deletion": "x", "segments": [{"first_tx": 1}]}'])
def test_a_damaged_manifest_beside_a_writer_is_one_ledger_error(tmp_path: Path, manifest: str) -> None:
    """Found by audit: KeyError, TypeError, JSONDecodeError from a read-only open."""
    root = tmp_path / "data"
    with Ledger.open(root) as lg:
        lg.append([{"kind": "event", "action": "set", "data": {"id": "a", "n": 1}}])
        lg.seal()
        (root / "manifest.json").write_text(manifest)
        with pytest.raises(LedgerError, match="manifest") as caught:
            Ledger.open(root, read_only=True)
        assert "\n" not in str(caught.value)
        assert lg.entity("a") == {"n": 1}  # the writer goes on


def test_without_a_writer_the_snapshot_is_complete_and_releases_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with writer(root, "exit") as w:
        pass
    assert w.final_tx == 13
    with Ledger.open(root, read_only=True) as lg:
        assert lg.complete is True and lg.note is None
        assert assert_consistent(lg) == 13
        tail = lg.sql("SELECT count(*) AS n FROM log WHERE tx > 10").to_pylist()[0]["n"]
        assert tail == 6  # the unsealed tail rows are in the snapshot
        # A writer in another process can open the directory while this snapshot is open ...
        with writer(root, "exit") as second:
            pass
        assert second.final_tx == 26
        # ... and the snapshot is a value: it does not see what that writer appended.
        assert lg.head.tx == 13
        assert lg.sql("SELECT max(tx) AS t FROM transactions").to_pylist() == [{"t": 13}]
    with Ledger.open(root, read_only=True) as lg:
        assert assert_consistent(lg) == 26


def test_read_only_never_creates_a_ledger(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(LedgerError):
        Ledger.open(missing, read_only=True)
    assert not missing.exists()


def test_cli_against_a_ledger_being_written(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with writer(root, "keep-writing") as w:
        for args in (["sql", "SELECT count(*) AS n, max(tx) AS t FROM log", "--format", "json"],
                     ["verify"], ["info", "--json"]):
            r = subprocess.run(
                [sys.executable, "-m", "ledger", *args, "--data-dir", str(root)],
                capture_output=True, text=True, env=child_env(), timeout=120,
            )
            assert r.returncode == 0, r.stderr
            (note,) = r.stderr.splitlines()
            assert note.startswith("note: ") and f"process {w.pid}" in note
            if args[0] == "sql":
                row = json.loads(r.stdout)
                assert row["n"] == 2 * row["t"]  # whole transactions only
            if args[0] == "info":
                assert json.loads(r.stdout)["complete"] is False
        # A digest newer than the snapshot's last seal is not proved by it, and says why.
        r = subprocess.run(
            [sys.executable, "-m", "ledger", "verify", "--digest", f"99999:{'0' * 64}",
             "--data-dir", str(root)],
            capture_output=True, text=True, env=child_env(), timeout=120,
        )
        assert r.returncode == 1, r.stderr
        assert r.stdout.startswith(
            "FAILED: tx 99999 is not in this ledger (a running writer's newer txs"), r.stdout


def test_a_writer_waits_out_a_snapshot_that_holds_the_file_for_a_moment(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with Ledger.open(root) as lg:
        lg.append([{"kind": "event", "action": "set", "data": {"id": "a", "n": 1}}])
    # Another process reads the file as a snapshot does (attached read-only), for 0.6 s.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, duckdb
        con = duckdb.connect()
        con.execute("ATTACH '{root / 'ledger.duckdb'}' AS src (READ_ONLY)")
        print("attached", flush=True)
        time.sleep(0.6)
        con.execute("DETACH src")
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "attached"
        with Ledger.open(root) as lg:  # not LedgerLocked naming the reader as a writer
            assert lg.entity("a") == {"n": 1}
    finally:
        holder.communicate(timeout=30)
