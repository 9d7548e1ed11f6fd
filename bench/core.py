"""Core benchmark: the ledger against SQLite and PostgreSQL on the same records, in the same run.

Measures, for each system:

* durable append throughput at batch sizes 1 and 100 (bounded samples, fresh stores) and 10,000
  (the full record set, which the later reads use);
* `entity(e, as_of=t)` latency p50/p99 over random (entity, tx) pairs (peers: the equivalent SQL);
* full-log aggregation (count per action per valid-time day);
* latest-value-per-entity rebuild as of a tx (every entity's state, materialised);
* bytes on disk per record, against the raw JSON lines.

Every system starts from the same parsed record dicts; the timed region of an append is "records in,
durable commit out" (the peers' conversion to rows is inside it, as the ledger's validation is).
Peers store one row per record (the event's JSON `data` plus its entity id and tx) with a primary key
on the record id (what makes the ledger's append exactly-once) and a B-tree on (entity, tx); their
as-of lookup unnests the JSON of that entity's events with tx <= t and keeps the latest value per
attribute (a null is a retraction), which is the ledger's datom rule.

    python bench/core.py --records 100000 --seal-every 25000     # smoke (~5 minutes)
    python bench/core.py --records 1000000
    python bench/core.py                                           # 10M records, ~1M entities

Needs PostgreSQL server binaries (apt-get install -y postgresql) and psycopg (see bench/README.md);
a private cluster is created in a temp directory on a free port and removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from ledger import Ledger  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

Rec = dict[str, Any]

TARGETS = {
    "lookup_p50_ms": 1.0,
    "lookup_p99_ms": 5.0,
    "append_10000_rps": 150_000,
    "aggregation_s": 1.0,
    "aggregation_vs_postgres_x": 8.0,
    "bytes_per_record": 80,
}

# ------------------------------------------------------------------------------------- the records
WORDS = (
    "salary payment invoice rent groceries transfer refund card online store coffee fuel insurance "
    "utilities subscription dividend loan repayment savings travel hotel booking train ticket pharmacy "
    "school fees donation gift birthday bonus tax return monthly standing order"
).split()
CURRENCIES = ("EUR", "USD", "GBP", "CHF")
CHANNELS = ("sepa", "card", "swift", "cash", "internal")
TIERS = ("basic", "plus", "premium")
HOLDS = ("kyc", "fraud-review", "legal")
START = datetime(2025, 3, 1, tzinfo=UTC)
SPAN_US = 30 * 86_400 * 1_000_000  # valid times spread over 30 days


def _uuid7(ms: int, rand: int) -> str:
    v = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64
    v |= 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=v))


def generate(n: int, n_entities: int, seed: int) -> Iterator[Rec]:
    """Deterministic bank-account events, ~200 bytes of `data` each.

    The first event of an entity opens it with every attribute; later ones carry a subset (amount,
    balance, ...; owner changes; holds placed and released with a null, i.e. a retraction), so an
    entity's state needs the latest value per attribute, not just its latest event.
    """
    rng = random.Random(seed)
    rnd = rng.random
    balances: dict[int, int] = {}
    start_ms = int(START.timestamp() * 1000)
    start_us = int(START.timestamp()) * 1_000_000
    for i in range(n):
        k = int(rnd() * n_entities)
        eid = f"acct-{k:07d}"
        memo = " ".join(WORDS[int(rnd() * len(WORDS))] for _ in range(5 + int(rnd() * 5)))
        bal = balances.get(k)
        data: dict[str, Any]
        if bal is None:
            bal = int(rnd() * 500_000)
            action = "account-opened"
            data = {
                "id": eid, "owner": f"cust-{int(rnd() * 1e8):08d}",
                "name": f"{WORDS[int(rnd() * len(WORDS))].title()} {WORDS[int(rnd() * len(WORDS))].title()}",
                "currency": CURRENCIES[int(rnd() * 4)], "branch": f"BR{int(rnd() * 400):03d}",
                "tier": TIERS[int(rnd() * 3)], "balance": bal, "memo": memo,
            }
        else:
            x = rnd()
            amt = 100 + int(rnd() * 250_000)
            if x < 0.90:
                if x < 0.40:
                    action, bal = "money-deposited", bal + amt
                elif x < 0.72:
                    action, bal = "money-withdrawn", bal - amt
                elif x < 0.82:
                    action, amt = "fee-charged", amt // 100
                    bal -= amt
                else:
                    action, amt = "interest-paid", amt // 50
                    bal += amt
                data = {
                    "id": eid, "amount": amt, "balance": bal, "channel": CHANNELS[int(rnd() * 5)],
                    "counterparty": f"DE{int(rnd() * 1e18):018d}", "memo": memo, "ref": f"TX-{i:010d}",
                }
            elif x < 0.94:
                action = "owner-changed"
                data = {"id": eid, "owner": f"cust-{int(rnd() * 1e8):08d}", "memo": memo,
                        "ref": f"CHG-{i:010d}"}
            elif x < 0.97:
                action = "hold-placed"
                data = {"id": eid, "hold": HOLDS[int(rnd() * 3)], "memo": memo, "ref": f"HLD-{i:010d}"}
            else:
                action = "hold-released"
                data = {"id": eid, "hold": None, "memo": memo, "ref": f"HLD-{i:010d}"}
        balances[k] = bal
        off = SPAN_US * i // n
        valid = min(max(off + int((rnd() - 0.5) * 7_200_000_000), 0), SPAN_US - 1)  # +-1 h jitter
        ts = datetime.fromtimestamp((start_us + valid) / 1e6, UTC)
        yield {
            "id": _uuid7(start_ms + off // 1000, rng.getrandbits(74)), "kind": "event",
            "action": action, "timestamp": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "data": data,
        }


def write_jsonl(path: Path, n: int, n_entities: int, seed: int) -> dict[str, Any]:
    data_bytes = 0
    with path.open("w", encoding="utf-8") as f:
        for r in generate(n, n_entities, seed):
            data_bytes += len(json.dumps(r["data"], separators=(",", ":")))
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    size = path.stat().st_size
    return {"path": str(path), "bytes": size, "bytes_per_record": size / n,
            "data_bytes_per_record": data_bytes / n}


def batches(path: Path, size: int, limit: int | None = None) -> Iterator[list[Rec]]:
    """The records as parsed dicts (parsing is outside every timed region)."""
    batch: list[Rec] = []
    n = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line))
            n += 1
            if len(batch) == size:
                yield batch
                batch = []
            if limit is not None and n >= limit:
                break
    if batch:
        yield batch


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def day_of(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return (date(1970, 1, 1) + timedelta(days=int(value))).isoformat()  # days since the epoch


def _micros(ts: str) -> int:
    d = datetime.fromisoformat(ts)
    return (d - EPOCH) // timedelta(microseconds=1)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------------------ systems
class System:
    """One store under test. Subclasses give append, lookup, aggregation, rebuild and size."""

    name = ""
    settings: dict[str, Any]

    def open(self, label: str) -> None: ...
    def append(self, batch: list[Rec]) -> None: ...
    def lookup(self, e: str, t: int) -> dict[str, Any]: ...
    def aggregate(self) -> list[tuple[str, str, int]]: ...
    def rebuild(self, t: int) -> tuple[int, int]: ...
    def size(self) -> dict[str, int]: ...
    def close(self, drop: bool) -> None: ...

    def server_cpu(self) -> float:
        """CPU seconds used outside this process on our behalf (a server backend), if any."""
        return 0.0

    def settle(self) -> None:
        """Wait for work the store deferred past its last append (the ledger's background seal)."""


class LedgerSystem(System):
    name = "ledger"

    def __init__(self, workdir: Path, seal_every: int, timeout: float) -> None:
        self.workdir = workdir
        self.seal_every = seal_every
        self.timeout = timeout  # the peers' limit too (the ledger's own default is 30 s)
        self.settings = {"seal_every": seal_every, "duckdb_threads": "default", "query_timeout_s": timeout}
        self.lg: Ledger | None = None
        self.seal_times: list[float] = []

    def open(self, label: str) -> None:
        self.path = self.workdir / f"ledger-{label}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.lg = lg = Ledger.open(self.path, seal_every=self.seal_every)
        self.seal_times = []
        seal = lg.seal

        def timed_seal() -> int | None:  # instrumentation only: the ledger calls self.seal()
            t0 = time.perf_counter()
            try:
                return seal()
            finally:
                self.seal_times.append(time.perf_counter() - t0)

        lg.seal = timed_seal  # type: ignore[method-assign]

    def append(self, batch: list[Rec]) -> None:
        assert self.lg is not None
        self.lg.append(batch)

    def settle(self) -> None:
        assert self.lg is not None
        sealer = self.lg._sealer
        if sealer is not None:
            sealer.join()

    def lookup(self, e: str, t: int) -> dict[str, Any]:
        assert self.lg is not None
        return self.lg.entity(e, as_of=t) or {}

    def aggregate(self) -> list[tuple[str, str, int]]:
        assert self.lg is not None
        rows = self.lg.sql(
            "SELECT action, CAST(valid_time AS DATE) AS day, count(*) AS n FROM log GROUP BY ALL",
            timeout=self.timeout,
        ).to_pylist()
        return [(r["action"], day_of(r["day"]), r["n"]) for r in rows]

    def rebuild(self, t: int) -> tuple[int, int]:
        assert self.lg is not None
        row = self.lg.sql(
            "SELECT count(*) AS n, sum(length(CAST(state AS VARCHAR))) AS chars FROM entities", as_of=t,
            timeout=self.timeout,
        ).to_pylist()[0]
        return int(row["n"]), int(row["chars"] or 0)

    def size(self) -> dict[str, int]:
        assert self.lg is not None
        self.lg.close()  # a clean close checkpoints DuckDB; then the directory is at rest
        self.lg = None
        out = {"total": dir_bytes(self.path)}
        for p in self.path.iterdir():
            if p.is_file():
                out[p.name] = p.stat().st_size
        segs = self.path / "segments"
        if segs.is_dir():
            for f in segs.rglob("*.parquet"):
                key = f"segments/{f.name}"
                out[key] = out.get(key, 0) + f.stat().st_size
        for f in (self.path / "state").glob("*.parquet"):  # entity state checkpoints
            out["state/"] = out.get("state/", 0) + f.stat().st_size
        return out

    def close(self, drop: bool) -> None:
        if self.lg is not None:
            self.lg.close()
            self.lg = None
        if drop:
            shutil.rmtree(self.path, ignore_errors=True)


class SQLiteSystem(System):
    name = "sqlite"
    DDL = (
        "CREATE TABLE events (tx INTEGER NOT NULL, seq INTEGER NOT NULL, id BLOB PRIMARY KEY, "
        "kind TEXT NOT NULL, action TEXT NOT NULL, entity TEXT, data TEXT NOT NULL, "
        "valid_time INTEGER NOT NULL, tx_time INTEGER NOT NULL)",
        "CREATE INDEX events_entity_tx ON events (entity, tx)",
    )
    LOOKUP = (
        "SELECT key, value FROM ("
        " SELECT j.key, j.value, j.type,"
        " row_number() OVER (PARTITION BY j.key ORDER BY r.tx DESC, r.seq DESC) AS rn"
        " FROM events r, json_each(r.data) j WHERE r.entity = ? AND r.tx <= ? AND j.key <> 'id')"
        " WHERE rn = 1 AND type <> 'null'"
    )
    REBUILD = (
        "SELECT count(*), sum(length(state)) FROM ("
        " SELECT entity, json_group_object(key, value) AS state FROM ("
        "  SELECT r.entity, j.key, j.value, j.type, row_number() OVER"
        "  (PARTITION BY r.entity, j.key ORDER BY r.tx DESC, r.seq DESC) AS rn"
        "  FROM events r, json_each(r.data) j WHERE r.tx <= ? AND j.key <> 'id')"
        " WHERE rn = 1 AND type <> 'null' GROUP BY entity)"
    )

    def __init__(self, workdir: Path, synchronous: str, timeout: float) -> None:
        self.workdir = workdir
        self.synchronous = synchronous
        self.timeout = timeout
        self.settings = {"journal_mode": "WAL", "synchronous": synchronous, "cache_size": "-1048576 (1 GiB)",
                         "sqlite_version": sqlite3.sqlite_version}

    def open(self, label: str) -> None:
        self.path = self.workdir / f"sqlite-{label}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.con = sqlite3.connect(self.path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={self.synchronous}")
        self.con.execute("PRAGMA cache_size=-1048576")
        for ddl in self.DDL:
            self.con.execute(ddl)
        self.tx = 0

    def append(self, batch: list[Rec]) -> None:
        self.tx += 1
        tx = self.tx
        now = _micros(datetime.now(UTC).isoformat())
        rows = [
            (tx, seq, uuid.UUID(r["id"]).bytes, r["kind"], r["action"], r["data"].get("id"),
             json.dumps(r["data"], separators=(",", ":"), ensure_ascii=False), _micros(r["timestamp"]), now)
            for seq, r in enumerate(batch)
        ]
        con = self.con
        con.execute("BEGIN")
        con.executemany("INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute("COMMIT")

    def lookup(self, e: str, t: int) -> dict[str, Any]:
        return dict(self.con.execute(self.LOOKUP, (e, t)).fetchall())

    def _guarded(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        deadline = time.monotonic() + self.timeout
        self.con.set_progress_handler(lambda: int(time.monotonic() > deadline), 100_000)
        try:
            return self.con.execute(sql, params).fetchall()
        finally:
            self.con.set_progress_handler(None, 0)

    def aggregate(self) -> list[tuple[str, str, int]]:
        rows = self._guarded(
            "SELECT action, valid_time / 86400000000 AS day, count(*) FROM events GROUP BY 1, 2"
        )
        return [(a, day_of(d), n) for a, d, n in rows]

    def rebuild(self, t: int) -> tuple[int, int]:
        n, chars = self._guarded(self.REBUILD, (t,))[0]
        return int(n), int(chars or 0)

    def size(self) -> dict[str, int]:
        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        out = {"total": sum(
            Path(f"{self.path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{self.path}{s}").exists()
        )}
        for name, pgsize in self.con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            out[name] = int(pgsize)
        return out

    def close(self, drop: bool) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.con.close()
        if drop:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bindir() -> Path:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        cand = Path(out.stdout.strip())
        if (cand / "initdb").exists():
            return cand
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    sys.exit("PostgreSQL server binaries not found: apt-get install -y postgresql (or pass --systems)")


class PostgresCluster:
    """A private, throwaway cluster: initdb in a temp dir, pg_ctl start on a free port."""

    CONF = {  # durability stays at the defaults (fsync=on, synchronous_commit=on, full_page_writes=on)
        "shared_buffers": "1GB", "max_wal_size": "4GB", "work_mem": "256MB",
        "maintenance_work_mem": "512MB", "listen_addresses": "127.0.0.1",
    }

    def __init__(self, workdir: Path) -> None:
        self.bindir = _pg_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=workdir))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            self.prefix = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
            os.chmod(self.dir, 0o755)
            for parent in [workdir, *workdir.parents]:
                if parent.stat().st_mode & 0o005 != 0o005:
                    os.chmod(parent, parent.stat().st_mode | 0o005)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N", "-E", "UTF8")
        opts = " ".join(f"-c {k}={v}" for k, v in self.CONF.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.dir} {opts}", "start")
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bindir / tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self, drop: bool) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        if drop:
            shutil.rmtree(self.dir, ignore_errors=True)


