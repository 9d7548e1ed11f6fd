"""Per-action JSON Schemas for command data, loaded from directories and persisted on change."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

import jsonschema._keywords
import jsonschema._utils
import re2
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing.exceptions import Unresolvable

from api.errors import bad_request, json_type, problem

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

log = logging.getLogger("api")
ACTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


_VALUES = frozenset({"const", "enum", "examples", "default"})  # data, not subschemas

# A schema's `pattern` / `patternProperties` run on RE2, in time linear in the input: with Python's
# backtracking `re`, one pattern like ^(a+)+$ and one crafted string would hold a thread for ever.
# RE2 has no lookaround or backreferences; such patterns are refused when the schema is put.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
_ECMA_U = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9A-Fa-f]{4})")  # ECMA-262 \uXXXX is RE2's \x{XXXX}


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    return re2.compile(_ECMA_U.sub(r"\1\\x{\2}", pattern), _RE2_OPTIONS)


class _LinearRe:
    """Stands in for the `re` module where jsonschema matches patterns (it calls re.search only)."""

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        return _compiled(pattern).search(string)


jsonschema._keywords.re = _LinearRe
jsonschema._utils.re = _LinearRe


def _subschemas(schema: object) -> Iterator[dict[str, Any]]:
    """Every object in a schema, depth first, skipping the keywords whose values are data."""
    if isinstance(schema, list):
        for item in schema:
            yield from _subschemas(item)
    elif isinstance(schema, dict):
        yield schema
        for key, value in schema.items():
            if key not in _VALUES:
                yield from _subschemas(value)


def _pattern_error(schema: object) -> str | None:
    """Why the first pattern in the schema cannot run on RE2, if one cannot."""
    for node in _subschemas(schema):
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            try:
                _compiled(pattern)
            except re2.error as e:
                why = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
                return (f"pattern /{pattern}/ is not supported ({why}): patterns run on RE2, in linear "
                        "time, which has no lookaround and no backreferences")
    return None


def _ids(schema: object) -> set[str]:
    """The `$id`s the schema declares (refs to them resolve inside it)."""
    return {node["$id"] for node in _subschemas(schema) if isinstance(node.get("$id"), str)}


def _refs(schema: object) -> Iterator[str]:
    for node in _subschemas(schema):
        for key in ("$ref", "$dynamicRef"):
            if isinstance(node.get(key), str):
                yield node[key]


def _remote_ref(schema: object) -> str | None:
    """The first $ref / $dynamicRef that points outside the schema, if any."""
    ids = _ids(schema)
    return next((r for r in _refs(schema) if r.split("#")[0] not in ids | {""}), None)


def _tokens(pointer: str) -> list[str]:
    """An RFC 6901 JSON pointer's reference tokens: "/a~1b/c~0d" is ["a/b", "c~d"]."""
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


_MISSING = object()
_INDEX = re.compile(r"0|[1-9][0-9]*")  # an array index in a pointer: ASCII digits, no leading zero


def _follow(document: object, tokens: list[str]) -> object:
    """What the tokens point to in the document, or _MISSING."""
    for token in tokens:
        if isinstance(document, dict) and token in document:
            document = document[token]
        elif isinstance(document, list) and _INDEX.fullmatch(token) and int(token) < len(document):
            document = document[int(token)]
        else:
            return _MISSING
    return document


def _dangling_ref(schema: object) -> str | None:
    """The first `#/...` $ref whose JSON pointer finds nothing in the schema, if any."""
    for node in _subschemas(schema):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/") and _follow(schema, _tokens(ref[1:])) is _MISSING:
            return ref
    return None


def _entity_key_error(schema: dict[str, Any]) -> str | None:
    """Why the schema's `x-entity-key` cannot name a Kafka key, if it cannot. It must be an RFC 6901
    pointer into data ("/account", "/customer/id"; in a name "~1" stands for "/" and "~0" for "~"),
    and the schema must allow a string or a number there. Only `properties`, `additionalProperties`
    and `type` are followed; past anything else ($ref, patternProperties, arrays) it is trusted."""
    if "x-entity-key" not in schema:
        return None
    pointer = schema["x-entity-key"]
    if not isinstance(pointer, str) or not pointer.startswith("/"):
        return f"x-entity-key {pointer!r} must be a JSON pointer into data, such as \"/account\""
    if re.search(r"~(?![01])", pointer):
        return f"x-entity-key {pointer!r}: in a name, '~' is written '~0' and '/' is written '~1'"
    node: object = schema
    for token in _tokens(pointer):
        if node is False:
            break
        if not isinstance(node, dict):  # `true`: anything goes below
            return None
        if (types := _types(node)) is not None and "object" not in types:
            if "array" in types:
                return None
            return f"x-entity-key {pointer!r} looks for {token!r} inside a {' or '.join(types)} value"
        properties = node.get("properties")
        if isinstance(properties, dict) and token in properties:
            node = properties[token]
        elif "patternProperties" in node:
            return None
        else:
            node = node.get("additionalProperties", True)
    if node is False:
        return f"x-entity-key {pointer!r} points to a member the schema does not allow"
    types = _types(node) if isinstance(node, dict) else None
    if types is not None and not {"string", "integer", "number"} & set(types):
        return (f"x-entity-key {pointer!r} points to a {' or '.join(types)} value; a key is a string "
                "or an integer")
    return None


