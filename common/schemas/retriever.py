"""The retriever's REST API (SPEC §6): collections, documents, search, and RAG answers.

Shared by the retriever service and `scripts/ingest.py` / `bench/rag_eval.py`, which are its clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from common.schemas.openai import ChatMessage, ResponseFormat

SearchType = Literal["dense", "sparse", "hybrid"]
FilterValue = StrictStr | StrictInt | float | StrictBool | None


class CollectionCreate(BaseModel):
    name: StrictStr = Field(description="letters, digits, '_', '-', '.'; up to 128 characters")
    description: str = ""
    metadata: dict[str, object] = Field(default_factory=dict)


class DocumentIn(BaseModel):
    id: StrictStr | None = Field(None, description="your id; default the sha256 of the normalised text")
    text: StrictStr = Field(min_length=1)
    metadata: dict[str, object] = Field(default_factory=dict)
    name: StrictStr | None = Field(None, description="shown in citations; default metadata.source or the id")


class DocumentsUpload(BaseModel):
    collection_name: StrictStr
    documents: list[DocumentIn] = Field(min_length=1, max_length=10_000)
    chunk_size: StrictInt | None = Field(None, ge=16, description="tokens per chunk (capped at the model limit)")
    chunk_overlap: StrictInt | None = Field(None, ge=0)


class IngestedDocument(BaseModel):
    document_id: str
    document_name: str
    status: Literal["ingested", "updated", "unchanged"]
    chunks: int


class FailedDocument(BaseModel):
    document_name: str
    error: str


class DocumentsUploadResponse(BaseModel):
    collection_name: str
    documents: list[IngestedDocument]
    failed: list[FailedDocument] = Field(default_factory=list)
    replaced: list[str] = Field(default_factory=list, description="ids of older documents that re-ingested files "
                                                                  "no longer hold, now deleted")


MAX_FILTER_KEYS = 32
MAX_FILTER_VALUES = 1024
MAX_COLLECTIONS_PER_QUERY = 64


def _check_filter(value: dict[str, object] | None) -> dict[str, object] | None:
    if value is not None and len(value) > MAX_FILTER_KEYS:
        raise ValueError(f"a filter may name at most {MAX_FILTER_KEYS} keys")
    for key, condition in (value or {}).items():
        if isinstance(condition, dict):
            if set(condition) != {"$in"} or not isinstance(condition["$in"], list) or not condition["$in"]:
                raise ValueError(f"filter on {key!r}: only a value or {{'$in': [values]}} is supported")
            if len(condition["$in"]) > MAX_FILTER_VALUES:
                raise ValueError(f"filter on {key!r}: '$in' takes at most {MAX_FILTER_VALUES} values")
        elif isinstance(condition, list):
            raise ValueError(f"filter on {key!r}: use {{'$in': [...]}} to match one of several values")
    return value


class SearchRequest(BaseModel):
    query: StrictStr = Field(min_length=1, description="at most RETRIEVER_MAX_QUERY_CHARS characters (413 above)")
    collection_names: list[StrictStr] = Field(min_length=1, max_length=MAX_COLLECTIONS_PER_QUERY)
    top_k: StrictInt = Field(10, ge=1, le=1000)
    search_type: SearchType = "hybrid"
    rerank: StrictBool = False
    reranker_top_k: StrictInt | None = Field(None, ge=1, le=1000)
    filter: dict[str, object] | None = Field(None, description="equality on metadata keys; {'$in': [...]} too")

    _filter = field_validator("filter")(classmethod(lambda cls, v: _check_filter(v)))


class SearchChunk(BaseModel):
    document_id: str
    document_name: str
    chunk_id: str
    collection_name: str
    content: str
    score: float
    metadata: dict[str, object]


class SearchResponse(BaseModel):
    chunks: list[SearchChunk]
    warnings: list[str] = Field(default_factory=list, description="what a degraded answer left out, and why")


class Citation(BaseModel):
    document_id: str
    document_name: str
    content: str
    score: float
    metadata: dict[str, object]


class Citations(BaseModel):
    total_results: int
    results: list[Citation]


class GenerateRequest(BaseModel):
    """OpenAI chat fields plus the RAG knobs; unknown fields are ignored, like OpenAI's `extra_body`."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    collection_names: list[StrictStr] = Field(default_factory=list, max_length=MAX_COLLECTIONS_PER_QUERY)
    collection_name: StrictStr | None = Field(None, description="one collection (alias of collection_names)")
    use_knowledge_base: StrictBool = True
    vdb_top_k: StrictInt | None = Field(None, ge=1, le=1000)
    reranker_top_k: StrictInt | None = Field(None, ge=1, le=1000)
    enable_reranker: StrictBool | None = Field(None, description="default: on for cross-encoder rerankers")
    enable_citations: StrictBool = True
    search_type: SearchType = "hybrid"
    filter: dict[str, object] | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    response_format: ResponseFormat | None = Field(None, description="passed to the LLM: a structured answer "
                                                                     "(json_object or json_schema)")

    _filter = field_validator("filter")(classmethod(lambda cls, v: _check_filter(v)))

    @property
    def collections(self) -> list[str]:
        names = list(self.collection_names)
        if self.collection_name and self.collection_name not in names:
            names.append(self.collection_name)
        return names

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
