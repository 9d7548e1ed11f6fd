"""The `ledger` command: one entry point, one subcommand per job, errors as one line on stderr.

Settings come from `LEDGER_*` environment variables; flags override them. To add a subcommand,
write an `add_arguments(parser)` and a `run(args) -> int` and register them in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
import pyarrow.csv as pa_csv

from ledger.errors import InvalidQuery, InvalidTime, LedgerError
from ledger.ledger import DB_FILE, Ledger
from ledger.records import to_utc
from ledger.storage.parquet_types import infinite_column
from ledger.temporal import DEFAULT_TIMEOUT, JSON_TYPE, check_time_point

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from ledger.temporal import TimePoint

PROG = "ledger"
DEFAULT_DATA_DIR = "./data"
FORMATS = ("table", "csv", "json", "parquet", "arrow")

# Exit codes: 0 success, 1 the command ran and failed (or verify found tampering), 2 bad command line.
OK, FAILED, USAGE = 0, 1, 2


class UsageError(LedgerError):
    """The command line is wrong: an unknown flag, a malformed value, a missing argument."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        hint = f" (see '{self.prog} --help')" if command else f" (see '{PROG} --help')"
        raise UsageError(message + hint)


# ------------------------------------------------------------------------------- settings
def setting(flag: str | None, env: str, default: str) -> str:
    """A flag's value if given, else the environment variable, else the default."""
    if flag is not None:
        return flag
    return os.environ.get(env) or default


def add_data_dir(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """`inherited`: an action's parser whose command parser has --data-dir too (either place
    works); its default must not overwrite the value given before the action."""
    parser.add_argument(
        "--data-dir", metavar="D", default=argparse.SUPPRESS if inherited else None,
        help=f"the ledger's data directory (env LEDGER_DATA_DIR, default {DEFAULT_DATA_DIR})",
    )


def data_dir(args: argparse.Namespace) -> Path:
    text = setting(args.data_dir, "LEDGER_DATA_DIR", DEFAULT_DATA_DIR)
    if why := not_utf8(text):  # DuckDB takes paths as UTF-8 only
        source = "--data-dir" if args.data_dir is not None else "LEDGER_DATA_DIR"
        raise UsageError(f"{source}: the path {shown(text)} is not valid UTF-8 ({why})")
    return Path(text)


def existing_ledger(args: argparse.Namespace) -> Path:
    """The data directory, if it holds a ledger: commands other than `serve` and `consume` never
    create one (a mistyped --data-dir is an error, not a new empty ledger)."""
    root = data_dir(args)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "the directory does not exist"
        raise LedgerError(f"no ledger at {root}: {what} (set --data-dir or LEDGER_DATA_DIR)")
    if not (root / DB_FILE).is_file():
        raise LedgerError(f"no ledger at {root.resolve()} (missing {DB_FILE})")
    return root


def open_snapshot(args: argparse.Namespace) -> Ledger:
    """A read-only snapshot of an existing ledger; never creates one, never blocks its writer."""
    lg = Ledger.open(existing_ledger(args), read_only=True)
    if lg.note:
        print(f"note: {one_line(lg.note)}", file=sys.stderr)
    return lg


# ---------------------------------------------------------------------------- value types
def not_utf8(text: str) -> str | None:
    """Why `text` is not valid UTF-8, else None. Bytes that do not decode reach Python from argv,
    the environment or stdin as lone surrogates (PEP 383), which DuckDB cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02X}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        return f"{what} at character {e.start + 1}"
    return None


def shown(text: str) -> str:
    """`text` quoted, with each undecodable byte as \\xNN (a lone surrogate as \\uNNNN)."""
    return "'" + "".join(
        f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
        else f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c
        for c in text
    ) + "'"


def utf8_argument(text: str) -> str:
    """argparse type for text handed to DuckDB (the query, table names)."""
    if why := not_utf8(text):
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({why})")
    return text


def utf8_path(text: str) -> str:
    """argparse type for a path DuckDB writes to (it takes UTF-8 paths only)."""
    if why := not_utf8(text):
        raise argparse.ArgumentTypeError(f"the path {shown(text)} is not valid UTF-8 ({why})")
    return text


def time_point(text: str) -> TimePoint:
    """argparse type for --as-of: digits are a tx number, anything else an ISO-8601 instant."""
    try:
        if re.fullmatch(r"[+-]?[0-9]+", text.strip()):
            return check_time_point(int(text), "--as-of")
        return to_utc(text, "--as-of")
    except InvalidTime as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--as-of: ")) from e


def instant(text: str) -> datetime:
    """argparse type for --valid-at: valid time is the records' own clock, so only instants."""
    try:
        return to_utc(text, "--valid-at")
    except InvalidTime as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--valid-at: ")) from e


def sql_params(text: str) -> list[Any] | dict[str, Any]:
    """argparse type for --params: a JSON array ($1, $2, ...) or object ($name)."""
    if why := not_utf8(text):
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({why})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, (list, dict)):
        raise argparse.ArgumentTypeError("expected a JSON array (for $1, $2, ...) or object (for $name)")
    if why := not_utf8(json.dumps(value, ensure_ascii=False)):  # a \ud800 escape decodes to one
        raise argparse.ArgumentTypeError(f"a string in it is not valid UTF-8 ({why} of its JSON)")
    return value


