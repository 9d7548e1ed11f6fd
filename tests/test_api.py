"""The HTTP API against a real `ledger serve` process (uvicorn, bundled broker, real ledger)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

REPO = Path(__file__).resolve().parents[1]
PROBLEM = "application/problem+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `ledger serve` subprocess on a free port."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.env.pop("LEDGER_KAFKA_BOOTSTRAP", None) if env is None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60, *, ready: bool = True) -> Server:
        """Start it and wait until /ready is 200 (`ready=False`: until it answers at all)."""
        self.port = free_port()
        self.log = (self.data_dir.parent / f"serve-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ledger", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port), *self.extra],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                if httpx.get(self.url + ("/ready" if ready else "/health"), timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready:\n" + self.tail())

    def tail(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.data_dir.parent / f"serve-{self.port}.log").read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop gracefully: uvicorn finishes the lifespan, then re-raises the signal."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.log.close()
        assert code in (0, -sig), self.tail()
        assert "Application shutdown complete" in self.tail(), self.tail()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = Server(tmp_path_factory.mktemp("api") / "data", "--memory-limit", "3GiB").start()
    yield srv
    srv.stop()


def assert_problem(resp: httpx.Response, status: int, *, field: str | None = None) -> dict[str, Any]:
    """Every error is RFC 9457 problem+json: status, title, detail, and the field when one is at fault."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    body = resp.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert body.get("field") == field or field in body["detail"], body
    return body


def post_command(server: Server, body: Any, **params: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/commands", content=content, params=params, timeout=10)


def wait_for(pred: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_async_command_is_accepted_and_lands_in_the_ledger(server: Server) -> None:
    resp = post_command(server, {"action": "note-taken", "data": {"text": "héllo"}, "user": "ann"})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert resp.headers["location"] == f"/commands/{body['id']}"
    assert body["topic"] == "commands" and body["offset"] >= 0
    got = wait_for(lambda: (r := httpx.get(server.url + resp.headers["location"])).status_code == 200 and r)
    cmd = got.json()
    assert cmd["data"] == {"text": "héllo"} and cmd["status"] == "pending" and cmd["children"] == []
    assert ["user", "ann"] in cmd["headers"]


def test_cursor_pagination_is_stable_while_records_arrive(server: Server) -> None:
    for i in range(7):
        assert post_command(server, {"action": "page-test", "data": {"i": i}}).status_code == 202
    def count() -> int:
        return len(httpx.get(server.url + "/commands", params={"action": "page-test"}).json()["items"])

    wait_for(lambda: count() == 7)
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"action": "page-test", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(server.url + "/commands", params=params).json()
        seen += [c["data"]["i"] for c in page["items"]]
        if len(seen) == 3:  # new records arriving mid-pagination only extend the end
            post_command(server, {"action": "page-test", "data": {"i": 7}})
            wait_for(lambda: count() == 8)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(8))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"action": ', None),  # malformed JSON
        (b"[1, 2]", None),
        ({"data": {}}, "action"),
        ({"action": "", "data": {}}, "action"),
        ({"action": "x", "data": [1]}, "data"),
        ({"action": "x", "data": {}, "user": 5}, "user"),
        ({"action": "x", "data": {}, "colour": "red"}, "colour"),
        # What the ledger would quarantine is refused here, not accepted and then lost:
        (b'{"action": "\\ud800", "data": {}}', "action"),  # a lone surrogate
        (b'{"action": "x", "data": {"\\udfff": 1}}', "data"),
        (b'{"action": "x", "data": {"n": "\\ud800"}}', "data"),
        (b'{"action": "x", "data": {}, "user": "\\ud800"}', "user"),
        (b'{"action": "x", "data": {"n": 1e400}}', None),  # not stored as null
        (b'{"action": "x", "data": {"n": NaN}}', None),
        (b'{"action": "x", "data": {"n": -Infinity}}', None),
        (b'{"action": "x", "data": {"a": ' + b"[" * 200 + b"]" * 200 + b"}}", "data"),
        (b'{"action": "x", "data": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "data"),
        ({"action": "x y/\u0000", "data": {}}, "action"),  # no schema could be put for it
        ({"action": "a" * 129, "data": {}}, "action"),
        (b'{"action": "x", "action": "y", "data": {}}', "body"),  # which one was meant?
        (b'{"action": "x", "data": {"n": {"m": 1, "m": 2}}}', "body"),
    ],
)
def test_malformed_commands_are_400_problems(server: Server, body: Any, field: str | None) -> None:
    problem = assert_problem(post_command(server, body), 400, field=field)
    if b'"m": 1, "m"' in (body if isinstance(body, bytes) else b""):
        assert "repeats the key 'm'" in problem["detail"]


