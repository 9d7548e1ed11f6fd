"""PUT /schemas/{action}, GET /schemas: the command schemas the API validates against."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, put

from api.errors import not_found, problems
from api.services import Services  # Litestar reads handler annotations at runtime


class SchemaController(Controller):
    path = "/schemas"
    tags = ["schemas"]

    @get("/")
    async def list_schemas(self, services: Services) -> dict[str, Any]:
        """Every registered command schema by action."""
        return {"strict": services.schemas.strict, "schemas": services.schemas.all()}

    @get("/{action:str}", responses=problems(400, 404))
    async def get_schema(self, services: Services, action: str) -> dict[str, Any]:
        schema = services.schemas.get(action)
        if schema is None:
            raise not_found(f"schema for action {action!r}")
        return schema

    @put("/{action:str}", status_code=200, responses=problems(400, 413))
    async def put_schema(self, services: Services, action: str, data: Any = None) -> dict[str, Any]:
        """Register (or replace) the JSON Schema that the `data` of `action` commands must match.
        Its `x-entity-key`, an RFC 6901 pointer into data such as "/account", picks the Kafka key."""
        services.schemas.put(action, data)
        return {"action": action, "schema": data}