# ------------------------------------------------------------------------------------ sql
def add_sql(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", type=utf8_argument,
                        help="one read-only query (SELECT, WITH, EXPLAIN, DESCRIBE, SUMMARIZE); "
                        "'-' reads it from stdin")
    parser.add_argument("--as-of", type=time_point, metavar="T",
                        help="a tx number, or an ISO-8601 instant in transaction time")
    parser.add_argument("--valid-at", type=instant, metavar="T",
                        help="an ISO-8601 instant in valid time (makes the read bitemporal)")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (aligned text, default), csv, json (one JSON object per line), "
                        "parquet or arrow (an Arrow IPC stream; binary: to stdout or --out)")
    parser.add_argument("--out", metavar="FILE", help="write the result to FILE instead of stdout")
    parser.add_argument("--params", type=sql_params, metavar="JSON",
                        help='query parameters: a JSON array for $1, $2 or an object for $name')
    parser.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"interrupt the query after this long (default {DEFAULT_TIMEOUT:g}; 0: none)")
    add_data_dir(parser)


def seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:  # (NaN too)
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number of seconds (0 for no limit)")
    return value or None


def outside_ledger(out: str, root: Path) -> Path:
    """--out as a path, refused if empty or inside the data directory (found by audit: an export
    there overwrote segments, a result the catalog)."""
    if not out.strip():
        raise UsageError("--out is empty")
    path, data = Path(out).resolve(), root.resolve()
    if path == data or data in path.parents:
        raise UsageError(f"--out {out} is inside the data directory {root}: write somewhere else")
    return Path(out)


def run_sql(args: argparse.Namespace) -> int:
    query = stdin_query() if args.query == "-" else args.query
    with open_snapshot(args) as lg:
        out = None if args.out is None else outside_ledger(args.out, lg.root)
        table = lg.sql(query, as_of=args.as_of, valid_at=args.valid_at, params=args.params,
                       timeout=args.timeout)
    if args.format in ("parquet", "arrow"):
        write_binary(table, args.format, out)
        return OK
    write = {"table": write_table, "csv": write_csv, "json": write_json}[args.format]
    if out is None:
        write(table)
        return OK
    with out.open("w", encoding="utf-8") as f, _stdout_to(f):
        write(table)
    return OK


