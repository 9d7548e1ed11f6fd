"""Shared fixtures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ledger.broker import Broker

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One real Tansu broker (memory storage) for the whole session.

    Shared: use topic and group names of your own, and never kill or restart it (a test that
    needs a broker restart starts a private `Broker`).
    """
    b = Broker().start()
    try:
        yield b
    finally:
        b.stop()
