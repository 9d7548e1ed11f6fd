"""DuckDB types Parquet cannot hold, and the type each is written as instead (text that DuckDB
casts back exactly), for export files and materialized views alike; and the DuckDB values that
Arrow, which carries every query result, gets wrong."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from collections.abc import Mapping

# DuckDB types Parquet has no form for (INTERVAL, UNION), or that the Arrow route writes wrongly
# (UHUGEINT wraps, a TIMETZ loses its offset, BIT and BIGNUM become their internal bytes): written
# as DuckDB's text for them, which casts back exactly; a VARIANT as JSON text.
_AS_TEXT = frozenset({"INTERVAL", "UHUGEINT", "BIGNUM", "VARINT", "BIT", "TIME WITH TIME ZONE", "UNION"})
_AS_JSON = frozenset({"VARIANT"})
# Of those, the ones DuckDB's Arrow export gets wrong (INTERVAL and UNION have Arrow types).
_WRONG_IN_ARROW = _AS_TEXT - {"INTERVAL", "UNION"}
_MAY_BE_WRONG_IN_ARROW = re.compile("UHUGEINT|BIGNUM|VARINT|BIT|TIME WITH|VARIANT")
# A DuckDB type name as DESCRIBE prints it, in tokens: quoted names, quoted strings, words, marks.
_TYPE_TOKEN = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'|TIME(?:STAMP)? WITH TIME ZONE|\w+|\S')


def arrow_type(duckdb_type: str) -> str | None:
    """The type a query result's column is cast to before it goes to Arrow (`UHUGEINT` ->
    `VARCHAR`, `STRUCT(t TIMETZ)` -> `STRUCT(t VARCHAR)`), or None when Arrow holds it as it is."""
    if not _MAY_BE_WRONG_IN_ARROW.search(duckdb_type):
        return None  # (most types: no parsing)
    return portable_type(duckdb_type, _WRONG_IN_ARROW)


def portable_type(duckdb_type: str, as_text: frozenset[str] = _AS_TEXT) -> str | None:
    """The type a DuckDB type is written to Parquet as (`INTERVAL` -> `VARCHAR`,
    `STRUCT(a INTERVAL[])` -> `STRUCT(a VARCHAR[])`), or None when it is written as it is;
    `as_text` names the types written as text."""
    tokens: list[str] = _TYPE_TOKEN.findall(duckdb_type)
    pos, changed = 0, False

    def one() -> str:
        nonlocal pos, changed
        name, pos = tokens[pos], pos + 1
        args: list[str] = []
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            while tokens[pos] != ")":
                if name.upper() in ("STRUCT", "UNION"):  # (field TYPE, ...)
                    field, pos = tokens[pos], pos + 1
                    args.append(f"{field} {one()}")
                elif name.upper() == "MAP":  # (KEY, VALUE)
                    args.append(one())
                else:  # DECIMAL(18,3), ENUM('a', 'b'): as they are
                    args.append(tokens[pos])
                    pos += 1
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
        text = name + (f"({', '.join(args)})" if args else "")
        if name.upper() in as_text | _AS_JSON:
            changed = True
            text = "VARCHAR" if name.upper() in as_text else "JSON"
        while pos < len(tokens) and tokens[pos] == "[":  # LIST (T[]) or ARRAY (T[3])
            end = tokens.index("]", pos)
            text += "".join(tokens[pos:end + 1])
            pos = end + 1
        return text

    portable = one()
    return portable if changed else None


def star_replace(casts: Mapping[str, str]) -> str:
    """`*`, with the columns named cast to the types given."""
    if not casts:
        return "*"
    return f"* REPLACE ({', '.join(f'CAST({_ident(c)} AS {t}) AS {_ident(c)}' for c, t in casts.items())})"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# DuckDB's infinity and -infinity, as its Arrow export writes them (microseconds; days for DATE).
_INFINITE = {"timestamp": (2**63 - 1, -(2**63 - 1)), "date32": (2**31 - 1, -(2**31 - 1))}


def infinite_column(table: pa.Table) -> str | None:
    """The first column holding DuckDB's infinity or -infinity for a time: Arrow holds it as an
    ordinary (far-away) value, which text formats would print as a date it is not."""
    for name, col in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_timestamp(col.type):
            kind = "timestamp"
        elif pa.types.is_date32(col.type):
            kind = "date32"
        else:
            continue
        if col.null_count == len(col):
            continue
        lo, hi = pc.min_max(col.cast(pa.int64() if kind == "timestamp" else pa.int32())).values()
        if hi.as_py() == _INFINITE[kind][0] or lo.as_py() == _INFINITE[kind][1]:
            return str(name)
    return None
