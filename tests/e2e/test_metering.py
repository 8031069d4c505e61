"""Metering through the real server: the usage log holds exactly one record per request, equal to
the usage the client was given, including requests whose client went away."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai

from e2e_support import MODEL, STORY_PROMPT, httpx

RECORD_WAIT_S = 30.0


def _records(path: Path, kind: str) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["kind"] == kind]


def _usage_of(path: Path, request_id: str) -> dict:
    """The usage record of `request_id`, waiting for it to be written."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while time.monotonic() < deadline:
        found = [r for r in _records(path, "usage") if r["request_id"] == request_id]
        if found:
            assert len(found) == 1, f"{len(found)} usage records for {request_id}"
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no usage record for {request_id} within {RECORD_WAIT_S} s")


def test_the_client_usage_is_the_metered_record(client: openai.OpenAI, tokenmill_server) -> None:
    """A finished request's usage (JSON and streamed) equals its one record in the usage log, to the token."""
    log = tokenmill_server.usage_log
    whole = client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=7, temperature=0)
    record = _usage_of(log, whole.id)
    assert record["tenant"] == "anonymous" and record["key_id"] == "none"
    assert record["finish_reason"] == "length"
    assert record["tokens"] == {
        "prompt_tokens": whole.usage.prompt_tokens,
        "cached_prompt_tokens": whole.usage.prompt_tokens_details.cached_tokens,
        "completion_tokens": whole.usage.completion_tokens,
    }
    assert record["device_seconds"] > 0

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    record = _usage_of(log, chunks[-1].id)
    assert record["tokens"]["prompt_tokens"] == usage.prompt_tokens
    assert record["tokens"]["completion_tokens"] == usage.completion_tokens


def test_a_client_that_leaves_is_billed_the_tokens_made_with_finish_cancelled(tokenmill_server) -> None:
    """Dropping a stream after 5 tokens yields one usage record, finish "cancelled", billing the tokens generated."""
    body = {"model": MODEL, "prompt": STORY_PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
    received = 0
    request_id = None
    with httpx.Client(base_url=tokenmill_server.base_url, timeout=60) as http:
        with http.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[len("data: ") :])
                    request_id = chunk["id"]
                    received += 1
                    if received == 5:
                        break
    assert request_id is not None
    record = _usage_of(tokenmill_server.usage_log, request_id)
    assert record["finish_reason"] == "cancelled"
    generated = record["tokens"]["completion_tokens"]
    # At least the tokens the client saw; the engine notices the closed stream within a step or two.
    assert 5 <= generated < 5 + 20, record


def test_capacity_records_cover_the_run_without_gaps(tokenmill_server) -> None:
    """Capacity records follow each other without gaps, never report more busy than wall time, and split by tenant."""
    log = tokenmill_server.usage_log
    deadline = time.monotonic() + RECORD_WAIT_S
    records: list[dict] = []
    while time.monotonic() < deadline and len(records) < 2:
        records = _records(log, "capacity")
        time.sleep(0.5)
    assert len(records) >= 2, "the server writes a capacity record every 10 s"
    for earlier, later in zip(records, records[1:]):
        assert earlier["end"] == later["start"]
    for record in records:
        assert 0 <= record["busy_seconds"] <= record["wall_seconds"] + 1e-9
        assert sum(t["tokens"] for t in record["tenants"]) == record["tokens"]
        assert abs(sum(t["busy_seconds"] for t in record["tenants"]) - record["busy_seconds"]) < 1e-6 or (
            record["busy_seconds"] == record["wall_seconds"]
        )
    assert any(record["tokens"] > 0 for record in records), "the session's requests show as busy capacity"