def stdin_query() -> str:
    """The query on stdin, which must be UTF-8 (whatever the locale says)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream with no bytes under it (a StringIO in place of stdin)
        text = sys.stdin.read()
    else:
        raw = buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LedgerError(
                f"the query on stdin is not valid UTF-8 (byte 0x{raw[e.start]:02X} at offset {e.start})"
            ) from None
    if why := not_utf8(text):
        raise LedgerError(f"the query on stdin is not valid UTF-8 ({why})")
    return text


@contextmanager
def _stdout_to(f: io.TextIOWrapper) -> Iterator[None]:
    saved, sys.stdout = sys.stdout, f
    try:
        yield
    finally:
        sys.stdout = saved


def write_binary(table: pa.Table, fmt: str, out: Path | None) -> None:
    """Parquet (zstd) or an Arrow IPC stream, to a file or to stdout (refused on a terminal)."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buffer, compression="zstd")
    else:
        with pa.ipc.new_stream(buffer, table.schema) as writer:
            writer.write_table(table)
    if out is not None:
        Path(out).write_bytes(buffer.getvalue())
        return
    if sys.stdout.isatty():
        raise UsageError(f"{fmt} is binary: redirect stdout or pass --out FILE")
    sys.stdout.flush()
    sys.stdout.buffer.write(buffer.getvalue())
    sys.stdout.buffer.flush()


def _values(table: pa.Table, name: str) -> list[Any]:
    """A column's values as Python objects; InvalidQuery naming the column if Python has none for
    one (an infinite timestamp, a date past the year 9999)."""
    try:
        values: list[Any] = table.column(name).to_pylist()
    except (OverflowError, ValueError) as e:
        raise InvalidQuery(f"column {name!r} holds a value out of Python's range ({e}): cast it to VARCHAR, "
                           "or use --format csv") from None
    return values


def write_table(table: pa.Table) -> None:
    names = table.column_names
    columns = [[cell(v) for v in _values(table, name)] for name in names]
    widths = [max([len(n), *map(len, col)]) for n, col in zip(names, columns, strict=True)]
    numeric = [_is_numeric(t) for t in table.schema.types]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            (v.rjust(w) if right else v.ljust(w)) for v, w, right in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(names), line(["-" * w for w in widths])]
    out += [line(row) for row in zip(*columns, strict=True)] if columns else []
    rows = table.num_rows
    out.append(f"({rows} row{'' if rows == 1 else 's'})")
    sys.stdout.write("\n".join(out) + "\n")


def write_csv(table: pa.Table) -> None:
    """RFC 4180 CSV with a header; types CSV cannot hold (lists, structs, intervals) become JSON text."""
    if (name := infinite_column(table)) is not None:
        raise InvalidQuery(f"column {name!r} holds infinity, which has no form in CSV: cast it to VARCHAR")
    cols = []
    for col in table.columns:
        try:
            if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                raise pa.ArrowNotImplementedError("blob")
            col.cast(pa.string())
            cols.append(col)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            cols.append(pa.array([None if v is None else cell(v) for v in col.to_pylist()], pa.string()))
    sys.stdout.flush()
    buffer = io.BytesIO()
    pa_csv.write_csv(pa.table(cols, names=table.column_names), buffer)
    sys.stdout.buffer.write(buffer.getvalue())


def write_json(table: pa.Table) -> None:
    """JSON Lines: one object per row, so output streams and pipes into jq row by row. JSON columns
    (data, state, ...) are JSON values in it, not text holding JSON (as in POST /query's JSON)."""
    json_columns = {f.name for f in table.schema if f.metadata == JSON_TYPE}
    names = table.column_names
    for values in zip(*(_values(table, name) for name in names), strict=True):
        row = dict(zip(names, values, strict=True))
        try:
            for name in json_columns:
                if row[name] is not None:
                    row[name] = json.loads(row[name])
            line = json.dumps(row, ensure_ascii=False, default=_json_default, allow_nan=False)
        except ValueError:  # NaN or an infinity (RFC 8259 has none), as a double or in JSON text
            raise InvalidQuery("a value is NaN or infinite, which JSON cannot hold: cast the column to "
                               "VARCHAR, or use --format csv") from None
        sys.stdout.write(line + "\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cell(value: Any) -> str:
    """A value as one line of text: NULL for null, ISO-8601 for times, JSON for nested values."""
    if value is None:
        return "NULL"
    if isinstance(value, str):  # control characters escaped: data must not drive the terminal
        text = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
        return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02X}", text)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return _blob(value)
    if isinstance(value, (int, float, Decimal)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, bytes):
        return _blob(value)
    return str(value)


