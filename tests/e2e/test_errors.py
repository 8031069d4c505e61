"""Errors: the right status, in OpenAI's shape {"error": {message, type, param, code}}.

Each case is checked on the wire with raw HTTP; a few are also checked through the
SDK's exception classes, which is how most clients see them.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from e2e_support import CONTEXT_TOKENS, MODEL, assert_error_body, httpx

COMPLETIONS = "/completions"
CHAT = "/chat/completions"
BASE_BODY = {
    COMPLETIONS: {"model": MODEL, "prompt": "Hello", "max_tokens": 4},
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
}
BOTH = pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])

TOO_LONG_TEXT = "hello " * 9000  # about 9000 tokens, more than the 8192-token context
FIVE_STOPS = ["a", "b", "c", "d", "e"]
A_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def _post(http: httpx.Client, path: str, **changes: Any) -> httpx.Response:
    """POST the path's valid base body with fields changed (a value of ... removes the field)."""
    body = {**BASE_BODY[path], **changes}
    body = {key: value for key, value in body.items() if value is not ...}
    return http.post(path, json=body)


# ---------------------------------------------------------------------------
# Unknown model


@BOTH
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_unknown_model_is_404(http: httpx.Client, path: str, stream: bool) -> None:
    """A model id the server does not serve gives 404, also for a streaming request."""
    assert_error_body(_post(http, path, model="no-such-model", stream=stream), 404)


def test_unknown_model_raises_not_found_in_sdk(client: openai.OpenAI) -> None:
    """The SDK raises NotFoundError for an unknown model, on both endpoints."""
    with pytest.raises(openai.NotFoundError) as completion_error:
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=4)
    with pytest.raises(openai.NotFoundError) as chat_error:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
    for error in (completion_error.value, chat_error.value):
        assert error.status_code == 404
        assert error.message


# ---------------------------------------------------------------------------
# Unsupported parameters: 400 with param naming the field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("best_of", 2),
        ("echo", True),
        ("suffix", "!"),
        ("logit_bias", {"504": 10}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("foo", 1),
    ],
)
def test_unsupported_completion_parameter_is_400(http: httpx.Client, field: str, value: Any) -> None:
    """A completions parameter the server does not support is refused, naming it in param."""
    assert_error_body(_post(http, COMPLETIONS, **{field: value}), 400, param=field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [A_TOOL]),
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("foo", 1),
    ],
)
def test_unsupported_chat_parameter_is_400(http: httpx.Client, field: str, value: Any) -> None:
    """A chat parameter the server does not support is refused, naming it in param."""
    assert_error_body(_post(http, CHAT, **{field: value}), 400, param=field)


def test_sdk_sees_param_of_unsupported_parameter(client: openai.OpenAI) -> None:
    """Through the SDK: best_of > n and an unknown extra field raise BadRequestError with param set."""
    with pytest.raises(openai.BadRequestError) as best_of_error:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, best_of=3)
    assert best_of_error.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as foo_error:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, extra_body={"foo": 1}
        )
    assert foo_error.value.param == "foo"


# ---------------------------------------------------------------------------
# Values out of range: 400 with param naming the field


@BOTH
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 3),
        ("temperature", -0.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("n", 0),
        ("n", 129),
        ("stop", FIVE_STOPS),
    ],
)
def test_out_of_range_value_is_400(http: httpx.Client, path: str, field: str, value: Any) -> None:
    """A value outside its allowed range is refused, naming the field in param."""
    assert_error_body(_post(http, path, **{field: value}), 400, param=field)


@pytest.mark.parametrize("value", [0, -1])
def test_out_of_range_max_completion_tokens_is_400(http: httpx.Client, value: int) -> None:
    """Chat's max_completion_tokens must be at least 1."""
    response = _post(http, CHAT, max_tokens=..., max_completion_tokens=value)
    assert_error_body(response, 400, param="max_completion_tokens")


def test_sdk_sees_param_of_out_of_range_value(client: openai.OpenAI) -> None:
    """Through the SDK: temperature=3 raises BadRequestError with param "temperature"."""
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=3)
    assert error.value.status_code == 400
    assert error.value.param == "temperature"


@BOTH
@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "ten"), ("temperature", "hot"), ("stop", 5), ("stream", "yes")],
)
def test_wrongly_typed_value_is_400(http: httpx.Client, path: str, field: str, value: Any) -> None:
    """A field of the wrong JSON type is a 400 (not a framework's 422)."""
    assert_error_body(_post(http, path, **{field: value}), 400)


# ---------------------------------------------------------------------------
# Prompts and messages


