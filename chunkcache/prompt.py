"""Prompt assembly by token ids: [prefix][chunk 1]...[chunk k][suffix].

The prefix (chat template opening, system prompt, instruction) and every chunk are tokenized on
their own and never re-tokenized in context (DESIGN.md section 8: a separator that tokenizes
differently inside a prompt breaks chunk matching). The template is read from the model's own
chat template by rendering it around sentinels and splitting there.

Only the template adds control tokens: chunk texts and the question are untrusted and tokenized with
special-token strings as plain text (chunkcache/tokens.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .tokens import encode_around, encode_plain, encode_template

_DOCS = "\x00CHUNKCACHE_DOCUMENTS\x00"
_QUESTION = "\x00CHUNKCACHE_QUESTION\x00"
CHUNK_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PromptTemplate:
    prefix_ids: tuple[int, ...]
    suffix_head: str  # text between the documents and the question
    suffix_tail: str  # text after the question (end of user turn, assistant opening)

    @property
    def prefix_hash(self) -> str:
        return hashlib.blake2b(repr(self.prefix_ids).encode(), digest_size=8).hexdigest()


def build_template(tokenizer, system_prompt: str, instruction: str) -> PromptTemplate:
    user = f"{instruction}{CHUNK_SEPARATOR}{_DOCS}Question: {_QUESTION}"
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a template (Gemma 3 270M): a plain layout, opened by BOS where the
        # tokenizer would add one, as the model saw in training
        text = f"{_bos_text(tokenizer)}{system_prompt}\n\n{user}\n\nAnswer:"
    prefix_text, rest = text.split(_DOCS)
    head, tail = rest.split(_QUESTION)
    # The prefix is the store's own system prompt and instruction in the chat template: trusted.
    return PromptTemplate(tuple(encode_template(tokenizer, prefix_text)), head, tail)


def _bos_text(tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]:
        return bos
    return ""


def chunk_token_ids(tokenizer, chunk_text: str) -> list[int]:
    """A chunk's token ids as they sit in every prompt (its own text plus the separator); the text is
    untrusted, so `<|im_start|>` in it stays characters."""
    return encode_plain(tokenizer, chunk_text.strip() + CHUNK_SEPARATOR)


def suffix_token_ids(tokenizer, template: PromptTemplate, question: str) -> list[int]:
    """The question (untrusted: plain text) between the template's closing pieces (with their control tokens)."""
    return encode_around(tokenizer, template.suffix_head, question.strip(), template.suffix_tail)
