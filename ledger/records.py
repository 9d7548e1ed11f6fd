"""The domain model: records, datoms, transactions and reports, and validation of new records.

Everything here is plain Python; pyarrow and DuckDB types appear only in `ledger.storage`.
"""

from __future__ import annotations

import math
import random
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from ledger.errors import InvalidRecord, InvalidTime

JSON = Any  # a value json.loads could return
KINDS = ("command", "event")
_CORE = frozenset({"id", "kind", "action", "data", "timestamp"})
_FIELDS = frozenset(
    {"id", "kind", "action", "parent", "data", "timestamp", "key", "headers",
     "topic", "partition", "offset", "kafka_timestamp"}
)


@dataclass(frozen=True, slots=True)
class Record:
    """One command or event as stored, with the ledger's stamps."""

    id: str
    kind: str
    action: str
    data: dict[str, JSON]
    valid_time: datetime
    tx: int
    seq: int
    tx_time: datetime
    hash: str
    parent: str | None = None
    key: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    kafka_timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class Datom:
    """An assertion (op=True) or retraction (op=False) of attribute `a` of entity `e`."""

    e: str
    a: str
    v: JSON
    tx: int
    tx_time: datetime
    op: bool
    valid_time: datetime
    record_id: str


@dataclass(frozen=True, slots=True)
class Transaction:
    """One committed transaction with its metadata and records (what tx_range yields)."""

    tx: int
    tx_time: datetime
    hash: str
    prev_hash: str
    meta: dict[str, JSON]
    records: tuple[Record, ...] = ()
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class TxReport:
    """What append() returns: the new transaction and what happened to each record."""

    tx: int
    tx_time: datetime
    hash: str
    ids: tuple[str, ...]  # ids of the records this tx stored, in order
    duplicates: tuple[str, ...] = ()  # ids already in the ledger (or repeated in the batch)
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of recomputing the hash chain from stored data."""

    ok: bool
    checked: int
    first_bad_tx: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Quarantined:
    """Raw input that could not become a record: kept with its provenance and the reason."""

    reason: str
    value: bytes | None
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    kafka_timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class OffsetMark:
    """A consumer's position in one partition, stored in the same transaction as the records."""

    next_offset: int
    generation: int = 0
    last_digest: str | None = None  # sha256 of the last message consumed: detects a recreated topic


class NewRecord(msgspec.Struct, frozen=True, gc=False):
    """A validated record not yet stamped with tx / tx_time (a Struct: built once per record on
    the append path, where a frozen dataclass's __init__ is measurably slow). Untracked by the
    garbage collector (gc=False: nothing it holds refers back to it): 10,000 tracked ones a batch
    set off collections that took 8% of an append's time, 2.5% untracked (measured)."""

    id: str
    kind: str
    action: str
    data: dict[str, JSON]
    data_json: str
    valid_time: datetime | None
    parent: str | None
    key: str | None
    headers: tuple[tuple[str, str], ...]
    topic: str | None
    partition: int | None
    offset: int | None
    kafka_timestamp: datetime | None


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562): 48-bit ms timestamp, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = random.getrandbits(80)  # reseeded in forked children; no syscall (measured under load)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def to_utc(value: object, what: str) -> datetime:
    """A tz-aware UTC datetime from a datetime or ISO-8601 string; naive times are refused."""
    if isinstance(value, str):
        try:
            text = value.strip()
            value = datetime.fromisoformat(text[:-1] + "Z" if text.endswith("z") else text)
        except ValueError as e:
            raise InvalidTime(f"{what}: {value!r} is not an ISO-8601 instant") from e
    if type(value) is datetime and value.tzinfo is UTC:  # the common case ("...Z"): nothing to do
        return value
    if not isinstance(value, datetime):
        raise InvalidTime(f"{what}: expected a datetime or ISO-8601 string, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidTime(f"{what}: {value.isoformat()} has no timezone; give an offset such as Z")
    if value.tzinfo is UTC:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError as e:  # e.g. 0001-01-01T00:00+05:00 is in year 0 in UTC
        raise InvalidTime(f"{what}: {value.isoformat()} is outside the years 1-9999 in UTC") from e


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages ("got array", not "got list")."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def utf8_text(value: str, what: str) -> str:
    """`value` if it can be stored as UTF-8; lone surrogates (e.g. from bad decoding) cannot."""
    if value.isascii():  # a flag read: only other text can hold a surrogate
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} has a lone surrogate {value[e.start]!r}, which is not UTF-8") from e
    return value


_encode = msgspec.json.Encoder().encode


def dumps(value: JSON) -> str:
    """Compact JSON that keeps key order and non-ASCII text. Values must already be checked
    (`check_json`): the encoder would write NaN as null."""
    try:
        text: str = _encode(value).decode()
    except (TypeError, msgspec.EncodeError) as e:
        raise ValueError(str(e)) from e
    return text


def _as_base_type(value: object) -> object:
    """For the encoder: a subclass of str, int, float or dict (numpy.str_, an IntEnum, a
    pandas-made mapping...) as the plain JSON value it stands for."""
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise NotImplementedError(type(value).__name__)


_encode_subclasses = msgspec.json.Encoder(enc_hook=_as_base_type).encode


def _plain_json(value: object) -> str:
    try:
        return _encode_subclasses(value).decode()
    except (TypeError, msgspec.EncodeError) as e:
        raise ValueError(str(e)) from e


_decode = msgspec.json.decode


def loads(text: str | bytes) -> Any:
    """Parse JSON text the ledger wrote."""
    return _decode(text)


MAX_DEPTH = 127  # containers nested in a record's data (its Kafka envelope makes 128)


