"""Per-action JSON Schemas for command data, loaded from directories and persisted on change."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import jsonschema._keywords
import jsonschema._utils
import jsonschema.validators
import re2
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema_specifications import REGISTRY as SPECIFICATIONS
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from api.errors import bad_request, json_type, problem

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

    from referencing._core import Resolver

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

# "integer" is a number written without a fraction or an exponent: JSON Schema lets 1.0 and 1e2 be
# integers, and a processor that wants an integer (the bank's amounts) gets a float and refuses it,
# after the API said 202 (found by audit).
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=(
    Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))))


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
    return next((why for node in _subschemas(schema) if (why := _own_pattern_error(node))), None)


def _own_pattern_error(node: dict[str, Any]) -> str | None:
    """Why the first of a schema object's own patterns cannot run on RE2, if one cannot."""
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


# Refs resolve inside the schema (and to the JSON Schema meta-schemas, as jsonschema's default
# registry has them); nothing is fetched: a registry without `retrieve` finds no other URI.
_LOCAL: Registry[Any] = SPECIFICATIONS.combine(Registry())

# The 2020-12 keywords whose values are subschemas: those applied to the same data as the schema
# they are in, and those applied to its members, items or names (which end with the data's depth).
_IN_PLACE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas")
_BELOW = ("prefixItems", "items", "contains", "properties", "patternProperties", "additionalProperties",
          "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema", "$defs",
          "definitions")
_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAPS = frozenset({"dependentSchemas", "properties", "patternProperties", "$defs", "definitions"})


def _resolver(schema: object) -> Resolver[Any]:
    """The resolver a validator of the schema resolves its refs with (as jsonschema builds it)."""
    return _LOCAL.resolver_with_root(DRAFT202012.create_resource(schema))


def _applied(node: dict[str, Any], keywords: tuple[str, ...]) -> Iterator[object]:
    """The subschemas under the given keywords of a schema object."""
    for key in keywords:
        if key not in node:
            continue
        value = node[key]
        if key in _LISTS:
            yield from value if isinstance(value, list) else ()
        elif key in _MAPS:
            yield from value.values() if isinstance(value, dict) else ()
        else:
            yield value


def _nowhere(key: str, ref: str) -> str:
    why = f"{key} {ref!r} points to nothing in the schema"
    fragment = ref.partition("#")[2]
    if fragment.startswith("/") and ("%" in fragment or "~" in fragment):
        names = [t.replace("~1", "/").replace("~0", "~") for t in unquote(fragment).split("/")[1:]]
        why += (f": it names the members {names} (a $ref is a URI, so '%25' in it stands for '%'; "
                "then, in a JSON pointer, '~1' stands for '/' and '~0' for '~')")
    return why


def _evaluation_error(schema: object, resolver: Resolver[Any]) -> str | None:
    """Why evaluating the schema would fail on some data, if it would: a `$ref` or `$dynamicRef`
    that resolves to nothing or to something that is not a schema (each resolved with the resolver
    the validator uses), a pattern RE2 cannot run in a subschema a ref reaches, or a loop of refs
    that comes back to a subschema without going into the data, which evaluation would never end."""
    # Each subschema once, with the subschemas it applies to the same data: its in-place
    # applicators and its refs' targets (the ref as the edge's name).
    in_place: dict[int, list[tuple[int, str | None]]] = {}
    checked = {id(node) for node in _tree(schema)}  # (check_schema has seen these)
    todo: list[tuple[object, Resolver[Any]]] = [(schema, resolver)]
    while todo:
        node, resolver = todo.pop()
        if not isinstance(node, dict) or id(node) in in_place:  # true and false refer to nothing
            continue
        edges: list[tuple[int, str | None]] = [(id(sub), None) for sub in _applied(node, _IN_PLACE)]
        in_place[id(node)] = edges
        if why := _own_pattern_error(node):
            return why
        for sub in _applied(node, _IN_PLACE + _BELOW):
            if isinstance(sub, dict):
                todo.append((sub, resolver.in_subresource(DRAFT202012.create_resource(sub))))
        for key in ("$ref", "$dynamicRef"):
            if not isinstance(ref := node.get(key), str):
                continue
            try:
                target = resolver.lookup(ref)
            except (Unresolvable, LookupError, ValueError, TypeError, AttributeError):
                return _nowhere(key, ref)  # (the others: a pointer through a number, a string, ...)
            if not isinstance(target.contents, (dict, bool)):
                return f"{key} {ref!r} points to a JSON {json_type(target.contents)}, not to a schema"
            if isinstance(target.contents, dict) and id(target.contents) not in checked:
                try:  # somewhere check_schema did not look, such as `examples` or `x-...`
                    Draft202012Validator.check_schema(target.contents)
                except SchemaError as e:
                    return f"{key} {ref!r} points to something that is not a valid schema: {e.message}"
                checked |= {id(sub) for sub in _tree(target.contents)}
            edges.append((id(target.contents), ref))
            todo.append((target.contents, target.resolver))
    if loop := _loop(in_place):
        return (f"the schema refers to itself without end: $ref {' then '.join(map(repr, loop))} "
                "leads back to where it started without going into the data")
    return None


def _tree(schema: object) -> Iterator[dict[str, Any]]:
    """Every schema object in a schema, through the keywords whose values are subschemas."""
    todo = [schema]
    while todo:
        if isinstance(node := todo.pop(), dict):
            yield node
            todo += _applied(node, _IN_PLACE + _BELOW)