@BOTH
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_prompt_longer_than_context_is_400(http: httpx.Client, path: str, stream: bool) -> None:
    """A prompt of more tokens than the 8192-token context is refused before any generation."""
    if path == COMPLETIONS:
        response = _post(http, path, prompt=TOO_LONG_TEXT, stream=stream)
    else:
        response = _post(http, path, messages=[{"role": "user", "content": TOO_LONG_TEXT}], stream=stream)
    assert_error_body(response, 400)


def test_token_id_prompt_longer_than_context_is_400(http: httpx.Client) -> None:
    """A prompt of more token ids than the context holds is refused."""
    assert_error_body(_post(http, COMPLETIONS, prompt=[504] * (CONTEXT_TOKENS + 10)), 400)


def test_sdk_sees_context_overflow_as_bad_request(client: openai.OpenAI) -> None:
    """Through the SDK, an over-long prompt raises BadRequestError."""
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=TOO_LONG_TEXT, max_tokens=4)


@pytest.mark.parametrize(
    "prompt",
    [[10_000_000], [-1], ["Hello", "World"], [[504], [3575]]],
    ids=["id-beyond-vocab", "negative-id", "list-of-strings", "list-of-id-lists"],
)
def test_invalid_prompt_form_is_400(http: httpx.Client, prompt: Any) -> None:
    """Token ids outside the vocabulary and batches of several prompts are refused (a batch of one is accepted)."""
    assert_error_body(_post(http, COMPLETIONS, prompt=prompt), 400)


def test_missing_prompt_is_400(http: httpx.Client) -> None:
    """A completions request without a prompt is refused."""
    assert_error_body(_post(http, COMPLETIONS, prompt=...), 400)


def test_missing_messages_is_400(http: httpx.Client) -> None:
    """A chat request without messages is refused."""
    assert_error_body(_post(http, CHAT, messages=...), 400)


def test_empty_messages_is_400(http: httpx.Client) -> None:
    """A chat request with an empty messages list is refused."""
    assert_error_body(_post(http, CHAT, messages=[]), 400)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "robot", "content": "Hello"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}],
        [{"role": "user"}],
        "Hello",
    ],
    ids=["unknown-role", "image-part", "no-content", "not-a-list"],
)
def test_invalid_messages_are_400(http: httpx.Client, messages: Any) -> None:
    """Messages with an unknown role, a non-text content part, no content, or not a list are refused."""
    assert_error_body(_post(http, CHAT, messages=messages), 400)


# ---------------------------------------------------------------------------
# Bodies that are not JSON objects


@BOTH
@pytest.mark.parametrize(
    "raw",
    [b'{"model": "smollm2", "prompt": ', b"not json", b"", b"[]"],
    ids=["truncated", "not-json", "empty", "array"],
)
def test_malformed_json_body_is_400(http: httpx.Client, path: str, raw: bytes) -> None:
    """A body that is not a JSON object is refused with 400 in OpenAI's error shape."""
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error_body(response, 400)


def test_server_still_answers_after_errors(client: openai.OpenAI) -> None:
    """After the refused requests above, a valid request still succeeds."""
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert response.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (COMPLETIONS, {"logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"logprobs": -1}, "logprobs"),
        (COMPLETIONS, {"logprobs": True}, "logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"logprobs": 1}, "logprobs"),
    ],
)
def test_bad_logprobs_are_400(http: httpx.Client, path: str, fields: dict, param: str) -> None:
    """logprobs / top_logprobs outside 0..=20, of the wrong type, or top_logprobs without logprobs: 400 naming it."""
    assert_error_body(_post(http, path, **fields), 400, param=param)


# ---------------------------------------------------------------------------
# The HTTP layer: what the body and headers cannot be


def test_a_body_in_an_encoding_the_server_does_not_decode_is_415(http: httpx.Client) -> None:
    # Not gzip at all, though it says so: never read as if it were plain JSON.
    response = http.post(COMPLETIONS, content=b'{"model": "x"}', headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    error = assert_error_body(response, 415, None)
    assert error["code"] == "unsupported_content_encoding" and "gzip" in error["message"], error
    # identity is plain.
    ok = http.post(COMPLETIONS, json=BASE_BODY[COMPLETIONS], headers={"Content-Encoding": "identity"})
    assert ok.status_code == 200, ok.text


def test_two_authorization_headers_are_refused_not_guessed(http: httpx.Client) -> None:
    headers = httpx.Headers([("Authorization", "Bearer first"), ("Authorization", "Bearer second")])
    with httpx.Client(timeout=30) as bare:
        response = bare.post(f"{http.base_url}".rstrip("/") + COMPLETIONS, json=BASE_BODY[COMPLETIONS],
                             headers=headers)
    error = assert_error_body(response, 400, None)
    assert error["code"] == "multiple_authorization_headers", error
