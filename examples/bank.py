"""The demo bank: a command processor that opens accounts and moves money, in integer minor units.

    python -m examples.bank --bootstrap localhost:9092

Balances live only in the events (every money event carries the balance after it), so the state is
rebuilt from the events topic on start and the ledger's entity state for an account is its balance
as of any point in time.  Any command that cannot be carried out becomes ``command-rejected``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger.processor import Command, Event, Processor

if TYPE_CHECKING:
    from collections.abc import Callable

    BankHandler = Callable[[Command, "Bank"], list[Event]]

__all__ = ["SCHEMAS", "Bank", "Rejected", "build", "main"]

SCHEMAS = Path(__file__).parent / "schemas"
ACTIONS = ("open-account", "deposit", "withdraw", "transfer-money")


@dataclass
class Bank:
    """What the bank knows, folded from events: balance and owner by account."""

    balances: dict[str, int] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)


class Rejected(Exception):
    """A command the bank refuses; its message is the reason in ``command-rejected``."""


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise Rejected(f"{name} must be a non-empty string")
    return value


# Balances stay within a signed 64-bit integer, so SQL over them (::BIGINT) never overflows.
MAX_BALANCE = 2**63 - 1


def _amount(data: dict[str, Any]) -> int:
    value = data.get("amount")
    # bool is an int in Python and 1.0 is not an amount in minor units.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BALANCE:
        raise Rejected(f"amount must be a positive integer up to {MAX_BALANCE}, got {value!r}")
    return value


def _credited(bank: Bank, account: str, amount: int) -> int:
    balance = bank.balances[account] + amount
    if balance > MAX_BALANCE:
        raise Rejected(f"balance of {account!r} would exceed {MAX_BALANCE}")
    return balance


def _account(bank: Bank, data: dict[str, Any], name: str) -> str:
    account = _text(data, name)
    if account not in bank.balances:
        raise Rejected(f"unknown account {account!r}")
    return account


def open_account(command: Command, bank: Bank) -> list[Event]:
    account, owner = _text(command.data, "account"), _text(command.data, "owner")
    if account in bank.balances:
        raise Rejected(f"duplicate account {account!r}")
    return [Event("account-opened", {"id": account, "owner": owner, "balance": 0})]


def deposit(command: Command, bank: Bank) -> list[Event]:
    amount = _amount(command.data)
    account = _account(bank, command.data, "account")
    balance = _credited(bank, account, amount)
    return [Event("money-deposited", {"id": account, "amount": amount, "balance": balance})]


def withdraw(command: Command, bank: Bank) -> list[Event]:
    amount = _amount(command.data)
    account = _account(bank, command.data, "account")
    balance = bank.balances[account]
    if amount > balance:
        raise Rejected(f"insufficient funds in {account!r}: balance {balance}, amount {amount}")
    return [Event("money-withdrawn", {"id": account, "amount": amount, "balance": balance - amount})]


def transfer_money(command: Command, bank: Bank) -> list[Event]:
    amount = _amount(command.data)
    source, target = _text(command.data, "from_account"), _text(command.data, "to_account")
    if source == target:
        raise Rejected(f"same account transfer: from_account and to_account are both {source!r}")
    source, target = _account(bank, command.data, "from_account"), _account(bank, command.data, "to_account")
    balance = bank.balances[source]
    if amount > balance:
        raise Rejected(f"insufficient funds in {source!r}: balance {balance}, amount {amount}")
    credited = _credited(bank, target, amount)
    return [
        Event("money-transferred",
              {"id": command.id, "from_account": source, "to_account": target, "amount": amount}),
        Event("account-debited", {"id": source, "amount": amount, "balance": balance - amount}),
        Event("account-credited",
              {"id": target, "amount": amount, "balance": credited}),
    ]


HANDLERS: dict[str, BankHandler] = {
    "open-account": open_account, "deposit": deposit, "withdraw": withdraw,
    "transfer-money": transfer_money,
}


def _opened(event: Event, bank: Bank) -> None:
    bank.owners[event.data["id"]] = event.data["owner"]
    bank.balances[event.data["id"]] = event.data["balance"]


def _balance(event: Event, bank: Bank) -> None:
    bank.balances[event.data["id"]] = event.data["balance"]


def build(
    bootstrap: str, *, group: str = "bank", commands_topic: str = "commands",
    events_topic: str = "events", join_group: bool = True, name: str | None = None,
    max_batch: int = 500,
) -> Processor[Bank]:
    """The bank processor, ready to ``await build(bootstrap).run(stop)``."""
    bank = Processor(
        bootstrap=bootstrap, group=group, commands_topic=commands_topic, events_topic=events_topic,
        state=Bank, join_group=join_group, name=name, max_batch=max_batch,
    )
    for action, fn in HANDLERS.items():
        bank.handler(action)(_rejecting(action, fn))
    bank.on_event("account-opened")(_opened)
    for action in ("money-deposited", "money-withdrawn", "account-debited", "account-credited"):
        bank.on_event(action)(_balance)
    return bank


def _rejecting(action: str, fn: BankHandler) -> BankHandler:
    """``fn`` with :class:`Rejected` turned into a ``command-rejected`` event."""

    def handle(command: Command, bank: Bank) -> list[Event]:
        try:
            events: list[Event] = fn(command, bank)
        except Rejected as e:
            return [Event("command-rejected", {"id": command.id, "action": action, "reason": str(e)})]
        return events

    return handle


def main(argv: list[str] | None = None) -> int:
    """Run the bank until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m examples.bank", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("LEDGER_KAFKA_BOOTSTRAP", "localhost:9092"),
                        help="Kafka bootstrap servers (default: $LEDGER_KAFKA_BOOTSTRAP or localhost:9092)")
    parser.add_argument("--group", default="bank", help="consumer group and processor name")
    parser.add_argument("--commands-topic", default="commands")
    parser.add_argument("--events-topic", default="events")
    parser.add_argument("--no-join", action="store_true",
                        help="read every commands partition without joining the group (faster start)")
    parser.add_argument("--max-batch", type=int, default=500, help="commands per offset commit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bank = build(args.bootstrap, group=args.group, commands_topic=args.commands_topic,
                 events_topic=args.events_topic, join_group=not args.no_join, max_batch=args.max_batch)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await bank.run(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
