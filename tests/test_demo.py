"""The whole service with the bank processor (`ledger serve --demo`): synchronous commands under
concurrency, and a restart mid-load that loses and duplicates nothing."""

from __future__ import annotations

import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_api import Server, read_sse, wait_for, wait_for_or_none

ACCOUNTS = [f"acct-{i}" for i in range(10)]
START = 1_000_000  # large enough that no transfer below is rejected: balances are order-free


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = Server(tmp_path_factory.mktemp("demo") / "data", "--demo").start()
    yield srv
    srv.stop()


def sync(client: httpx.Client, action: str, data: dict[str, Any]) -> httpx.Response:
    body = {"action": action, "data": data}
    return client.post("/commands", params={"sync": "true", "timeout": 20}, json=body)


def test_sync_transfers_from_concurrent_clients(bank: Server) -> None:
    with httpx.Client(base_url=bank.url, timeout=30) as client:
        for acct in ACCOUNTS:
            assert sync(client, "open-account", {"account": acct, "owner": acct.upper()}).status_code == 201
            assert sync(client, "deposit", {"account": acct, "amount": START}).status_code == 201
        rejected = sync(client, "withdraw", {"account": "acct-0", "amount": 10 * START})
        assert rejected.status_code == 201  # a rejection is an answer too

    rng = random.Random(7)
    transfers = []
    for _ in range(1000):
        a, b = rng.sample(ACCOUNTS, 2)
        transfers.append({"from_account": a, "to_account": b, "amount": rng.randint(1, 500)})

    unresolved: list[str] = []  # a 201's Location that did not answer 200 right away

    def send(chunk: list[dict[str, Any]]) -> list[httpx.Response]:
        with httpx.Client(base_url=bank.url, timeout=30) as client:
            out = []
            for t in chunk:
                out.append(r := sync(client, "transfer-money", t))
                if r.status_code == 201 and client.get(r.headers["location"]).status_code != 200:
                    unresolved.append(r.headers["location"])
            return out

    with ThreadPoolExecutor(20) as pool:
        responses = [r for rs in pool.map(send, [transfers[i::20] for i in range(20)]) for r in rs]

    assert [r.status_code for r in responses] == [201] * len(transfers)
    assert unresolved == []  # the command is in the ledger when its answer says done (found by audit)
    ids = [r.json()["id"] for r in responses]
    # A transfer's events are stored in one transaction (ledger.groups), so the answer names all
    # three: before, the ledger could store the debit and the credit apart, and answer with one.
    assert [len(r.json()["children"]) for r in responses] == [3] * len(transfers)
    q = httpx.post(bank.url + "/query", timeout=30, json={
        "sql": "SELECT parent, list(action ORDER BY action) AS actions, count(DISTINCT tx) AS txs "
               "FROM events WHERE parent IN (SELECT unnest($ids::VARCHAR[])) GROUP BY parent",
        "params": {"ids": ids},
    }).json()
    by_parent = {row[0]: row[1] for row in q["rows"]}
    want = ["account-credited", "account-debited", "money-transferred"]
    assert all(by_parent[i] == want for i in ids), "each transfer has its three events"
    assert {row[2] for row in q["rows"]} == {1}, "each transfer's events are in one transaction"
    # the first child each response named is one of those events
    firsts = {r.json()["children"][0] for r in responses}
    q = httpx.post(bank.url + "/query", timeout=30, json={
        "sql": "SELECT count(*) FROM events WHERE id IN (SELECT unnest($ids::VARCHAR[])) "
               "AND parent IS NOT NULL", "params": {"ids": list(firsts)},
    }).json()
    assert q["rows"][0][0] == len(firsts)

    expected = dict.fromkeys(ACCOUNTS, START)
    for t in transfers:
        expected[t["from_account"]] -= t["amount"]
        expected[t["to_account"]] += t["amount"]

    def balances() -> dict[str, int]:
        return {a: httpx.get(f"{bank.url}/entities/{a}").json()["state"]["balance"] for a in ACCOUNTS}

    assert wait_for(lambda: balances() == expected and expected, timeout=30)

    # attribute_tx: the tx of the event that set each attribute, as the log says
    acct = ACCOUNTS[0]
    got = httpx.get(f"{bank.url}/entities/{acct}").json()
    last = httpx.post(bank.url + "/query", json={
        "sql": "SELECT max(tx) FROM events WHERE data->>'id' = $a AND data->>'balance' IS NOT NULL",
        "params": {"a": acct}, "as_of": got["as_of_tx"]}).json()["rows"][0][0]
    assert got["attribute_tx"]["balance"] == last
    assert set(got["attribute_tx"]) == set(got["state"])


