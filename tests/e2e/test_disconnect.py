"""Clients that go away mid-request must not hurt the server or the requests after them."""

from __future__ import annotations

import time

import openai
import pytest

from e2e_support import COUNTING_PROMPT, MODEL, STORY_CHAT, STORY_PROMPT, complete, httpx

# Generation the clients below abandon: far longer than any test waits for.
ABANDONED_MAX_TOKENS = 2000
# A small request after a disconnect must finish within this (it takes about a second alone).
FOLLOW_UP_LIMIT_S = 30.0


def _assert_follow_up_is_served(client: openai.OpenAI, tokenmill_server) -> None:
    started = time.monotonic()
    result = complete(client, COUNTING_PROMPT, max_tokens=8)
    elapsed = time.monotonic() - started
    assert result.usage.completion_tokens == 8
    assert elapsed < FOLLOW_UP_LIMIT_S, f"follow-up request took {elapsed:.1f} s"
    assert httpx.get(f"{tokenmill_server.root}/health", timeout=10).status_code == 200


def test_completion_stream_closed_after_three_chunks(client: openai.OpenAI, tokenmill_server) -> None:
    """Closing a long completions stream after 3 chunks leaves the server serving the next request quickly."""
    stream = client.completions.create(
        model=MODEL, prompt=STORY_PROMPT, max_tokens=ABANDONED_MAX_TOKENS, temperature=0, stream=True
    )
    received = [chunk for _, chunk in zip(range(3), stream)]
    stream.close()
    assert len(received) == 3
    _assert_follow_up_is_served(client, tokenmill_server)


def test_chat_stream_closed_after_three_chunks(client: openai.OpenAI, tokenmill_server) -> None:
    """Closing a long chat stream after 3 chunks leaves the server serving the next request quickly."""
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY_CHAT, max_tokens=ABANDONED_MAX_TOKENS, temperature=0, stream=True
    )
    received = [chunk for _, chunk in zip(range(3), stream)]
    stream.close()
    assert len(received) == 3
    _assert_follow_up_is_served(client, tokenmill_server)


def test_raw_connection_dropped_mid_stream(http: httpx.Client, client: openai.OpenAI, tokenmill_server) -> None:
    """Dropping the TCP connection of a raw SSE stream after 3 events leaves the server serving."""
    body = {
        "model": MODEL,
        "prompt": STORY_PROMPT,
        "max_tokens": ABANDONED_MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=60) as own:
        with own.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events += 1
                    if events == 3:
                        break
    assert events == 3
    _assert_follow_up_is_served(client, tokenmill_server)


def test_client_timeout_on_non_streaming_request(client: openai.OpenAI, tokenmill_server) -> None:
    """A client that times out on a long non-streaming request and leaves does not hurt the server."""
    impatient = client.with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(
            model=MODEL, prompt=COUNTING_PROMPT, max_tokens=ABANDONED_MAX_TOKENS, temperature=0
        )
    _assert_follow_up_is_served(client, tokenmill_server)


def test_several_abandoned_streams_then_normal_traffic(client: openai.OpenAI, tokenmill_server) -> None:
    """Four streams abandoned one after another leave later requests running normally, with unchanged output."""
    before = complete(client, STORY_PROMPT, max_tokens=8)
    for _ in range(4):
        stream = client.completions.create(
            model=MODEL, prompt=STORY_PROMPT, max_tokens=ABANDONED_MAX_TOKENS, temperature=0, stream=True
        )
        next(iter(stream))
        stream.close()
    _assert_follow_up_is_served(client, tokenmill_server)
    after = complete(client, STORY_PROMPT, max_tokens=8)
    assert after.text == before.text
