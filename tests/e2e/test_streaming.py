"""Server-sent events: streamed text and usage equal the non-streaming answer; framing."""

from __future__ import annotations

import json

import openai
import pytest

from e2e_support import (
    COUNTING_PROMPT,
    MODEL,
    STORY_CHAT,
    STORY_PROMPT,
    assert_same_usage,
    chat,
    collect_chat_stream,
    collect_completion_stream,
    complete,
    httpx,
)


@pytest.mark.parametrize("prompt", [COUNTING_PROMPT, STORY_PROMPT], ids=["counting", "story"])
def test_completion_stream_equals_non_stream(client: openai.OpenAI, prompt: str) -> None:
    """A greedy streamed completion concatenates to the non-streamed text, with the same finish_reason and usage."""
    whole = complete(client, prompt, max_tokens=24)
    streamed = complete(client, prompt, max_tokens=24, stream=True)
    assert streamed.text == whole.text
    assert streamed.finish_reason == whole.finish_reason
    assert_same_usage(streamed.usage, whole.usage)


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    """A greedy streamed chat concatenates to the non-streamed content, with the same finish_reason and usage."""
    whole = chat(client, STORY_CHAT, max_tokens=24)
    streamed = chat(client, STORY_CHAT, max_tokens=24, stream=True)
    assert streamed.text == whole.text
    assert streamed.finish_reason == whole.finish_reason
    assert_same_usage(streamed.usage, whole.usage)


def test_stream_length_finish_matches_max_tokens(client: openai.OpenAI) -> None:
    """A stream cut by max_tokens ends with finish_reason "length" and completion_tokens == max_tokens."""
    streamed = complete(client, COUNTING_PROMPT, max_tokens=10, stream=True)
    assert streamed.finish_reason == "length"
    assert streamed.usage.completion_tokens == 10


@pytest.mark.parametrize("stream_options", [None, {"include_usage": False}], ids=["absent", "false"])
def test_completion_stream_without_usage_request_has_no_usage(client: openai.OpenAI, stream_options) -> None:
    """Without stream_options.include_usage, no chunk carries usage."""
    extra = {} if stream_options is None else {"stream_options": stream_options}
    stream = client.completions.create(
        model=MODEL, prompt=COUNTING_PROMPT, max_tokens=8, temperature=0, stream=True, **extra
    )
    result = collect_completion_stream(stream)
    assert result.usage is None
    assert result.text


def test_chat_stream_without_usage_request_has_no_usage(client: openai.OpenAI) -> None:
    """Without stream_options, a chat stream has no usage chunk."""
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY_CHAT, max_tokens=8, temperature=0, stream=True
    )
    result = collect_chat_stream(stream)
    assert result.usage is None
    assert result.text


def _read_sse(http: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    """POST and return the response and the payloads of its `data:` lines, in order."""
    payloads = []
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line or line.startswith(":"):
                continue  # event separator or SSE comment (keep-alive)
            assert line.startswith("data:"), f"unexpected SSE line: {line!r}"
            payloads.append(line[len("data:") :].strip())
    return response, payloads


@pytest.mark.parametrize(
    ("path", "body", "chunk_object"),
    [
        ("/completions", {"prompt": COUNTING_PROMPT}, "text_completion"),
        ("/chat/completions", {"messages": STORY_CHAT}, "chat.completion.chunk"),
    ],
    ids=["completions", "chat"],
)
def test_raw_sse_framing(http: httpx.Client, path: str, body: dict, chunk_object: str) -> None:
    """The wire format: text/event-stream, JSON `data:` chunks, usage chunk last, then `data: [DONE]`."""
    request = {
        "model": MODEL,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    response, payloads = _read_sse(http, path, request)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) >= 2
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1, f"all chunks of one stream share an id: {ids}"
    for chunk in chunks:
        assert chunk["object"] == chunk_object
        assert chunk["model"] == MODEL
        assert isinstance(chunk["created"], int)
    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)
    for chunk in content_chunks:
        assert len(chunk["choices"]) == 1
        assert chunk.get("usage") is None
    assert content_chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert all(c["choices"][0].get("finish_reason") is None for c in content_chunks[:-1])


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(http) -> None:
    """vLLM's stream_options.continuous_usage_stats (guidellm sends it): each chunk carries the
    cumulative usage; the last usage chunk is the request's whole usage."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = []
    with http.stream("POST", "/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices and all(c.get("usage") for c in with_choices), chunks
    completion = [c["usage"]["completion_tokens"] for c in with_choices]
    assert completion == sorted(completion) and completion[-1] <= 6, completion
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    prompt = {c["usage"]["prompt_tokens"] for c in chunks}
    assert len(prompt) == 1, prompt
    for c in with_choices:
        assert c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]


def test_fields_that_change_nothing_are_accepted_and_a_penalty_is_not_faked(http) -> None:
    """store, metadata, service_tier and vLLM's neutral repetition_penalty (its benchmark always sends
    1.0) are accepted; a real repetition penalty, which we do not implement, is still a 400 naming it."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "store": False, "metadata": {"run": "e2e"},
            "service_tier": "auto", "repetition_penalty": 1.0}
    ok = http.post("/completions", json=body)
    assert ok.status_code == 200, ok.text
    refused = http.post("/completions", json={**body, "repetition_penalty": 1.2})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "repetition_penalty", refused.text
