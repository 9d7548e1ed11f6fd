"""Read side for events."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, get

from api.commands import _page
from api.errors import not_found, problems
from api.records import get_record
from api.services import Services  # Litestar reads handler annotations at runtime


class EventController(Controller):
    path = "/events"
    tags = ["events"]

    @get("/", responses=problems(400))
    async def list_events(
        self, services: Services, action: list[str] | None = None, since: str | None = None,
        until: str | None = None, as_of: str | None = None, limit: int = 100, cursor: str | None = None,
    ) -> dict[str, Any]:
        """Events in ledger order; pass `cursor` from the previous page to continue."""
        return await _page(services, "event", action, since, until, as_of, limit, cursor)

    @get("/{event_id:str}", responses=problems(400, 404))
    async def get_event(self, services: Services, event_id: str) -> dict[str, Any]:
        """One event, with `parent` (the command it answers)."""
        rec = await asyncio.to_thread(get_record, services.ledger, event_id, "event")
        if rec is None:
            raise not_found(f"event {event_id}")
        return rec
