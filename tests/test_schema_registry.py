"""Command schemas against a real `ledger serve`: every `$ref` is resolved (as the validator will
resolve it) when a schema is put or loaded, so no command meets a schema that cannot be evaluated;
violations name the data with RFC 6901 pointers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.test_api import Server, assert_problem, post_command

if TYPE_CHECKING:
    from collections.abc import Iterator

# A loop of refs that never goes into the data: evaluating `x` would never end.
LOOP = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("schema-registry") / "data"
    (data / "schemas").mkdir(parents=True)
    # A schema file from before these checks: loaded with a warning, as other bad files are.
    (data / "schemas" / "old-loop.json").write_text(json.dumps(LOOP), encoding="utf-8")
    srv = Server(data).start()
    yield srv
    srv.stop()


def put_schema(server: Server, action: str, schema: Any) -> httpx.Response:
    return httpx.put(f"{server.url}/schemas/{action}", json=schema, timeout=10)


def test_a_loaded_schema_that_cannot_be_evaluated_is_reported_and_never_crashes_a_command(
    server: Server,
) -> None:
    log = server.tail()
    assert "old-loop.json" in log and "'#/$defs/a' leads back" in log, log
    assert post_command(server, {"action": "old-loop", "data": {}}).status_code == 202  # the loop not reached
    detail = assert_problem(post_command(server, {"action": "old-loop", "data": {"x": 1}}), 500)["detail"]
    assert "cannot be evaluated" in detail and "nothing was written" in detail, detail
    assert "PUT /schemas/old-loop" in detail and "RecursionError" not in detail, detail


def test_a_ref_that_resolves_to_nothing_is_a_400_naming_the_schema(server: Server) -> None:
    schema = {"type": "object", "$defs": {"a%25b": {"type": "object"}}, "$ref": "#/$defs/a%25b"}
    detail = assert_problem(put_schema(server, "t1", schema), 400, field="schema")["detail"]
    # A $ref is a URI: "%25" is "%", so it names the member "a%b", which the schema does not have.
    assert "'#/$defs/a%25b' points to nothing" in detail and "'a%b'" in detail, detail
    assert httpx.get(server.url + "/schemas/t1").status_code == 404  # nothing was stored


def test_schemas_that_cannot_be_evaluated_are_refused_when_put(server: Server) -> None:
    dangling = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a%25b"}},
                "$defs": {"a%25b": {"type": "integer"}}}
    detail = assert_problem(put_schema(server, "t2", dangling), 400, field="schema")["detail"]
    assert "'#/$defs/a%25b' points to nothing" in detail, detail
    detail = assert_problem(put_schema(server, "t2", LOOP), 400, field="schema")["detail"]
    assert "without end" in detail and "'#/$defs/a'" in detail, detail
    a_to_b = {"allOf": [{"$ref": "#/$defs/b"}]}
    b_to_a = {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/a"}]}
    for bad in (
        # loops through applicators that apply to the same data; one that only some data reaches
        {"properties": {"x": {"$ref": "#/$defs/a"}}, "$defs": {"a": a_to_b, "b": b_to_a}},
        {"properties": {"a": {"$ref": "#/properties/a"}}},
        # refs to what is not a schema: a string, through a number, a non-numeric array index, bad data
        {"type": "object", "properties": {"x": {"$ref": "#/type"}}},
        {"properties": {"x": {"$ref": "#/$defs/n/minimum/y"}}, "$defs": {"n": {"minimum": 1}}},
        {"properties": {"x": {"$ref": "#/allOf/x"}}, "allOf": [{}]},
        {"properties": {"x": {"$ref": "#/examples/0"}}, "examples": [{"type": 5}]},
    ):
        assert_problem(put_schema(server, "t2", bad), 400, field="schema")
    assert httpx.get(server.url + "/schemas/t2").status_code == 404  # none of them was stored
    # Written as the URI fragment it is, the same ref resolves; a ref may recurse through the data.
    good = {"type": "object", "properties": {
        "x": {"$ref": "#/$defs/a%2525b"}, "y": {"$ref": "#/$defs/c~1d~0e"}, "next": {"$ref": "#"}},
        "$defs": {"a%25b": {"type": "integer"}, "c/d~e": {"type": "string"}}}
    assert put_schema(server, "t2", good).status_code == 200
    ok = {"x": 1, "y": "s", "next": {"x": 2}}
    assert post_command(server, {"action": "t2", "data": ok}).status_code == 202
    bad_data = {"next": {"next": {"x": "1", "y": 2}}}
    body = assert_problem(post_command(server, {"action": "t2", "data": bad_data}), 422)
    assert sorted(e["pointer"] for e in body["errors"]) == ["/data/next/next/x", "/data/next/next/y"], body


def test_violation_pointers_are_rfc6901_escaped(server: Server) -> None:
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in ("a/b", "c~d", "~1")}}
    assert put_schema(server, "t4", schema).status_code == 200
    body = assert_problem(post_command(server, {"action": "t4", "data": {"a/b": "x", "c~d": "y", "~1": "z"}}),
                          422)
    assert sorted(e["pointer"] for e in body["errors"]) == ["/data/a~1b", "/data/c~0d", "/data/~01"], body
    assert "/data/a~1b: " in body["detail"], body