def check_json(value: object, path: str, depth: int = 1) -> None:
    """Refuse what JSON cannot hold (NaN, lone surrogates, non-string keys, other types) and
    containers nested deeper than MAX_DEPTH (hashing, reads and verify recurse per level)."""
    if isinstance(value, (Mapping, list, tuple)) and depth > MAX_DEPTH:
        raise ValueError(f"{path} nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        utf8_text(value, path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value}, which JSON cannot represent")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-string key {k!r}")
            check_json(v, f"{path}.{utf8_text(k, f'{path} key')}", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json(v, f"{path}[{i}]", depth + 1)
        return
    raise ValueError(f"{path} is a {type(value).__name__}, which is not a JSON value")


_PLAIN = frozenset({str, int, bool, type(None)})


def _check_data(data: Mapping[str, object]) -> tuple[dict[str, Any], str]:
    """Check a record's `data`; return it as a plain dict, and its JSON text. Flat fields are
    checked here; only floats and nested values take the full walk (strings are checked by the
    encoder, which refuses lone surrogates; on that error the walk names the field)."""
    for k, v in data.items():
        if type(k) is not str and not isinstance(k, str):
            raise ValueError(f"data has a non-string key {k!r}")
        if type(v) not in _PLAIN:
            check_json(v, f"data.{k}", 2)
    try:
        return dict(data), dumps(data)
    except ValueError:
        check_json(data, "data")  # raises, naming a value JSON cannot hold
    # Else what the plain encoder refused are subclasses (numpy.str_, an IntEnum, a mapping type):
    # stored, hashed and indexed as the plain values they stand for.
    text = _plain_json(data)
    return loads(text), text


def plain(value: object) -> Any:
    """A value that passed `check_json`, with every subclass (of str, int, float, dict) replaced
    by the plain value it stands for."""
    return loads(_plain_json(value))


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(value: object) -> str:
    if isinstance(value, str):
        if _CANONICAL_UUID.fullmatch(value):
            return str(value)  # (a subclass as plain str)
        try:
            return str(uuid.UUID(value))
        except ValueError as e:
            raise ValueError(f"{value!r} is not a UUID") from e
    if isinstance(value, uuid.UUID):
        return str(value)
    raise ValueError(f"must be a UUID, got {type(value).__name__}")


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, (Sequence, type({}.items()))) or isinstance(items, (str, bytes)):
        raise ValueError("must be a mapping or a list of (name, value) pairs")
    out = []
    pair: object
    for pair in items:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError("must be a mapping or a list of (name, value) pairs")
        name, val = pair
        if isinstance(val, bytes):
            val = val.decode("utf-8", "backslashreplace")
        if not isinstance(name, str) or not isinstance(val, str):
            raise ValueError(f"header {name!r}: names and values must be strings")
        out.append((utf8_text(str(name), "header name"), utf8_text(str(val), f"header {name!r}")))
    return tuple(out)


def _optional_str(rec: Mapping[str, object], name: str) -> str | None:
    value = rec.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return utf8_text(str(value), name)


def _optional_int(rec: Mapping[str, object], name: str, bits: int) -> int | None:
    value = rec.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"must be an integer from 0 to 2**{bits} - 1")
    return value


def validate(index: int, rec: object) -> NewRecord:
    """Check one input mapping and normalise it; raises InvalidRecord naming the field."""
    if type(rec) is not dict and not isinstance(rec, Mapping):
        raise InvalidRecord(index, "*", f"a record must be a mapping, got {type(rec).__name__}")
    core = _CORE.issuperset(rec)  # no parent nor Kafka provenance: most appends
    if not core and not _FIELDS.issuperset(rec):
        unknown = sorted(set(rec) - _FIELDS)
        raise InvalidRecord(index, unknown[0], f"unknown field; allowed: {', '.join(sorted(_FIELDS))}")
    name = "kind"
    try:
        kind = rec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"must be 'command' or 'event', got {kind!r}")
        kind = str(kind)  # (a str subclass compares equal)
        name = "action"
        action = rec.get("action")
        if not isinstance(action, str) or not action.strip():
            raise ValueError("must be a non-empty string")
        action = utf8_text(str(action), "action")
        name = "data"
        data = rec.get("data")
        if type(data) is not dict and not isinstance(data, Mapping):
            raise ValueError(f"must be a JSON object, got {type(data).__name__}")
        data, data_json = _check_data(data)
        name = "id"
        raw_id = rec.get("id")
        rid = uuid7() if raw_id is None else _uuid(raw_id)
        name = "timestamp"
        ts = rec.get("timestamp")
        valid_time = None if ts is None else to_utc(ts, "timestamp")
        parent = key = topic = partition = offset = kafka_ts = None
        headers: tuple[tuple[str, str], ...] = ()
        if not core:
            name = "parent"
            parent = rec.get("parent")
            parent = str(parent) if isinstance(parent, uuid.UUID) else _optional_str(rec, "parent")
            name = "kafka_timestamp"
            kts = rec.get("kafka_timestamp")
            kafka_ts = None if kts is None else to_utc(kts, "kafka_timestamp")
            name = "key"
            key = _optional_str(rec, "key")
            name = "headers"
            headers = _headers(rec.get("headers") or ())
            name = "topic"
            topic = _optional_str(rec, "topic")
            name = "partition"
            partition = _optional_int(rec, "partition", 31)
            name = "offset"
            offset = _optional_int(rec, "offset", 63)
    except (ValueError, InvalidTime) as e:
        raise InvalidRecord(index, name, str(e)) from e
    return NewRecord(
        id=rid, kind=kind, action=action, data=data, data_json=data_json,
        valid_time=valid_time, parent=parent, key=key, headers=headers, topic=topic,
        partition=partition, offset=offset, kafka_timestamp=kafka_ts,
    )