def _loop(graph: dict[int, list[tuple[int, str | None]]]) -> list[str] | None:
    """The names of the edges of a cycle in the graph, if it has one (depth first, without recursion)."""
    done: set[int] = set()
    for start in graph:
        if start in done:
            continue
        path: list[tuple[int, str | None]] = [(start, None)]  # each node with the edge that reached it
        on_path = {start}
        edges = [iter(graph[start])]
        while edges:
            step = next(edges[-1], None)
            if step is None:
                node = path.pop()[0]
                on_path.discard(node)
                done.add(node)
                edges.pop()
            elif step[0] in on_path:
                begin = next(i for i, (seen, _) in enumerate(path) if seen == step[0])
                return [name for _, name in [*path[begin + 1:], step] if name is not None]
            elif step[0] in graph and step[0] not in done:
                path.append(step)
                on_path.add(step[0])
                edges.append(iter(graph[step[0]]))
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


# What evaluating a schema raises when it refers to itself without end, when a ref resolves to
# nothing (or, in referencing, when a pointer goes through a number or an array index is not one),
# or when a pattern cannot run.
_CANNOT_EVALUATE = (RecursionError, Unresolvable, re2.error, LookupError, ValueError, TypeError,
                    AttributeError)


def _why(e: BaseException) -> str:
    """What a `_CANNOT_EVALUATE` error says about the schema, in a few words (referencing's own
    messages quote the whole schema)."""
    if isinstance(e, RecursionError):
        return "it refers to itself without end, or nests deeper than can be followed"
    if isinstance(e, Unresolvable):
        return f"$ref {e.ref!r} resolves to nothing"
    if isinstance(e, re2.error):
        return "a pattern in it cannot run on RE2"
    return f"{type(e).__name__} while evaluating it"


def _pointer(path: Iterable[str | int]) -> str:
    """The RFC 6901 JSON pointer to a place in a command's data: in a name, '~' is '~0', '/' is '~1'."""
    return "/data" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class SchemaRegistry:
    """Schemas by action. `x-entity-key` (a JSON pointer into data) names the Kafka key."""

    def __init__(self, directory: Path, *, strict: bool = False, extra_dirs: tuple[Path, ...] = ()) -> None:
        self.directory = directory
        self.strict = strict
        self._validators: dict[str, Any] = {}
        for d in (*extra_dirs, directory):
            if d.is_dir():
                for path in sorted(d.glob("*.json")):
                    schema = json.loads(path.read_text(encoding="utf-8"))
                    try:
                        self._install(path.stem, schema)
                    except SchemaError as e:  # accepted before these checks: check() will say why
                        log.warning("schema %s: %s", path, e.message)
                        self._validators[path.stem] = _Validator(schema, _resolver=_resolver(schema))
                    if isinstance(schema, dict) and (why := _entity_key_error(schema)):
                        log.warning("schema %s: %s; its commands are keyed by their ids", path, why)

    def _install(self, action: str, schema: dict[str, Any]) -> None:
        """Register the schema if it can be evaluated on any data; SchemaError saying why not."""
        try:
            Draft202012Validator.check_schema(schema)
            if remote := _remote_ref(schema):  # the service fetches nothing
                raise SchemaError(f"$ref {remote!r} points outside the schema; only its own refs resolve")
            if why := _pattern_error(schema):
                raise SchemaError(why)
            resolver = _resolver(schema)
            if why := _evaluation_error(schema, resolver):
                raise SchemaError(why)
        except RecursionError as e:  # checking the schema itself recursed too deep
            raise SchemaError("it is nested too deeply") from e
        # `_resolver` is how jsonschema hands a validator its resolver (evolve() passes it on): so
        # evaluation resolves every ref as the checks above did.
        validator = _Validator(schema, _resolver=resolver)
        try:
            validator.is_valid({})
        except _CANNOT_EVALUATE as e:  # (what the checks above are there to have found first)
            raise SchemaError(f"it cannot be evaluated: {_why(e)}") from e
        self._validators[action] = validator

    def all(self) -> dict[str, Any]:
        return {a: v.schema for a, v in sorted(self._validators.items())}

    def get(self, action: str) -> dict[str, Any] | None:
        v = self._validators.get(action)
        return None if v is None else dict(v.schema)

    def put(self, action: str, schema: object) -> None:
        if not ACTION.fullmatch(action):
            raise bad_request(f"action {action!r} must match {ACTION.pattern}", field="action")
        if not isinstance(schema, dict):
            raise bad_request(f"body must be a JSON Schema object, got {json_type(schema)}", field="body")
        if why := _entity_key_error(schema):
            raise bad_request(why, field="x-entity-key")
        try:
            self._install(action, schema)
        except SchemaError as e:
            raise bad_request(f"not a valid JSON Schema: {e.message}", field="schema") from e
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
        except _CANNOT_EVALUATE as e:  # a schema file from before these checks (see __init__)
            log.warning("schema for %r cannot be evaluated: %s", action, _why(e))
            raise problem(500, "Schema error", f"the schema registered for {action!r} cannot be "
                          f"evaluated on this data ({_why(e)}); nothing was written: replace the schema "
                          f"with PUT /schemas/{action}", kind="schema-error") from e
        if errors:
            violations = [{"pointer": _pointer(e.absolute_path), "message": _json_message(e)} for e in errors]
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


def _json_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message with the value it opens with in JSON ("true is not of type
    'integer'"), not in Python ("True ...": found by audit)."""
    message, shown = str(error.message), repr(error.instance)
    if not message.startswith(shown):
        return message
    return json.dumps(error.instance, ensure_ascii=False) + message[len(shown):]
