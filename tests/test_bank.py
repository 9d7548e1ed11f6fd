"""The demo bank against a real Tansu broker: a scripted run matches an independent model of the
bank, a new instance rebuilds its balances from the events, a kill -9 mid-run loses and doubles
nothing, and the command schemas accept and refuse what the bank does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ledger.broker import Broker, create_topics_async
from ledger.processor import Processor, command_envelope, event_id

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is not an installed package, only a directory
    sys.path.insert(0, str(ROOT))
from examples.bank import SCHEMAS, Bank, build  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def kafka() -> Iterator[Broker]:
    with Broker() as b:
        yield b


# ----------------------------------------------------------------------- the independent model
MAX_BALANCE = 2**63 - 1  # balances stay BIGINT


class Model:
    """The bank as a plain dict: what each command should emit, computed without the processor.

    An expected event list is either the exact events, or ``("rejected", words)`` where ``words``
    must appear in the rejection's reason."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}

    def apply(self, cid: str, action: str, d: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | str:
        amount = d.get("amount")
        bad_amount = type(amount) is not int or not 1 <= amount <= MAX_BALANCE
        if action == "open-account":
            if d["account"] in self.balances:
                return "duplicate account"
            self.balances[d["account"]] = 0
            return [("account-opened", {"id": d["account"], "owner": d["owner"], "balance": 0})]
        if action in ("deposit", "withdraw"):
            if bad_amount:
                return "positive integer"
            acct = d["account"]
            if acct not in self.balances:
                return "unknown account"
            if action == "withdraw":
                if amount > self.balances[acct]:
                    return "insufficient funds"
                self.balances[acct] -= amount
                return [("money-withdrawn", {"id": acct, "amount": amount, "balance": self.balances[acct]})]
            if self.balances[acct] + amount > MAX_BALANCE:
                return "would exceed"
            self.balances[acct] += amount
            return [("money-deposited", {"id": acct, "amount": amount, "balance": self.balances[acct]})]
        assert action == "transfer-money"
        src, dst = d["from_account"], d["to_account"]
        if bad_amount:
            return "positive integer"
        if src == dst:
            return "same account"
        if src not in self.balances or dst not in self.balances:
            return "unknown account"
        if amount > self.balances[src]:
            return "insufficient funds"
        if self.balances[dst] + amount > MAX_BALANCE:
            return "would exceed"
        self.balances[src] -= amount
        self.balances[dst] += amount
        return [
            ("money-transferred", {"id": cid, "from_account": src, "to_account": dst, "amount": amount}),
            ("account-debited", {"id": src, "amount": amount, "balance": self.balances[src]}),
            ("account-credited", {"id": dst, "amount": amount, "balance": self.balances[dst]}),
        ]


def scripted() -> list[tuple[str, dict[str, Any]]]:
    """Opens, deposits, withdrawals and transfers, with every kind of failure."""
    return [
        ("open-account", {"account": "alice", "owner": "Alice"}),
        ("open-account", {"account": "bob", "owner": "Bob"}),
        ("open-account", {"account": "alice", "owner": "Mallory"}),  # duplicate
        ("deposit", {"account": "alice", "amount": 10_000}),
        ("deposit", {"account": "nobody", "amount": 5}),  # unknown account
        ("deposit", {"account": "bob", "amount": 0}),  # not positive
        ("deposit", {"account": "bob", "amount": 1.5}),  # not an integer
        ("deposit", {"account": "bob", "amount": True}),  # a bool is not an amount
        ("deposit", {"account": "bob", "amount": "100"}),  # a string is not an amount
        ("deposit", {"account": "bob", "amount": MAX_BALANCE + 1}),  # beyond any balance
        ("deposit", {"account": "alice", "amount": MAX_BALANCE}),  # the balance would pass int64
        ("withdraw", {"account": "alice", "amount": 2_500}),
        ("withdraw", {"account": "bob", "amount": 1}),  # insufficient funds
        ("transfer-money", {"from_account": "alice", "to_account": "bob", "amount": 3_000}),
        ("transfer-money", {"from_account": "bob", "to_account": "bob", "amount": 1}),  # same account
        ("transfer-money", {"from_account": "bob", "to_account": "zed", "amount": 1}),  # unknown
        ("transfer-money", {"from_account": "bob", "to_account": "alice", "amount": 3_001}),  # funds
        ("transfer-money", {"from_account": "alice", "to_account": "bob", "amount": -4}),
        ("open-account", {"account": "carol", "owner": "Carol"}),
        ("transfer-money", {"from_account": "bob", "to_account": "carol", "amount": 3_000}),  # exactly all
        ("withdraw", {"account": "alice", "amount": 4_500}),  # exactly all
    ]


def random_commands(n: int, seed: int, accounts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for _ in range(n):
        kind = rng.random()
        amount = rng.choice([rng.randint(1, 500), rng.randint(1, 5_000), 0])
        if kind < 0.3:
            out.append(("deposit", {"account": rng.choice(accounts), "amount": amount}))
        elif kind < 0.5:
            out.append(("withdraw", {"account": rng.choice(accounts), "amount": amount}))
        else:
            out.append(("transfer-money", {"from_account": rng.choice(accounts),
                                           "to_account": rng.choice(accounts), "amount": amount}))
    return out


# -------------------------------------------------------------------------------------- helpers
async def topics(bootstrap: str) -> tuple[str, str]:
    # One commands partition gives the commands a total order, so the model can predict every
    # rejection; events keep four partitions, keyed by account, as in production.
    tag = uuid.uuid4().hex[:8]
    await create_topics_async(bootstrap, {f"commands-{tag}": 1, f"events-{tag}": 4})
    return f"commands-{tag}", f"events-{tag}"


async def send(bootstrap: str, topic: str, commands: list[tuple[str, dict[str, Any]]]) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in commands]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        for cid, (action, data) in zip(ids, commands, strict=True):
            await producer.send(topic, command_envelope(action, data, command_id=cid), key=b"bank")
        await producer.flush()
    finally:
        await producer.stop()
    return ids


async def read_events(bootstrap: str, topic: str) -> list[tuple[int, dict[str, Any]]]:
    """(partition, envelope) of every event, in partition order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, dict[str, Any]]] = []
        remaining = set(tps)
        while remaining:
            for msgs in (await consumer.getmany(timeout_ms=100, max_records=5_000)).values():
                out.extend((m.partition, json.loads(m.value)) for m in msgs)
            for tp in list(remaining):
                hw = consumer.highwater(tp)
                if hw is not None and await consumer.position(tp) >= hw:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


async def run_until(processor: Processor[Bank], done: Callable[[], bool], timeout: float = 30) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(processor.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if task.done():
                task.result()
                raise AssertionError("processor stopped by itself")
            assert time.monotonic() < deadline, f"timed out; status {processor.status.as_dict()}"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def check(
    events: list[tuple[int, dict[str, Any]]], ids: list[str], commands: list[tuple[str, dict[str, Any]]],
    model: Model, group: str,
) -> None:
    """Every command got exactly the events the model predicts, with deterministic ids."""
    by_parent: dict[str, dict[str, dict[str, Any]]] = {}
    for _, e in events:
        by_parent.setdefault(e["parent"], {})[e["id"]] = e
    for cid, (action, data) in zip(ids, commands, strict=True):
        got = by_parent.pop(cid, {})
        expected = model.apply(cid, action, data)
        if isinstance(expected, str):
            [e] = got.values()
            assert e["id"] == event_id(cid, 0, processor=group)
            assert e["action"] == "command-rejected" and e["data"]["id"] == cid, e
            assert e["data"]["action"] == action and expected in e["data"]["reason"], (expected, e)
            continue
        assert len(got) == len(expected), (action, data, got)
        for i, (name, payload) in enumerate(expected):
            e = got[event_id(cid, i, processor=group)]
            assert (e["action"], e["data"]) == (name, payload), (i, action, data)


def last_balances(events: list[tuple[int, dict[str, Any]]]) -> dict[str, int]:
    """Each account's balance from its last event: all its events share a key, hence a partition."""
    out: dict[str, int] = {}
    for _, e in events:
        if e["action"] != "command-rejected" and "balance" in e["data"]:
            out[e["data"]["id"]] = e["data"]["balance"]
    return out


# ---------------------------------------------------------------------------------------- tests
async def test_scripted_run_matches_the_model_and_a_new_instance_carries_on(kafka: Broker) -> None:
    bs = kafka.bootstrap
    commands_topic, events_topic = await topics(bs)
    accounts = ["alice", "bob", "carol", "dave"]
    first = [*scripted(), ("open-account", {"account": "dave", "owner": "Dave"}),
             *random_commands(300, seed=1, accounts=[*accounts, "ghost"])]
    ids = await send(bs, commands_topic, first)
    bank = build(bs, group="bank-a", commands_topic=commands_topic, events_topic=events_topic,
                 join_group=False)
    await run_until(bank, lambda: bank.status.commands == len(first))
    assert bank.status.failed == bank.status.fold_errors == 0

    model = Model()
    events = await read_events(bs, events_topic)
    check(events, ids, first, model, "bank-a")
    assert len({e["id"] for _, e in events}) == len(events)
    assert bank.state.balances == model.balances == last_balances(events)
    assert bank.state.owners == {"alice": "Alice", "bob": "Bob", "carol": "Carol", "dave": "Dave"}
    reasons = {e["data"]["reason"].split(" ")[0] for _, e in events if e["action"] == "command-rejected"}
    assert reasons == {"duplicate", "unknown", "amount", "insufficient", "same", "balance"}

    # A new instance knows the balances only from the events, and continues correctly.
    second = random_commands(200, seed=2, accounts=accounts)
    more_ids = await send(bs, commands_topic, second)
    again = build(bs, group="bank-a", commands_topic=commands_topic, events_topic=events_topic,
                  join_group=False)
    await run_until(again, lambda: again.status.commands == len(second))
    assert again.status.replayed == len(events) and again.status.redelivered == 0
    events = await read_events(bs, events_topic)
    check([(p, e) for p, e in events if e["parent"] in set(more_ids)], more_ids, second, model, "bank-a")
    assert again.state.balances == model.balances == last_balances(events)
    assert sum(model.balances.values()) == sum(
        e["data"]["amount"] * (1 if e["action"] == "money-deposited" else -1)
        for _, e in events if e["action"] in ("money-deposited", "money-withdrawn")
    )

    # Every command redelivered (a group with no committed offsets, same processor name): all are
    # recognised as done, nothing is emitted, and the rebuilt balances are the same.
    replica = build(bs, group="bank-a-replica", name="bank-a", commands_topic=commands_topic,
                    events_topic=events_topic, join_group=False)
    await run_until(replica, lambda: replica.status.redelivered == len(first) + len(second))
    assert replica.status.commands == 0 and replica.state.balances == model.balances
    assert len(await read_events(bs, events_topic)) == len(events)


async def test_kill_9_mid_run_loses_and_doubles_nothing(kafka: Broker, tmp_path: Path) -> None:
    bs = kafka.bootstrap
    commands_topic, events_topic = await topics(bs)
    accounts = [f"acct-{i}" for i in range(8)]
    commands = [("open-account", {"account": a, "owner": a.upper()}) for a in accounts]
    commands += [("deposit", {"account": a, "amount": 1_000}) for a in accounts]
    commands += random_commands(4_000, seed=3, accounts=accounts)
    ids = await send(bs, commands_topic, commands)

    log = (tmp_path / "bank.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.bank", "--bootstrap", bs, "--group", "bank-k", "--no-join",
         "--commands-topic", commands_topic, "--events-topic", events_topic, "--max-batch", "20"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    watcher = AIOKafkaConsumer(bootstrap_servers=bs, auto_offset_reset="earliest", fetch_max_wait_ms=5)
    await watcher.start()
    try:
        watcher.assign([TopicPartition(events_topic, p) for p in range(4)])
        deadline = time.monotonic() + 20
        seen = 0
        while seen < 500:  # well into the run, with a commit every 20 commands: kill it now
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "bank.log").read_text()
            seen += sum(len(m) for m in (await watcher.getmany(timeout_ms=5)).values())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await asyncio.sleep(0.2)  # let the broker finish a produce request that was in flight
    finally:
        await watcher.stop()
        log.close()
    before = await read_events(bs, events_topic)
    committed = await committed_offset(bs, "bank-k", commands_topic)
    assert 0 < len({e["parent"] for _, e in before}) < len(commands), "the kill came too late to test"

    bank = build(bs, group="bank-k", commands_topic=commands_topic, events_topic=events_topic,
                 join_group=False)
    handled_before = len({e["parent"] for _, e in before})
    await run_until(bank, lambda: bank.status.commands + bank.status.redelivered
                    == len(commands) - committed)
    # Commands whose events were out but whose offsets were not committed (if the kill fell between
    # the acks and the commit, about one run in three) came back and were recognised, not re-applied.
    assert bank.status.redelivered == handled_before - committed
    assert bank.status.commands == len(commands) - handled_before

    events = await read_events(bs, events_topic)
    assert [k for k, n in Counter(e["id"] for _, e in events).items() if n > 1] == []
    model = Model()
    check(events, ids, commands, model, "bank-k")
    assert bank.state.balances == model.balances == last_balances(events)
    assert sum(model.balances.values()) == sum(
        e["data"]["amount"] * (1 if e["action"] == "money-deposited" else -1)
        for _, e in events if e["action"] in ("money-deposited", "money-withdrawn")
    )


async def committed_offset(bootstrap: str, group: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0)) or 0
    finally:
        await consumer.stop()


def test_schemas_accept_and_refuse_what_the_bank_does() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {p.stem: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    assert set(schemas) == {"open-account", "deposit", "withdraw", "transfer-money"}
    valid: dict[str, dict[str, Any]] = {
        "open-account": {"account": "a", "owner": "A"},
        "deposit": {"account": "a", "amount": 1},
        "withdraw": {"account": "a", "amount": 10**12},
        "transfer-money": {"from_account": "a", "to_account": "b", "amount": 5},
    }
    for action, schema in schemas.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["additionalProperties"] is False
        v = jsonschema.Draft202012Validator(schema)
        v.check_schema(schema)
        data = valid[action]
        assert list(v.iter_errors(data)) == []
        assert schema["x-entity-key"].strip("/") in data  # the API's Kafka key for the command
        assert list(v.iter_errors({**data, "extra": 1})), action
        for name in data:
            assert list(v.iter_errors({k: x for k, x in data.items() if k != name})), (action, name)
        if "amount" in data:
            for bad in (0, -1, 1.5, "1", True, None):
                assert list(v.iter_errors({**data, "amount": bad})), (action, bad)