def test_a_command_too_large_for_a_kafka_message_is_413_not_503(server: Server) -> None:
    # Under the body limit, over the message limit once the id and timestamp are added.
    resp = post_command(server, {"action": "big", "data": {"s": "x" * ((1 << 20) - 40)}})
    assert "Kafka message" in assert_problem(resp, 413, field="data")["detail"]
    deepest = {"action": "x", "data": {"a": json.loads("[" * 126 + "]" * 126)}}  # 128 with the envelope
    accepted = post_command(server, deepest)
    assert accepted.status_code == 202
    wait_for(lambda: httpx.get(server.url + accepted.headers["location"]).status_code == 200)  # stored


def test_schema_violations_are_422_with_json_pointers(server: Server) -> None:
    schema = {"type": "object", "required": ["account", "amount"], "additionalProperties": False,
              "properties": {"account": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}},
              "x-entity-key": "/account"}
    resp = httpx.put(server.url + "/schemas/pay-in", json=schema)
    assert resp.status_code == 200, resp.text
    assert httpx.get(server.url + "/schemas").json()["schemas"]["pay-in"] == schema
    body = assert_problem(post_command(server, {"action": "pay-in", "data": {"amount": 0, "x": 1}}), 422)
    pointers = sorted(e["pointer"] for e in body["errors"])
    assert pointers == ["/data", "/data", "/data/amount"], body
    flags = {"action": "pay-in", "data": {"account": None, "amount": True}}
    flag = assert_problem(post_command(server, flags), 422)
    assert sorted(e["message"] for e in flag["errors"]) == [  # JSON's names, not Python's True, None
        "null is not of type 'string'", "true is not of type 'integer'"]
    for integral in (b"1.0", b"1e2"):  # JSON Schema's integers, floats to a processor (found by audit)
        fraction = b'{"action": "pay-in", "data": {"account": "a", "amount": ' + integral + b"}}"
        assert_problem(post_command(server, fraction), 422)
    ok = post_command(server, {"action": "pay-in", "data": {"account": "acct-9", "amount": 3}})
    assert ok.status_code == 202
    cmd = wait_for(lambda: (r := httpx.get(server.url + ok.headers["location"])).status_code == 200 and r)
    assert cmd.json()["key"] == "acct-9"  # the schema named the entity key
    assert_problem(httpx.put(server.url + "/schemas/bad", json={"type": 5}), 400, field="schema")
    deep: dict[str, Any] = {}
    for _ in range(150):
        deep = {"not": deep}
    for schema in ({"$ref": "http://example.com/x.json"}, {"properties": {"a": {"$ref": "other.json#"}}},
                   {"$ref": "#"}, {"properties": {"a": {"$ref": "#/$defs/missing"}}}, deep):
        assert_problem(httpx.put(server.url + "/schemas/bad", json=schema), 400, field="schema")
    own = {"$defs": {"a": {"$id": "a.json", "type": "integer"}}, "properties": {"n": {"$ref": "a.json"}},
           "examples": [{"$ref": "http://example.com/not-a-schema"}]}  # its own $id; examples are data
    assert httpx.put(server.url + "/schemas/own-ids", json=own).status_code == 200
    assert post_command(server, {"action": "own-ids", "data": {"n": "x"}}).status_code == 422
    # A loop of $refs that never goes into the data is refused when put (it used to be accepted,
    # and only the commands that reached it failed).
    loop = {"properties": {"a": {"$ref": "#/properties/a"}}}
    resp = httpx.put(server.url + "/schemas/loops", json=loop)
    assert "without end" in assert_problem(resp, 400, field="schema")["detail"]

    # Patterns run in linear time: a catastrophic one answers at once (with Python's re, 2^40 steps).
    evil = {"properties": {"s": {"pattern": "^(a+)+$"}},
            "patternProperties": {"^(b+)+$": {"type": "integer"}}, "additionalProperties": {"type": "string"}}
    assert httpx.put(server.url + "/schemas/evil", json=evil).status_code == 200
    crafted = {"s": "a" * 40 + "!", "b" * 40 + "!": "x"}
    resp = post_command(server, {"action": "evil", "data": crafted})
    assert [e["pointer"] for e in assert_problem(resp, 422)["errors"]] == ["/data/s"]
    assert post_command(server, {"action": "evil", "data": {"s": "aaa", "bb": "x"}}).status_code == 422
    unicode = {"properties": {"s": {"pattern": "^caf\\u00e9$"}}}  # ECMA-262 \uXXXX
    assert httpx.put(server.url + "/schemas/unicode", json=unicode).status_code == 200
    assert post_command(server, {"action": "unicode", "data": {"s": "caf\u00e9"}}).status_code == 202
    assert post_command(server, {"action": "unicode", "data": {"s": "cafe"}}).status_code == 422
    for pattern in ("(?=a)b", "(a)\\1"):  # lookaround, backreference: refused up front, saying why
        bad = {"properties": {"s": {"pattern": pattern}}}
        resp = httpx.put(server.url + "/schemas/bad", json=bad)
        detail = assert_problem(resp, 400, field="schema")["detail"]
        assert pattern in detail and "RE2" in detail, detail


