"""A raw read of the one kind of Kafka record aiokafka cannot parse: a header name that is not UTF-8.

aiokafka decodes header names strictly (its C and pure-Python parsers alike), so its consumer raises
UnicodeDecodeError on every fetch that reaches such a record, and it parses each record batch from
its start, so it never gets past one. The ledger's consumer reads that batch here, with a lenient
parser of the v2 record batch format (KIP-98), to quarantine the record and ingest the others of
its batch; aiokafka parses every other batch. aiokafka internals used: only its FetchRequest (sent
through its public client); a response of another shape fails loudly (LedgerError).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka import codec
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import NoError, for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import ConsumerRecord

from ledger.errors import LedgerError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from aiokafka.structs import TopicPartition

# BaseOffset, Length, PartitionLeaderEpoch, Magic, CRC, Attributes, LastOffsetDelta, BaseTimestamp,
# MaxTimestamp, ProducerId, ProducerEpoch, BaseSequence, RecordCount.
_BATCH = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD = 12  # BaseOffset and Length: Length counts the bytes after them
_MAGIC_AT = 16  # where the magic byte is, in the v2 batch and the older message formats alike
_LOG_APPEND_TIME, _CONTROL = 0x08, 0x20
_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {
    1: codec.gzip_decode, 2: codec.snappy_decode, 3: codec.lz4_decode, 4: codec.zstd_decode,
}


@dataclass
class UnparsedRecord(ConsumerRecord[bytes, bytes]):  # type: ignore[misc]
    """A record read here because aiokafka cannot parse it; `reason` says why (for the quarantine).
    Header names are text with the bytes that are not UTF-8 as \\x escapes."""

    reason: str = ""


@dataclass(frozen=True)
class Unparsable:
    """Where aiokafka fails in a partition, from a given offset on."""

    before: list[int]  # offsets of the records before the batch it cannot parse: it parses those
    records: list[ConsumerRecord[bytes, bytes]]  # that batch's, read raw (UnparsedRecord where bad)
    end: int  # the offset after that batch


async def find_unparsable(
    bootstrap: str, client_options: Mapping[str, Any], positions: Mapping[TopicPartition, int],
    max_bytes: int,
) -> tuple[TopicPartition, Unparsable] | None:
    """Fetch each partition from its position (up to `max_bytes`, as the consumers do), through one
    client, and find the first record batch aiokafka cannot parse: its partition and where it is;
    None if there is none."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, **client_options)
    try:
        await client.bootstrap()
        for tp, offset in positions.items():
            found = first_unparsable(await _fetch(client, tp, offset, max_bytes), tp, offset)
            if found is not None:
                return tp, found
        return None
    finally:
        await client.close()


async def _fetch(client: AIOKafkaClient, tp: TopicPartition, offset: int, max_bytes: int) -> bytes:
    """The record batches of one partition from `offset`, as the broker sends them."""
    await client.add_topic(tp.topic)
    leader = client.cluster.leader_for_partition(tp)
    if leader is None or leader < 0:
        raise LedgerError(f"{tp.topic}/{tp.partition} has no leader to read it from")
    # (Tansu answers max_wait_time=0 with no records at all.)
    response = await client.send(leader, FetchRequest(
        max_wait_time=500, min_bytes=1, max_bytes=max_bytes, isolation_level=0,
        topics=[(tp.topic, [(tp.partition, offset, max_bytes)])]))
    for topic, partitions in response.topics:
        for partition, error_code, _highwater, *rest in partitions:
            if (topic, partition) != (tp.topic, tp.partition):
                continue
            error = for_code(error_code)
            if error is not NoError:
                raise error(f"raw fetch of {topic}/{partition} at offset {offset}")
            data = rest[-1] or b""  # the record batches come last in every version of the response
            if not isinstance(data, bytes):
                raise LedgerError(f"aiokafka's fetch response changed: records are {type(data).__name__}")
            return data
    raise LedgerError(f"the fetch response has no {tp.topic}/{tp.partition}")


def first_unparsable(data: bytes, tp: TopicPartition, offset: int) -> Unparsable | None:
    """In the record batches of a fetch response, the first with a header name that is not UTF-8
    (aiokafka parses each batch from its start, even the records before the offset it fetched
    from, and cannot go past that record). Records are built as aiokafka builds them; control
    batches are skipped, as aiokafka skips them; a batch cut off by the fetch size ends the data."""
    before: list[int] = []
    end = 0
    while (start := end) + _BATCH.size <= len(data):
        base, length = struct.unpack_from(">qi", data, start)
        end = start + _LOG_OVERHEAD + length
        if end > len(data):
            break
        if data[start + _MAGIC_AT] != 2:  # older formats have no headers (and Kafka 4 none at all)
            raise LedgerError(f"{tp.topic}/{tp.partition}: a message set of format "
                              f"v{data[start + _MAGIC_AT]} at offset {base} cannot be read raw")
        *_, attributes, last_delta, first_ts, max_ts, _, _, _, count = _BATCH.unpack_from(data, start)
        if attributes & _CONTROL:
            continue
        body = data[start + _BATCH.size:end]
        if attributes & 0x07:
            try:
                body = _DECOMPRESS[attributes & 0x07](body)
            except KeyError:
                raise LedgerError(f"unknown compression codec {attributes & 0x07}") from None
        log_append = bool(attributes & _LOG_APPEND_TIME)
        records: list[ConsumerRecord[bytes, bytes]] = []
        poisoned = False
        at = 0
        for _ in range(count):
            length, at = _varint(body, at)
            record_end = at + length
            at += 1  # attributes: unused
            ts_delta, at = _varint(body, at)
            offset_delta, at = _varint(body, at)
            key, at = _bytes(body, at)
            value, at = _bytes(body, at)
            n_headers, at = _varint(body, at)
            headers = []
            for _ in range(n_headers):
                name, at = _bytes(body, at)
                header_value, at = _bytes(body, at)
                headers.append((name or b"", header_value))
            if at != record_end:
                raise LedgerError(f"{tp.topic}/{tp.partition}: corrupt record in the batch at offset {base}")
            bad = _bad_name(headers)
            poisoned = poisoned or bad is not None
            if base + offset_delta < offset:
                continue  # before the offset asked for (but aiokafka parses it too)
            fields = (tp.topic, tp.partition, base + offset_delta,
                      max_ts if log_append else first_ts + ts_delta, int(log_append), key, value, None,
                      -1 if key is None else len(key), -1 if value is None else len(value),
                      [(k.decode("utf-8", "backslashreplace"), v) for k, v in headers])
            records.append(ConsumerRecord(*fields) if bad is None else
                           UnparsedRecord(*fields, reason=f"header name {bad!r} is not UTF-8"))
        if poisoned:
            return Unparsable(before, records, base + last_delta + 1)
        before.extend(r.offset for r in records)
    return None


def _bad_name(headers: list[tuple[bytes, bytes | None]]) -> bytes | None:
    for name, _ in headers:
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            return name
    return None


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """The zigzag varint at `at`, and where it ends."""
    shift = raw = 0
    while True:
        byte = buf[at]
        at += 1
        raw |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (raw >> 1) ^ -(raw & 1), at
        shift += 7


def _bytes(buf: bytes, at: int) -> tuple[bytes | None, int]:
    """Varint-length-prefixed bytes at `at` (-1: None), and where they end."""
    length, at = _varint(buf, at)
    if length < 0:
        return None, at
    return buf[at:at + length], at + length
