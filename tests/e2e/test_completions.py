"""POST /v1/completions without streaming: shape, lengths, prompts as text or token ids."""

from __future__ import annotations

import openai

from e2e_support import (
    COUNTING_PROMPT,
    FRANCE_TEXT,
    FRANCE_TOKEN_IDS,
    MODEL,
    STORY_PROMPT,
    assert_completion_shape,
    complete,
)


def test_completion_has_openai_shape(client: openai.OpenAI) -> None:
    """A completion has id, object "text_completion", created, model, one choice and usage."""
    response = client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=8, temperature=0)
    assert_completion_shape(response)
    assert response.choices[0].text, "expected some generated text"


def test_max_tokens_reached_gives_length(client: openai.OpenAI) -> None:
    """With max_tokens=N and no stop hit, exactly N tokens are generated and finish_reason is "length"."""
    result = complete(client, COUNTING_PROMPT, max_tokens=12)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 12
    assert result.text


def test_greedy_completion_is_deterministic(client: openai.OpenAI) -> None:
    """temperature=0 gives the same text and usage for the same request twice."""
    first = complete(client, STORY_PROMPT, max_tokens=16)
    second = complete(client, STORY_PROMPT, max_tokens=16)
    assert first.text == second.text
    assert first.finish_reason == second.finish_reason
    assert first.usage.completion_tokens == second.usage.completion_tokens


def test_text_prompt_counts_its_tokens(client: openai.OpenAI) -> None:
    """prompt_tokens is the tokenizer's count for a text prompt (SmolLM2 adds no BOS token)."""
    result = complete(client, FRANCE_TEXT, max_tokens=4)
    assert result.usage.prompt_tokens == len(FRANCE_TOKEN_IDS)


def test_token_id_prompt_matches_text_prompt(client: openai.OpenAI) -> None:
    """A prompt given as token ids generates exactly what the same prompt as text does."""
    from_text = complete(client, FRANCE_TEXT, max_tokens=12)
    from_ids = complete(client, FRANCE_TOKEN_IDS, max_tokens=12)
    assert from_ids.text == from_text.text
    assert from_ids.finish_reason == from_text.finish_reason
    assert from_ids.usage.prompt_tokens == len(FRANCE_TOKEN_IDS)
    assert from_ids.usage.completion_tokens == from_text.usage.completion_tokens


def test_n_1_user_and_seed_are_accepted(client: openai.OpenAI) -> None:
    """The supported optional parameters n=1, user, seed, top_p=1 are accepted on a greedy request."""
    plain = complete(client, COUNTING_PROMPT, max_tokens=8)
    with_params = complete(client, COUNTING_PROMPT, max_tokens=8, n=1, user="e2e-user", seed=7, top_p=1.0)
    assert with_params.text == plain.text


def test_cached_tokens_never_exceed_prompt_tokens(client: openai.OpenAI) -> None:
    """A repeated long prompt reports cached_tokens as an int between 0 and prompt_tokens."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    first = complete(client, prompt, max_tokens=4)
    second = complete(client, prompt, max_tokens=4)
    for usage in (first.usage, second.usage):
        cached = usage.prompt_tokens_details.cached_tokens
        assert isinstance(cached, int) and 0 <= cached <= usage.prompt_tokens
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    assert first.text == second.text
