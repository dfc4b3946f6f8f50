"""LlamaIndex: an LLM over a chunkcache pipeline, and a query engine that feeds any retriever's nodes to
chunkcache as cached chunks.

    from chunkcache import RAGPipeline
    from chunkcache.integrations.llama_index import ChunkCacheLLM, ChunkCacheQueryEngine

    pipe = RAGPipeline.open("stores/mine")
    engine = ChunkCacheQueryEngine(retriever=my_index.as_retriever(), pipeline=pipe)
    print(engine.query("What does the with statement do?"))   # the second call reuses the nodes' KV

Over HTTP, LlamaIndex's own `OpenAILike(api_base="http://host:8000/v1", model="default", is_chat_model=True)`
works against `chunkcache serve`; `ChunkCacheQueryEngine(retriever=..., llm=that)` sends the nodes as `documents`.
"""
from __future__ import annotations

from typing import Any, Sequence

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseGen, CompletionResponse,
                                              CompletionResponseGen, LLMMetadata)
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.response.schema import Response
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.retrievers import BaseRetriever
from pydantic import Field

from .conversation import document_texts, query_arguments, request_from_turns


class ChunkCacheLLM(CustomLLM):
    """A LlamaIndex LLM answered by a `RAGPipeline` in this process. A completion's prompt is the question;
    a chat's system messages become the system prompt and earlier turns go after the chunks. The chunks
    are `documents` (here or per call), else `top_k` from the pipeline's store (`top_k=0`: none)."""

    pipeline: Any = Field(exclude=True)
    documents: list[str] | None = None
    top_k: int | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    query_kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def metadata(self) -> LLMMetadata:
        lm = self.pipeline.rt.lm
        return LLMMetadata(context_window=lm.max_context, num_output=self.max_new_tokens, model_name=lm.spec,
                           is_chat_model=True)

    def _arguments(self, kwargs: dict) -> dict:
        kwargs = {k: v for k, v in kwargs.items() if k != "formatted"}
        return query_arguments({"max_new_tokens": self.max_new_tokens, "temperature": self.temperature},
                               self.query_kwargs, kwargs, self.documents, self.top_k)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self.pipeline.query(prompt, **self._arguments(kwargs))
        return CompletionResponse(text=answer.text, raw=answer.to_dict())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text = ""
        for event in self.pipeline.events(prompt, **self._arguments(kwargs)):
            if isinstance(event, str):
                text += event
                yield CompletionResponse(text=text, delta=event)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = request_from_turns((m.role.value, m.content or "") for m in messages)
        args = {**self._arguments(kwargs), **request}
        answer = self.pipeline.query(args.pop("question"), **args)
        return ChatResponse(message=ChatMessage(role="assistant", content=answer.text), raw=answer.to_dict())

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = request_from_turns((m.role.value, m.content or "") for m in messages)
        text = ""
        args = {**self._arguments(kwargs), **request}
        for event in self.pipeline.events(args.pop("question"), **args):
            if isinstance(event, str):
                text += event
                yield ChatResponse(message=ChatMessage(role="assistant", content=text), delta=event)


class ChunkCacheQueryEngine(CustomQueryEngine):
    """query -> Response: `retriever`'s nodes (any LlamaIndex retriever: the user's own index) become the
    request's chunks, so a node seen before is a KV cache hit. Answered in-process by `pipeline`, or by
    `llm` (LlamaIndex's `OpenAILike` pointed at `chunkcache serve`; the nodes travel as `documents`)."""

    retriever: BaseRetriever
    pipeline: Any = Field(default=None, exclude=True)
    llm: Any = Field(default=None, exclude=True)
    query_kwargs: dict[str, Any] = Field(default_factory=dict)

    def custom_query(self, query_str: str) -> Response:
        nodes = self.retriever.retrieve(query_str)
        texts = document_texts(n.node for n in nodes)
        extra = {"documents": texts} if texts else {"top_k": 0}
        if self.pipeline is not None:
            answer = self.pipeline.query(query_str, **{**self.query_kwargs, **extra})
            return Response(answer.text, source_nodes=nodes, metadata={"chunkcache": answer.to_dict()})
        if self.llm is None:
            raise ValueError("give ChunkCacheQueryEngine a pipeline (in-process) or an llm (over HTTP)")
        reply = self.llm.chat([ChatMessage(role="user", content=query_str)],
                              extra_body={**self.query_kwargs, **extra})
        return Response(reply.message.content, source_nodes=nodes, metadata={"chunkcache": reply.raw})


class ChunkCacheEmbedding(BaseEmbedding):
    """The store's embedder as a LlamaIndex embedding model (to build an index in the same space)."""

    pipeline: Any = Field(default=None, exclude=True)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self.pipeline.embed([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self.pipeline.embed([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self.pipeline.embed(texts).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)
