"""Sampling parameters: seed reproducibility, greedy decoding, temperature and top_p bounds."""

from __future__ import annotations

import openai

from e2e_support import COUNTING_PROMPT, STORY_CHAT, STORY_PROMPT, chat, complete

SAMPLED = {"temperature": 1.0, "max_tokens": 16}


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    """temperature=1 with the same seed gives the same text twice."""
    first = complete(client, STORY_PROMPT, seed=1234, **SAMPLED)
    second = complete(client, STORY_PROMPT, seed=1234, **SAMPLED)
    assert first.text == second.text


def test_different_seeds_give_different_text(client: openai.OpenAI) -> None:
    """temperature=1 with several different seeds gives at least one different text."""
    texts = {complete(client, STORY_PROMPT, seed=seed, **SAMPLED).text for seed in (1, 2, 3, 4, 5)}
    assert len(texts) > 1, f"five seeds all gave {texts!r}"


def test_seeded_stream_equals_seeded_non_stream(client: openai.OpenAI) -> None:
    """A seeded sampled request gives the same text streamed and not streamed."""
    whole = complete(client, STORY_PROMPT, seed=99, **SAMPLED)
    streamed = complete(client, STORY_PROMPT, seed=99, stream=True, **SAMPLED)
    assert streamed.text == whole.text
    assert streamed.usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_chat_is_reproducible(client: openai.OpenAI) -> None:
    """A seeded sampled chat gives the same content twice."""
    first = chat(client, STORY_CHAT, seed=2024, **SAMPLED)
    second = chat(client, STORY_CHAT, seed=2024, **SAMPLED)
    assert first.text == second.text


def test_greedy_ignores_seed(client: openai.OpenAI) -> None:
    """With temperature=0 the seed makes no difference."""
    a = complete(client, STORY_PROMPT, max_tokens=12, seed=1)
    b = complete(client, STORY_PROMPT, max_tokens=12, seed=2)
    assert a.text == b.text


def test_tiny_top_p_is_greedy(client: openai.OpenAI) -> None:
    """top_p close to 0 keeps only the most likely token, so temperature=1 then decodes greedily."""
    greedy = complete(client, STORY_PROMPT, max_tokens=12)
    nucleus = complete(client, STORY_PROMPT, max_tokens=12, temperature=1.0, top_p=1e-6, seed=5)
    assert nucleus.text == greedy.text


def test_temperature_and_top_p_upper_bounds_are_accepted(client: openai.OpenAI) -> None:
    """temperature=2 and top_p=1 are inside the allowed ranges."""
    result = complete(client, COUNTING_PROMPT, max_tokens=4, temperature=2.0, top_p=1.0, seed=3)
    assert result.usage.completion_tokens >= 1
