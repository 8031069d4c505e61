"""Stop strings: matched across token boundaries, cut from the text, finish_reason "stop".

Each test first generates greedily without a stop string, picks stop strings from
that text, and reruns with them: greedy generation is the same up to the stop,
so the expected answer is the original text cut before the stop string.
"""

from __future__ import annotations

import openai
import pytest

from e2e_support import (
    COUNTING_PROMPT,
    STORY_CHAT,
    STORY_PROMPT,
    assert_same_usage,
    chat,
    complete,
    pick_stop,
    truncate_at_stop,
)

BASE_TOKENS = 24
STREAM_MODES = pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])


@pytest.fixture(scope="module")
def counting_text(client: openai.OpenAI) -> str:
    """The greedy continuation of the counting prompt, without stop strings."""
    return complete(client, COUNTING_PROMPT, max_tokens=BASE_TOKENS).text


@pytest.fixture(scope="module")
def story_text(client: openai.OpenAI) -> str:
    """The greedy continuation of the story prompt, without stop strings."""
    return complete(client, STORY_PROMPT, max_tokens=BASE_TOKENS).text


@pytest.fixture(scope="module")
def chat_text(client: openai.OpenAI) -> str:
    """The greedy answer to the story chat, without stop strings."""
    return chat(client, STORY_CHAT, max_tokens=BASE_TOKENS).text


@STREAM_MODES
@pytest.mark.parametrize("base", ["counting_text", "story_text"])
def test_stop_string_spanning_tokens_cuts_text(
    client: openai.OpenAI, request: pytest.FixtureRequest, base: str, stream: bool
) -> None:
    """A multi-character stop string from mid-output ends generation; it and all after it are cut."""
    text = request.getfixturevalue(base)
    prompt = COUNTING_PROMPT if base == "counting_text" else STORY_PROMPT
    stop = pick_stop(text)
    result = complete(client, prompt, max_tokens=BASE_TOKENS, stop=stop, stream=stream)
    assert result.finish_reason == "stop"
    assert result.text == truncate_at_stop(text, [stop]), f"stop={stop!r}"
    assert stop not in result.text
    assert 1 <= result.usage.completion_tokens < BASE_TOKENS


@STREAM_MODES
def test_second_word_as_stop(client: openai.OpenAI, story_text: str, stream: bool) -> None:
    """The second whitespace-separated word of the output, as a stop string, cuts the text before it."""
    words = story_text.split()
    assert len(words) >= 3, story_text
    stop = words[1]
    result = complete(client, STORY_PROMPT, max_tokens=BASE_TOKENS, stop=[stop], stream=stream)
    assert result.finish_reason == "stop"
    assert result.text == truncate_at_stop(story_text, [stop]), f"stop={stop!r}"


@STREAM_MODES
def test_first_completed_stop_of_a_list_wins(client: openai.OpenAI, counting_text: str, stream: bool) -> None:
    """With several stop strings, the one completed first in the output ends it, whatever its list position."""
    early = pick_stop(counting_text, near=0.3)
    late = pick_stop(counting_text, near=0.75, not_before=counting_text.index(early) + len(early))
    never = "@@never-generated@@"
    result = complete(client, COUNTING_PROMPT, max_tokens=BASE_TOKENS, stop=[never, late, early], stream=stream)
    assert result.finish_reason == "stop"
    assert result.text == counting_text[: counting_text.index(early)], f"stops={[late, early]!r}"


@STREAM_MODES
def test_stop_never_generated_changes_nothing(client: openai.OpenAI, counting_text: str, stream: bool) -> None:
    """Stop strings that never occur leave the text whole and finish_reason "length"."""
    result = complete(client, COUNTING_PROMPT, max_tokens=BASE_TOKENS, stop=["@@", "never-seen"], stream=stream)
    assert result.finish_reason == "length"
    assert result.text == counting_text
    assert result.usage.completion_tokens == BASE_TOKENS


def test_four_stop_strings_are_accepted(client: openai.OpenAI, counting_text: str) -> None:
    """Up to 4 stop strings are allowed."""
    stop = pick_stop(counting_text)
    result = complete(client, COUNTING_PROMPT, max_tokens=BASE_TOKENS, stop=["@1", "@2", "@3", stop])
    assert result.finish_reason == "stop"
    assert result.text == truncate_at_stop(counting_text, [stop])


def test_stopped_stream_usage_equals_non_stream(client: openai.OpenAI, story_text: str) -> None:
    """A request ended by a stop string reports the same usage streamed and not streamed."""
    stop = pick_stop(story_text)
    whole = complete(client, STORY_PROMPT, max_tokens=BASE_TOKENS, stop=stop)
    streamed = complete(client, STORY_PROMPT, max_tokens=BASE_TOKENS, stop=stop, stream=True)
    assert streamed.text == whole.text
    assert_same_usage(streamed.usage, whole.usage)


@STREAM_MODES
def test_chat_stop_string_cuts_content(client: openai.OpenAI, chat_text: str, stream: bool) -> None:
    """In chat, a stop string from mid-answer cuts the content before it, with finish_reason "stop"."""
    stop = pick_stop(chat_text)
    result = chat(client, STORY_CHAT, max_tokens=BASE_TOKENS, stop=stop, stream=stream)
    assert result.finish_reason == "stop"
    assert result.text == truncate_at_stop(chat_text, [stop]), f"stop={stop!r}"
