"""PUT /schemas/{action}, GET /schemas: the command schemas the API validates against."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, put
from litestar.params import Body

from api.errors import not_found
from api.services import Services  # Litestar reads handler annotations at runtime


class SchemaController(Controller):
    path = "/schemas"
    tags = ["schemas"]

    @get("/")
    async def list_schemas(self, services: Services) -> dict[str, Any]:
        """Every registered command schema by action."""
        return {"strict": services.schemas.strict, "schemas": services.schemas.all()}

    @get("/{action:str}")
    async def get_schema(self, services: Services, action: str) -> dict[str, Any]:
        schema = services.schemas.get(action)
        if schema is None:
            raise not_found(f"schema for action {action!r}")
        return schema

    @put("/{action:str}", status_code=200)
    async def put_schema(self, services: Services, action: str, data: Any = Body()) -> dict[str, Any]:  # noqa: B008
        """Register (or replace) the JSON Schema that the `data` of `action` commands must match."""
        services.schemas.put(action, data)
        return {"action": action, "schema": data}
