"""What a request's output must match: the engine-side description of a constraint, plain data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

GuidedKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """`kind` and its text: a JSON schema, a regex, a JSON list of choices, an EBNF grammar, or an xgrammar
    structural tag (JSON). Hashable, so equal constraints share one compiled grammar."""

    kind: GuidedKind
    value: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GuidedDecoding:
        # Key order kept: the grammar writes properties in the schema's order.
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> GuidedDecoding:
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def structural_tag(cls, tag: dict[str, Any]) -> GuidedDecoding:
        return cls("structural_tag", json.dumps(tag, sort_keys=True))