def test_other_error_paths_share_the_problem_shape(server: Server) -> None:
    assert "1,048,576-byte limit" in assert_problem(post_command(server, b"x" * (1 << 20 + 1)), 413)["detail"]
    # Errors Litestar raises itself (body decoding, parameter validation) name the field too.
    for path in ("/query", "/views/v", "/schemas/a"):
        method = "POST" if path == "/query" else "PUT"
        resp = httpx.request(method, server.url + path, content=b'{"sql": ')
        body = assert_problem(resp, 400)
        assert body["field"] == "body" and "not valid JSON" in body["detail"], path
    bad_limit = assert_problem(httpx.get(server.url + "/events", params={"limit": "many"}), 400)
    assert bad_limit["field"] == "limit" and bad_limit["errors"][0]["key"] == "limit"
    assert_problem(httpx.get(server.url + "/commands/0190a5a0-0000-7000-8000-000000000001"), 404)
    assert_problem(httpx.get(server.url + "/events/nope"), 404)
    for t in ("\uff13", "-1", "x"):  # a full-width 3 is not tx 3
        assert_problem(httpx.get(f"{server.url}/tx/{t}"), 400, field="t")
    assert_problem(httpx.get(f"{server.url}/tx/{'9' * 30}"), 404)
    assert_problem(httpx.get(server.url + "/no-such-route"), 404)
    assert_problem(httpx.get(server.url + "/commands", params={"cursor": "!!"}), 400, field="cursor")
    for cursor in ("-5", "0", str(2**63), "9" * 60):  # a 200 page before (-5 read as 0)
        assert_problem(httpx.get(server.url + "/tx", params={"cursor": cursor}), 400, field="cursor")
    assert_problem(httpx.get(server.url + "/commands", params={"limit": 0}), 400, field="limit")
    assert_problem(post_command(server, {"action": "x", "data": {}}, timeout=-1), 400, field="timeout")
    q = httpx.post(server.url + "/query", json={"sql": "DELETE FROM log"})
    assert "SELECT" in assert_problem(q, 400)["detail"]
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", "COPY (SELECT 1) TO '/tmp/x.csv'",
                "ATTACH '/tmp/o.duckdb' AS o", "INSTALL httpfs", "LOAD httpfs", "SET threads = 1",
                "PRAGMA database_list", "SELECT * FROM tail_records", "SELECT 1; SELECT 2"):
        assert_problem(httpx.post(server.url + "/query", json={"sql": sql}), 400)
    q = httpx.post(server.url + "/query", json={"sql": "SELECT * FROM read_text('/etc/hostname')"})
    assert "read_text() is not available" in assert_problem(q, 400)["detail"]
    assert_problem(httpx.post(server.url + "/query", json={"sql": "SELECT nonsense("}), 400)
    # A bad time names its parameter (and full-width digits are not a tx number).
    for path, params in [("/entities/x", {"as_of": "yesterday"}), ("/entities/x", {"as_of": "\uff13"}),
                         ("/entities/x", {"valid_at": "2024-01-01T00:00:00"}),
                         ("/entities/x/history", {"until": "soon"}), ("/commands", {"since": "abc"}),
                         ("/events", {"as_of": "1e3"}), ("/tx", {"since": "x"}),
                         ("/views/nope/changes", {"from": "abc"}),
                         ("/views/nope/changes", {"from": "0", "to": "z"}),
                         ("/updates", {"after_tx": "\uff13"}), ("/updates", {"after_tx": "9" * 5000}),
                         ("/events", {"as_of": "9" * 5000})]:
        field = next(iter(params)) if len(params) == 1 else "to"
        detail = assert_problem(httpx.get(server.url + path, params=params), 400, field=field)["detail"]
        assert field in detail, (path, params, detail)
    for extra, field in [({"limit": True}, "limit"), ({"params": "x"}, "params"), ({"as_of": True}, "as_of"),
                         ({"valid_at": 5}, "valid_at"), ({"valid_at": "noon"}, "valid_at"),
                         ({"as_of": "noon"}, "as_of")]:
        resp = httpx.post(server.url + "/query", json={"sql": "SELECT 1 AS x", **extra})
        assert_problem(resp, 400, field=field)
    # A parameter the endpoint does not take, or a single one given twice, was ignored silently
    # (/events?kind=command listed events; found by audit).
    for path, params in [("/events", {"kind": "command"}), ("/entities/x/history", {"limit": "2"}),
                         ("/events", [("limit", "2"), ("limit", "3")]),
                         ("/commands", [("as_of", "1"), ("as_of", "2")]), ("/tx/1", {"verbose": "1"}),
                         ("/schemas", {"x": "1"}), ("/schemas/deposit", {"x": "1"})]:
        resp = httpx.get(server.url + path, params=params)
        field = params[0][0] if isinstance(params, list) else next(iter(params))
        assert field in assert_problem(resp, 400, field=field)["detail"], (path, params)
    assert httpx.get(server.url + "/events", params=[("action", "a"), ("action", "b")]).status_code == 200
    assert httpx.get(server.url + "/schema/openapi.json", params={"x": "1"}).status_code == 200
    # the service keeps serving after every one of those
    assert httpx.get(server.url + "/ready").status_code == 200


