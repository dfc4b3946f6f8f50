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

from .tokens import encode_around, encode_interleaved, encode_plain, encode_template

_DOCS = "\x00CHUNKCACHE_DOCUMENTS\x00"
_QUESTION = "\x00CHUNKCACHE_QUESTION\x00"
CHUNK_SEPARATOR = "\n\n"
TURN_ROLES = ("user", "assistant")


class ConversationError(ValueError):
    """Earlier turns this template cannot lay out after the documents; the message says what to change."""


@dataclass(frozen=True)
class PromptTemplate:
    prefix_ids: tuple[int, ...]
    suffix_head: str  # text between the documents and the question
    suffix_tail: str  # text after the question (end of user turn, assistant opening)
    system_prompt: str = ""
    instruction: str = ""
    prefix_text: str = ""  # what prefix_ids encode

    @property
    def prefix_hash(self) -> str:
        return hashlib.blake2b(repr(self.prefix_ids).encode(), digest_size=8).hexdigest()


def build_template(tokenizer, system_prompt: str, instruction: str, *, trusted: bool = True) -> PromptTemplate:
    """The prompt's pieces around the documents and the question. `trusted`: the system prompt is the
    store's own (template text, whose control tokens count); a request's system prompt is not, and is
    tokenized as plain text inside the template, like a question (docs/SECURITY.md)."""
    prefix_text, rest = _render(tokenizer, system_prompt, instruction, [("user", _QUESTION)]).split(_DOCS)
    head, tail = rest.split(_QUESTION)
    if trusted:
        prefix_ids = encode_template(tokenizer, prefix_text)
    else:
        sentinel = "\x00CHUNKCACHE_SYSTEM\x00"
        around, _ = _render(tokenizer, sentinel, instruction, [("user", _QUESTION)]).split(_DOCS)
        before, after = around.split(sentinel)
        prefix_ids = encode_interleaved(tokenizer, [before, after], [system_prompt])
    return PromptTemplate(tuple(prefix_ids), head, tail, system_prompt, instruction, prefix_text)


def _render(tokenizer, system_prompt: str, instruction: str, turns: list[tuple[str, str]]) -> str:
    """The whole prompt as text, with `_DOCS` where the chunks go: the system prompt, then the turns, the
    first of which (a user turn) opens with the instruction and the documents."""
    first_role, first = turns[0]
    turns = [(first_role, f"{instruction}{CHUNK_SEPARATOR}{_DOCS}Question: {first}"), *turns[1:]]
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] + [{"role": r, "content": c} for r, c in turns]
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:  # the template's own checks (e.g. turns must alternate): the caller's to fix
            raise ConversationError(f"the model's chat template refuses these messages: {exc}") from None
    # Base models without a template (Gemma 3 270M): a plain layout, opened by BOS where the tokenizer
    # would add one, as the model saw in training.
    text = f"{_bos_text(tokenizer)}{system_prompt}\n\n{turns[0][1]}"
    for role, content in turns[1:]:
        text += f"\n\n{'Question' if role == 'user' else 'Answer'}: {content}"
    return text + "\n\nAnswer:"


def _bos_text(tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]:
        return bos
    return ""


def chunk_token_ids(tokenizer, chunk_text: str) -> list[int]:
    """A chunk's token ids as they sit in every prompt (its own text plus the separator); the text is
    untrusted, so `<|im_start|>` in it stays characters."""
    return encode_plain(tokenizer, chunk_text.strip() + CHUNK_SEPARATOR)


def suffix_token_ids(tokenizer, template: PromptTemplate, question: str,
                     history: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """Everything after the chunks: earlier turns `history` ((role, text) pairs, the first a user turn),
    then the question, each untrusted (plain text) between the chat template's pieces (with their
    control tokens)."""
    if not history:
        return encode_around(tokenizer, template.suffix_head, question.strip(), template.suffix_tail)
    if history[0][0] != "user" or any(role not in TURN_ROLES for role, _ in history):
        raise ConversationError("earlier turns must open with a user turn and hold only user and assistant turns")
    turns = [(role, f"\x00CHUNKCACHE_TURN_{i}\x00") for i, (role, _) in enumerate([*history, ("user", "")])]
    prefix_text, rest = _render(tokenizer, template.system_prompt, template.instruction, turns).split(_DOCS)
    if prefix_text != template.prefix_text:
        raise ConversationError("this model's chat template lays the system prompt out differently when there are "
                                "earlier turns; send the question alone")
    pieces = []
    for _, sentinel in turns:
        piece, rest = rest.split(sentinel)
        pieces.append(piece)
    texts = [text.strip() for _, text in history] + [question.strip()]
    return encode_interleaved(tokenizer, [*pieces, rest], texts)
