"""Constants and helpers shared by the end-to-end tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

try:  # pinned in requirements.txt
    import httpx
except ImportError:  # the OpenAI SDK 3.x brings httpx2, the same API under another name
    import httpx2 as httpx  # type: ignore[no-redef]

__all__ = ["httpx"]

MODEL = "smollm2"
CONTEXT_TOKENS = 8192

# Greedy continuations of these run long and regular, so max_tokens (not EOS) ends them.
COUNTING_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"
STORY_PROMPT = "Once upon a time, in a small village by the sea, there lived"
STORY_CHAT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]

# "The capital of France is" in SmolLM2's tokenizer (byte-level BPE; it adds no BOS token).
FRANCE_TEXT = "The capital of France is"
FRANCE_TOKEN_IDS = [504, 3575, 282, 4649, 314]

FINISH_REASONS = {"stop", "length"}


@dataclass(frozen=True)
class Result:
    """What one request produced, the same shape for streaming and non-streaming calls."""

    text: str
    finish_reason: str | None
    usage: Any  # openai.types.CompletionUsage, or None when a stream did not ask for it


def tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a text file (for server logs)."""
    try:
        content = path.read_text(errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return "\n".join(content.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# Requests through the SDK


def complete(client: openai.OpenAI, prompt: str | list[int], *, stream: bool = False, **params: Any) -> Result:
    """POST /v1/completions; greedy unless `temperature` is given."""
    params.setdefault("temperature", 0)
    if not stream:
        response = client.completions.create(model=MODEL, prompt=prompt, **params)
        assert_completion_shape(response)
        choice = response.choices[0]
        return Result(choice.text, choice.finish_reason, response.usage)
    params.setdefault("stream_options", {"include_usage": True})
    return collect_completion_stream(client.completions.create(model=MODEL, prompt=prompt, stream=True, **params))


def chat(client: openai.OpenAI, messages: list[dict], *, stream: bool = False, **params: Any) -> Result:
    """POST /v1/chat/completions; greedy unless `temperature` is given."""
    params.setdefault("temperature", 0)
    if not stream:
        response = client.chat.completions.create(model=MODEL, messages=messages, **params)
        assert_chat_shape(response)
        choice = response.choices[0]
        return Result(choice.message.content, choice.finish_reason, response.usage)
    params.setdefault("stream_options", {"include_usage": True})
    return collect_chat_stream(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **params))


def collect_completion_stream(stream: Any) -> Result:
    """Read a completions stream to its end, checking the order of its chunks."""
    parts: list[str] = []
    finish_reason = None
    usage = None
    for chunk in stream:
        assert usage is None, "a chunk arrived after the usage chunk"
        assert chunk.object == "text_completion"
        assert chunk.model == MODEL
        if chunk.usage is not None:
            assert chunk.choices == [], "the usage chunk must have empty choices"
            usage = chunk.usage
            continue
        assert len(chunk.choices) == 1
        choice = chunk.choices[0]
        assert choice.index == 0
        assert finish_reason is None, "a chunk with choices arrived after finish_reason was sent"
        parts.append(choice.text or "")
        finish_reason = choice.finish_reason
    assert finish_reason in FINISH_REASONS, f"stream ended without a valid finish_reason: {finish_reason!r}"
    return Result("".join(parts), finish_reason, usage)


def collect_chat_stream(stream: Any) -> Result:
    """Read a chat stream to its end, checking the order of its chunks."""
    parts: list[str] = []
    finish_reason = None
    usage = None
    first = True
    for chunk in stream:
        assert usage is None, "a chunk arrived after the usage chunk"
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL
        if chunk.usage is not None:
            assert chunk.choices == [], "the usage chunk must have empty choices"
            usage = chunk.usage
            continue
        assert len(chunk.choices) == 1
        choice = chunk.choices[0]
        assert choice.index == 0
        assert finish_reason is None, "a chunk with choices arrived after finish_reason was sent"
        if first:
            assert choice.delta.role == "assistant", f"first delta must carry role 'assistant': {choice.delta}"
            first = False
        parts.append(choice.delta.content or "")
        finish_reason = choice.finish_reason
    assert finish_reason in FINISH_REASONS, f"stream ended without a valid finish_reason: {finish_reason!r}"
    return Result("".join(parts), finish_reason, usage)


# ---------------------------------------------------------------------------
# Assertions


def assert_usage(usage: Any) -> None:
    """usage has the OpenAI fields, non-negative and adding up."""
    assert usage is not None, "missing usage"
    assert isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0
    assert isinstance(usage.completion_tokens, int) and usage.completion_tokens >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    details = usage.prompt_tokens_details
    assert details is not None, "missing usage.prompt_tokens_details"
    assert isinstance(details.cached_tokens, int)
    assert 0 <= details.cached_tokens <= usage.prompt_tokens


def assert_same_usage(a: Any, b: Any) -> None:
    """Two usages count the same tokens.

    cached_tokens is left out: a repeat of a request may be served from the prefix cache.
    """
    assert_usage(a)
    assert_usage(b)
    assert (a.prompt_tokens, a.completion_tokens, a.total_tokens) == (
        b.prompt_tokens,
        b.completion_tokens,
        b.total_tokens,
    )


def assert_completion_shape(response: Any) -> None:
    """A non-streaming /v1/completions response in OpenAI's shape."""
    assert response.object == "text_completion"
    assert isinstance(response.id, str) and response.id
    assert isinstance(response.created, int) and response.created > 0
    assert response.model == MODEL
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0
    assert isinstance(choice.text, str)
    assert choice.finish_reason in FINISH_REASONS
    assert_usage(response.usage)


def assert_chat_shape(response: Any) -> None:
    """A non-streaming /v1/chat/completions response in OpenAI's shape."""
    assert response.object == "chat.completion"
    assert isinstance(response.id, str) and response.id
    assert isinstance(response.created, int) and response.created > 0
    assert response.model == MODEL
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in FINISH_REASONS
    assert_usage(response.usage)


def assert_error_body(response: Any, status: int, param: str | None = ...) -> dict:  # type: ignore[assignment]
    """A raw HTTP response is an OpenAI error: {"error": {message, type, param, code}}.

    `param` is checked only when given (None included).
    """
    assert response.status_code == status, f"expected HTTP {status}, got {response.status_code}: {response.text}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert {"message", "type", "param", "code"} <= set(error), f"error lacks a field: {error}"
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if param is not ...:
        assert error["param"] == param, f"expected param {param!r}: {error}"
    return error


# ---------------------------------------------------------------------------
# Stop strings


def pick_stop(text: str, *, near: float = 0.5, length: int = 5, not_before: int = 1) -> str:
    """A substring of `text` to use as a stop string.

    It is `length` characters taken as close as possible to `near` (a fraction of
    the text), preferring one that crosses a word boundary ("x y"): a byte-level
    BPE never puts both sides of a space into one token, so such a stop string
    spans at least two tokens and tests matching across token boundaries. Its
    first occurrence starts at or after `not_before`, so the expected truncated
    text is not empty.
    """
    assert len(text) >= length + not_before + 2, f"base text too short to pick a stop string from: {text!r}"
    centre = int(len(text) * near)
    starts = sorted(range(len(text) - length + 1), key=lambda s: abs(s - centre))
    candidates = [text[s : s + length] for s in starts]
    usable = [c for c in candidates if c.strip() and text.index(c) >= not_before]
    spanning = [c for c in usable if re.search(r"\S\s+\S", c)]
    if spanning:
        return spanning[0]
    assert usable, f"no usable stop string in {text!r}"
    return usable[0]


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """The text a server must return when generating `text` with `stops`.

    Generation ends at the stop string whose first occurrence is completed first
    (smallest end position); the text before that occurrence is returned.
    """
    ends = {s: text.index(s) + len(s) for s in stops if s in text}
    assert ends, "no stop string occurs in the text"
    first = min(ends, key=ends.get)
    return text[: text.index(first)]