def test_a_query_past_the_memory_limit_is_400_and_the_service_stays_up(server: Server) -> None:
    """Found by audit: one query (an 8 GB list DuckDB does not count against its memory_limit)
    grew the service until the kernel killed it. Under --memory-limit the allocation fails."""
    for sql in ("SELECT list_sum(range(1000000000)) AS s", "SELECT length(repeat('x', 4000000000)) AS n"):
        resp = httpx.post(server.url + "/query", json={"sql": sql}, timeout=60)
        assert "memory" in assert_problem(resp, 400)["detail"].lower(), sql
    assert httpx.get(server.url + "/ready").status_code == 200
    setting = {"sql": "SELECT current_setting('memory_limit') AS m"}
    assert httpx.post(server.url + "/query", json=setting).json()["rows"] == [["1.7 GiB"]]  # 60% of 3


def test_kafka_unreachable_is_503_with_retry_after(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    srv = Server(tmp_path / "data", "--bootstrap", dead, env={"LEDGER_KAFKA_BOOTSTRAP": dead})
    srv.port = free_port()
    # The service cannot become ready without Kafka; start it and check /commands directly.
    srv.log = (tmp_path / f"serve-{srv.port}.log").open("wb")
    srv.proc = subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve", "--data-dir", str(srv.data_dir), "--port", str(srv.port),
         "--bootstrap", dead], env=srv.env, stdout=srv.log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        wait_for(lambda: _status(srv.url + "/health") == 200, 30)
        assert _status(srv.url + "/ready") == 503  # up, but not ready: Kafka is missing
        resp = post_command(srv, {"action": "x", "data": {}})
        body = assert_problem(resp, 503)
        assert resp.headers["retry-after"] and "nothing was written" in body["detail"]
        assert httpx.get(srv.url + "/commands").json()["items"] == []  # reads still work
    finally:
        srv.stop()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0


def wait_for_or_none(pred: Any, timeout: float) -> Any:
    try:
        return wait_for(pred, timeout)
    except AssertionError:
        return None


def read_sse(url: str, headers: dict[str, str], want: int, timeout: float = 20) -> list[dict[str, Any]]:
    """Read `want` record events from an SSE stream, then drop the connection."""
    out: list[dict[str, Any]] = []
    event: dict[str, str] = {}
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                k, _, v = line.partition(":")
                event[k] = v.strip()
            elif line == "" and "data" in event:
                out.append({**json.loads(event["data"]), "sse_id": event["id"]})
                event = {}
                if len(out) == want:
                    break
    return out


def test_sse_and_websocket_deliver_every_record_once_in_order_across_reconnects(server: Server) -> None:
    base = httpx.get(server.url + "/commands", params={"limit": 1000}).json()["items"]
    start_tx = max((c["tx"] for c in base), default=0)
    for i in range(30):
        assert post_command(server, {"action": "stream-test", "data": {"i": i}}).status_code == 202
    url = server.url + "/updates?action=stream-test"
    first = read_sse(url + f"&after_tx={start_tx}", {}, 12)
    rest = read_sse(url, {"Last-Event-ID": first[-1]["sse_id"]}, 18)  # forced disconnect, then resume
    got = [e["data"]["i"] for e in first + rest]
    assert got == list(range(30))
    positions = [(e["tx"], e["seq"]) for e in first + rest]
    assert positions == sorted(set(positions))

    ws_url = server.url.replace("http", "ws") + "/updates?action=stream-test"
    with ws_connect(ws_url + f"&after_tx={start_tx}") as ws:
        part1 = [json.loads(ws.recv(timeout=10)) for _ in range(10)]
    resume = f"{part1[-1]['tx']}.{part1[-1]['seq']}"
    with ws_connect(ws_url + f"&after_tx={resume}") as ws:
        part2 = [json.loads(ws.recv(timeout=10)) for _ in range(20)]
        for i in range(30, 33):  # live records arrive on the open socket too
            post_command(server, {"action": "stream-test", "data": {"i": i}})
        part3 = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
    assert [r["data"]["i"] for r in part1 + part2 + part3] == list(range(33))
    with ws_connect(ws_url) as ws:  # no position: the records from now on
        post_command(server, {"action": "stream-test", "data": {"i": 33}})
        assert json.loads(ws.recv(timeout=10))["data"]["i"] == 33
    with ws_connect(ws_url, additional_headers={"Last-Event-ID": resume}) as ws:  # the header resumes too
        assert json.loads(ws.recv(timeout=10))["data"]["i"] == 10
    head = httpx.get(server.url + "/ready").json()["tx"]
    for query, field in [("&after_tx=" + "\u00e9" * 80, "after_tx"),  # a bad position: a problem, then 1008
                         (f"&after_tx={head + 1000}", "after_tx"),  # past the head: it would skip records
                         ("&after=3", "after")]:  # unknown, as over HTTP
        with ws_connect(ws_url + query) as ws:
            problem = json.loads(ws.recv(timeout=10))
            assert problem["status"] == 400 and problem["field"] == field, problem
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    past = httpx.get(url, headers={"Last-Event-ID": f"{head + 1000}.0"})
    assert "not in the ledger yet" in assert_problem(past, 400, field="Last-Event-ID")["detail"]


