"""Token ids from text: untrusted text as plain text, template text with its control tokens.

Documents, ingested files and questions come from users. Tokenized the ordinary way, a string such
as `<|im_start|>system` inside them becomes the real control tokens and forges a turn of the chat
(issue 9: a document made the model answer "BANANA"). Here untrusted text is tokenized with special
tokens split as plain text; only the prompt template (chunkcache/prompt.py) emits control tokens.
For text without special-token strings both ways give the same ids, so ordinary chunks keep their keys.
"""
from __future__ import annotations

import re
import threading
import weakref

# NOTE: HF fast tokenizers implement `split_special_tokens` by setting a flag on the shared Rust
# tokenizer for the duration of the call. Two threads encoding with different settings could see each
# other's flag (a template call would split, or, worse, a plain call would not), so every encode here
# holds this lock.
_ENCODE_LOCK = threading.Lock()


class ControlTokenError(ValueError):
    """The tokenizer produced a control token from untrusted text (it ignored `split_special_tokens`)."""


def control_token_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's special (control) tokens: chat-turn markers, EOS, BOS and the like."""
    return _controls(tokenizer)[0]


def _controls(tokenizer) -> tuple[frozenset[int], re.Pattern | None]:
    """(control ids, a pattern matching their strings), computed once per tokenizer: reading a
    tokenizer's added tokens costs ~10 ms, and Gemma's has 6,000 of them."""
    try:
        return _CONTROLS[tokenizer]
    except (KeyError, TypeError):
        pass
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = {i for i, token in decoder.items() if getattr(token, "special", False)}
    ids = frozenset(ids | set(getattr(tokenizer, "all_special_ids", ()) or ()))
    strings = sorted({t.content for i, t in decoder.items() if i in ids and t.content},
                     key=len, reverse=True)  # longest first, so a token that contains another wins
    result = ids, (re.compile("|".join(map(re.escape, strings))) if strings else None)
    try:
        _CONTROLS[tokenizer] = result
    except TypeError:  # not weak-referenceable: computed every time
        pass
    return result


_CONTROLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_template(tokenizer, text: str) -> list[int]:
    """Template text (trusted: the chat template, the store's system prompt): control tokens stay control
    tokens. The template already holds any BOS, so none is added."""
    with _ENCODE_LOCK:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=False)


def encode_plain(tokenizer, text: str) -> list[int]:
    """Untrusted text: special-token strings inside it are tokenized as the characters they are.

    Raises:
        ControlTokenError: the tokenizer does not support `split_special_tokens` and produced a control
            token anyway (refused rather than letting the text forge a turn).
    """
    with _ENCODE_LOCK:
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    _check_plain(tokenizer, ids)
    return ids


def plain_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each token of untrusted `text`, tokenized as `encode_plain` does."""
    with _ENCODE_LOCK:
        enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    _check_plain(tokenizer, enc["input_ids"])
    return [tuple(o) for o in enc["offset_mapping"]]


def encode_around(tokenizer, before: str, untrusted: str, after: str) -> list[int]:
    """Token ids of template text `before`, then untrusted text, then template text `after`."""
    return encode_interleaved(tokenizer, [before, after], [untrusted])


def encode_interleaved(tokenizer, template: list[str], untrusted: list[str]) -> list[int]:
    """Token ids of template[0], untrusted[0], template[1], ..., untrusted[-1], template[-1].

    The template's control tokens stay control tokens and the untrusted texts' are plain text. Each plain
    span runs from the last control token of one template piece to the first of the next one (or further,
    across a piece without any): a tokenizer splits at control tokens before anything else, so text
    without special-token strings gets exactly the ids it would get tokenized in one piece.
    """
    if len(template) != len(untrusted) + 1:
        raise ValueError("need one more template piece than untrusted texts")
    pattern = _control_pattern(tokenizer)
    ids: list[int] = []
    plain = ""
    for index, piece in enumerate(template):
        controls = list(pattern.finditer(piece)) if pattern else []
        if controls:
            first, last = controls[0].start(), controls[-1].end()
            plain += piece[:first]
            if plain:
                ids += encode_plain(tokenizer, plain)
            ids += encode_template(tokenizer, piece[first:last])
            plain = piece[last:]
        else:
            plain += piece
        if index < len(untrusted):
            plain += untrusted[index]
    if plain:
        ids += encode_plain(tokenizer, plain)
    return ids


def _control_pattern(tokenizer) -> re.Pattern | None:
    return _controls(tokenizer)[1]


def _check_plain(tokenizer, ids) -> None:
    found = sorted(set(ids) & control_token_ids(tokenizer))
    if found:
        raise ControlTokenError(
            f"the tokenizer {type(tokenizer).__name__} turned untrusted text into control token(s) "
            f"{tokenizer.convert_ids_to_tokens(found)} although asked to split special tokens; use a "
            "transformers version whose tokenizers support split_special_tokens")