def test_temporal_reads_over_http_on_the_bank_ledger(bank: Server) -> None:
    """Entities as of / valid at, history, events and their parents, /query in every format and with
    FOR SYSTEM_TIME, and /updates filtered by kind, on a ledger the bank built through Kafka."""
    acct = "acct-audit"
    with httpx.Client(base_url=bank.url, timeout=30) as client:
        before_tx = client.get("/ready").json()["tx"]
        answers = [sync(client, "open-account", {"account": acct, "owner": "ann"}),
                   sync(client, "deposit", {"account": acct, "amount": 100}),
                   sync(client, "deposit", {"account": acct, "amount": 50})]
        assert [a.status_code for a in answers] == [201, 201, 201]
        events = [client.get(f"/events/{a.json()['children'][0]}").json() for a in answers]
        assert [e["parent"] for e in events] == [a.json()["id"] for a in answers]
        assert [e["action"] for e in events] == ["account-opened", "money-deposited", "money-deposited"]
        opened, first, _ = events
        wait_for(lambda: client.get(f"/entities/{acct}").json().get("state", {}).get("balance") == 150, 30)

        def balance(**params: Any) -> int:
            return int(client.get(f"/entities/{acct}", params=params).json()["state"]["balance"])

        assert balance(as_of=first["tx"]) == 100
        assert balance(as_of=first["tx_time"]) == 100  # an instant resolves to the tx at or before it
        assert balance(valid_at=opened["timestamp"]) == 0
        assert client.get(f"/entities/{acct}", params={"as_of": opened["tx"] - 1}).status_code == 404
        assert balance(as_of="") == 150  # empty is unset, as everywhere (it was tx 0: 404)
        assert len(client.get("/events", params={"until": "", "limit": 1000}).json()["items"]) >= 3
        negative = client.get(f"/entities/{acct}", params={"as_of": "-1"}).json()
        assert negative["status"] == 400 and "at least 0" in negative["detail"]
        history = client.get(f"/entities/{acct}/history").json()["datoms"]
        assert [d["v"] for d in history if d["a"] == "balance"] == [0, 100, 150]
        assert {d["record_id"] for d in history} == {e["id"] for e in events}
        since = client.get(f"/entities/{acct}/history", params={"since": first["tx"]}).json()["datoms"]
        assert [d["v"] for d in since if d["a"] == "balance"] == [150]
        txs = client.get("/tx", params={"since": opened["tx_time"], "until": first["tx_time"]}).json()
        assert [t["tx"] for t in txs["items"]] == list(range(opened["tx"] + 1, first["tx"] + 1))
        listed = client.get("/events", params={"action": "money-deposited", "since": before_tx,
                                                "limit": 1000}).json()["items"]
        assert [e["id"] for e in events[1:]] == [e["id"] for e in listed if e["data"]["id"] == acct]

        sql = "SELECT e, CAST(state->>'balance' AS BIGINT) AS balance FROM entities WHERE e = $a"
        body = {"sql": sql, "params": {"a": acct}}
        arrow = client.post("/query", json=body, headers={"accept": "application/vnd.apache.arrow.stream"})
        assert pa.ipc.open_stream(arrow.content).read_all().to_pylist() == [{"e": acct, "balance": 150}]
        parquet = client.post("/query", json=body, headers={"accept": "application/vnd.apache.parquet"})
        assert pq.read_table(io.BytesIO(parquet.content)).to_pylist() == [{"e": acct, "balance": 150}]
        sql = "SELECT state, data FROM entities, log WHERE e = $a AND log.id = $id"
        state = client.post("/query", json={"sql": sql, "params": {"a": acct, "id": first["id"]}}).json()
        assert [c["type"] for c in state["columns"]] == ["json", "json"]  # JSON values, not text
        assert state["rows"] == [[{"amount": 50, "balance": 150, "owner": "ann"}, first["data"]]]
        valid = client.post("/query", json={**body, "valid_at": opened["timestamp"]}).json()
        assert valid["rows"] == [[acct, 0]]
        both = client.post("/query", json={"params": {"a": acct}, "sql":
            f"SELECT CAST(past.state->>'balance' AS BIGINT) AS past, CAST(cur.state->>'balance' AS BIGINT) "
            f"AS cur FROM entities FOR SYSTEM_TIME AS OF {first['tx']} AS past "
            "JOIN entities AS cur ON past.e = cur.e WHERE cur.e = $a"}).json()
        assert both.get("rows") == [[100, 150]], both

        # Any id is one path segment when percent-encoded: `/` (even before "history"), `%`, space,
        # non-ASCII. (Was 404: the server decodes %2F before routing.)
        odd = "ops/history 100%/ü"
        assert sync(client, "open-account", {"account": odd, "owner": "ops"}).status_code == 201
        path = "/entities/" + quote(odd, safe="")
        assert wait_for(lambda: client.get(path).json().get("state")) == {"balance": 0, "owner": "ops"}
        assert client.get(path).json()["id"] == odd
        assert [d["a"] for d in client.get(path + "/history").json()["datoms"]] == ["balance", "owner"]
        assert client.get("/entities/ops%2F").status_code == 404  # a prefix of the id is not the entity
        assert client.get("/entities/%FF").json()["field"] == "entity_id"  # not UTF-8: 400, named

    records = read_sse(bank.url + f"/updates?kind=event&after_tx={before_tx}", {}, 3)
    assert [r["id"] for r in records if r["data"].get("id") == acct][:3] == [e["id"] for e in events]
    assert {r["kind"] for r in records} == {"event"}


