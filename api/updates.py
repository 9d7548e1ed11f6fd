"""Every new record in tx order, as Server-Sent Events or over a WebSocket. Streams read from the
ledger, so a client that reconnects with Last-Event-ID (or ?after_tx=) loses nothing and sees
nothing twice, however slow it is."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from litestar import Request, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.openapi import ResponseSpec
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.response import ServerSentEvent, ServerSentEventMessage

from api.errors import bad_request, problems
from api.records import list_records, parse_position
from api.services import Services  # Litestar reads handler annotations at runtime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


async def record_stream(
    services: Services, after: tuple[int, int], kind: str | None, actions: list[str] | None
) -> AsyncIterator[dict[str, Any]]:
    position = after
    while True:
        upto = services.notifier.tx
        items, _ = await asyncio.to_thread(
            list_records, services.ledger, kind=kind, actions=actions, after=position, limit=500, upto=upto,
        )
        for item in items:
            position = (item["tx"], item["seq"])
            yield item
        if len(items) < 500:
            if not await services.notifier.wait_past(upto, services.settings.sse_keepalive_s):
                yield {}  # keep-alive


def _start(
    services: Services, last_event_id: str | None, after_tx: str | None, kind: str | None
) -> tuple[int, int]:
    """Where a stream starts: after the client's last event, else after `after_tx` (0: the whole
    log), else with the records that arrive from now on."""
    if kind not in (None, "command", "event"):
        raise bad_request("kind must be 'command' or 'event'", field="kind")
    what, given = ("Last-Event-ID", last_event_id) if last_event_id else ("after_tx", after_tx)
    if not given:
        return parse_position(str(services.notifier.tx), "after_tx")
    after = parse_position(given, what)
    if after[0] > (head := services.ledger.head.tx):  # (an id from another ledger, or a reset one)
        raise bad_request(f"{what}: tx {after[0]} is not in the ledger yet (the latest is {head}); "
                          "resuming after it would skip every record until then", field=what)
    return after


@get("/updates", tags=["updates"], responses={
    200: ResponseSpec(str, media_type="text/event-stream", generate_examples=False,
                      description="`record` events (data: the record as JSON) and `: keep-alive` comments"),
    **problems(400),
})
async def sse_updates(
    request: Request[Any, Any, Any], services: Services, kind: str | None = None,
    action: list[str] | None = None, after_tx: str | None = None,
) -> ServerSentEvent:
    """Server-Sent Events: one `record` event per record, id `TX.SEQ`; resume with Last-Event-ID.
    The same stream is a WebSocket at the same path (`ws://.../updates`, which OpenAPI cannot
    describe): one JSON text frame per record, resume with `?after_tx=TX.SEQ`; a bad parameter is
    one problem+json frame, then close code 1008."""
    after = _start(services, request.headers.get("last-event-id"), after_tx, kind)

    async def messages() -> AsyncIterator[ServerSentEventMessage]:
        async for item in record_stream(services, after, kind, action):
            if not item:  # a comment line alone: with a data line, EventSource dispatches an empty message
                yield ServerSentEventMessage(comment="keep-alive", data=None)
                continue
            yield ServerSentEventMessage(
                data=json.dumps(item), event="record", id=f"{item['tx']}.{item['seq']}"
            )

    return ServerSentEvent(messages())


@websocket("/updates")
async def ws_updates(
    socket: WebSocket[Any, Any, Any], services: Services, kind: str | None = None,
    action: list[str] | None = None, after_tx: str | None = None,
) -> None:
    """The same stream over a WebSocket: JSON text frames; resume with ?after_tx=TX.SEQ (or a
    Last-Event-ID header). Bad parameters: one problem+json frame, then close code 1008."""
    try:
        if unknown := sorted(set(socket.query_params) - {"kind", "action", "after_tx"}):
            raise bad_request(f"unknown query parameter {unknown[0]!r}; /updates takes action, after_tx, "
                              "kind", field=unknown[0])
        after = _start(services, socket.headers.get("last-event-id"), after_tx, kind)
    except ProblemDetailsException as e:
        await socket.accept()
        extra = e.extra if isinstance(e.extra, dict) else {}
        await socket.send_json({"type": e.type_, "title": e.title, "status": e.status_code,
                                "detail": e.detail, **extra})
        # A close reason is at most 123 bytes of UTF-8 (the detail echoes the client's value).
        await socket.close(code=1008, reason=e.detail.encode()[:123].decode(errors="ignore"))
        return
    await socket.accept()

    async def stream() -> None:
        async for item in record_stream(services, after, kind, action):
            if item:
                await socket.send_json(item)

    async def closed() -> None:
        """Returns when the client goes: on an idle ledger nothing is sent that would notice."""
        while (await socket.receive())["type"] != "websocket.disconnect":
            pass  # frames from the client are ignored

    tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(closed())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await task