class PostgresSystem(System):
    name = "postgres"
    COLS = "tx, seq, id, kind, action, entity, data, valid_time, tx_time"
    LOOKUP = (
        "SELECT key, value FROM ("
        " SELECT DISTINCT ON (kv.key) kv.key, kv.value FROM {t} r CROSS JOIN LATERAL jsonb_each(r.data) kv"
        " WHERE r.entity = %s AND r.tx <= %s AND kv.key <> 'id' ORDER BY kv.key, r.tx DESC, r.seq DESC) s"
        " WHERE jsonb_typeof(value) <> 'null'"
    )
    REBUILD = (
        "SELECT count(*), sum(length(state::text)) FROM ("
        " SELECT entity, jsonb_object_agg(key, value) AS state FROM ("
        "  SELECT DISTINCT ON (r.entity, kv.key) r.entity, kv.key, kv.value"
        "  FROM {t} r CROSS JOIN LATERAL jsonb_each(r.data) kv WHERE r.tx <= %s AND kv.key <> 'id'"
        "  ORDER BY r.entity, kv.key, r.tx DESC, r.seq DESC) s"
        " WHERE jsonb_typeof(value) <> 'null' GROUP BY entity) x"
    )

    def __init__(self, cluster: PostgresCluster, timeout: float) -> None:
        import psycopg  # a bench dependency only (see bench/README.md)

        self.psycopg = psycopg
        self.cluster = cluster
        self.timeout = timeout
        self.settings = {
            **PostgresCluster.CONF, "fsync": "on", "synchronous_commit": "on",
            "append": "batch 1: INSERT ... ON CONFLICT DO NOTHING; batch >= 100: COPY into a temp "
                      "table, INSERT ... SELECT ... ON CONFLICT DO NOTHING; one tx per batch",
        }
        self.con = psycopg.connect(cluster.dsn, autocommit=False)
        self.version = self.con.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        self.backend = int(self.con.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        self.con.commit()

    def server_cpu(self) -> float:
        try:
            fields = Path(f"/proc/{self.backend}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def open(self, label: str) -> None:
        self.table = f"events_{label}"
        con = self.con
        con.execute(f"DROP TABLE IF EXISTS {self.table}")
        con.execute(
            f"CREATE TABLE {self.table} (tx BIGINT NOT NULL, seq INT NOT NULL, id UUID PRIMARY KEY, "
            "kind TEXT NOT NULL, action TEXT NOT NULL, entity TEXT, data JSONB NOT NULL, "
            "valid_time TIMESTAMPTZ NOT NULL, tx_time TIMESTAMPTZ NOT NULL)"
        )
        con.execute(f"CREATE INDEX {self.table}_entity_tx ON {self.table} (entity, tx)")
        con.execute(f"CREATE TEMP TABLE IF NOT EXISTS stage (LIKE {self.table}) ON COMMIT DELETE ROWS")
        con.commit()
        self.tx = 0

    def append(self, batch: list[Rec]) -> None:
        self.tx += 1
        tx = self.tx
        now = datetime.now(UTC)
        rows = [
            (tx, seq, uuid.UUID(r["id"]), r["kind"], r["action"], r["data"].get("id"),
             json.dumps(r["data"], separators=(",", ":"), ensure_ascii=False),
             datetime.fromisoformat(r["timestamp"]), now)
            for seq, r in enumerate(batch)
        ]
        con = self.con
        with con.cursor() as cur:
            if len(rows) < 50:
                cur.executemany(
                    f"INSERT INTO {self.table} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING", rows,
                )
            else:
                with cur.copy(f"COPY stage ({self.COLS}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
                cur.execute(f"INSERT INTO {self.table} SELECT * FROM stage ON CONFLICT (id) DO NOTHING")
        con.commit()

    def lookup(self, e: str, t: int) -> dict[str, Any]:
        rows = self.con.execute(self.LOOKUP.format(t=self.table), (e, t)).fetchall()  # type: ignore[arg-type]
        self.con.rollback()
        return dict(rows)

    def _guarded(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        con = self.con
        con.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
        try:
            return con.execute(sql, params).fetchall()  # type: ignore[arg-type]
        finally:
            con.rollback()

    def aggregate(self) -> list[tuple[str, str, int]]:
        rows = self._guarded(
            f"SELECT action, (valid_time AT TIME ZONE 'UTC')::date AS day, count(*) FROM {self.table} "
            "GROUP BY 1, 2"
        )
        return [(a, day_of(d), n) for a, d, n in rows]

    def rebuild(self, t: int) -> tuple[int, int]:
        n, chars = self._guarded(self.REBUILD.format(t=self.table), (t,))[0]
        return int(n), int(chars or 0)

    def size(self) -> dict[str, int]:
        con = self.con
        row = con.execute(
            "SELECT pg_total_relation_size(%s), pg_relation_size(%s), pg_indexes_size(%s), "
            "coalesce(pg_total_relation_size(reltoastrelid), 0) FROM pg_class WHERE oid = %s::regclass",
            (self.table,) * 4,
        ).fetchone()
        idx = con.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
            "WHERE indrelid = %s::regclass", (self.table,),
        ).fetchall()
        con.rollback()
        assert row is not None
        out = {"total": int(row[0]), "heap": int(row[1]), "indexes": int(row[2]), "toast": int(row[3])}
        out.update({name: int(b) for name, b in idx})
        return out

    def close(self, drop: bool) -> None:
        if drop:
            self.con.execute(f"DROP TABLE IF EXISTS {self.table}")
            self.con.commit()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.con.close()


# ---------------------------------------------------------------------------------------- measuring
def load(system: System, path: Path, batch: int, limit: int | None) -> dict[str, Any]:
    """Append the records in batches; time only the append calls."""
    times: list[float] = []
    sizes: list[int] = []
    cpu = 0.0
    server0 = system.server_cpu()
    for b in batches(path, batch, limit):
        c0 = time.process_time()
        t0 = time.perf_counter()
        system.append(b)
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
        sizes.append(len(b))
    c0 = time.process_time()
    t0 = time.perf_counter()
    system.settle()  # deferred work counts: the load is done when the store is at rest
    settled = time.perf_counter() - t0
    cpu += time.process_time() - c0
    server = system.server_cpu() - server0
    n = sum(sizes)
    wall = sum(times) + settled
    out: dict[str, Any] = {
        "batch": batch, "records": n, "commits": len(times), "seconds": round(wall, 3),
        "settle_seconds": round(settled, 3),
        "records_per_s": round(n / wall, 1), "client_cpu_s": round(cpu, 3),
        "server_cpu_s": round(server, 3), "records_per_cpu_s": round(n / (cpu + server), 1),
        "commit_ms_p50": round(statistics.median(times) * 1000, 3),
        "commit_ms_p99": round(pct(sorted(times), 0.99) * 1000, 3),
    }
    if len(times) >= 10:  # throughput per tenth of the load: does it degrade as the store grows?
        tenth = len(times) // 10
        out["records_per_s_by_tenth"] = [
            round(sum(sizes[i * tenth:(i + 1) * tenth]) / sum(times[i * tenth:(i + 1) * tenth]), 1)
            for i in range(10)
        ]
    if isinstance(system, LedgerSystem) and system.seal_times:
        # Seals run on their own thread, beside the appends: their time overlaps the wall time.
        out.update(seals=len(system.seal_times), seal_seconds_in_background=round(sum(system.seal_times), 3))
    return out


def sample_pairs(n_entities: int, max_tx: int, count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed + 1)
    return [(f"acct-{rng.randrange(n_entities):07d}", rng.randint(1, max_tx)) for _ in range(count)]


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def run_system(
    system: System, args: argparse.Namespace, jsonl: Path, pairs: list[tuple[str, int]],
    max_tx: int, log: Callable[[str], None],
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "settings": system.settings, "append": {}, "load_average": {"start": os.getloadavg()},
    }
    for batch, limit in ((1, args.sample_1), (100, args.sample_100)):
        if batch in args.batches:
            system.open(f"b{batch}")
            r = load(system, jsonl, batch, min(limit, args.records))
            system.close(drop=True)
            res["append"][str(batch)] = r
            log(f"  append batch {batch:>6}: {r['records_per_s']:>12,.0f} rec/s ({r['records']:,} records)")
    system.open("full")
    r = load(system, jsonl, 10_000, None)
    res["append"]["10000"] = r
    log(f"  append batch  10000: {r['records_per_s']:>12,.0f} rec/s ({r['records']:,} records, "
        f"{r['seconds']:.1f} s)")

    for e, t in pairs[: args.warmup]:
        system.lookup(e, t)
    lat = []
    answers = []
    c0 = time.process_time()
    for e, t in pairs:
        t0 = time.perf_counter()
        answers.append(system.lookup(e, t))
        lat.append(time.perf_counter() - t0)
    lat_ms = sorted(x * 1000 for x in lat)
    res["lookup"] = {"n": len(lat_ms), "p50_ms": round(pct(lat_ms, 0.5), 3),
                     "p99_ms": round(pct(lat_ms, 0.99), 3), "mean_ms": round(statistics.fmean(lat_ms), 3),
                     "max_ms": round(lat_ms[-1], 3),
                     "client_cpu_ms_mean": round((time.process_time() - c0) * 1000 / len(pairs), 3)}
    log(f"  as-of lookup: p50 {res['lookup']['p50_ms']:.3f} ms, p99 {res['lookup']['p99_ms']:.3f} ms")

    try:
        times, agg = timed(system.aggregate, args.repeat)
        res["aggregation"] = {"seconds": [round(x, 4) for x in times], "best_s": round(min(times), 4),
                              "groups": len(agg)}
        log(f"  aggregation: best {min(times):.3f} s ({len(agg)} groups)")
    except Exception as e:  # a timeout on a peer is a result, not a crash
        agg = None
        res["aggregation"] = {"error": str(e)[:300]}
        log(f"  aggregation failed: {e}")
    t_rebuild = max(1, max_tx // 2)
    try:
        times, rebuilt = timed(lambda: system.rebuild(t_rebuild), args.rebuild_repeat)
        res["rebuild"] = {"as_of_tx": t_rebuild, "seconds": [round(x, 3) for x in times],
                          "best_s": round(min(times), 3), "entities": rebuilt[0], "state_chars": rebuilt[1]}
        log(f"  rebuild as of tx {t_rebuild}: best {min(times):.3f} s ({rebuilt[0]:,} entities)")
    except Exception as e:
        res["rebuild"] = {"as_of_tx": t_rebuild, "error": str(e)[:300]}
        log(f"  rebuild failed: {e}")

    size = system.size()
    res["bytes"] = {"total": size["total"], "per_record": round(size["total"] / args.records, 1),
                    "detail": size}
    log(f"  on disk: {size['total'] / 1e6:,.1f} MB = {size['total'] / args.records:.1f} bytes/record")
    system.close(drop=not args.keep)
    res["load_average"]["end"] = os.getloadavg()
    res["_answers"] = answers
    res["_agg"] = None if agg is None else sorted(agg)
    return res


# ------------------------------------------------------------------------------------------ machine
def machine(workdir: Path, pg_version: str | None) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) * 1024
    fsync = []
    probe = workdir / "fsync.probe"
    with probe.open("wb") as f:
        for _ in range(100):
            f.write(b"x" * 4096)
            f.flush()
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            fsync.append((time.perf_counter() - t0) * 1000)
    probe.unlink()
    git = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git["head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                     text=True, check=True).stdout.strip()
        git["ledger_dirty"] = bool(subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "ledger"], capture_output=True, text=True,
            check=True).stdout.strip())
    digest = hashlib.sha256()
    for p in sorted((ROOT / "ledger").rglob("*.py")):
        digest.update(p.read_bytes())
    git["ledger_sources_sha256"] = digest.hexdigest()[:16]
    import pyarrow

    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
        "ram_bytes": ram, "os": platform.platform(), "python": platform.python_version(),
        "duckdb": duckdb.__version__, "pyarrow": pyarrow.__version__, "sqlite": sqlite3.sqlite_version,
        "postgres": pg_version, "fsync_4k_ms_p50": round(statistics.median(fsync), 3),
        "load_average_at_start": os.getloadavg(), "git": git,
    }
    with contextlib.suppress(ImportError):
        import psycopg

        info["psycopg"] = psycopg.__version__
    return info


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--entities", type=int, default=None, help="default: records / 10")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--systems", default="ledger,sqlite,postgres")
    ap.add_argument("--batches", default="1,100", help="sampled batch sizes besides the full 10,000 load")
    ap.add_argument("--sample-1", type=int, default=2_000, help="records appended at batch 1")
    ap.add_argument("--sample-100", type=int, default=100_000, help="records appended at batch 100")
    ap.add_argument("--seal-every", type=int, default=250_000, help="the ledger's seal_every")
    ap.add_argument("--lookups", type=int, default=1_000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the aggregation (best is reported)")
    ap.add_argument("--rebuild-repeat", type=int, default=None, help="default: 2, or 1 from 5M records")
    ap.add_argument("--sqlite-synchronous", default="FULL", choices=["FULL", "NORMAL"])
    ap.add_argument("--query-timeout", type=float, default=900.0, help="peer aggregation/rebuild limit, s")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default: a fresh temp dir, removed afterwards; name one to reuse its records")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "core.json")
    ap.add_argument("--keep", action="store_true", help="keep the stores of the full load")
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",") if x]
    systems = [s for s in args.systems.split(",") if s]
    n = args.records
    n_entities = args.entities or max(1, n // 10)
    args.rebuild_repeat = args.rebuild_repeat or (1 if n >= 5_000_000 else 2)
    own_workdir = args.workdir is None  # concurrent runs must never share (and wipe) a directory
    args.workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-core-")) if own_workdir else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so `finally` stops PostgreSQL
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:8.1f}s] {msg}", flush=True)

    try:
        run(args, systems, n, n_entities, log, started)
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


