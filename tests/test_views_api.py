"""Views over HTTP against a real `ledger serve` (records appended through POST /commands)."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import httpx
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from tests.test_api import REPO, Server, assert_problem, post_command, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

NOTES = ("SELECT data->>'text' AS text, tx FROM commands WHERE action = 'note-taken'")
COUNTS = "SELECT action, count(*) AS n FROM commands WHERE action LIKE 'note%' GROUP BY ALL"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("views-api") / "data").start()
    yield srv
    srv.stop()


def note(server: Server, text: str) -> int:
    """Post a command and wait until the ledger has it; returns the head tx then."""
    assert post_command(server, {"action": "note-taken", "data": {"text": text}}).status_code == 202

    def landed() -> Any:
        r = httpx.post(server.url + "/query", json={
            "sql": "SELECT max(tx) AS tx FROM commands WHERE data->>'text' = $t", "params": {"t": text}})
        return r.json()["rows"][0][0]

    return int(wait_for(landed))


def put_view(server: Server, name: str, sql: str, description: str = "") -> httpx.Response:
    return httpx.put(f"{server.url}/views/{name}", json={"sql": sql, "description": description}, timeout=30)


def test_define_read_replace_and_drop(server: Server) -> None:
    t1 = note(server, "one")
    r = put_view(server, "notes", NOTES, "every note")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "notes" and body["description"] == "every note" and body["tx"] > t1
    assert body["materialization"]["state"] == "none"
    v1 = body["tx"]
    rows = httpx.get(f"{server.url}/views/notes/rows").json()
    assert [c["name"] for c in rows["columns"]] == ["text", "tx"] and rows["rows"] == [["one", t1]]

    r = put_view(server, "notes", NOTES.replace("data->>'text'", "upper(data->>'text')"))
    assert r.status_code == 200 and r.json()["versions"] == 2
    t2 = note(server, "two")
    now = httpx.get(f"{server.url}/views/notes/rows").json()["rows"]
    assert sorted(now) == [["ONE", t1], ["TWO", t2]]
    # as of the first version: the old definition, over the data of then
    assert httpx.get(f"{server.url}/views/notes/rows", params={"as_of": v1}).json()["rows"] == [["one", t1]]
    # today's definition over past data
    past = httpx.get(f"{server.url}/views/notes/rows", params={"as_of": v1, "definition": "current"})
    assert past.json()["rows"] == [["ONE", t1]]
    # the same as /query sees it, and formats by Accept
    q = httpx.post(server.url + "/query", json={"sql": "SELECT count(*) AS n FROM notes"}).json()
    assert q["rows"] == [[2]]
    csv = httpx.get(f"{server.url}/views/notes/rows", headers={"accept": "text/csv"})
    assert csv.headers["content-type"].startswith("text/csv") and "ONE" in csv.text
    rows_url = f"{server.url}/views/notes/rows"
    arrow = httpx.get(rows_url, headers={"accept": "application/vnd.apache.arrow.stream"})
    assert ipc.open_stream(arrow.content).read_all().num_rows == 2
    parquet = httpx.get(rows_url, headers={"accept": "application/vnd.apache.parquet"})
    assert pq.read_table(io.BytesIO(parquet.content)).num_rows == 2
    limited = httpx.get(f"{server.url}/views/notes/rows", params={"limit": 1}).json()
    assert limited["row_count"] == 1 and limited["truncated"]

    listing = httpx.get(f"{server.url}/views").json()
    assert "notes" in [v["name"] for v in listing["items"]]
    assert httpx.delete(f"{server.url}/views/notes").status_code == 204
    assert_problem(httpx.get(f"{server.url}/views/notes"), 404)
    assert_problem(httpx.delete(f"{server.url}/views/notes"), 404)
    # still readable as of a tx when it existed
    assert httpx.get(f"{server.url}/views/notes/rows", params={"as_of": v1}).status_code == 200


def test_changes_between_two_points(server: Server) -> None:
    t0 = note(server, "c-one")
    assert put_view(server, "counts", COUNTS).status_code in (200, 201)
    v = httpx.get(f"{server.url}/views/counts").json()["tx"]
    note(server, "c-two")
    r = httpx.get(f"{server.url}/views/counts/changes", params={"from": v})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["from_tx"] == v and body["columns"] == ["action", "n"]
    [added], [removed] = body["added"], body["removed"]
    assert added["n"] == removed["n"] + 1 and added["action"] == "note-taken"
    # before it was defined it reads as empty at both points (with definition=current: today's rows)
    before = httpx.get(f"{server.url}/views/counts/changes", params={"from": 0, "to": t0})
    assert before.status_code == 200 and before.json()["added"] == before.json()["removed"] == []
    cur = httpx.get(f"{server.url}/views/counts/changes",
                    params={"from": 0, "to": t0, "definition": "current"})
    assert cur.json()["removed"] == [] and [a["n"] for a in cur.json()["added"]] >= [1]
    assert_problem(httpx.get(f"{server.url}/views/counts/changes"), 400)


def test_rebuild_in_the_background_with_progress(server: Server) -> None:
    note(server, "r-one")
    assert put_view(server, "rnotes", NOTES).status_code in (200, 201)
    r = httpx.post(f"{server.url}/views/rnotes/rebuild")
    assert r.status_code == 202 and r.headers["location"] == "/views/rnotes"
    seen = []

    def ready() -> Any:
        m = httpx.get(f"{server.url}/views/rnotes").json()["materialization"]
        seen.append(m["progress"])
        return m if m["state"] == "ready" else None

    mat = wait_for(ready, 30)
    assert mat["progress"] == 1.0 and mat["rows"] >= 1 and mat["incremental"] is True
    assert (server.data_dir / "views" / "rnotes" / f"{mat['tx']}.parquet").exists()
    note(server, "r-two")  # incremental: the materialization plus the newer records
    rows = httpx.get(f"{server.url}/views/rnotes/rows").json()["rows"]
    assert {"r-one", "r-two"} <= {r[0] for r in rows}
    assert httpx.get(f"{server.url}/views/rnotes").json()["materialization"]["state"] == "ready"
    assert_problem(httpx.post(f"{server.url}/views/nope/rebuild"), 404)
    # The CLI cannot rebuild while the service writes the ledger: it says where to go instead.
    cli = subprocess.run([sys.executable, "-m", "ledger", "views", "rebuild", "rnotes", "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert cli.returncode == 1 and "POST /views/rnotes/rebuild" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("Bad-Name", {"sql": "SELECT 1"}, "name"),
        ("events", {"sql": "SELECT 1"}, "name"),
        ("okname", {"sql": "SELEC 1"}, "sql"),
        ("okname", {"sql": "SELECT * FROM nowhere"}, "sql"),
        ("okname", {"sql": "DROP TABLE tail_records"}, "sql"),
        ("okname", {"description": "no sql"}, "sql"),
        ("okname", {"sql": "SELECT 1", "extra": 1}, "extra"),
        ("okname", {"sql": "SELECT 1", "description": 5}, "description"),
    ],
)
def test_bad_definitions_are_400_problems_naming_the_field(
    server: Server, name: str, body: dict[str, Any], field: str
) -> None:
    r = httpx.put(f"{server.url}/views/{name}", json=body)
    assert_problem(r, 400, field=field)
    assert r.json()["field"] == field


def test_other_error_shapes(server: Server) -> None:
    assert_problem(httpx.get(f"{server.url}/views/nope"), 404)
    assert_problem(httpx.get(f"{server.url}/views/nope/rows"), 404)
    assert put_view(server, "shapes", "SELECT 1 AS x").status_code in (200, 201)
    assert_problem(httpx.get(f"{server.url}/views/shapes/rows", params={"definition": "x"}), 400,
                   field="definition")
    assert_problem(httpx.get(f"{server.url}/views/shapes/rows", params={"limit": 0}), 400, field="limit")
    assert_problem(httpx.get(f"{server.url}/views/shapes/rows", params={"as_of": "yesterday"}), 400)
    assert_problem(httpx.get(f"{server.url}/export", params={"tables": "nope"}), 400, field="tables")


def test_a_tx_not_written_yet_is_refused_wherever_a_point_in_time_is_asked(server: Server) -> None:
    """`as_of=<head + 1>` read as of the head, and answered differently once that tx was written
    (found by audit); an instant past the head is read as of the head, and the header says so."""
    t = note(server, "now")
    assert put_view(server, "later", "SELECT 1 AS x").status_code in (200, 201)
    r = httpx.post(server.url + "/query", json={"sql": "SELECT max(tx) AS t FROM transactions"})
    head = r.json()["rows"][0][0]
    assert r.headers["ledger-as-of-tx"] == str(head) and head > t
    future = str(head + 1)
    for path, params in [("/entities/x", {"as_of": future}), ("/commands", {"as_of": future}),
                         ("/events", {"as_of": future}), ("/views/later/rows", {"as_of": future}),
                         ("/views/later/changes", {"from": "0", "to": future}),
                         ("/views/later/changes", {"from": future}), ("/export", {"as_of": future})]:
        field = "as_of" if "as_of" in params else ("to" if "to" in params else "from")
        problem = assert_problem(httpx.get(server.url + path, params=params), 400, field=field)
        assert f"tx {future} is not in the ledger yet (the latest is {head})" in problem["detail"], path
    for as_of in (head + 1, future):
        assert_problem(httpx.post(server.url + "/query", json={"sql": "SELECT 1", "as_of": as_of}), 400,
                       field="as_of")
    at_head = httpx.post(server.url + "/query", json={"sql": "SELECT count(*) FROM log", "as_of": head})
    assert at_head.status_code == 200 and at_head.headers["ledger-as-of-tx"] == str(head)
    later = httpx.post(server.url + "/query", json={"sql": "SELECT 1", "as_of": "2999-01-01T00:00:00Z"})
    assert later.status_code == 200 and later.headers["ledger-as-of-tx"] == str(head)
    first = httpx.post(server.url + "/query", json={"sql": "SELECT 1", "as_of": "2000-01-01T00:00:00Z"})
    assert first.headers["ledger-as-of-tx"] == "0"


def test_changes_across_a_change_of_columns_name_the_definition(server: Server) -> None:
    first = put_view(server, "shifting", "SELECT 1 AS a")
    assert first.status_code == 201
    assert put_view(server, "shifting", "SELECT 2 AS b").status_code == 200
    r = httpx.get(f"{server.url}/views/shifting/changes", params={"from": first.json()["tx"]})
    assert "definition=current" in assert_problem(r, 400, field="definition")["detail"]
    current = httpx.get(f"{server.url}/views/shifting/changes",
                        params={"from": first.json()["tx"], "definition": "current"})
    assert current.status_code == 200 and current.json()["added"] == []
