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

from api.errors import bad_request, problem

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


def _dangling_ref(schema: object) -> str | None:
    """The first `#/...` $ref whose JSON pointer finds nothing in the schema, if any."""
    for node in _subschemas(schema):
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            continue
        target: object = schema
        for part in ref[2:].split("/"):
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                return ref
    return None


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
            raise bad_request("a schema must be a JSON object", field="schema")
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
        v = self._validators.get(action)
        pointer = None if v is None else v.schema.get("x-entity-key")
        if not isinstance(pointer, str):
            return None
        value: Any = data
        for part in pointer.strip("/").split("/"):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