def test_temporal_reads_over_http(server: Server) -> None:
    for n in (1, 2, 3):  # a few transactions, whichever tests ran before
        assert post_command(server, {"action": "temporal-test", "data": {}}).status_code == 202
        wait_for(lambda n=n: httpx.get(server.url + "/ready").json()["tx"] >= n, timeout=30)
    tx_before = httpx.get(server.url + "/ready").json()["tx"]
    q = httpx.post(server.url + "/query", json={"sql": "SELECT count(*) AS n FROM log", "as_of": tx_before})
    assert q.status_code == 200 and q.json()["rows"][0][0] >= 1
    csv = httpx.post(server.url + "/query", json={"sql": "SELECT tx FROM transactions ORDER BY tx LIMIT 2"},
                     headers={"accept": "text/csv"})
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.splitlines()[0] == '"tx"'
    body = {"sql": "SELECT 1 AS one"}
    weighted = httpx.post(server.url + "/query", json=body,
                          headers={"accept": "application/vnd.apache.parquet;q=0.5, text/csv"})
    assert weighted.headers["content-type"].startswith("text/csv")
    assert_problem(httpx.post(server.url + "/query", json=body, headers={"accept": "image/png"}), 406)
    # A result cut at its row limit says so in every format (CSV had no sign of it; found by audit),
    # and one over the byte limit is refused, not sent (a 2 GB body was).
    for accept in ("text/csv", "application/json", "application/vnd.apache.parquet"):
        cut = httpx.post(server.url + "/query", json={"sql": "SELECT * FROM range(5)", "limit": 2},
                         headers={"accept": accept})
        assert cut.headers["ledger-result-truncated"] == "true", accept
    assert "ledger-result-truncated" not in weighted.headers
    huge = httpx.post(server.url + "/query", timeout=60,
                      json={"sql": "SELECT repeat('x', 1000000) AS s FROM range(300)"})
    assert "byte limit" in assert_problem(huge, 400)["detail"]
    # A type a format cannot hold: 400 naming the format, not 500 (found by audit).
    for sql, accept in [("SELECT [1, 2] AS l", "text/csv"), ("SELECT {'a': 1} AS s", "text/csv"),
                        ("SELECT INTERVAL 1 DAY AS d", "application/vnd.apache.parquet"),
                        ("SELECT 'infinity'::TIMESTAMPTZ AS t", "application/json"),
                        # NaN and infinity went out as null, like SQL NULL (found by audit):
                        ("SELECT x FROM (VALUES (1.5), ('nan'::DOUBLE)) t(x)", "application/json"),
                        ("SELECT '-inf'::FLOAT AS f", "application/json")]:
        resp = httpx.post(server.url + "/query", json={"sql": sql}, headers={"accept": accept})
        assert accept in assert_problem(resp, 400, field="accept")["detail"], sql
    tx = httpx.get(server.url + "/tx/1").json()
    assert tx["tx"] == 1 and len(tx["hash"]) == 64 and tx["records"]
    page = httpx.get(server.url + "/tx", params={"limit": 2}).json()
    assert [t["tx"] for t in page["items"]] == [1, 2] and page["next_cursor"] == 2


def test_sync_waiters_never_leak(server: Server) -> None:
    # No processor answers "nobody-answers": the wait times out with 202 pending.
    resp = post_command(server, {"action": "nobody-answers", "data": {}}, sync="true", timeout=0.3)
    assert resp.status_code == 202 and resp.json()["status"] == "pending"
    assert resp.headers["location"] == f"/commands/{resp.json()['id']}"
    # A client that gives up mid-wait leaves nothing behind either.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/commands", params={"sync": "true", "timeout": 5},
                   json={"action": "nobody-answers", "data": {}}, timeout=0.3)
    wait_for(lambda: httpx.get(server.url + "/ready").json()["sync_waiters"] == 0, timeout=10)


def test_ready_notices_a_dead_broker_and_its_return(tmp_path: Path) -> None:
    from ledger.broker import Broker, create_topics

    broker = Broker().start()
    port = int(broker.bootstrap.rsplit(":", 1)[1])
    create_topics(broker.bootstrap, {"commands": 3, "events": 3})
    srv = Server(tmp_path / "data", "--bootstrap", broker.bootstrap,
                 env={"LEDGER_KAFKA_BOOTSTRAP": broker.bootstrap}).start()
    try:
        assert httpx.get(srv.url + "/ready").json()["checks"]["broker"] is True
        broker.stop()
        r = wait_for(lambda: (r := httpx.get(srv.url + "/ready", timeout=10)).status_code == 503 and r, 30)
        body = r.json()
        assert body["checks"]["broker"] is False
        broker = Broker(port=port).start()  # back on the same address (memory storage: empty)
        create_topics(broker.bootstrap, {"commands": 3, "events": 3})
        wait_for(lambda: httpx.get(srv.url + "/ready", timeout=10).json()["checks"]["broker"], 60)
    finally:
        srv.stop()
        broker.stop()