def _blob(value: bytes) -> str:
    """Bytes the way DuckDB prints a BLOB: printable ASCII as is, everything else as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02X}" for b in value)


def _is_numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


# --------------------------------------------------------------------------------- verify
def add_verify(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--digest", metavar="TX:HASH", type=published_digest,
                        help="also prove that tx TX has this published hash (lg.digest(), GET /tx/{t})")


def published_digest(text: str) -> tuple[int, str]:
    tx, _, digest = text.strip().partition(":")
    digest = digest.lower()
    if not (tx.isascii() and tx.isdigit() and len(tx) <= 18 and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not TX:HASH (a tx number, ':', 64 hex digits)")
    return int(tx), digest


def run_verify(args: argparse.Namespace) -> int:
    with open_snapshot(args) as lg:
        report = lg.verify()
        head = lg.digest()
        found = [] if args.digest is None else lg.tx_range(args.digest[0], args.digest[0] + 1)
    if not report.ok:
        print(f"FAILED at tx {report.first_bad_tx}: {one_line(report.reason or 'unknown reason')}")
        return FAILED
    checked = f"checked {report.checked} transactions; latest tx {head['tx']} hash {head['hash']}"
    if args.digest is not None:
        tx, published = args.digest
        if not found:
            holds = "" if lg.complete else " (a running writer's newer txs are not in this snapshot)"
            print(f"FAILED: tx {tx} is not in this ledger{holds}; {checked}")
            return FAILED
        if found[0].hash != published:
            print(f"FAILED: tx {tx} has hash {found[0].hash}, not the published {published}; {checked}")
            return FAILED
        checked += f"; tx {tx} has the published hash"
    print(f"ok: {checked}")
    return OK


# ----------------------------------------------------------------------------------- info
_INFO_LABELS = {
    "data_dir": "data dir", "tx": "latest tx", "tx_time": "latest tx time", "hash": "latest hash",
    "transactions": "transactions", "records": "records", "commands": "commands", "events": "events",
    "datoms": "datoms", "quarantined": "quarantined", "segments": "segments",
    "sealed_through_tx": "sealed through tx", "bytes_on_disk": "bytes on disk", "complete": "complete",
}


def add_info(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="also show consumer lag per partition (env LEDGER_KAFKA_BOOTSTRAP)")
    parser.add_argument("--group", help="consumer group for the lag (env LEDGER_KAFKA_GROUP, default ledger)")


def run_info(args: argparse.Namespace) -> int:
    bootstrap = setting(args.bootstrap, "LEDGER_KAFKA_BOOTSTRAP", "")
    group = setting(args.group, "LEDGER_KAFKA_GROUP", "ledger")
    with open_snapshot(args) as lg:
        info = lg.info()
        if bootstrap:
            import asyncio

            from aiokafka.errors import KafkaError

            from ledger.consumer import partition_lag

            logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the error below says it once
            try:
                # Also the partitions of the consumed topics that no offset was stored for yet.
                topics = consumed_topics(None)
                info["lag"] = asyncio.run(partition_lag(lg, bootstrap=bootstrap, group=group, topics=topics))
            except KafkaError as e:
                raise LedgerError(f"Kafka at {bootstrap} is not reachable for the lag ({e})") from e
            except ValueError as e:  # aiokafka parsing the address
                raise UsageError(f"bootstrap {bootstrap!r} is not HOST:PORT[,HOST:PORT...] ({e})") from e
    if args.json:
        print(json.dumps(info, default=_json_default))
        return OK
    width = max(map(len, _INFO_LABELS.values()))
    for key, label in _INFO_LABELS.items():
        if key in info:
            value = info[key]
            text = (f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                    else "-" if value is None else cell(value))
            print(f"{label.ljust(width)}  {text}")
    for row in info.get("lag", []):
        print(f"{'lag ' + row['topic'] + '/' + str(row['partition']):<{width}}  {row['lag']} "
              f"(next offset {row['next_offset']}, highwater {row['highwater']})")
    return OK


# ----------------------------------------------------------------------------- quarantine
QUARANTINE_SQL = (
    "SELECT tx, seq, kafka_topic AS topic, kafka_partition AS partition, kafka_offset AS offset, "
    "reason, octet_length(value) AS value_bytes, value, key FROM quarantine ORDER BY tx, seq"
)


def add_quarantine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table (default), csv or json (JSON lines; raw bytes as \\xNN text)")
    add_data_dir(parser)


def run_quarantine(args: argparse.Namespace) -> int:
    with open_snapshot(args) as lg:
        table = lg.sql(QUARANTINE_SQL, timeout=None)
    {"table": write_table, "csv": write_csv, "json": write_json}[args.format](table)
    return OK


# --------------------------------------------------------------------------- kafka settings
def add_kafka(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap servers (env LEDGER_KAFKA_BOOTSTRAP)")
    parser.add_argument("--group", help="consumer group (env LEDGER_KAFKA_GROUP, default ledger)")
    parser.add_argument("--topics", help="comma-separated topics (env LEDGER_TOPICS, default "
                        "commands,events)")
    parser.add_argument("--pattern", help="subscribe to topics matching this regex instead "
                        "(env LEDGER_TOPIC_PATTERN)")
    parser.add_argument("--kinds", metavar="TOPIC=KIND,...",
                        help="kind of each topic's records, command or event (env LEDGER_KINDS; the "
                        "commands and events topics are known; others: the envelope's kind, else event)")


def consumed_topics(given: str | None) -> tuple[str, ...]:
    """--topics, else LEDGER_TOPICS, else the commands and events topics."""
    commands = setting(None, "LEDGER_COMMANDS_TOPIC", "commands")
    events = setting(None, "LEDGER_EVENTS_TOPIC", "events")
    topics = setting(given, "LEDGER_TOPICS", f"{commands},{events}")
    return tuple(t.strip() for t in topics.split(",") if t.strip())


def kafka_settings(args: argparse.Namespace) -> dict[str, Any]:
    from ledger.consumer import topic_kinds

    commands = setting(None, "LEDGER_COMMANDS_TOPIC", "commands")
    events = setting(None, "LEDGER_EVENTS_TOPIC", "events")
    wait = setting(None, "LEDGER_FETCH_MAX_WAIT_MS", "")
    return {
        "bootstrap": setting(args.bootstrap, "LEDGER_KAFKA_BOOTSTRAP", ""),
        "group": setting(args.group, "LEDGER_KAFKA_GROUP", "ledger"),
        "topics": consumed_topics(args.topics),
        "pattern": setting(args.pattern, "LEDGER_TOPIC_PATTERN", "") or None,
        "kinds": topic_kinds(commands, events, setting(args.kinds, "LEDGER_KINDS", "")),
        **({"fetch_max_wait_ms": _int_setting("LEDGER_FETCH_MAX_WAIT_MS", wait)} if wait else {}),
    }


def _int_setting(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {text!r}") from None


def open_writer(root: Path, *, standby: bool) -> Ledger:
    """Open the ledger for writing; with `standby`, wait for the current writer to go away."""
    from ledger.errors import LedgerLocked

    announced = False
    while True:
        try:
            return Ledger.open(root)
        except LedgerLocked as e:
            if not standby:
                raise
            if not announced:
                print(f"{PROG}: standby: {one_line(str(e))}", file=sys.stderr, flush=True)
                announced = True
            import time as _time

            _time.sleep(0.2)


# -------------------------------------------------------------------------------- consume
def add_consume(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    add_kafka(parser)
    parser.add_argument("--standby", action="store_true",
                        help="if another process writes this ledger, wait and take over when it stops")


def run_consume(args: argparse.Namespace) -> int:
    import logging

    from ledger.consumer import Consumer, run_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kafka = kafka_settings(args)
    if not kafka["bootstrap"]:
        raise UsageError("no Kafka to consume from: set --bootstrap or LEDGER_KAFKA_BOOTSTRAP")
    with open_writer(data_dir(args), standby=args.standby) as lg:
        print(f"{PROG}: consuming {kafka['pattern'] or ','.join(kafka['topics'])} from "
              f"{kafka['bootstrap']} as group {kafka['group']} into {lg.root}", file=sys.stderr, flush=True)
        run_forever(Consumer(lg, **kafka))
    return OK


# ---------------------------------------------------------------------------------- serve
def add_serve(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--host", help="address to listen on (env LEDGER_HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="port (env LEDGER_PORT, default 8000)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap (env LEDGER_KAFKA_BOOTSTRAP; unset: run the bundled broker)")
    parser.add_argument("--demo", action="store_true", help="also run the example bank processor")
    parser.add_argument("--memory-limit", metavar="SIZE",
                        help="memory this process may allocate: a share of RAM (60%%), a size (8GiB) or "
                             "none (env LEDGER_MEMORY_LIMIT, default 60%%)")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(%|MiB|GiB|TiB)", re.IGNORECASE)
_UNITS = {"mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def limit_memory(text: str) -> int | None:
    """Cap this process's data segment (RLIMIT_DATA) at `text`, so that an allocation past it
    fails (a query: DuckDB's out-of-memory error, HTTP 400) rather than the kernel killing the
    service; DuckDB's own memory_limit is set below it (ledger.ledger._confine). Bytes, or None."""
    import resource

    if text.strip().lower() == "none":
        return None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = 0
    if m := _SIZE.fullmatch(text.strip()):
        unit = ram / 100 if m[2] == "%" else _UNITS[m[2].lower()]
        limit = int(float(m[1]) * unit)
    if not 256 << 20 <= limit <= ram:
        raise UsageError(f"memory limit must be a share of RAM (60%), a size from 256MiB up to RAM "
                         f"(8GiB) or none, got {text!r}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from api.app import create_app
    from api.services import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings(data_dir=data_dir(args), demo=args.demo or setting(None, "LEDGER_DEMO", "") == "1")
    if args.bootstrap:
        settings.bootstrap = args.bootstrap
    host = setting(args.host, "LEDGER_HOST", "127.0.0.1")
    port = _int_setting("--port" if args.port else "LEDGER_PORT", setting(args.port, "LEDGER_PORT", "8000"))
    if not 1 <= port <= 65535:
        raise UsageError(f"port must be between 1 and 65535, got {port}")
    limit_memory(setting(args.memory_limit, "LEDGER_MEMORY_LIMIT", "60%"))  # (the broker's too)
    # Opened here, not in the app's startup: a data dir another process writes is one line and
    # exit code 1, not an ASGI lifespan traceback.
    settings.ledger = Ledger.open(settings.data_dir)
    broker = None
    try:
        if not settings.bootstrap:
            # The embedded default. Started here, in the main thread, so the kernel stops the
            # broker even if this process is killed outright.
            from ledger.broker import Broker, create_topics

            broker = Broker().start()
            create_topics(broker.bootstrap, {settings.commands_topic: settings.partitions,
                                             settings.events_topic: settings.partitions})
            settings.bootstrap, settings.embedded_broker = broker.bootstrap, True
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                    access_log=setting(None, "LEDGER_ACCESS_LOG", "0") == "1", timeout_graceful_shutdown=10)
    finally:
        if broker is not None:
            broker.stop()
        settings.ledger.close()  # (the app closes it when it started; closing twice is a no-op)
    return OK


# --------------------------------------------------------------------------------- broker
def add_broker(parser: argparse.ArgumentParser) -> None:
    from ledger import broker

    broker.add_arguments(parser)


def run_broker(args: argparse.Namespace) -> int:
    from ledger import broker

    return broker.run(args)


# ---------------------------------------------------------------------------------- views
def add_views(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)  # `ledger views --data-dir D list` as well as `ledger views list --data-dir D`
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="the views defined now, with their materialization state")
    add_data_dir(p, inherited=True)
    p = sub.add_parser("show", help="one view: definition, versions, materialization")
    p.add_argument("name")
    add_data_dir(p, inherited=True)
    p = sub.add_parser("rebuild", help="materialize a view as Parquet at the latest tx")
    p.add_argument("name")
    add_data_dir(p, inherited=True)


