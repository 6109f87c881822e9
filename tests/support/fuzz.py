"""Schema fuzzing: requests drawn from a service's own OpenAPI schema by schemathesis, sent to the real server.

Every answer must be below 500 (503 only where the caller allows it: a dependency it keeps down on purpose) and
every 4xx/503 must be in the OpenAI error shape. The cases are drawn with hypothesis directly (schemathesis' pytest
plugin broke on pytest 9.2), derandomized with a fixed budget: CI sends the same requests on every run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# A hook that points a drawn case at live state (an existing collection, a stored document id), drawing from `data`.
Prepare = Callable[[Any, st.DataObject], None]


@dataclass(frozen=True, slots=True)
class Finding:
    operation: str
    request: str
    status: int
    problem: str
    body: str


def error_shape_problem(status: int, text: str) -> str | None:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return "error body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return "error body is not {'error': {message, type, param, code}}"
    if not isinstance(error["message"], str) or not error["message"]:
        return "error message is empty"
    return None


def load_schema(base_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(base_url + "/openapi.json")


def fuzz_operation(operation: Any, base_url: str, *, max_examples: int, prepare: Prepare | None = None,
                   allow_503: bool = False, timeout: float = 120.0) -> list[Finding]:
    findings: list[Finding] = []
    name = f"{operation.method.upper()} {operation.path}"

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(), data=st.data())
    def check(case: Any, data: st.DataObject) -> None:
        if prepare is not None:
            prepare(case, data)
        response = case.call(base_url=base_url, timeout=timeout)
        status = response.status_code
        problem = None
        if status >= 500 and not (status == 503 and allow_503):
            problem = "server error"
        elif status >= 400:
            problem = error_shape_problem(status, response.text)
        if problem:
            request = json.dumps({"path": case.path_parameters, "query": case.query, "body": _printable(case.body)},
                                 default=repr)[:600]
            findings.append(Finding(name, request, status, problem, response.text[:300]))

    check()
    return findings


def fuzz_schema(schema: schemathesis.BaseSchema, base_url: str, *, max_examples: int,
                prepare: dict[str, Prepare] | None = None, allow_503: frozenset[str] = frozenset(),
                order: list[str] | None = None) -> tuple[list[str], list[Finding]]:
    """Fuzz every operation (in `order` first, by "METHOD /path"); returns the operations run and the findings."""
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    names = [n for n in order or [] if n in operations] + sorted(set(operations) - set(order or []))
    findings: list[Finding] = []
    for name in names:
        findings += fuzz_operation(operations[name], base_url, max_examples=max_examples,
                                   prepare=(prepare or {}).get(name), allow_503=name in allow_503)
    return names, findings


def _printable(body: object) -> object:
    if isinstance(body, bytes | bytearray):
        return f"<{len(body)} bytes>"
    if isinstance(body, dict):
        return {k: _printable(v) for k, v in body.items()}
    if isinstance(body, list):
        return [_printable(v) for v in body]
    return body