def test_ready_stays_not_ready_while_the_consumer_fails_at_every_restart(tmp_path: Path) -> None:
    """A consumer that fails at once each time it is restarted was ready between failures: /ready
    holds its consumer check false for a while after each failure, and says why."""
    from ledger.broker import Broker, create_topics

    broker = Broker().start()
    create_topics(broker.bootstrap, {"commands": 1, "events": 1})
    srv = Server(tmp_path / "data", "--bootstrap", broker.bootstrap,  # a setting aiokafka refuses
                 env={"LEDGER_KAFKA_BOOTSTRAP": broker.bootstrap,
                      "LEDGER_KAFKA_OPTIONS": '{"isolation_level": "sometimes"}'}).start(ready=False)
    try:
        r = wait_for(lambda: (r := httpx.get(srv.url + "/ready", timeout=10)).status_code == 503 and r, 30)
        assert r.json()["checks"]["consumer"] is False and r.json()["checks"]["broker"] is True
        assert "Incorrect isolation level" in r.json()["consumer"]["last_error"]
        for _ in range(10):  # restarts every ~2 s
            time.sleep(0.5)
            assert httpx.get(srv.url + "/ready", timeout=10).status_code == 503
    finally:
        srv.stop()
        broker.stop()


def test_a_record_aiokafka_cannot_parse_is_quarantined_and_the_service_stays_ready(tmp_path: Path) -> None:
    """A header name that is not UTF-8 made aiokafka's getmany() raise: the consumer failed at every
    restart and /ready stayed 503. The record is quarantined now, and what comes after is ingested."""
    from ledger.broker import Broker, create_topics
    from tests.test_consumer import produce_bad_header_names

    broker = Broker().start()
    create_topics(broker.bootstrap, {"commands": 1, "events": 1})
    srv = Server(tmp_path / "data", "--bootstrap", broker.bootstrap,
                 env={"LEDGER_KAFKA_BOOTSTRAP": broker.bootstrap}).start()

    def query(sql: str) -> Any:
        return httpx.post(srv.url + "/query", json={"sql": sql}, timeout=10).json()["rows"][0][0]

    try:
        values = [json.dumps({"action": "x", "data": {"n": n}}).encode() for n in range(2)]
        produce_bad_header_names(broker.bootstrap, "commands", values, [0])
        wait_for(lambda: query("SELECT count(*) FROM log WHERE action = 'x'") == 1, 30)
        assert query("SELECT reason FROM quarantine WHERE kafka_offset = 0") == (
            "header name b'\\xff\\xfe' is not UTF-8")
        for _ in range(6):  # and not failing between checks
            r = httpx.get(srv.url + "/ready", timeout=10)
            assert r.status_code == 200 and r.json()["consumer"]["last_error"] is None, r.text
            time.sleep(0.5)
    finally:
        srv.stop()
        broker.stop()


def test_a_websocket_client_that_leaves_an_idle_stream_is_let_go(tmp_path: Path) -> None:
    """Nothing is sent on an idle ledger, so only reading the socket notices the client is gone:
    before, each handler lived on until shutdown cancelled it (found by audit)."""
    srv = Server(tmp_path / "data").start()
    ws_url = srv.url.replace("http://", "ws://") + "/updates?after_tx=0"
    try:
        for _ in range(5):
            with ws_connect(ws_url):
                pass
        time.sleep(1)
    finally:
        started = time.monotonic()
        srv.stop()
    assert "graceful shutdown exceeded" not in srv.tail() and "CancelledError" not in srv.tail()
    assert time.monotonic() - started < 8  # the graceful-shutdown timeout is 10 s


def test_an_sse_keep_alive_is_a_comment_that_dispatches_no_event(tmp_path: Path) -> None:
    """A keep-alive with a `data:` line (Litestar's default for a comment) makes EventSource
    dispatch an empty message event: it must be the comment line alone."""
    env = {"LEDGER_SSE_KEEPALIVE_S": "0.2", "LEDGER_KAFKA_BOOTSTRAP": ""}  # bundled broker
    srv = Server(tmp_path / "data", env=env).start()
    try:
        with httpx.stream("GET", srv.url + "/updates", params={"action": "never-sent"}, timeout=30) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            received = b""
            for chunk in resp.iter_bytes():
                received += chunk.replace(b"\r\n", b"\n")
                if received.count(b"\n\n") >= 2:
                    break
        assert received.split(b"\n\n")[:2] == [b": keep-alive", b": keep-alive"], received
    finally:
        srv.stop()


