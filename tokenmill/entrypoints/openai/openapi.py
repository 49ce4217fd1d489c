"""/openapi.json (behind /docs and /redoc) with the request bodies of the routes that parse their own.

Those routes read the raw body themselves (a size limit, OpenAI-style errors for every fault), so FastAPI
cannot see their request models; this adds each model's JSON schema to the generated description.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

SCHEMA_REF = "#/components/schemas/{model}"


def document_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Describe `bodies` (POST path -> request model) in the app's OpenAPI schema, built once when asked."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template=SCHEMA_REF)
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                content = {"application/json": {"schema": {"$ref": SCHEMA_REF.format(model=model.__name__)}}}
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