def run_views(args: argparse.Namespace) -> int:
    from ledger import views

    if args.action == "rebuild":
        return _rebuild_view(args)
    with open_snapshot(args) as lg:
        if args.action == "show":
            print(json.dumps(views.describe(lg, args.name), indent=2, default=_json_default))
            return OK
        defs = views.definitions(lg)
        for name in sorted(defs):
            st = views.status(lg, name)
            mat = f"{st['state']} at tx {st['tx']}" if st["tx"] is not None else st["state"]
            print(f"{name}\tdefined at tx {defs[name].tx}\t{mat}\t{one_line(defs[name].description)}")
    return OK


def _rebuild_view(args: argparse.Namespace) -> int:
    from ledger import views
    from ledger.errors import LedgerLocked

    try:
        lg = Ledger.open(existing_ledger(args))
    except LedgerLocked as e:
        raise LedgerError(
            f"{one_line(str(e))}; rebuild through that service instead: POST /views/{args.name}/rebuild"
        ) from e
    started = datetime.now().astimezone()

    def progress(fraction: float, message: str) -> None:
        if (datetime.now().astimezone() - started).total_seconds() > 1 or fraction >= 1:
            print(f"\r{PROG}: rebuild {args.name}: {fraction:4.0%} {message}".ljust(70), end="",
                  file=sys.stderr, flush=True)

    with lg:
        status = views.rebuild(lg, args.name, on_progress=progress, timeout=None)  # Ctrl-C stops it
    print(file=sys.stderr)
    print(f"{args.name}: {status['rows']} rows at tx {status['tx']} in {status['seconds']} s")
    return OK


