"""Limits that protect the server, each with its OpenAI error and status: prompt length and max_tokens
(400), body size (413), requests in progress (503 + Retry-After), request timeout (504)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from conftest import Server, server_binary, start_server
from e2e_support import MODEL, STORY_PROMPT, assert_error_body, httpx

ARGS = ["--no-auth", "--no-ledger", "--max-prompt-tokens", "12", "--max-output-tokens", "3000",
        "--request-timeout", "2", "--max-concurrent-requests", "2", "--max-body-bytes", "2000"]


@pytest.fixture(scope="module")
def limited() -> Iterator[Server]:
    with start_server(server_binary(), ARGS) as server:
        yield server


def _post(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/completions", json={"model": MODEL, **body}, timeout=60)


def test_prompt_and_output_limits_are_400(limited: Server) -> None:
    """13+ prompt tokens or max_tokens over 3000: 400 naming the parameter; within the limits: 200."""
    assert _post(limited, prompt="Hello there", max_tokens=2).status_code == 200
    assert_error_body(_post(limited, prompt=STORY_PROMPT, max_tokens=2), 400, param="prompt")
    assert_error_body(_post(limited, prompt="Hi", max_tokens=3001), 400, param="max_tokens")


def test_a_body_over_the_limit_is_413(limited: Server) -> None:
    """A 3 kB body against a 2000-byte limit: 413 in OpenAI's shape."""
    assert_error_body(_post(limited, prompt="x" * 3000, max_tokens=1), 413, param=None)


def test_a_request_past_its_timeout_is_504_and_stopped(limited: Server) -> None:
    """A 3000-token completion cannot finish in 2 s: 504 (JSON) or an error event then [DONE] (stream)."""
    response = _post(limited, prompt="Once upon a time", max_tokens=3000, temperature=0)
    error = assert_error_body(response, 504, param=None)
    assert error["code"] == "timeout"
    events = []
    with httpx.stream("POST", f"{limited.base_url}/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "timeout"


def test_requests_beyond_the_concurrency_limit_get_503(limited: Server) -> None:
    """With 2 long streams in progress, a third request gets 503 with Retry-After; after they end, it is served."""
    started = threading.Barrier(3)
    done = threading.Event()

    def hold() -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{limited.base_url}/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            started.wait(timeout=30)
            done.wait(timeout=30)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=30)
    refused = _post(limited, prompt="Hi", max_tokens=1)
    done.set()
    for t in threads:
        t.join()
    error = assert_error_body(refused, 503, param=None)
    assert error["code"] == "too_many_requests_in_progress"
    assert refused.headers["retry-after"] == "1"
    assert _post(limited, prompt="Hi", max_tokens=1).status_code == 200
