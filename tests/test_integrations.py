"""LangChain and LlamaIndex, the real libraries: in-process and against a real `chunkcache serve` (uvicorn)."""
from __future__ import annotations

import pytest

from chunkcache.server import NoMetrics, ServerSettings, create_app

from .conftest import DOCS
from .test_server import open_store_pipeline
from .test_server_openai import running_server

Q = "Where is Mount Everest?"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_lm, hash_embedder):
    p = open_store_pipeline(tmp_path_factory.mktemp("integrations"), tiny_lm, hash_embedder)
    yield p
    p.close()


@pytest.fixture(scope="module")
def base_url(pipe):
    with running_server(create_app(pipe, ServerSettings(), metrics=NoMetrics())) as url:
        yield url


# -- LangChain ---------------------------------------------------------------------------------------------
def test_langchain_chat_model_in_process(pipe):
    from langchain_core.documents import Document
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from chunkcache.integrations.langchain import ChunkCacheChatModel

    chat = ChunkCacheChatModel(pipeline=pipe, max_new_tokens=6)
    messages = [SystemMessage("Be terse."), HumanMessage("I am Ada."), AIMessage("Hi Ada."), HumanMessage(Q)]
    reply = chat.invoke(messages, documents=[Document(page_content=d) for d in DOCS])
    direct = pipe.query(Q, documents=DOCS, max_new_tokens=6, system_prompt="Be terse.",
                        history=[{"role": "user", "content": "I am Ada."}, {"role": "assistant", "content": "Hi Ada."}])
    assert reply.content == direct.text
    assert 0 < reply.usage_metadata["input_token_details"]["cache_read"] <= direct.stats.cached_tokens
    streamed = "".join(chunk.content for chunk in chat.stream(messages, documents=DOCS))
    assert streamed.strip() == direct.text
    # Per-call arguments override the model's own (they used to clash: "multiple values for keyword").
    tuned = ChunkCacheChatModel(pipeline=pipe, max_new_tokens=6, query_kwargs={"temperature": 0.5, "seed": 1})
    again = tuned.invoke(messages, documents=DOCS, temperature=0.0, max_new_tokens=6)
    assert again.content == direct.text


def test_langchain_retriever_and_embeddings_over_the_store(pipe):
    from chunkcache.integrations.langchain import ChunkCacheEmbeddings, ChunkCacheRetriever

    docs = ChunkCacheRetriever(pipeline=pipe, k=2).invoke("Eiffel Tower Paris")
    assert len(docs) == 2 and "Eiffel" in docs[0].page_content and docs[0].metadata["kv_cached"]
    vector = ChunkCacheEmbeddings(pipe).embed_query("Rivers flow.")
    assert vector == pytest.approx(pipe.embed(["Rivers flow."])[0].tolist())


def test_langchain_rag_chain_with_the_user_s_vector_store_hits_the_cache(pipe, base_url):
    """The README example: a LangChain vector store the user already has feeds chunkcache; the second call
    finds every retrieved chunk's KV cached, in-process and over HTTP through ChatOpenAI."""
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import ChatOpenAI

    from chunkcache.integrations.langchain import ChunkCacheChatModel, ChunkCacheEmbeddings, rag_chain

    store = InMemoryVectorStore(ChunkCacheEmbeddings(pipe))
    store.add_texts(["Lake Baikal is the deepest lake on Earth.", "The Sahara is a hot desert in Africa.",
                     "Mount Kilimanjaro is the highest mountain in Africa."])
    retriever = store.as_retriever(search_kwargs={"k": 2})
    chain = rag_chain(retriever, ChunkCacheChatModel(pipeline=pipe, max_new_tokens=5))
    first = chain.invoke("Which is the deepest lake?")
    second = chain.invoke("Which is the deepest lake?")
    assert second.content == first.content
    assert first.response_metadata["chunk_hits"] < 2 and second.response_metadata["chunk_hits"] == 2
    texts = [d.page_content for d in retriever.invoke("Which is the deepest lake?")]
    over_http = rag_chain(retriever, ChatOpenAI(base_url=f"{base_url}/v1", api_key="none", model="tiny-random-0",
                                                max_tokens=5, temperature=0, max_retries=0))
    reply = over_http.invoke("Which is the deepest lake?")
    assert reply.content == pipe.query("Which is the deepest lake?", documents=texts, max_new_tokens=5).text
    assert reply.usage_metadata["input_token_details"]["cache_read"] > 0


# -- LlamaIndex --------------------------------------------------------------------------------------------
def test_llama_index_llm_in_process(pipe):
    from llama_index.core.llms import ChatMessage

    from chunkcache.integrations.llama_index import ChunkCacheLLM

    llm = ChunkCacheLLM(pipeline=pipe, documents=DOCS, max_new_tokens=6)
    direct = pipe.query(Q, documents=DOCS, max_new_tokens=6)
    assert llm.complete(Q).text == direct.text
    assert ChunkCacheLLM(pipeline=pipe, documents=DOCS, query_kwargs={"max_new_tokens": 2}).complete(
        Q, max_new_tokens=6).text == direct.text
    assert list(llm.stream_complete(Q))[-1].text.strip() == direct.text
    chat = llm.chat([ChatMessage(role="system", content="Be terse."), ChatMessage(role="user", content=Q)])
    assert chat.message.content == pipe.query(Q, documents=DOCS, max_new_tokens=6, system_prompt="Be terse.").text
    assert llm.metadata.context_window == 2048


def test_llama_index_query_engine_with_the_user_s_index_hits_the_cache(pipe, base_url):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.llms.openai_like import OpenAILike

    from chunkcache.integrations.llama_index import ChunkCacheEmbedding, ChunkCacheQueryEngine

    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in ("Lake Titicaca lies between Peru and Bolivia.", "The Gobi is a cold desert.",
                                    "Mount Fuji is the highest mountain in Japan.")],
        embed_model=ChunkCacheEmbedding(pipeline=pipe))
    retriever = index.as_retriever(similarity_top_k=2)
    engine = ChunkCacheQueryEngine(retriever=retriever, pipeline=pipe, query_kwargs={"max_new_tokens": 5})
    first = engine.query("Where is Lake Titicaca?")
    second = engine.query("Where is Lake Titicaca?")
    assert str(second) == str(first) and len(second.source_nodes) == 2
    assert second.metadata["chunkcache"]["stats"]["chunk_hits"] == 2
    texts = [n.node.get_content() for n in retriever.retrieve("Where is Lake Titicaca?")]
    expected = pipe.query("Where is Lake Titicaca?", documents=texts, max_new_tokens=5).text
    llm = OpenAILike(api_base=f"{base_url}/v1", api_key="none", model="tiny-random-0", is_chat_model=True,
                     max_tokens=5, temperature=0.0, max_retries=0)
    over_http = ChunkCacheQueryEngine(retriever=retriever, llm=llm)
    assert str(over_http.query("Where is Lake Titicaca?")) == expected
    # OpenAILike as a completion model calls /v1/completions (a 404 before it existed).
    completion = OpenAILike(api_base=f"{base_url}/v1", api_key="none", model="tiny-random-0", is_chat_model=False,
                            max_tokens=5, temperature=0.0, max_retries=0)
    assert completion.complete(Q, extra_body={"documents": DOCS}).text == \
        pipe.query(Q, documents=DOCS, max_new_tokens=5).text
