"""OpenAI completions and chat-completions shapes: requests, responses and streaming chunks.

The LLM service serves them; the retriever reuses the chat ones for its own OpenAI-compatible
`/v1/chat/completions` and as a client of the LLM. A request field outside the schema is a 400 naming it, as
on OpenAI's own API: accepting a field without honouring it would silently answer something else than was
asked. Values out of range are 400s too.

Structured outputs come as OpenAI's `response_format`, or vLLM's `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` or its `structured_outputs` object, or NIM's `nvext` object; tools as
OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# OpenAI request fields this server does not implement, with the values that ask for nothing: sent with one of
# these (or null) they are dropped; with anything else they are refused.
NO_OP_VALUES: dict[str, tuple[object, ...]] = {
    "functions": ([],),  # OpenAI's deprecated predecessors of tools / tool_choice
    "function_call": ("none", "auto"),
    "best_of": (1,),  # on chat (completions implement it)
    "store": (False,),
    "service_tier": ("auto", "default"),
}


class StrictRequest(BaseModel):
    """A request body whose unknown fields are a 400 naming them (pydantic's `extra_forbidden`)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_fields_that_ask_for_nothing(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if key in cls.model_fields or not (value is None or value in NO_OP_VALUES.get(key, ()))}


class StreamOptions(BaseModel):
    include_usage: StrictBool = Field(False, description="send a last chunk with the request's usage")


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema."""

    model_config = ConfigDict(populate_by_name=True)

    name: StrictStr = Field("response", max_length=64)
    description: StrictStr | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema to follow")
    strict: StrictBool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class GuidedFields(BaseModel):
    """vLLM's (and NIM's) constraint fields; one at most per request."""

    model_config = ConfigDict(extra="forbid")

    guided_json: dict[str, Any] | StrictStr | None = Field(None, description="a JSON schema the output follows")
    guided_regex: StrictStr | None = Field(None, description="a regex the whole output matches")
    guided_choice: list[StrictStr] | None = Field(None, min_length=1, description="the output is one of these")
    guided_grammar: StrictStr | None = Field(None, description="an EBNF grammar (rule `root`) the output follows")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = Field(None, min_length=1)
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


class SamplingFields(StrictRequest):
    """Sampling parameters common to both endpoints (OpenAI's, plus vLLM's extras)."""

    model: str | None = Field(None, description="the served model id; omitted means the one model served")
    max_tokens: StrictInt | None = Field(None, ge=1, description="tokens to generate; omitted: the rest of "
                                                                  "the context")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(-1, ge=-1, description="-1 or 0: no top-k cut")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(None, description="per-request sampling seed, for reproducible answers")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="strings that end the answer (not "
                                                                       "included in it)")
    n: StrictInt = Field(1, ge=1, le=16, description="independent answers to the same prompt")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    user: str | None = Field(None, description="OpenAI end-user id; accepted and ignored")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100] "
                                                                  "added to its logit")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    guided_json: dict[str, Any] | StrictStr | None = Field(None, description="vLLM: a JSON schema to follow")
    guided_regex: StrictStr | None = Field(None, description="vLLM: a regex the output matches")
    guided_choice: list[StrictStr] | None = Field(None, min_length=1, description="vLLM: the output is one of these")
    guided_grammar: StrictStr | None = Field(None, description="vLLM: an EBNF grammar (rule `root`) to follow")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's structured_outputs object")
    nvext: GuidedFields | None = Field(None, description="NIM's extension object (its guided_* fields)")

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        if len(strings) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = list[StrictInt]


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description="a text, a batch of texts, token ids, or a batch of token-id lists")
    logprobs: StrictInt | None = Field(None, ge=0, le=20, description="log-probabilities of this many top "
                                                                      "alternatives per token")
    echo: StrictBool = Field(False, description="put the prompt before each answer")
    best_of: StrictInt | None = Field(None, ge=1, le=16, description="answers generated per prompt; the n with the "
                                                                     "highest log-probability are returned")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | list) -> str | list:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(item, list) and not item for item in value):
            raise ValueError("prompt token lists must not be empty")
        if isinstance(value, list) and any(isinstance(item, int) and item < 0 for item in value):
            raise ValueError("token ids must be non-negative")
        if isinstance(value, list) and any(isinstance(item, list) and min(item) < 0 for item in value):
            raise ValueError("token ids must be non-negative")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a text or a token-id list."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as a JSON object, in a string")


class ToolCall(BaseModel):
    id: StrictStr = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: StrictBool | None = Field(None, description="accepted; forced calls always follow the schema")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolChoiceFunction


class ChatMessage(StrictRequest):
    role: Role
    content: StrictStr | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: StrictStr | None = Field(None, description="a tool turn: the call it answers")

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: StrictBool = Field(False, description="return the log-probability of each answer token")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="alternatives per token, with logprobs")
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or a named function")
    parallel_tool_calls: StrictBool | None = Field(None, description="allow several calls in one answer "
                                                                     "(default: as the chat template allows)")

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class LoadLoRAAdapterRequest(StrictRequest):
    """vLLM's `/v1/load_lora_adapter`: a PEFT adapter directory on the server, served under `lora_name`."""

    lora_name: str = Field(min_length=1, description="the model id requests use to pick the adapter")
    lora_path: str = Field(min_length=1, description="the adapter's directory on the server")


class UnloadLoRAAdapterRequest(StrictRequest):
    """vLLM's `/v1/unload_lora_adapter`."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = Field(None, description="accepted for vLLM clients and ignored")


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[StrictInt] = Field(description="token ids to turn back into text")


class DetokenizeResponse(BaseModel):
    prompt: str
