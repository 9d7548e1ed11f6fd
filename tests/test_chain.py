"""The hash format is pinned: the chains of existing ledgers must keep verifying, so a change to
the bytes ledger.chain hashes, or to what the append path feeds it, fails here. (The expected
values were computed by the code that wrote the first ledgers.)"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ledger import Ledger, chain

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

META = {"source": "golden"}
RECORDS: list[dict[str, Any]] = [
    {"id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "kind": "event", "action": "account-opened",
     "timestamp": "2024-03-01T12:00:00.123456Z",
     "data": {"id": "acct-1", "owner": 'Zoë 北京 🦆 "q" \\ \n', "balance": 2**70, "rate": 1.25,
              "closed": None, "vip": True, "tags": ["a", {"z": 1, "a": [None, -0.5]}]}},
    {"id": "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5C", "kind": "command", "action": "deposit",
     "timestamp": "2024-03-01T17:30:00+05:30", "data": {},
     "parent": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "key": "k-1",
     "headers": {"trace": "t-1", "user": "ådå"}, "topic": "commands", "partition": 2,
     "offset": 2**40, "kafka_timestamp": datetime(2024, 3, 1, 12, 0, 1, tzinfo=UTC)},
    {"id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5d", "kind": "event", "action": "account-deleted",
     "timestamp": datetime(2024, 3, 2, tzinfo=UTC), "data": {"id": "acct-1"}},
]
RECORD_HASHES = [
    "dcfc1a94c5552da9b8c5c9c1670c0ee52f9c6f965fa8cffb95bf7608c50fa31b",
    "0cd14d6ac86c6079ef41589a7cf519f3332dc5189f8952a916bfd77d656fb52f",
    "ed5e35d26570e00f1379bf5d78ea043e83173045aabcc898bef4a364dcf72f47",
]


def test_hashes_of_data_and_transactions_are_pinned() -> None:
    assert chain.data_hash(RECORDS[0]["data"]) == (
        "c66875f7f52bd84aa56a3b8ce4533811f1117a32782c646fd01f231b2d7a7986")
    assert chain.tx_hash(
        tx=1, tx_us=1_709_294_400_000_000, prev_hash=chain.GENESIS, meta=META,
        record_hashes=RECORD_HASHES,
    ) == "3fbba93b76538eb7660f14ae44949dae0dfd9994bc0037ff924c8d1af4d00a96"


def test_append_hashes_records_as_pinned_and_reads_recompute_the_same(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger") as lg:
        report = lg.append(RECORDS, META)
        tx_us = (report.tx_time - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        assert report.hash == chain.tx_hash(
            tx=1, tx_us=tx_us, prev_hash=chain.GENESIS, meta=META, record_hashes=RECORD_HASHES)
        assert [r.hash for r in lg.tx_range()[0].records] == RECORD_HASHES
        assert lg.verify().ok


def test_builtin_sha256_digests_match_openssl(monkeypatch: pytest.MonkeyPatch) -> None:
    for data in (b"", b"x" * 55, b"x" * 64, 'Zoë 北京 🦆 "q"'.encode() * 40):
        assert chain._sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()

    def missing(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(chain.importlib, "import_module", missing)
    assert chain._builtin_sha256() is hashlib.sha256  # the fallback where there is none
