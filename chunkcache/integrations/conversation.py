"""Framework chat messages as a chunkcache request: the system prompt, earlier turns and the question."""
from __future__ import annotations

from typing import Iterable

ROLES = {"system": "system", "developer": "system", "human": "user", "user": "user", "ai": "assistant",
         "assistant": "assistant"}


def request_from_turns(turns: Iterable[tuple[str, str]]) -> dict:
    """(role, text) pairs, in LangChain's or LlamaIndex's role names -> `RAGPipeline.query` arguments
    (`question`, and `system_prompt` / `history` when the conversation has them)."""
    system, history = [], []
    for role, text in turns:
        kind = ROLES.get(role)
        if kind is None:
            raise ValueError(f"{role} messages are not supported (system, user and assistant messages are)")
        if kind == "system":
            system.append(text)
        else:
            history.append({"role": kind, "content": text})
    if not history or history[-1]["role"] != "user":
        raise ValueError("the last message must be the user's question")
    out = {"question": history.pop()["content"]}
    if system:
        out["system_prompt"] = "\n\n".join(system)
    if history:
        out["history"] = history
    return out


def document_texts(documents) -> list[str] | None:
    """Texts from framework documents (anything with `page_content` or `get_content()`) or plain strings."""
    if documents is None:
        return None
    texts = []
    for doc in documents:
        if isinstance(doc, str):
            texts.append(doc)
        elif hasattr(doc, "page_content"):
            texts.append(doc.page_content)
        elif hasattr(doc, "get_content"):
            texts.append(doc.get_content())
        else:
            raise TypeError(f"cannot take text from a {type(doc).__name__}; pass strings or documents")
    return texts


def query_arguments(defaults: dict, query_kwargs: dict, call_kwargs: dict, documents, top_k: int | None) -> dict:
    """`RAGPipeline.query` keyword arguments for one call: the model's defaults, then its `query_kwargs`, then
    the call's own (later ones win). The chunks are the call's or the model's `documents`, else `top_k` from
    the store."""
    call_kwargs = dict(call_kwargs)
    texts = document_texts(call_kwargs.pop("documents", documents))
    args = {**defaults, **query_kwargs, **call_kwargs}
    if texts is not None:
        args["documents"] = texts
    elif top_k is not None:
        args.setdefault("top_k", top_k)
    return args
