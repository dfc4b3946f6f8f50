"""Request and error bodies. The request models are built from `Limits`, so every field is bounded and
the OpenAPI schema states the bounds the server enforces."""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal, NamedTuple

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


class RequestModels(NamedTuple):
    query: type[BaseModel]
    chat: type[BaseModel]
    completion: type[BaseModel]
    embedding: type[BaseModel]
    tokenize: type[BaseModel]
    detokenize: type[BaseModel]


@lru_cache(maxsize=8)
def request_models(limits: Limits) -> RequestModels:
    """Every endpoint's request model, bounded by `limits`."""
    Document = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_document_chars)]
    Documents = Annotated[list[Document], Field(min_length=1, max_length=limits.max_documents)]
    MaxTokens = Annotated[int, Field(ge=1, le=limits.max_new_tokens)]
    TopK = Annotated[int, Field(ge=0, le=limits.max_top_k)]  # 0: no store chunks (the prompt brings its own)
    Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    Temperature = Annotated[float, Field(ge=0.0, le=limits.max_temperature, allow_inf_nan=False)]
    CheckLayer = Annotated[int, Field(ge=0, le=limits.max_check_layer)]
    Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
    Stop = str | Annotated[list[str], Field(max_length=4)]
    Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
    RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)]
    LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]],
                          Field(max_length=300)]

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
        stop: Stop | None = Field(default=None, description="up to 4 strings that end the answer (not included)")
        frequency_penalty: Penalty | None = None
        presence_penalty: Penalty | None = None
        repetition_penalty: RepetitionPenalty | None = None
        logit_bias: LogitBias | None = Field(default=None, description="{token id: bias in [-100, 100]}")
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
        n: int | None = Field(default=None, ge=1, le=limits.max_choices)
        stop: Stop | None = None
        presence_penalty: Penalty | None = None
        frequency_penalty: Penalty | None = None
        repetition_penalty: RepetitionPenalty | None = None  # vLLM's extension, as transformers defines it
        logit_bias: LogitBias | None = None
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
            if (self.n or 1) > 1 and self.stream:
                raise ValueError(f"n={self.n} with stream=true is not supported; stream one choice, or drop stream")
            if self.tools:
                raise ValueError("tools are not supported")
            if self.response_format and self.response_format.get("type") != "text":
                raise ValueError("only response_format {'type': 'text'} is supported")
            if self.top_logprobs and not self.logprobs:
                raise ValueError("top_logprobs needs logprobs=true")
            roles = {m.role for m in self.messages} - {"system", "developer", "user", "assistant"}
            if roles:
                raise ValueError(f"{', '.join(sorted(roles))} messages are not supported (no tools)")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must be the user's question (assistant prefill is not supported)")
            for message in self.messages:
                message.text()  # every message, not only the question: non-text parts are refused here (422)
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
                                              "deviation", "selection", "chunk_scale", "scale_queries", "seed",
                                              "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
                                              "logit_bias"},
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

    class CompletionRequest(BaseModel):
        """OpenAI's (legacy) completion request: the prompt is the question, with the same extras as chat."""

        model_config = ConfigDict(extra="ignore")
        model: str | None = Field(default=None, max_length=256)
        prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
        max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
        temperature: Temperature | None = None
        top_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
        n: int | None = Field(default=None, ge=1, le=limits.max_choices)
        seed: Seed | None = None
        logprobs: int | None = Field(default=None, ge=0, le=limits.max_logprobs)
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        stop: Stop | None = None
        presence_penalty: Penalty | None = None
        frequency_penalty: Penalty | None = None
        repetition_penalty: RepetitionPenalty | None = None
        logit_bias: LogitBias | None = None
        echo: bool | None = False
        suffix: str | None = None
        best_of: int | None = None
        documents: Documents | None = None
        top_k: TopK | None = None
        mode: Mode | None = None
        recompute_ratio: Ratio | None = None
        selection: Selection | None = None

        @model_validator(mode="after")
        def _supported(self):
            if self.echo:
                raise ValueError("echo is not supported")
            if self.suffix:
                raise ValueError("suffix (insertion) is not supported")
            if self.best_of not in (None, 1):
                raise ValueError("best_of is not supported; use n")
            if (self.n or 1) > 1 and self.stream:
                raise ValueError(f"n={self.n} with stream=true is not supported; stream one choice, or drop stream")
            if not self.question().strip():
                raise ValueError("the prompt is empty")
            if len(self.question()) > limits.max_question_chars:
                raise ValueError(f"the prompt has {len(self.question())} characters; the limit is "
                                 f"{limits.max_question_chars}")
            return self

        def question(self) -> str:
            return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

        def pipeline_kwargs(self) -> dict[str, Any]:
            kwargs = self.model_dump(include={"documents", "top_k", "mode", "recompute_ratio", "selection", "seed",
                                              "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
                                              "logit_bias"}, exclude_none=True)
            kwargs["max_new_tokens"] = self.max_tokens or 16
            kwargs["temperature"], kwargs["top_p"] = sampling(self.temperature or 0.0,
                                                              1.0 if self.top_p is None else self.top_p)
            if self.logprobs:
                kwargs["logprobs"] = self.logprobs
            return kwargs

    class EmbeddingRequest(BaseModel):
        """OpenAI's embeddings request, served by the store's embedder."""

        model_config = ConfigDict(extra="ignore")
        model: str | None = Field(default=None, max_length=256)
        input: Document | Annotated[list[Document], Field(min_length=1, max_length=limits.max_documents)]
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = None

        @model_validator(mode="after")
        def _supported(self):
            if self.dimensions is not None:
                raise ValueError("dimensions is not supported: the embedder's size is fixed")
            return self

        def texts(self) -> list[str]:
            return [self.input] if isinstance(self.input, str) else list(self.input)

    class TokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = Field(default=None, max_length=256)
        prompt: str = Field(max_length=limits.max_question_chars)

    class DetokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = Field(default=None, max_length=256)
        tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=limits.max_question_chars)

    return RequestModels(QueryRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest,
                         DetokenizeRequest)


def sampling(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) for the pipeline: (0, 1), greedy, where only the top token could be drawn."""
    if temperature < GREEDY_TEMPERATURE or top_p < GREEDY_TOP_P:
        return 0.0, 1.0
    return temperature, top_p
