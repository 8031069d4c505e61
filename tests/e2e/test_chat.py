"""POST /v1/chat/completions: shape, roles, content parts, length limits."""

from __future__ import annotations

import openai

from e2e_support import MODEL, STORY_CHAT, assert_chat_shape, chat, collect_chat_stream

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_chat_completion_is_from_assistant(client: openai.OpenAI) -> None:
    """A chat completion has object "chat.completion", role "assistant" and non-empty content."""
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    assert_chat_shape(response)
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content and message.content.strip()


def test_streaming_chat_first_delta_is_assistant(client: openai.OpenAI) -> None:
    """The first delta of a streamed chat carries role "assistant"; the content is non-empty."""
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    first_with_choices = next(c for c in chunks if c.choices)
    assert first_with_choices.choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip()


def test_streaming_chat_collects_cleanly(client: openai.OpenAI) -> None:
    """A streamed chat has chunks of object "chat.completion.chunk", one finish_reason, then usage."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    result = collect_chat_stream(stream)
    assert result.text.strip()
    assert result.usage is not None


def test_greedy_chat_is_deterministic(client: openai.OpenAI) -> None:
    """temperature=0 gives the same chat answer twice."""
    first = chat(client, HELLO, max_tokens=16)
    second = chat(client, HELLO, max_tokens=16)
    assert first.text == second.text
    assert first.usage.completion_tokens == second.usage.completion_tokens


def test_max_completion_tokens_limits_length(client: openai.OpenAI) -> None:
    """max_completion_tokens=N stops a long answer at exactly N tokens with finish_reason "length"."""
    result = chat(client, STORY_CHAT, max_completion_tokens=8)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 8


def test_max_tokens_limits_chat_length(client: openai.OpenAI) -> None:
    """The legacy max_tokens=N limits a chat answer the same way as max_completion_tokens."""
    by_max_tokens = chat(client, STORY_CHAT, max_tokens=8)
    by_max_completion = chat(client, STORY_CHAT, max_completion_tokens=8)
    assert by_max_tokens.finish_reason == "length"
    assert by_max_tokens.usage.completion_tokens == 8
    assert by_max_tokens.text == by_max_completion.text


def test_text_parts_equal_string_content(client: openai.OpenAI) -> None:
    """Content as a list with one {"type": "text"} part is the same prompt as that string."""
    text = HELLO[0]["content"]
    as_string = chat(client, [{"role": "user", "content": text}], max_tokens=16)
    as_parts = chat(client, [{"role": "user", "content": [{"type": "text", "text": text}]}], max_tokens=16)
    assert as_parts.text == as_string.text
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


def test_system_and_multi_turn_messages(client: openai.OpenAI) -> None:
    """system, user and assistant roles are accepted, and more turns mean more prompt tokens."""
    system = {"role": "system", "content": "You are a terse assistant."}
    one_turn = [system, {"role": "user", "content": "Name a colour."}]
    three_turns = one_turn + [
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Name another one."},
    ]
    short = chat(client, one_turn, max_tokens=8)
    long = chat(client, three_turns, max_tokens=8)
    assert long.text.strip()
    assert long.usage.prompt_tokens > short.usage.prompt_tokens


def test_system_message_is_part_of_the_prompt(client: openai.OpenAI) -> None:
    """A longer system message gives more prompt tokens: the system role reaches the template."""
    user = {"role": "user", "content": "Name a colour."}
    short = chat(client, [{"role": "system", "content": "Be brief."}, user], max_tokens=4)
    long = chat(client, [{"role": "system", "content": "Be brief. " * 10}, user], max_tokens=4)
    assert long.usage.prompt_tokens > short.usage.prompt_tokens


def test_ignore_eos_makes_exactly_max_tokens(client: openai.OpenAI) -> None:
    """A chat answer that ends early (finish "stop") runs to max_tokens with ignore_eos (the benchmark extension)."""
    messages = [{"role": "user", "content": "What is 2 + 2? Answer with one number."}]
    natural = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage.completion_tokens < 40
    forced = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].finish_reason == "length"
    assert forced.usage.completion_tokens == 40
