"""The Commander edge: validate a command, produce it to the commands topic (the only writer),
and optionally wait for its first event (the illusion of synchrony) — via the ledger."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

import msgspec
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import ResponseHeader
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.plugins.problem_details import ProblemDetailsException

from api.errors import bad_request, json_type, not_found, not_utf8, problem, problems, unavailable
from api.records import children, decode_cursor, encode_cursor, get_record, list_records
from api.registry import ACTION
from api.services import Services  # Litestar reads handler annotations at runtime
from ledger.consumer import MAX_JSON_DEPTH, MAX_VALUE_BYTES
from ledger.errors import InvalidRecord
from ledger.records import uuid7, validate

ENVELOPE_FIELDS = {"action", "data", "user", "system"}
MAX_SYNC_TIMEOUT = 30.0
INLINE_CHECK_BYTES = 16_384  # bodies up to this size are validated on the event loop


class _CommandOptional(TypedDict, total=False):  # (a base: NotRequired[...] is lost when postponed)
    user: str
    system: str
    children: list[str]  # with status "done": the events that answer it


class CommandAccepted(_CommandOptional):
    """A command as it was produced to Kafka, where it went, and how far it has got."""

    id: str
    action: str
    data: dict[str, Any]
    timestamp: str
    topic: str
    partition: int
    offset: int
    status: Literal["accepted", "pending", "done"]


@dataclass
class _SubmitOperation(Operation):
    """POST /commands reads its body itself (to check it as the ledger will check the record),
    so Litestar sees no body parameter to describe: the envelope is described here."""

    def __post_init__(self) -> None:
        envelope = Schema(
            type=OpenAPIType.OBJECT, required=["action", "data"], additional_properties=False,
            properties={
                "action": Schema(type=OpenAPIType.STRING, min_length=1,
                                 description="picks the JSON Schema that `data` must match"),
                "data": Schema(type=OpenAPIType.OBJECT, description="the command's payload"),
                "user": Schema(type=OpenAPIType.STRING, description="who sent it (a Kafka header)"),
                "system": Schema(type=OpenAPIType.STRING, description="what sent it (a Kafka header)"),
            },
            examples=[{"action": "open-account", "data": {"account": "acct-1", "owner": "ann"}}],
        )
        self.request_body = RequestBody(
            required=True, description="The command envelope (at most LEDGER_MAX_BODY_BYTES)",
            content={"application/json": OpenAPIMediaType(schema=envelope)},
        )


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


class _LongInteger(ValueError):
    pass


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        raise _LongInteger(f"body holds an integer of {len(text.lstrip('-')):,} digits; at most "
                           f"{sys.get_int_max_str_digits():,} are accepted") from None


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of the body; a key given twice is refused (which value was meant is a guess)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(f"body repeats the key {key!r} in one object")
            seen.add(key)
    return obj


def parse_command(body: bytes) -> dict[str, Any]:
    """The request body as a command envelope, checked as the ledger will check the record it
    becomes (so what is accepted here is never quarantined); 400 naming the field otherwise."""
    try:
        env = json.loads(body, parse_float=_finite, parse_int=_integer, parse_constant=_not_a_number,
                         object_pairs_hook=_unique_keys)
    except RecursionError as e:
        raise bad_request(f"body nests deeper than {MAX_JSON_DEPTH} levels", field="data") from e
    except (_LongInteger, _RepeatedKey) as e:
        raise bad_request(str(e), field="body") from e
    except UnicodeDecodeError as e:
        raise not_utf8(e) from e
    except ValueError as e:
        raise bad_request(f"body is not valid JSON: {e}", field="body", kind="malformed-json") from e
    if not isinstance(env, dict):
        raise bad_request(f"body must be a JSON object, got {json_type(env)}", field="body")
    unknown = sorted(set(env) - ENVELOPE_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown field {unknown[0]!r}; allowed: action, data, user, system", field=unknown[0]
        )
    action = env.get("action")
    if not isinstance(action, str) or not action.strip():
        raise bad_request("'action' must be a non-empty string", field="action")
    if not ACTION.fullmatch(action):  # as a schema's: every command's action can have one
        raise bad_request(f"'action' {action[:80]!r} must match {ACTION.pattern}", field="action")
    if not isinstance(env.get("data"), dict):
        raise bad_request("'data' must be a JSON object", field="data")
    for name in ("user", "system"):  # (they travel as headers: checked here to name them)
        if (value := env.get(name)) is None:
            continue
        if not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string", field=name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"'{name}' has a lone surrogate, which is not UTF-8", field=name) from e
    try:  # the record's own checks, nesting depth included
        validate(0, {"kind": "command", "action": action, "data": env["data"],
                     "headers": [(k, env[k]) for k in ("user", "system") if env.get(k) is not None]})
    except InvalidRecord as e:
        raise bad_request(f"'{e.field}' {e.reason}", field=e.field) from e
    return env


class CommandController(Controller):
    path = "/commands"
    tags = ["commands"]

    @post(
        "/", status_code=202, operation_class=_SubmitOperation,
        response_description="Produced to Kafka (with `sync`: not answered within `timeout`, status pending)",
        response_headers=[ResponseHeader(name="Location", value="/commands/{id}", documentation_only=True,
                                         description="the command, to poll for its status")],
        responses={
            201: ResponseSpec(CommandAccepted, generate_examples=False, description=(
                "With `sync`: an event that answers it is in the ledger (`children`); Location as for 202")),
            **problems(400, 413, 422, 503),
        },
    )
    async def submit(
        self, request: Request[Any, Any, Any], services: Services, sync: bool = False, timeout: float = 5.0,
    ) -> Response[CommandAccepted]:
        """Accept a command: 202 with its Kafka position, or with `sync=true` 201 once its first
        event is in the ledger (202 `pending` if that takes longer than `timeout` seconds)."""
        if not 0 < timeout <= MAX_SYNC_TIMEOUT:
            raise bad_request(f"timeout must be in (0, {MAX_SYNC_TIMEOUT}] seconds", field="timeout")
        body = await request.body()
        env = parse_command(body)
        # Validation takes time linear in the body (patterns run on RE2): a large body's on a
        # thread, so the loop keeps serving; a small one's here (the hop to a thread costs more).
        if len(body) <= INLINE_CHECK_BYTES:
            services.schemas.check(env["action"], env["data"])
        else:
            await asyncio.to_thread(services.schemas.check, env["action"], env["data"])
        command = {
            "id": uuid7(), "action": env["action"], "data": env["data"],
            "timestamp": datetime.now(UTC).isoformat(),
            **{k: env[k] for k in ("user", "system") if env.get(k) is not None},
        }
        key = services.schemas.entity_key(env["action"], env["data"]) or command["id"]
        waiter = services.children.register(command["id"]) if sync else None
        try:  # answered, timed out, failed, or the client went away: no waiter outlives its request
            return await _produce_and_wait(services, command, key, waiter, timeout)
        finally:
            if waiter is not None:
                services.children.forget(command["id"])

    @get("/", responses=problems(400))
    async def list_commands(
        self, services: Services, action: list[str] | None = None, since: str | None = None,
        until: str | None = None, as_of: str | None = None, limit: int = 100, cursor: str | None = None,
    ) -> dict[str, Any]:
        """Commands in ledger order; pass `cursor` from the previous page to continue."""
        return await _page(services, "command", action, since, until, as_of, limit, cursor)

    @get("/{command_id:str}", responses=problems(400, 404))
    async def get_command(self, services: Services, command_id: str) -> dict[str, Any]:
        """One command, its events (`children`) and `status`: done once it has an event."""
        rec = await asyncio.to_thread(get_record, services.ledger, command_id, "command")
        if rec is None:
            raise not_found(f"command {command_id}")
        kids = await asyncio.to_thread(children, services.ledger, command_id)
        return {**rec, "children": kids, "status": "done" if kids else "pending"}


async def _produce_and_wait(
    services: Services, command: dict[str, Any], key: str, waiter: asyncio.Future[Any] | None,
    timeout: float,
) -> Response[Any]:
    producer = services.producer
    if producer is None:
        raise unavailable(f"Kafka at {services.bootstrap} is not reachable; nothing was written, "
                          "retry later")
    value = msgspec.json.encode(command)
    if len(value) > MAX_VALUE_BYTES:  # the ledger would quarantine it (and Kafka may refuse it)
        raise too_large(len(value))
    try:
        async with asyncio.timeout(services.settings.produce_timeout):
            meta = await producer.send_and_wait(services.settings.commands_topic, value, key=key.encode())
    except MessageSizeTooLargeError as e:  # the broker's limit is lower: retrying will not help
        raise too_large(len(value), f" (Kafka refused it: {e})") from e
    except (KafkaError, TimeoutError) as e:
        raise unavailable(f"Kafka did not accept the command ({type(e).__name__}: {e}); "
                          "nothing was written, retry later") from e
    services.produced(meta.topic, meta.partition, meta.offset)
    body = {**command, "topic": meta.topic, "partition": meta.partition, "offset": meta.offset,
            "status": "accepted"}
    location = {"Location": f"/commands/{command['id']}"}
    if waiter is None:
        return Response(body, status_code=202, headers=location)
    try:
        kids = await asyncio.wait_for(waiter, timeout)
    except TimeoutError:
        return Response({**body, "status": "pending"}, status_code=202, headers=location)
    return Response({**body, "status": "done", "children": kids}, status_code=201, headers=location)


def too_large(size: int, why: str = "") -> ProblemDetailsException:
    return problem(413, "Body too large", f"the command is {size:,} bytes as a Kafka message, over the "
                   f"{MAX_VALUE_BYTES:,}-byte limit{why}; nothing was written", kind="body-too-large",
                   field="data")


async def _page(
    services: Services, kind: str, action: list[str] | None, since: str | None, until: str | None,
    as_of: str | None, limit: int, cursor: str | None,
) -> dict[str, Any]:
    after = decode_cursor(cursor) if cursor else (0, -1)
    items, nxt = await asyncio.to_thread(
        list_records, services.ledger, kind=kind, actions=action, after=after, since=since,
        until=until, as_of=as_of, limit=limit,
    )
    return {"items": items, "next_cursor": encode_cursor(*nxt) if nxt else None}