def run(
    args: argparse.Namespace, systems: list[str], n: int, n_entities: int,
    log: Callable[[str], None], started: float,
) -> None:
    cluster = None
    pg: PostgresSystem | None = None
    if "postgres" in systems:
        cluster = PostgresCluster(args.workdir)
        pg = PostgresSystem(cluster, args.query_timeout)
        log(f"postgres {pg.version} on port {cluster.port} ({cluster.dir})")
    info = machine(args.workdir, pg.version if pg else None)
    log(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_bytes'] / 2**30:.1f} GiB, "
        f"fsync p50 {info['fsync_4k_ms_p50']} ms, load {info['load_average_at_start']}")

    jsonl = args.workdir / f"records-{n}-{n_entities}-{args.seed}.jsonl"
    meta_path = jsonl.with_suffix(".json")
    if jsonl.exists() and meta_path.exists():
        raw = json.loads(meta_path.read_text())
    else:
        log(f"generating {n:,} records over {n_entities:,} entities -> {jsonl}")
        raw = write_jsonl(jsonl, n, n_entities, args.seed)
        meta_path.write_text(json.dumps(raw))
    log(f"raw JSON lines: {raw['bytes_per_record']:.1f} bytes/record "
        f"(data {raw['data_bytes_per_record']:.1f})")
    max_tx = -(-n // 10_000)
    pairs = sample_pairs(n_entities, max_tx, args.lookups, args.seed)

    results: dict[str, Any] = {}
    try:
        for name in systems:
            log(f"== {name}")
            system: System
            if name == "ledger":
                system = LedgerSystem(args.workdir, args.seal_every, args.query_timeout)
            elif name == "sqlite":
                system = SQLiteSystem(args.workdir, args.sqlite_synchronous, args.query_timeout)
            elif name == "postgres":
                assert pg is not None
                system = pg
            else:
                sys.exit(f"unknown system {name!r}")
            results[name] = run_system(system, args, jsonl, pairs, max_tx, log)
    finally:
        if pg is not None:
            pg.shutdown()
        if cluster is not None:
            cluster.stop(drop=not args.keep)

    # The same answers from every system, or the comparison means nothing.
    checks: dict[str, Any] = {}
    names = list(results)
    for other in names[1:]:
        a, b = results[names[0]]["_answers"], results[other]["_answers"]
        checks[f"lookups_{names[0]}_vs_{other}_mismatches"] = sum(x != y for x, y in zip(a, b, strict=True))
        ga, gb = results[names[0]]["_agg"], results[other]["_agg"]
        if ga is not None and gb is not None:
            checks[f"aggregation_{names[0]}_vs_{other}_equal"] = ga == gb
        ra, rb = results[names[0]].get("rebuild", {}), results[other].get("rebuild", {})
        if "entities" in ra and "entities" in rb:
            checks[f"rebuild_entities_{names[0]}_vs_{other}_equal"] = ra["entities"] == rb["entities"]
    for r in results.values():
        r.pop("_answers")
        r.pop("_agg")

    verdicts = evaluate(results)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"records": n, "entities": n_entities, "seed": args.seed, "lookups": args.lookups,
                   "sample_batch_1": min(args.sample_1, n), "sample_batch_100": min(args.sample_100, n),
                   "full_load_batch": 10_000, "transactions_in_full_load": max_tx},
        "machine": info, "raw_jsonl": raw, "results": results, "checks": checks, "targets": verdicts,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    log(f"wrote {args.out}")


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    lg = results.get("ledger")
    if lg is None:
        return {}
    out: dict[str, Any] = {}

    def verdict(key: str, value: float | None, ok: bool | None) -> None:
        out[key] = {"target": TARGETS[key], "ledger": value, "pass": ok}

    look = lg["lookup"]
    verdict("lookup_p50_ms", look["p50_ms"], look["p50_ms"] <= TARGETS["lookup_p50_ms"])
    verdict("lookup_p99_ms", look["p99_ms"], look["p99_ms"] <= TARGETS["lookup_p99_ms"])
    rps = lg["append"]["10000"]["records_per_s"]
    verdict("append_10000_rps", rps, rps >= TARGETS["append_10000_rps"])
    agg = lg["aggregation"].get("best_s")
    verdict("aggregation_s", agg, agg is not None and agg <= TARGETS["aggregation_s"])
    pg_agg = results.get("postgres", {}).get("aggregation", {}).get("best_s")
    ratio = None if agg is None or pg_agg is None else round(pg_agg / agg, 2)
    verdict("aggregation_vs_postgres_x", ratio,
            None if ratio is None else ratio >= TARGETS["aggregation_vs_postgres_x"])
    bpr = lg["bytes"]["per_record"]
    verdict("bytes_per_record", bpr, bpr <= TARGETS["bytes_per_record"])
    return out


