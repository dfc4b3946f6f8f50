"""Request and error bodies. The request models are built from `Limits`, so every field is bounded and
the OpenAPI schema states the bounds the server enforces."""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ..config import DEVIATIONS, MODES, SCALE_QUERIES, SELECTIONS, check_chunk_scale
from .settings import Limits

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value
# Below these, sampling can only draw the most likely token: decode greedily. Passed on as they are,
# logits / 1e-300 overflow to inf, and a top_p under fp32's smallest normal rounds to 0 and keeps no
# token at all (both found by the schema fuzzer; both end in torch.multinomial errors).
GREEDY_TEMPERATURE = 1e-4
GREEDY_TOP_P = 1e-6

Mode = Literal[MODES]  # type: ignore[valid-type]
Deviation = Literal[DEVIATIONS]  # type: ignore[valid-type]
Selection = Literal[SELECTIONS]  # type: ignore[valid-type]
ScaleQueries = Literal[SCALE_QUERIES]  # type: ignore[valid-type]


def _chunk_scale(value: float | str) -> float | str:
    check_chunk_scale(value)
    return value


# "calibrated", "off", or one attention scale S for the reused chunks after the first; one
# validator (not a union of types) so that an error names the field alone.
ChunkScale = Annotated[float | str, AfterValidator(_chunk_scale)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, used by every endpoint so one client-side handler reads them all."""

    error: ErrorDetail


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(max_length=64)
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        other = sorted({p.type for p in self.content if p.type != "text"})
        if other:
            raise ValueError(f"only text content is supported; the message has {', '.join(other)} parts")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


@lru_cache(maxsize=8)
def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(QueryRequest, ChatCompletionRequest) bounded by `limits`."""
    Document = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_document_chars)]
    Documents = Annotated[list[Document], Field(min_length=1, max_length=limits.max_documents)]
    MaxTokens = Annotated[int, Field(ge=1, le=limits.max_new_tokens)]
    TopK = Annotated[int, Field(ge=0, le=limits.max_top_k)]  # 0: no store chunks (the prompt brings its own)
    Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    Temperature = Annotated[float, Field(ge=0.0, le=limits.max_temperature, allow_inf_nan=False)]
    CheckLayer = Annotated[int, Field(ge=0, le=limits.max_check_layer)]
    Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]

    class Turn(BaseModel):
        """An earlier turn of the conversation (it goes after the chunks, before the question)."""

        model_config = ConfigDict(extra="forbid")
        role: Literal["user", "assistant"]
        content: str = Field(max_length=limits.max_question_chars)

    class QueryRequest(BaseModel):
        """A question over the store (or over `documents`), with chunkcache's own settings."""

        model_config = ConfigDict(extra="forbid")
        question: str = Field(min_length=1, max_length=limits.max_question_chars)
        top_k: TopK | None = Field(default=None, description="chunks to retrieve (default from the store config); 0 "
                                   "turns retrieval off: only `documents`, if any, are chunks")
        documents: Documents | None = Field(default=None, description="use these texts as the chunks instead "
                                            "of retrieval; their KVs are cached for later requests")
        system_prompt: str | None = Field(default=None, max_length=limits.max_question_chars,
                                          description="this request's own system prompt instead of the store's")
        history: list[Turn] | None = Field(default=None, max_length=limits.max_messages,
                                           description="earlier turns, opening with a user turn; they go after "
                                           "the chunks, before the question")
        mode: Mode | None = None
        recompute_ratio: Ratio | None = None
        max_new_tokens: MaxTokens | None = None
        temperature: Temperature = 0.0
        top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
        logprobs: int = Field(default=0, ge=0, le=limits.max_logprobs)
        seed: Seed | None = None
        check_layer: CheckLayer | None = None
        deviation: Deviation | None = None
        selection: Selection | None = None
        chunk_scale: ChunkScale | None = None
        scale_queries: ScaleQueries | None = None
        stream: bool = False

        def pipeline_kwargs(self) -> dict[str, Any]:
            kwargs = self.model_dump(exclude={"question", "stream"}, exclude_none=True)
            kwargs["temperature"], kwargs["top_p"] = sampling(self.temperature, self.top_p)
            return kwargs

    class ChatCompletionRequest(BaseModel):
        """OpenAI's chat completion request. The last message is the question (a user message); system and
        developer messages make the request's system prompt; earlier user and assistant turns go after the
        chunks, before the question. Fields the server cannot honour are refused rather than ignored;
        unknown fields are ignored."""

        model_config = ConfigDict(extra="ignore")
        model: str | None = Field(default=None, max_length=256)
        messages: list[ChatMessage] = Field(min_length=1, max_length=limits.max_messages)
        max_tokens: MaxTokens | None = None
        max_completion_tokens: MaxTokens | None = None
        temperature: Temperature | None = None
        top_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
        seed: Seed | None = None
        logprobs: bool | None = None
        top_logprobs: int | None = Field(default=None, ge=0, le=limits.max_logprobs)
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        n: int | None = Field(default=None, ge=1, le=128)
        stop: str | list[str] | None = None
        presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
        frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
        logit_bias: dict[str, float] | None = None
        tools: list[dict[str, Any]] | None = None
        response_format: dict[str, Any] | None = None
        # chunkcache's own fields (openai clients send them with extra_body={...})
        documents: Documents | None = None
        top_k: TopK | None = None
        mode: Mode | None = None
        recompute_ratio: Ratio | None = None
        check_layer: CheckLayer | None = None
        deviation: Deviation | None = None
        selection: Selection | None = None
        chunk_scale: ChunkScale | None = None
        scale_queries: ScaleQueries | None = None

        @model_validator(mode="after")
        def _supported(self):
            if self.n not in (None, 1):
                raise ValueError(f"n={self.n}: only one choice per request (n=1) is supported")
            if self.stop:
                raise ValueError("stop sequences are not supported; leave `stop` unset")
            if self.tools:
                raise ValueError("tools are not supported")
            if self.presence_penalty or self.frequency_penalty:
                raise ValueError("presence_penalty and frequency_penalty are not supported; leave them 0")
            if self.logit_bias:
                raise ValueError("logit_bias is not supported")
            if self.response_format and self.response_format.get("type") != "text":
                raise ValueError("only response_format {'type': 'text'} is supported")
            if self.top_logprobs and not self.logprobs:
                raise ValueError("top_logprobs needs logprobs=true")
            roles = {m.role for m in self.messages} - {"system", "developer", "user", "assistant"}
            if roles:
                raise ValueError(f"{', '.join(sorted(roles))} messages are not supported (no tools)")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must be the user's question (assistant prefill is not supported)")
            question = self.question()
            if not question.strip():
                raise ValueError("the last user message is empty; ask something")
            if len(question) > limits.max_question_chars:
                raise ValueError(f"the last user message has {len(question)} characters; "
                                 f"the limit is {limits.max_question_chars}")
            return self

        def question(self) -> str:
            for message in reversed(self.messages):
                if message.role == "user":
                    return message.text()
            raise ValueError("no user message: the last user message is the question")

        def conversation(self) -> dict[str, Any]:
            """The system prompt (system and developer messages, joined) and the earlier turns, as pipeline
            arguments; none when the request is the question alone."""
            system = [m.text() for m in self.messages if m.role in ("system", "developer")]
            turns = [{"role": m.role, "content": m.text()} for m in self.messages[:-1]
                     if m.role in ("user", "assistant")]
            out: dict[str, Any] = {}
            if system:
                out["system_prompt"] = "\n\n".join(system)
            if turns:
                out["history"] = turns
            return out

        def pipeline_kwargs(self) -> dict[str, Any]:
            kwargs = self.model_dump(include={"documents", "top_k", "mode", "recompute_ratio", "check_layer",
                                              "deviation", "selection", "chunk_scale", "scale_queries", "seed"},
                                     exclude_none=True)
            max_tokens = self.max_completion_tokens or self.max_tokens
            if max_tokens is not None:
                kwargs["max_new_tokens"] = max_tokens
            # The default temperature is greedy (OpenAI's is 1); top_p 0 (OpenAI allows it) is greedy too.
            kwargs["temperature"], kwargs["top_p"] = sampling(self.temperature or 0.0,
                                                              1.0 if self.top_p is None else self.top_p)
            if self.logprobs:
                # The pipeline reports the chosen token's log-probability beside its top-k list.
                kwargs["logprobs"] = max(1, self.top_logprobs or 0)
            return kwargs | self.conversation()

    return QueryRequest, ChatCompletionRequest


def sampling(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) for the pipeline: (0, 1), greedy, where only the top token could be drawn."""
    if temperature < GREEDY_TEMPERATURE or top_p < GREEDY_TOP_P:
        return 0.0, 1.0
    return temperature, top_p
