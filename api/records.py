"""Reading records for the API: JSON shapes, filters and stable cursors (shared by commands,
events and updates)."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from api.errors import bad_request
from ledger.errors import InvalidTime
from ledger.records import to_utc

if TYPE_CHECKING:
    from ledger import Ledger

COLUMNS = (
    "id, kind, action, parent, data, valid_time, tx, seq, tx_time, key, headers, "
    "kafka_topic, kafka_partition, kafka_offset"
)
MAX_LIMIT = 1000


def record_json(row: dict[str, Any]) -> dict[str, Any]:
    """A stored record as the API shows it."""
    return {
        "id": row["id"], "kind": row["kind"], "action": row["action"], "parent": row["parent"],
        "data": json.loads(row["data"]), "timestamp": _iso(row["valid_time"]), "tx": row["tx"],
        "seq": row["seq"], "tx_time": _iso(row["tx_time"]), "key": row["key"],
        "headers": json.loads(row["headers"]) if row["headers"] else [],
        "topic": row["kafka_topic"], "partition": row["kafka_partition"],
        "offset": row["kafka_offset"],
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def encode_cursor(tx: int, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{tx}.{seq}".encode()).decode().rstrip("=")


# What encode_cursor is given: the (tx, seq) of a record the page ended on. tx is a BIGINT, seq an
# INTEGER counted from 0 within its tx; canonical decimal, no sign, no leading zeros.
_CURSOR = re.compile(r"(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,9})")
_MAX_TX, _MAX_SEQ = 2**63 - 1, 2**31 - 1


def decode_cursor(cursor: str) -> tuple[int, int]:
    """The (tx, seq) of a cursor encode_cursor made; 400 naming `cursor` for anything else (another
    spelling of the same numbers too, so a cursor is opaque and cannot be edited into a position)."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except ValueError:  # not base64, or not ASCII once decoded (UnicodeDecodeError is a ValueError)
        text = ""
    if m := _CURSOR.fullmatch(text):
        tx, seq = int(m[1]), int(m[2])
        if tx <= _MAX_TX and seq <= _MAX_SEQ and encode_cursor(tx, seq) == cursor:
            return tx, seq
    raise bad_request(f"cursor {cursor!r} is not one this API returned", field="cursor")


def parse_position(text: str, what: str) -> tuple[int, int]:
    """A Last-Event-ID ("tx.seq") or an after_tx ("tx") as a (tx, seq) position to resume after."""
    if not (m := re.fullmatch(r"([0-9]{1,18})(?:\.([0-9]{1,9}))?", text)):
        raise bad_request(f"{what} {text!r} must be 'TX' or 'TX.SEQ'", field=what)
    return int(m[1]), 2**31 if m[2] is None else int(m[2])


def time_param(text: str | None, what: str, *, head: int | None = None) -> int | datetime | None:
    """A tx number (ASCII digits) or an ISO-8601 instant with its offset; 400 naming `what`.
    With `head` (the latest tx) a later tx number is refused: a point in time that names a tx
    not written yet would answer differently once it is (an instant is read as of the last tx
    committed by then, so a future instant reads as of the latest)."""
    if text is None or text == "":
        return None
    if text.isascii() and text.isdigit():
        if len(text) > 18:
            raise bad_request(f"{what}: tx {text[:24]}... is out of range", field=what, kind="invalid-time")
        if head is not None and int(text) > head:
            raise bad_request(f"{what}: tx {int(text)} is not in the ledger yet (the latest is {head})",
                              field=what, kind="invalid-time")
        return int(text)
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        raise bad_request(f"{what}: a tx number is at least 0, got {text}", field=what, kind="invalid-time")
    return instant_param(text, what)


def instant_param(text: str | None, what: str) -> datetime | None:
    """An ISO-8601 instant with its offset (a valid time); 400 naming `what`."""
    if text is None or text == "":
        return None
    try:
        return to_utc(text, what)
    except InvalidTime as e:
        raise bad_request(str(e), field=what, kind="invalid-time") from e


def list_records(
    ledger: Ledger, *, kind: str | None, actions: list[str] | None = None, after: tuple[int, int] = (0, -1),
    since: str | None = None, until: str | None = None, as_of: str | None = None,
    limit: int = 100, upto: int | None = None,
) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """Records in (tx, seq) order after a position; the next position, if there may be more."""
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be between 1 and {MAX_LIMIT}, got {limit}", field="limit")
    where = ["(tx > $atx OR (tx = $atx AND seq > $aseq))"]
    params: dict[str, Any] = {"atx": after[0], "aseq": after[1], "lim": limit}
    if kind:
        where.append("kind = $kind")
        params["kind"] = kind
    if actions:
        where.append("action IN (SELECT unnest($actions::VARCHAR[]))")
        params["actions"] = actions
    low, high = time_param(since, "since"), time_param(until, "until")  # (empty: unset)
    if low is not None:
        where.append("tx > $since")
        params["since"] = ledger.resolve(low)
    if high is not None:
        where.append("tx <= $until")
        params["until"] = ledger.resolve(high)
    pinned = time_param(as_of, "as_of", head=ledger.head.tx)
    if pinned is None:
        pinned = upto
    rows = ledger.sql(
        f"SELECT {COLUMNS} FROM log WHERE {' AND '.join(where)} ORDER BY tx, seq LIMIT $lim",
        as_of=pinned, params=params,
    ).to_pylist()
    nxt = (rows[-1]["tx"], rows[-1]["seq"]) if len(rows) == limit else None
    return [record_json(r) for r in rows], nxt


def get_record(ledger: Ledger, record_id: str, kind: str) -> dict[str, Any] | None:
    rows = ledger.sql(
        f"SELECT {COLUMNS} FROM log WHERE id = $id AND kind = $kind", params={"id": record_id, "kind": kind}
    ).to_pylist()
    return record_json(rows[0]) if rows else None


def children(ledger: Ledger, command_id: str) -> list[str]:
    rows = ledger.sql(
        "SELECT id FROM events WHERE parent = $p ORDER BY tx, seq", params={"p": command_id}
    ).to_pylist()
    return [r["id"] for r in rows]