def test_every_json_body_endpoint_names_the_body_when_the_body_is_at_fault(server: Server) -> None:
    """Malformed JSON, an empty body, a body that is no JSON object and one over the size limit
    are problems with field "body" (POST /commands and every 413 named no field)."""
    too_big = b"x" * ((1 << 20) + 1)
    endpoints = [("POST", "/commands"), ("POST", "/query"), ("PUT", "/views/v"), ("PUT", "/schemas/a")]
    for method, path in endpoints:
        for content, status in [(b'{"sql": ', 400), (b"", 400), (b"[1, 2]", 400), (b'"x"', 400),
                                (b"null", 400), (too_big, 413)]:
            resp = httpx.request(method, server.url + path, content=content, timeout=10)
            body = assert_problem(resp, status)
            assert body.get("field") == "body", (method, path, content[:10], body)
            assert "data" not in body["detail"].split(":")[0], body  # not Litestar's name for the body
    resp = httpx.put(server.url + "/schemas/a", json=True)  # a JSON Schema may be a boolean; not here
    assert assert_problem(resp, 400)["field"] == "body"
    # Messages that misled: msgspec calls a lone high surrogate "truncated"; Python's integer limit
    # told an HTTP client to call sys.set_int_max_str_digits().
    lone = httpx.post(server.url + "/query", content=b'{"sql": "SELECT \\ud800 x"}')
    assert "surrogate" in assert_problem(lone, 400, field="body")["detail"]
    for method, path, content in [("POST", "/query", b'{"sql": "SELECT \xff"}'),
                                  ("PUT", "/views/v", b'{"sql": "SELECT 1", "description": "\xfe"}'),
                                  ("PUT", "/schemas/a", b'{"description": "\xff"}'),
                                  ("POST", "/commands", b'{"action": "\xff", "data": {}}')]:
        resp = httpx.request(method, server.url + path, content=content)  # was 500 but for /commands
        assert "UTF-8" in assert_problem(resp, 400, field="body")["detail"], path
    long_int = post_command(server, b'{"action": "x", "data": {"n": ' + b"9" * 5000 + b"}}")
    assert "5,000 digits" in assert_problem(long_int, 400, field="body")["detail"]
    assert "sys." not in long_int.json()["detail"]


def test_what_used_to_be_500s_and_misplaced_errors_in_query(server: Server) -> None:
    """Each of these was a 500 (a RecursionError decoding the body, an ArrowInvalid building the
    result), a 200 for an Accept that refused every format (q=0), an error naming no field, or a
    LINE number counted in the SQL the ledger ran rather than the caller's."""
    deep = "[" * 3000 + "]" * 3000
    for method, path in [("POST", "/query"), ("PUT", "/views/deep"), ("PUT", "/schemas/deep")]:
        body = '{"sql": "SELECT 1", "params": ' + deep + "}" if path != "/schemas/deep" else deep
        resp = httpx.request(method, server.url + path, content=body.encode())
        assert_problem(resp, 400, field="body")
    nested = "SELECT " + "[" * 150 + "1" + "]" * 150 + " AS x"
    assert "cannot be returned" in assert_problem(
        httpx.post(server.url + "/query", json={"sql": nested}), 400, field="sql")["detail"]
    inf = httpx.post(server.url + "/query", json={"sql": "SELECT 'infinity'::TIMESTAMPTZ AS t"},
                     headers={"Accept": "text/csv"})  # was 200 with the year 32103 in the cell
    assert "infinity" in assert_problem(inf, 400, field="accept")["detail"]
    for accept in ("text/csv;q=0", "*/*;q=0", "application/json;q=0, text/csv;q=0",
                   "text/csv;q=0, application/vnd.apache.parquet;q=0"):
        resp = httpx.post(server.url + "/query", json={"sql": "SELECT 1 AS x"}, headers={"Accept": accept})
        assert_problem(resp, 406)
    parquet = "application/vnd.apache.parquet"
    for accept, media in [("text/csv;q=0, */*", "application/json"), ("text/*;q=0.5, */*;q=0.1", "text/csv"),
                          (f"{parquet}, text/csv;q=0.9", parquet)]:
        resp = httpx.post(server.url + "/query", json={"sql": "SELECT 1 AS x"}, headers={"Accept": accept})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(media), (accept, resp)
    for body, field in [({"sql": "SELEC 1"}, "sql"), ({"sql": "SELECT $1", "params": []}, "params"),
                        ({"sql": "SELECT 1 FROM log FOR SYSTEM_TIME AS OF TIMESTAMP 'noon'"}, "sql")]:
        assert_problem(httpx.post(server.url + "/query", json=body), 400, field=field)
    detail = assert_problem(httpx.post(server.url + "/query", json={"sql": "SELECT 1 AS a,\n'x'::JSON AS j"}),
                            400, field="sql")["detail"]
    assert "LINE 2: 'x'::JSON AS j" in detail, detail
    for sql, word in [("INSTALL httpfs", "INSTALL"), ("USE memory", "USE"), ("CHECKPOINT", "CHECKPOINT")]:
        resp = httpx.post(server.url + "/query", json={"sql": sql})
        assert assert_problem(resp, 400, field="sql")["detail"].endswith(f"not {word}")
    assert httpx.get(server.url + "/ready").status_code == 200


