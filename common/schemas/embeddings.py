"""`POST /v1/embeddings` request and response, as the embed service serves them and the retriever sends them.

The shape is OpenAI's, plus NVIDIA NIM's `input_type` and `truncate`. Unknown fields (OpenAI `extra_body`
extras) are accepted and ignored, so stock clients work unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

InputType = Literal["query", "passage"]
Truncate = Literal["NONE", "START", "END"]
EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: StrictStr | list[StrictStr] = Field(description="one text or a list of texts to embed")
    model: str | None = Field(None, description="the served model id; omitted means the one model served")
    input_type: InputType = Field("passage", description="queries get the model's query prefix, passages its "
                                                         "passage prefix (asymmetric models)")
    encoding_format: EncodingFormat = Field("float", description="float list, or base64 of little-endian float32")
    truncate: Truncate = Field("NONE", description="NONE: too-long input is an error; END: keep the start; "
                                                   "START: keep the end")
    dimensions: int | None = Field(None, gt=0, description="keep the first N dimensions, then re-normalise")
    user: str | None = Field(None, description="OpenAI end-user id; accepted and ignored")

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value: object) -> object:
        # One clear message instead of pydantic's per-branch union errors; token-id arrays are refused here.
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(one, str) for one in value)):
            return value
        raise ValueError("input must be a string or a list of strings")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must hold at least one text")
        for index, text in enumerate(texts):
            if not text:
                raise ValueError(f"input[{index}] is an empty string" if isinstance(value, list)
                                 else "input is an empty string")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 when encoding_format is base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
