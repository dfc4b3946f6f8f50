"""Prompt assembly by token ids: [prefix][chunk 1]...[chunk k][suffix].

The prefix (chat template opening, system prompt, instruction) and every chunk are tokenized on
their own and never re-tokenized in context (DESIGN.md section 8: a separator that tokenizes
differently inside a prompt breaks chunk matching). The template is read from the model's own
chat template by rendering it around sentinels and splitting there.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
    else:  # base models without a template: a plain layout
        text = f"{system_prompt}\n\n{user}\n\nAnswer:"
    prefix_text, rest = text.split(_DOCS)
    head, tail = rest.split(_QUESTION)
    return PromptTemplate(tuple(encode(tokenizer, prefix_text)), head, tail)


def encode(tokenizer, text: str) -> list[int]:
    # Special tokens in the rendered template are text here; the template already holds any BOS.
    return tokenizer.encode(text, add_special_tokens=False)


def chunk_token_ids(tokenizer, chunk_text: str) -> list[int]:
    """A chunk's token ids as they sit in every prompt (its own text plus the separator)."""
    return encode(tokenizer, chunk_text.strip() + CHUNK_SEPARATOR)


def suffix_token_ids(tokenizer, template: PromptTemplate, question: str) -> list[int]:
    return encode(tokenizer, template.suffix_head + question.strip() + template.suffix_tail)
