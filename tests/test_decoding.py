"""Decoding options: stop strings (streamed correctly across token boundaries), penalties, logit bias."""
from __future__ import annotations

import pytest
import torch

from chunkcache.errors import QueryError
from chunkcache.sampling import OpenAIPenalties, logits_processors

from .conftest import DOCS

Q = "Where is Mount Everest?"


def _ask(pipe, **kwargs):
    kwargs.setdefault("max_new_tokens", 16)
    events = list(pipe.events(Q, documents=DOCS, **kwargs))
    return "".join(e for e in events if isinstance(e, str)), events[-1]


def test_a_stop_string_ends_the_answer_before_it_even_across_tokens(tiny_pipe):
    streamed, plain = _ask(tiny_pipe)
    text = plain.text
    assert len(text) > 12 and streamed.strip() == text
    stop = text[5:9]  # most likely spans a token boundary; the answer must end right before it
    streamed, answer = _ask(tiny_pipe, stop=["never appears \x01", stop])
    assert answer.finish_reason == "stop" and answer.text == text[:text.find(stop)].strip()
    assert stop not in streamed and streamed.strip() == answer.text  # no piece of it was streamed first
    assert answer.token_ids == plain.token_ids[:len(answer.token_ids)]
    _, unmatched = _ask(tiny_pipe, stop="never appears \x01")
    assert unmatched.text == text and unmatched.finish_reason == plain.finish_reason


def test_logit_bias_steers_the_tokens(tiny_pipe):
    _, plain = _ask(tiny_pipe)
    forced = 1234
    biased = tiny_pipe.query(Q, documents=DOCS, max_new_tokens=3, logit_bias={str(forced): 100})
    assert biased.token_ids == [forced] * 3
    banned = tiny_pipe.query(Q, documents=DOCS, max_new_tokens=3, logit_bias={plain.token_ids[0]: -100})
    assert banned.token_ids[0] != plain.token_ids[0]


def test_openai_penalties_count_the_answer_only():
    scores = torch.zeros(1, 6)
    seen = torch.tensor([[5, 5, 1, 2, 2, 2, 3]])  # prompt [5, 5], answer [1, 2, 2, 2, 3]
    out = OpenAIPenalties(frequency_penalty=0.5, presence_penalty=1.0, prompt_len=2)(seen, scores)
    assert out.tolist() == [[0.0, -1.5, -2.5, -1.5, 0.0, 0.0]]
    assert not logits_processors(prompt_len=2)  # nothing asked: nothing runs


def test_penalties_change_greedy_decoding_and_defaults_do_not(tiny_pipe):
    _, plain = _ask(tiny_pipe)
    _, same = _ask(tiny_pipe, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    assert same.token_ids == plain.token_ids
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    _, penalised = _ask(tiny_pipe, frequency_penalty=2.0, presence_penalty=2.0)
    assert repeats(penalised.token_ids) <= repeats(plain.token_ids)
    _, repetition = _ask(tiny_pipe, repetition_penalty=10.0)
    assert repetition.token_ids != plain.token_ids or repeats(plain.token_ids) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop=["a", "b", "c", "d", "e"]), "stop must be up to 4"),
    (dict(stop=[""]), "non-empty"),
    (dict(frequency_penalty=3), "frequency_penalty must be in"),
    (dict(repetition_penalty=0), "repetition_penalty must be in"),
    (dict(logit_bias={"x": 1}), "token ids"),
    (dict(logit_bias={10**9: 1}), "not in the vocabulary"),
    (dict(logit_bias={5: 500}), r"\[-100, 100\]"),
])
def test_bad_decoding_options_are_refused(tiny_pipe, kwargs, match):
    with pytest.raises(QueryError, match=match):
        tiny_pipe.query(Q, documents=DOCS, **kwargs)


def test_overflowing_penalties_still_sample():
    """A repetition penalty of 1e-200 turns logits infinite (the fuzzer found a 500); sampling picks among
    the largest, and never fails."""
    from chunkcache.sampling import next_token

    logits = torch.tensor([1.0, float("inf"), float("nan"), -float("inf"), float("inf")])
    gen = torch.Generator().manual_seed(0)
    assert {next_token(logits, 2.0, 1.0, gen) for _ in range(50)} == {1, 4}
    assert next_token(logits, 0.0, 1.0, gen) in (1, 4)
    assert next_token(torch.full((4,), float("nan")), 1.0, 0.9, gen) in range(4)
