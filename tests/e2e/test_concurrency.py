"""Several clients at once: each gets exactly the answer it gets alone."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai

from e2e_support import (
    COUNTING_PROMPT,
    FRANCE_TEXT,
    MODEL,
    STORY_CHAT,
    STORY_PROMPT,
    Result,
    chat,
    collect_completion_stream,
    complete,
)

BARRIER_TIMEOUT_S = 60


def _run_together(calls: list[Callable[[], Result]]) -> list[Result]:
    """Run the calls on one thread each, released at the same moment."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Result]) -> Result:
        barrier.wait(timeout=BARRIER_TIMEOUT_S)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def _assert_same_answers(together: list[Result], alone: list[Result]) -> None:
    for i, (t, a) in enumerate(zip(together, alone)):
        assert t.text == a.text, f"request {i}: concurrent text differs from the text alone"
        assert t.finish_reason == a.finish_reason, f"request {i}"
        assert t.usage.prompt_tokens == a.usage.prompt_tokens, f"request {i}"
        assert t.usage.completion_tokens == a.usage.completion_tokens, f"request {i}"


def test_concurrent_completions_match_sequential(client: openai.OpenAI) -> None:
    """4 different greedy completions sent at once (2 streamed, lengths differ) each equal the same request alone."""
    requests = [
        lambda: complete(client, COUNTING_PROMPT, max_tokens=8),
        lambda: complete(client, STORY_PROMPT, max_tokens=16, stream=True),
        lambda: complete(client, FRANCE_TEXT, max_tokens=12),
        lambda: complete(client, "def fibonacci(n):", max_tokens=20, stream=True),
    ]
    alone = [call() for call in requests]
    together = _run_together(requests)
    _assert_same_answers(together, alone)


def test_concurrent_chat_and_completions_match_sequential(client: openai.OpenAI) -> None:
    """Chat and completion requests mixed in one batch each equal the same request alone."""
    requests = [
        lambda: chat(client, STORY_CHAT, max_tokens=16),
        lambda: chat(client, [{"role": "user", "content": "What is 2 + 2?"}], max_tokens=12, stream=True),
        lambda: complete(client, COUNTING_PROMPT, max_tokens=16, stream=True),
        lambda: complete(client, STORY_PROMPT, max_tokens=8),
    ]
    alone = [call() for call in requests]
    together = _run_together(requests)
    _assert_same_answers(together, alone)


def test_request_joining_a_running_generation_matches_alone(client: openai.OpenAI) -> None:
    """A short request arriving while a long one is generating gets its answer alone; so does the long one."""
    long_alone = complete(client, STORY_PROMPT, max_tokens=48)
    short_alone = complete(client, COUNTING_PROMPT, max_tokens=8)

    started = threading.Event()

    def run_long() -> Result:
        stream = client.completions.create(
            model=MODEL,
            prompt=STORY_PROMPT,
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )

        def chunks():
            for chunk in stream:
                started.set()
                yield chunk

        return collect_completion_stream(chunks())

    with ThreadPoolExecutor(max_workers=1) as pool:
        long_future = pool.submit(run_long)
        if not started.wait(timeout=60):
            long_future.result(timeout=60)  # raises what the long request raised, if anything
            raise AssertionError("the long stream sent no chunk within 60 s")
        short_joined = complete(client, COUNTING_PROMPT, max_tokens=8)
        long_joined = long_future.result(timeout=120)
    _assert_same_answers([long_joined, short_joined], [long_alone, short_alone])


# 32 different prompts: topics x openings, so every request has its own text.
_TOPICS = ["the sea", "a dragon", "bread", "the moon", "a robot", "winter", "a library", "the river"]
_OPENINGS = ["Write one sentence about {}.", "Tell me a fact about {}.", "Describe {} in a few words.", "A poem about {}:"]
THIRTY_TWO = [opening.format(topic) for topic in _TOPICS for opening in _OPENINGS]


def test_thirty_two_concurrent_greedy_requests_each_match_alone(client: openai.OpenAI) -> None:
    """32 different greedy requests at once (half chat, half completions, half streamed) each equal the request alone."""
    requests: list[Callable[[], Result]] = []
    for i, prompt in enumerate(THIRTY_TWO):
        stream = i % 4 < 2
        if i % 2:
            requests.append(lambda p=prompt, s=stream: chat(client, [{"role": "user", "content": p}], max_tokens=16, stream=s))
        else:
            requests.append(lambda p=prompt, s=stream: complete(client, p, max_tokens=16, stream=s))
    alone = [call() for call in requests]
    together = _run_together(requests)
    _assert_same_answers(together, alone)