def test_restart_mid_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data").start()
    try:
        _restart_mid_load(srv)
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.proc.kill()


def _restart_mid_load(srv: Server) -> None:
    accepted: list[str] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                r = httpx.post(srv.url + "/commands", json={"action": "ping", "data": {"i": i}}, timeout=5)
            except httpx.HTTPError:
                time.sleep(0.05)  # the service is restarting
                continue
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            i += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_for(lambda: len(accepted) > 100, timeout=30)
        srv.stop()  # graceful: the consumer drains what was accepted before the broker stops
        before = len(accepted)
        srv.start()  # same data dir, a fresh in-memory broker
        wait_for(lambda: len(accepted) > before + 100, timeout=60)
    finally:
        stop.set()
        worker.join()

    def stored() -> list[str]:
        rows = httpx.post(srv.url + "/query", timeout=30, json={
            "sql": "SELECT id FROM commands WHERE action = 'ping'", "limit": 100_000}).json()["rows"]
        return [r[0] for r in rows]

    wait_for_or_none(lambda: set(accepted) <= set(stored()), timeout=30)
    ids = stored()
    assert len(ids) == len(set(ids)), "no command stored twice"
    missing = [accepted.index(m) for m in set(accepted) - set(ids)]
    assert not missing, f"accepted commands missing from the ledger (by send order): {sorted(missing)}"
    assert httpx.post(srv.url + "/query", json={"sql": "SELECT 1"}).status_code == 200
    srv.stop()


def test_commands_the_bank_never_answered_are_answered_after_a_restart(tmp_path: Path) -> None:
    """The bundled broker keeps its topics in memory: a command accepted (so in the ledger) but not yet
    handled when the service stopped is gone from Kafka. The next start sends it again."""
    from ledger import Ledger

    data = tmp_path / "data"
    with Ledger.open(data) as lg:  # as if accepted and ingested just before a stop
        rep = lg.append([{"kind": "command", "action": "open-account",
                          "data": {"account": "acct-late", "owner": "lee"}, "headers": {"user": "ann"}}])
    command_id = rep.ids[0]
    srv = Server(data, "--demo").start()
    try:
        url = srv.url + f"/commands/{command_id}"
        wait_for(lambda: httpx.get(url).json()["status"] == "done", timeout=60)
        got = httpx.get(url).json()
        assert len(got["children"]) == 1
        assert httpx.get(srv.url + "/entities/acct-late").json()["state"] == {"balance": 0, "owner": "lee"}
        ids = httpx.post(srv.url + "/query", json={
            "sql": "SELECT id FROM commands WHERE id = $id", "params": {"id": command_id}}).json()["rows"]
        assert ids == [[command_id]]  # sent again, stored once
    finally:
        srv.stop()
