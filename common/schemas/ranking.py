"""`POST /v1/ranking` (NVIDIA NIM) and `POST /v1/rerank` (Cohere/Jina), as the rerank service serves them
and the retriever sends them.

`/v1/ranking` returns raw scores (`logit`) sorted best first; `/v1/rerank` returns `relevance_score` in [0, 1]
(the scorer's probability view of its logit, see the rerank service README) and can echo the documents.
Unknown fields are accepted and ignored, so stock clients work unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

Truncate = Literal["NONE", "END"]


class RankingText(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: StrictStr


class RankingQuery(RankingText):
    text: StrictStr = Field(min_length=1, description="the query the passages are ranked against")


class RankingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model id; omitted means the one model served")
    query: RankingQuery
    passages: list[RankingText] = Field(min_length=1, description="the passages to rank")
    truncate: Truncate = Field("NONE", description="NONE: a too-long query + passage is an error; "
                                                   "END: cut the passage's end to fit")


class Ranking(BaseModel):
    index: int = Field(description="position of the passage in the request")
    logit: float = Field(description="the scorer's raw score; higher is more relevant")


class RankingResponse(BaseModel):
    rankings: list[Ranking] = Field(description="one per passage, best first")


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the served model id; omitted means the one model served")
    query: StrictStr = Field(min_length=1)
    documents: list[StrictStr | RankingText] = Field(min_length=1, description="texts or {text} objects")
    top_n: int | None = Field(None, ge=1, description="keep the best N results (default: all)")
    return_documents: bool = Field(False, description="echo each result's document text")
    truncate: Truncate = Field("END", description="END (Cohere's behaviour): cut long documents to fit; "
                                                  "NONE: a too-long document is an error")

    @property
    def texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="in [0, 1]; higher is more relevant")
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RerankResult] = Field(description="best first, at most top_n")
    usage: RerankUsage
