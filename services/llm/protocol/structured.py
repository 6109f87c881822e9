"""A request's output constraint, from whichever of the accepted spellings it used.

OpenAI's `response_format` (json_object, json_schema), vLLM's `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` and its `structured_outputs` object, and NIM's `nvext` all become one
`GuidedDecoding`; asking for two constraints at once is a 400.
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import bad_request
from common.schemas.openai import GuidedFields, SamplingFields
from services.llm.guided import GuidedDecoding


def guided_decoding(body: SamplingFields, forced_calls: GuidedDecoding | None = None
                    ) -> tuple[str, GuidedDecoding] | None:
    """The constraint the request asks for and the field that asked, or None; 400 when it asks for several.
    `forced_calls`: the grammar of a chat request's required or named `tool_choice`."""
    found: list[tuple[str, GuidedDecoding]] = [("tool_choice", forced_calls)] if forced_calls is not None else []
    if body.response_format is not None and body.response_format.type != "text":
        rf = body.response_format
        if rf.type == "json_object":
            found.append(("response_format", GuidedDecoding("json_object")))
        else:
            assert rf.json_schema is not None and rf.json_schema.json_schema is not None
            found.append(("response_format", GuidedDecoding.json_schema(rf.json_schema.json_schema)))
    found += _vllm_fields(body, "")
    if body.nvext is not None:
        found += _vllm_fields(body.nvext, "nvext.")
    if body.structured_outputs is not None:
        so = body.structured_outputs
        found += _one_each("structured_outputs.", json=so.json_schema, regex=so.regex, choice=so.choice,
                           grammar=so.grammar, json_object=True if so.json_object else None)
    if len(found) > 1:
        raise bad_request(f"give one output constraint, not {len(found)}: " + ", ".join(name for name, _ in found),
                          found[1][0])
    return found[0] if found else None


def _vllm_fields(fields: SamplingFields | GuidedFields, prefix: str) -> list[tuple[str, GuidedDecoding]]:
    return _one_each(prefix + "guided_", json=fields.guided_json, regex=fields.guided_regex,
                     choice=fields.guided_choice, grammar=fields.guided_grammar)


def _one_each(prefix: str, **values: Any) -> list[tuple[str, GuidedDecoding]]:
    found = []
    for kind, value in values.items():
        if value is None:
            continue
        param = prefix + kind
        if kind == "json":
            found.append((param, GuidedDecoding.json_schema(_schema(value, param))))
        elif kind == "json_object":
            found.append((param, GuidedDecoding("json_object")))
        elif kind == "choice":
            if not all(value):
                raise bad_request("choices must not be empty strings", param)
            found.append((param, GuidedDecoding.choice(value)))
        else:
            found.append((param, GuidedDecoding(kind, value)))
    return found


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the JSON schema is not valid JSON: {exc}", param) from exc
    if not isinstance(schema, dict):
        raise bad_request("a JSON schema must be an object", param)
    return schema
