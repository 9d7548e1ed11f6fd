"""DuckDB types Parquet cannot hold, and the type each is written as instead (text that DuckDB
casts back exactly), for export files and materialized views alike."""

from __future__ import annotations

import re

# DuckDB types Parquet has no form for (INTERVAL, UNION), or that the Arrow route writes wrongly
# (UHUGEINT wraps, a TIMETZ loses its offset, BIT and BIGNUM become their internal bytes): written
# as DuckDB's text for them, which casts back exactly; a VARIANT as JSON text.
_AS_TEXT = frozenset({"INTERVAL", "UHUGEINT", "BIGNUM", "VARINT", "BIT", "TIME WITH TIME ZONE", "UNION"})
_AS_JSON = frozenset({"VARIANT"})
# A DuckDB type name as DESCRIBE prints it, in tokens: quoted names, quoted strings, words, marks.
_TYPE_TOKEN = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'|TIME(?:STAMP)? WITH TIME ZONE|\w+|\S')


def portable_type(duckdb_type: str) -> str | None:
    """The type a DuckDB type is written to Parquet as (`INTERVAL` -> `VARCHAR`,
    `STRUCT(a INTERVAL[])` -> `STRUCT(a VARCHAR[])`), or None when it is written as it is."""
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
        if name.upper() in _AS_TEXT | _AS_JSON:
            changed = True
            text = "VARCHAR" if name.upper() in _AS_TEXT else "JSON"
        while pos < len(tokens) and tokens[pos] == "[":  # LIST (T[]) or ARRAY (T[3])
            end = tokens.index("]", pos)
            text += "".join(tokens[pos:end + 1])
            pos = end + 1
        return text

    portable = one()
    return portable if changed else None