def test_x_entity_key_is_an_rfc6901_pointer_checked_when_the_schema_is_put(server: Server) -> None:
    schema = {"type": "object", "properties": {
        "a/b": {"type": "string"}, "m~n": {"type": "integer"}, "x": {},
        "acct": {"type": "object", "properties": {"id": {"type": "string"}}},
    }}

    def key_of(action: str, data: dict[str, Any]) -> tuple[str, str]:
        resp = post_command(server, {"action": action, "data": data})
        assert resp.status_code == 202, resp.text
        url = server.url + resp.headers["location"]
        got = wait_for(lambda: (r := httpx.get(url)).status_code == 200 and r)
        return got.json()["key"], resp.json()["id"]

    for pointer, data, key in [("/a~1b", {"a/b": "k-1"}, "k-1"), ("/m~0n", {"m~n": 42}, "42"),
                               ("/acct/id", {"acct": {"id": "k-3"}}, "k-3"), ("/x", {"x": "k-4"}, "k-4")]:
        resp = httpx.put(server.url + "/schemas/keyed", json={**schema, "x-entity-key": pointer})
        assert resp.status_code == 200, resp.text
        assert key_of("keyed", data)[0] == key, pointer
    # Valid, but this command's data has nothing usable there: the command's own id is its key.
    for data in ({}, {"x": {"nested": 1}}, {"x": 1.5}, {"x": True}, {"x": None}):
        key, command_id = key_of("keyed", data)
        assert key == command_id, data

    strict = {**schema, "additionalProperties": False}
    # Refused: not a pointer, a bad escape, a member the schema forbids, inside a string, an object.
    for bad in (5, None, "", "x", "a/b", "/a~2", "/a~", "/nope", "/a~1b/c", "/acct"):
        resp = httpx.put(server.url + "/schemas/badly-keyed", json={**strict, "x-entity-key": bad})
        detail = assert_problem(resp, 400)["detail"]
        assert resp.json()["field"] == "x-entity-key" and "x-entity-key" in detail, (bad, detail)
    assert httpx.get(server.url + "/schemas/badly-keyed").status_code == 404  # nothing was stored
    # Where the schema does not settle it (acct allows other members), the pointer is trusted.
    ok = httpx.put(server.url + "/schemas/badly-keyed", json={**strict, "x-entity-key": "/acct/other"})
    assert ok.status_code == 200, ok.text


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_openapi_describes_the_real_requests_and_responses(server: Server) -> None:
    doc = httpx.get(server.url + "/schema/openapi.json").json()
    paths = doc["paths"]

    def problem_shape(response: dict[str, Any]) -> dict[str, Any]:
        assert list(response["content"]) == [PROBLEM], response
        return _resolve(doc, response["content"][PROBLEM]["schema"])

    submit = paths["/commands"]["post"]
    body = _resolve(doc, submit["requestBody"]["content"]["application/json"]["schema"])
    assert sorted(body["required"]) == ["action", "data"] and body["additionalProperties"] is False
    assert sorted(body["properties"]) == ["action", "data", "system", "user"]
    assert body["properties"]["data"]["type"] == "object"
    responses = submit["responses"]
    assert sorted(responses) == ["201", "202", "400", "413", "422", "503"]
    assert "location" in {h.lower() for h in responses["202"]["headers"]}
    for status in ("201", "202"):
        accepted = _resolve(doc, responses[status]["content"]["application/json"]["schema"])
        assert {"id", "topic", "partition", "offset", "status"} <= set(accepted["properties"]), accepted
    for status in ("400", "413", "422", "503"):
        shape = problem_shape(responses[status])
        assert {"type", "title", "status", "detail"} <= set(shape["required"])
        assert {"field", "errors"} <= set(shape["properties"])

    # PUT /views/{name} answers 201 for a new view and 200 for a replaced one (OpenAPI said 200 only)
    assert sorted(paths["/views/{name}"]["put"]["responses"]) == ["200", "201", "400", "413"]

    for path in ("/commands/{command_id}", "/events/{event_id}", "/schemas/{action}", "/entities/{entity_id}",
                 "/tx/{t}", "/views/{name}", "/views/{name}/rows"):
        problem_shape(paths[path]["get"]["responses"]["404"])
    # No error is described in Litestar's own shape (status_code, detail, extra): they are all problems
    # (but /ready's 503, the readiness report).
    for path, item in paths.items():
        if path == "/ready":
            continue
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == [PROBLEM], (method, path, status)

    sse = paths["/updates"]["get"]
    assert "WebSocket" in sse["description"] and "Last-Event-ID" in sse["description"]
    assert list(sse["responses"]["200"]["content"]) == ["text/event-stream"]