def print_table(report: dict[str, Any]) -> None:
    results = report["results"]
    names = list(results)
    raw = report["raw_jsonl"]["bytes_per_record"]

    def get(r: dict[str, Any], *path: str) -> Any:
        for p in path:
            if not isinstance(r, dict) or p not in r:
                return None
            r = r[p]
        return r

    rows = [
        ("append batch 1 (rec/s)", ("append", "1", "records_per_s"), "{:,.0f}", None),
        ("append batch 100 (rec/s)", ("append", "100", "records_per_s"), "{:,.0f}", None),
        ("append batch 10000 (rec/s)", ("append", "10000", "records_per_s"), "{:,.0f}", "append_10000_rps"),
        ("  same, records per CPU-second", ("append", "10000", "records_per_cpu_s"), "{:,.0f}", None),
        ("as-of lookup p50 (ms)", ("lookup", "p50_ms"), "{:.3f}", "lookup_p50_ms"),
        ("as-of lookup p99 (ms)", ("lookup", "p99_ms"), "{:.3f}", "lookup_p99_ms"),
        ("aggregation per action/day (s)", ("aggregation", "best_s"), "{:.3f}", "aggregation_s"),
        ("rebuild latest per entity (s)", ("rebuild", "best_s"), "{:.3f}", None),
        ("bytes on disk per record", ("bytes", "per_record"), "{:.1f}", "bytes_per_record"),
    ]
    cfg = report["config"]
    print(f"\n{cfg['records']:,} records, {cfg['entities']:,} entities; "
          f"raw JSON lines {raw:.1f} bytes/record; "
          f"{report['machine']['cpu']}, {report['machine']['cores']} cores")
    head = f"{'':34}" + "".join(f"{n:>14}" for n in names) + f"{'target':>14}  ledger"
    print(head)
    print("-" * len(head))
    targets = report["targets"]
    for label, path, fmt, tkey in rows:
        cells = []
        for n in names:
            v = get(results[n], *path)
            cells.append(f"{(fmt.format(v) if v is not None else '-'):>14}")
        t = targets.get(tkey) if tkey else None
        tcell = ""
        if t is not None:
            tcell = (">= " if "rps" in str(tkey) else "<= ") + format(t["target"], ",")
        tcell = f"{tcell:>14}"
        verdict = "" if not t else ("pass" if t["pass"] else "MISS")
        print(f"{label:34}" + "".join(cells) + tcell + f"  {verdict}")
    t = targets.get("aggregation_vs_postgres_x")
    if t:
        x = "-" if t["ledger"] is None else t["ledger"]
        print(f"{'aggregation vs postgres (x faster)':34}{x:>14}"
              f"{'':>{14 * (len(names) - 1)}}{'>= 8':>14}  "
              f"{'-' if t['pass'] is None else ('pass' if t['pass'] else 'MISS')}")
    if report["checks"]:
        print("checks:", json.dumps(report["checks"]))


if __name__ == "__main__":
    main()
