"""LangChain: a chat model over a chunkcache pipeline, a retriever over its store, embeddings from its
embedder, and `rag_chain`, which feeds any retriever's Documents to chunkcache as cached chunks.

    from chunkcache import RAGPipeline
    from chunkcache.integrations.langchain import ChunkCacheChatModel, rag_chain

    pipe = RAGPipeline.open("stores/mine")
    chat = ChunkCacheChatModel(pipeline=pipe)                 # in-process
    chain = rag_chain(my_vector_store.as_retriever(), chat)   # the retrieved Documents become chunks
    chain.invoke("What does the with statement do?")          # the second call reuses their KV

Over HTTP, `rag_chain` takes LangChain's own `ChatOpenAI(base_url="http://host:8000/v1", model="default")` and
sends the Documents as the request's `documents`.
"""
from __future__ import annotations

from typing import Any, Iterator

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ConfigDict, Field

from ..answer import Answer
from .conversation import document_texts, query_arguments, request_from_turns


class ChunkCacheChatModel(BaseChatModel):
    """A LangChain chat model answered by a `RAGPipeline` in this process.

    The system message becomes the request's system prompt and earlier turns go after the chunks. The
    chunks are `documents` (strings or LangChain Documents, given here or per call:
    `invoke(messages, documents=[...])`); without any, the pipeline retrieves `top_k` from its store
    (`top_k=0`: none). Keyword arguments of `RAGPipeline.query` (mode, recompute_ratio, ...) go in
    `query_kwargs` or per call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    pipeline: Any = Field(exclude=True)
    documents: list[Any] | None = None
    top_k: int | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    query_kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "chunkcache"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.pipeline.rt.lm.spec, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, **self.query_kwargs}

    def _arguments(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> dict:
        args = query_arguments({"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                **({"stop": stop} if stop else {})}, self.query_kwargs, kwargs, self.documents,
                               self.top_k)
        return {**args, **request_from_turns((m.type, m.text) for m in messages)}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        args = self._arguments(messages, stop, kwargs)
        answer = self.pipeline.query(args.pop("question"), **args)
        return ChatResult(generations=[ChatGeneration(message=_message(AIMessage, answer.text, answer))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        args = self._arguments(messages, stop, kwargs)
        for event in self.pipeline.events(args.pop("question"), **args):
            if isinstance(event, str):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event))
                if run_manager:
                    run_manager.on_llm_new_token(event, chunk=chunk)
                yield chunk
            else:
                yield ChatGenerationChunk(message=_message(AIMessageChunk, "", event))


def _message(cls, text: str, answer: Answer):
    s = answer.stats
    return cls(content=text, response_metadata={"finish_reason": answer.finish_reason, "ttft_s": answer.ttft_s,
                                                "sources": [src.source for src in answer.sources],
                                                "chunk_hits": s.chunk_hits, "model_name": answer.config.get("model")},
               usage_metadata={"input_tokens": s.prompt_tokens, "output_tokens": s.completion_tokens,
                               "total_tokens": s.prompt_tokens + s.completion_tokens,
                               "input_token_details": {"cache_read": s.cached_tokens}})


class ChunkCacheRetriever(BaseRetriever):
    """The store's own retrieval (its embedder and Faiss index) as a LangChain retriever."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    pipeline: Any = Field(exclude=True)
    k: int = 4

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [Document(page_content=s.text, metadata={"source": s.source, "score": s.score, "key": s.key,
                                                        "kv_cached": s.hit})
                for s in self.pipeline.retrieve(query, top_k=self.k)]


class ChunkCacheEmbeddings(Embeddings):
    """The store's embedder as LangChain Embeddings (to build a vector store in the same space)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.pipeline.embed(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.pipeline.embed([text])[0].tolist()


def rag_chain(retriever: Runnable, chat_model: BaseChatModel) -> Runnable:
    """question -> AIMessage: `retriever`'s Documents (any LangChain retriever: the user's own vector store)
    go to chunkcache as the request's chunks, so a chunk seen before is a KV cache hit.

    `chat_model` is a `ChunkCacheChatModel` (in-process) or LangChain's `ChatOpenAI` pointed at
    `chunkcache serve` (the Documents travel as `extra_body={"documents": [...]}`).
    """
    def answer(question: str) -> AIMessage:
        texts = document_texts(retriever.invoke(question))
        messages = [HumanMessage(content=question)]
        if isinstance(chat_model, ChunkCacheChatModel):
            return chat_model.invoke(messages, documents=texts)
        return chat_model.bind(extra_body={"documents": texts} if texts else {"top_k": 0}).invoke(messages)

    return RunnableLambda(answer, name="chunkcache_rag")