# --------------------------------------------------------------------------------- export
def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=time_point, metavar="T",
                        help="a tx number or an ISO-8601 instant (default: the latest tx)")
    parser.add_argument("--out", required=True, type=utf8_path, metavar="DIR", help="directory to write into")
    parser.add_argument("--tables", type=utf8_argument, metavar="T1,T2",
                        help="relations and views to export (default: every relation)")
    add_data_dir(parser)


def run_export(args: argparse.Namespace) -> int:
    from ledger.export import export_dir

    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    with open_snapshot(args) as lg:
        manifest = export_dir(lg, outside_ledger(args.out, lg.root), as_of=args.as_of, tables=tables)
    for name, entry in manifest["tables"].items():
        print(f"{name}\t{entry['rows']} rows\t{entry['file']}")
    d = manifest["digest"]
    print(f"as of tx {manifest['as_of_tx']}: hash {d['hash']}")
    return OK


# ----------------------------------------------------------------------------- the command
@dataclass(frozen=True, slots=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "sql": Subcommand("run one read-only SQL query (as of a tx or instant)", add_sql, run_sql),
    "verify": Subcommand("recompute the hash chain; exit 1 naming the first bad tx", add_verify, run_verify),
    "info": Subcommand("counts, latest tx, segments and size on disk", add_info, run_info),
    "serve": Subcommand("run the HTTP API, the ledger consumer and (by default) a bundled broker",
                        add_serve, run_serve),
    "quarantine": Subcommand("list input that could not become records, with the reason",
                             add_quarantine, run_quarantine),
    "consume": Subcommand("ingest Kafka topics into the ledger, exactly once", add_consume, run_consume),
    "views": Subcommand("list, show or rebuild (materialize) views", add_views, run_views),
    "export": Subcommand("write a Parquet slice of the ledger as of a tx, with a manifest", add_export,
                         run_export),
    "broker": Subcommand("run the bundled Kafka-compatible broker in the foreground", add_broker,
                         run_broker),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Commander Ledger: a temporal ledger of commands and events.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; every failure becomes one line on stderr and a non-zero exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else OK
    except UsageError as e:
        return _fail(str(e), USAGE)
    except LedgerError as e:
        return _fail(str(e), FAILED)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ledger sql ... | head`): stop quietly, as other Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILED
    except OSError as e:  # a file it cannot write or read: "out.csv: Is a directory"
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), FAILED)
    except Exception as e:
        if os.environ.get("LEDGER_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e} (set LEDGER_DEBUG=1 for a traceback)", FAILED)


if __name__ == "__main__":
    sys.exit(main())
