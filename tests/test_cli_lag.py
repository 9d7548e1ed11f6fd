"""`ledger info --bootstrap` (lag per partition from a real broker) and `ledger quarantine`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ledger import Ledger, OffsetMark
from ledger.broker import Broker, create_topics_async
from tests.test_consumer import phase, produce

REPO = Path(__file__).resolve().parents[1]


def info_lag(data_dir: Path, bootstrap: str, *, group: str, topics: str) -> subprocess.CompletedProcess[str]:
    """`ledger info --json` with the lag, run as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "ledger", "info", "--json", "--data-dir", str(data_dir),
         "--bootstrap", bootstrap, "--group", group],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "LEDGER_TOPICS": topics},
    )


async def test_info_reports_lag_per_partition(broker: Broker, tmp_path: Path) -> None:
    await create_topics_async(broker.bootstrap, {"cli-lag": 3})
    await produce(broker.bootstrap, "cli-lag", phase("a", 12), partition=0)
    await produce(broker.bootstrap, "cli-lag", phase("b", 5), partition=1)
    await produce(broker.bootstrap, "cli-lag", phase("c", 4), partition=2)  # never consumed: all lag
    with Ledger.open(tmp_path / "data") as lg:  # as a consumer would: offsets stored with a tx
        lg.append([], offsets={("cli", "cli-lag", 0): OffsetMark(10), ("cli", "cli-lag", 1): OffsetMark(5)})
    out = info_lag(tmp_path / "data", broker.bootstrap, group="cli", topics="cli-lag")
    assert out.returncode == 0, out.stderr
    lag = json.loads(out.stdout)["lag"]
    assert [(r["partition"], r["next_offset"], r["highwater"], r["lag"]) for r in lag] == [
        (0, 10, 12, 2), (1, 5, 5, 0), (2, 0, 4, 4)]


async def test_info_beside_a_running_writer_counts_the_groups_kafka_commits(
    broker: Broker, tmp_path: Path,
) -> None:
    """The snapshot sees none of the writer's unsealed offsets; Kafka's commits say how far it got."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    await create_topics_async(broker.bootstrap, {"cli-live": 2})
    await produce(broker.bootstrap, "cli-live", phase("a", 12), partition=0)
    await produce(broker.bootstrap, "cli-live", phase("b", 3), partition=1)
    with Ledger.open(tmp_path / "data") as lg:  # the writer stays open while `info` runs
        lg.append([], offsets={("live", "cli-live", 0): OffsetMark(10)})
        kafka = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="live",
                                 enable_auto_commit=False)
        await kafka.start()
        try:
            kafka.assign([TopicPartition("cli-live", 0)])
            await kafka.commit({TopicPartition("cli-live", 0): 10})
        finally:
            await kafka.stop()
        out = info_lag(tmp_path / "data", broker.bootstrap, group="live", topics="cli-live")
    assert out.returncode == 0, out.stderr
    assert "is writing this ledger" in out.stderr
    lag = json.loads(out.stdout)["lag"]
    assert [(r["partition"], r["next_offset"], r["highwater"], r["lag"]) for r in lag] == [
        (0, 10, 12, 2), (1, 0, 3, 3)]


def test_quarantine_lists_raw_input_with_reason_and_provenance(tmp_path: Path) -> None:
    from ledger import Quarantined

    with Ledger.open(tmp_path / "data") as lg:
        lg.append([], quarantine=[Quarantined(reason="value is not JSON", value=b"\xff{", key=b"k1",
                                              topic="commands", partition=2, offset=41)])
    out = subprocess.run(
        [sys.executable, "-m", "ledger", "quarantine", "--format", "json",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "LEDGER_TOPICS": "cli-lag"},
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert (row["topic"], row["partition"], row["offset"], row["reason"]) == (
        "commands", 2, 41, "value is not JSON")
    assert row["value_bytes"] == 2 and row["value"] == "\\xFF{"
