"""The request bodies of the routes that read their body themselves, described in the OpenAPI schema.

`POST /v1/documents` takes JSON or a multipart upload, and the RAG routes keep fields they do not know (like
OpenAI's `extra_body`), so FastAPI cannot describe them from a signature; clients and the schema fuzz tests still
need to know what to send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from common.schemas.retriever import DocumentsUpload, GenerateRequest

_MULTIPART_UPLOAD = {
    "type": "object",
    "required": ["collection_name", "documents"],
    "properties": {
        "collection_name": {"type": "string"},
        "documents": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": ".txt .md .html .pdf .json .jsonl files"},
        "metadata": {"type": "string", "description": "a JSON object added to every document's metadata"},
        "chunk_size": {"type": "integer", "minimum": 16},
        "chunk_overlap": {"type": "integer", "minimum": 0},
    },
}
_RAG_PATHS = ("/v1/generate", "/v1/chat/completions")


def describe_request_bodies(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        paths = spec["paths"]
        paths["/v1/documents"]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _component(schemas, DocumentsUpload)},
            "multipart/form-data": {"schema": _MULTIPART_UPLOAD}}}
        for path in _RAG_PATHS:
            paths[path]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _component(schemas, GenerateRequest)}}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _component(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(definition.pop("$defs", {}))
    schemas[model.__name__] = definition
    return {"$ref": f"#/components/schemas/{model.__name__}"}
