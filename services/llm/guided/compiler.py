"""Turns a `GuidedDecoding` into an xgrammar grammar compiled against the model's tokenizer.

The tokenizer's vocabulary is read once, on the first constrained request (about a second for a 50k vocabulary),
so servers that never see one pay nothing. xgrammar caches compiled grammars, so requests with the same schema
compile it once. JSON is generated without free whitespace (", " and ": " separators): a small model given
"any whitespace" can spend its whole budget on newlines.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from services.llm.guided.spec import GuidedDecoding

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The constraint cannot be compiled (bad schema, regex or grammar): the request's fault."""


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._info: Any = None
        self._lock = threading.Lock()

    def compile(self, spec: GuidedDecoding) -> Any:
        """The compiled grammar (an `xgrammar.CompiledGrammar`); GrammarError when the spec is invalid."""
        compiler = self._xgrammar_compiler()
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(_schema_text(spec.value), any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_structural_tag(_choice_tag(spec.value))
            if spec.kind == "grammar":
                return compiler.compile_grammar(spec.value)
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.value)
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar reports bad input as RuntimeError/ValueError subclasses of its own
            raise GrammarError(f"invalid {_WHAT[spec.kind]}: {_first_line(exc)}") from exc
        raise GrammarError(f"unknown guided decoding kind {spec.kind!r}")

    @property
    def tokenizer_info(self) -> Any:
        self._xgrammar_compiler()
        return self._info

    def _xgrammar_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                started = time.perf_counter()
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                self._info, self._compiler = info, xgrammar.GrammarCompiler(info, max_threads=1)
                log.info("grammar compiler ready: vocabulary of %d tokens read in %.2fs", self.vocab_size,
                         time.perf_counter() - started)
            return self._compiler


_WHAT = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice list",
         "grammar": "EBNF grammar", "structural_tag": "structural tag"}


def _schema_text(value: str) -> str:
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise GrammarError("a JSON schema must be an object (or true/false)")
    return value


def _choice_tag(value: str) -> str:
    choices = json.loads(value)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    elements = [{"type": "const_string", "value": c} for c in dict.fromkeys(choices)]
    return json.dumps({"type": "structural_tag", "format": {"type": "or", "elements": elements}})


def _first_line(exc: Exception) -> str:
    """The error's first line without xgrammar's "[time] file.cc:line: " prefix."""
    text = str(exc).strip() or type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0])[:500]