def _types(node: dict[str, Any]) -> list[str] | None:
    """A schema's `type` as a list; None when it does not say."""
    types = node.get("type")
    return [types] if isinstance(types, str) else types if isinstance(types, list) else None


class SchemaRegistry:
    """Schemas by action. `x-entity-key` (a JSON pointer into data) names the Kafka key."""

    def __init__(self, directory: Path, *, strict: bool = False, extra_dirs: tuple[Path, ...] = ()) -> None:
        self.directory = directory
        self.strict = strict
        self._validators: dict[str, Draft202012Validator] = {}
        for d in (*extra_dirs, directory):
            if d.is_dir():
                for path in sorted(d.glob("*.json")):
                    schema = json.loads(path.read_text(encoding="utf-8"))
                    try:
                        self._install(path.stem, schema)
                    except SchemaError as e:  # accepted before these checks: check() will say why
                        log.warning("schema %s: %s", path, e.message)
                        self._validators[path.stem] = Draft202012Validator(schema)
                    if isinstance(schema, dict) and (why := _entity_key_error(schema)):
                        log.warning("schema %s: %s; its commands are keyed by their ids", path, why)

    def _install(self, action: str, schema: dict[str, Any]) -> None:
        Draft202012Validator.check_schema(schema)
        if remote := _remote_ref(schema):  # the service fetches nothing
            raise SchemaError(f"$ref {remote!r} points outside the schema; only its own refs resolve")
        if why := _pattern_error(schema):
            raise SchemaError(why)
        nested_ids = _ids(schema) - {schema.get("$id")}  # "#/..." inside those is relative to them
        if not nested_ids and (dangling := _dangling_ref(schema)):
            raise SchemaError(f"$ref {dangling!r} points to nothing in the schema")
        validator = Draft202012Validator(schema)
        try:
            validator.is_valid({})
        except RecursionError as e:
            raise SchemaError("the schema refers to itself without end") from e
        self._validators[action] = validator

    def all(self) -> dict[str, Any]:
        return {a: v.schema for a, v in sorted(self._validators.items())}

    def get(self, action: str) -> dict[str, Any] | None:
        v = self._validators.get(action)
        return None if v is None else dict(v.schema)

    def put(self, action: str, schema: object) -> None:
        if not ACTION.match(action):
            raise bad_request(f"action {action!r} must match {ACTION.pattern}", field="action")
        if not isinstance(schema, dict):
            raise bad_request(f"body must be a JSON Schema object, got {json_type(schema)}", field="body")
        if why := _entity_key_error(schema):
            raise bad_request(why, field="x-entity-key")
        try:
            self._install(action, schema)
        except SchemaError as e:
            raise bad_request(f"not a valid JSON Schema: {e.message}", field="schema") from e
        except RecursionError as e:  # checking the schema itself recursed too deep
            raise bad_request("not a valid JSON Schema: it is nested too deeply", field="schema") from e
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{action}.json.tmp"
        tmp.write_text(json.dumps(schema, indent=2), encoding="utf-8")
        os.replace(tmp, self.directory / f"{action}.json")

    def check(self, action: str, data: dict[str, Any]) -> None:
        """Raise 422 listing every violation with its JSON pointer; 422 for unknown actions if strict."""
        v = self._validators.get(action)
        if v is None:
            if self.strict:
                raise problem(422, "Unknown action", f"no schema is registered for action {action!r} "
                              "and the service is strict", kind="unknown-action", field="action")
            return
        try:
            errors = sorted(v.iter_errors(data), key=lambda e: list(e.absolute_path))
        except (RecursionError, Unresolvable, re2.error) as e:
            raise problem(500, "Schema error", f"the schema registered for {action!r} cannot be "
                          f"evaluated ({type(e).__name__}: {e}); replace it with PUT /schemas/{action}",
                          kind="schema-error") from e
        if errors:
            violations = [
                {"pointer": "/data" + "".join(f"/{p}" for p in e.absolute_path), "message": e.message}
                for e in errors
            ]
            raise problem(422, "Schema violation", f"data does not match the schema of {action!r}: "
                          + "; ".join(f"{x['pointer']}: {x['message']}" for x in violations),
                          kind="schema-violation", errors=violations)

    def entity_key(self, action: str, data: dict[str, Any]) -> str | None:
        """The Kafka key `x-entity-key` picks from the command's data: the string or integer there.
        None (the caller keys the command by its own id) when the action has no such pointer, or
        this data has nothing there or something else (an object, a float, a boolean, null): the
        schema may leave the member optional, and a command it accepts is not refused for its key."""
        v = self._validators.get(action)
        pointer = None if v is None else v.schema.get("x-entity-key")
        if not isinstance(pointer, str) or not pointer.startswith("/"):  # (refused by put)
            return None
        value = _follow(data, _tokens(pointer))
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
