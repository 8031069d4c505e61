"""Graceful drain on SIGTERM, with real processes: readiness flips first, new requests get 503,
requests in flight finish (or are cut at the deadline, billed, with finish "shutdown"), exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from conftest import server_binary, start_server
from e2e_support import MODEL, STORY_PROMPT, httpx

STREAMS = 50


def _stream(base_url: str, max_tokens: int, first_chunk: threading.Semaphore) -> dict:
    """One streamed completion, read to its end; what arrived."""
    body = {"model": MODEL, "prompt": STORY_PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    out: dict = {"text_chunks": 0, "finish": None, "usage": None, "error": None, "done": False, "id": None}
    with httpx.Client(base_url=base_url, timeout=300) as http:
        with http.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = chunk["error"]
                    continue
                out["id"] = chunk["id"]
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["text"]:
                        out["text_chunks"] += 1
                        if out["text_chunks"] == 1:
                            first_chunk.release()
                    out["finish"] = choice["finish_reason"] or out["finish"]
    return out


def _usage_records(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["request_id"]: r for r in lines if r["kind"] == "usage"}


def _drain_run(tmp_path: Path, drain_timeout: float, max_tokens: int):
    usage_log = tmp_path / "usage.jsonl"
    args = ["--no-auth", "--usage-log", str(usage_log), "--drain-timeout", str(drain_timeout)]
    first_chunk = threading.Semaphore(0)
    with start_server(server_binary(), args) as server:
        with ThreadPoolExecutor(max_workers=STREAMS) as pool:
            futures = [pool.submit(_stream, server.base_url, max_tokens, first_chunk) for _ in range(STREAMS)]
            for _ in range(STREAMS):  # every stream is under way
                assert first_chunk.acquire(timeout=120)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(f"{server.root}/health/ready", timeout=10)
            live = httpx.get(f"{server.root}/health/live", timeout=10)
            refused = httpx.post(f"{server.base_url}/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=10)
            results = [f.result(timeout=300) for f in futures]
        code = server.process.wait(timeout=60)
    return results, ready, live, refused, code, _usage_records(usage_log)


def test_sigterm_lets_fifty_streams_finish_then_exits_zero(tmp_path: Path) -> None:
    """SIGTERM during 50 streams: readiness 503 and new requests 503 at once, every stream completes, exit 0."""
    results, ready, live, refused, code, records = _drain_run(tmp_path, drain_timeout=120, max_tokens=24)
    assert ready.status_code == 503 and live.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "shutting_down"
    assert code == 0
    for r in results:
        assert r["done"] and r["error"] is None and r["finish"] == "length", r
        assert r["usage"]["completion_tokens"] == 24
        record = records[r["id"]]
        assert record["finish_reason"] == "length"
        assert record["tokens"]["completion_tokens"] == 24
    assert len(records) == STREAMS


def test_streams_past_the_drain_deadline_are_cut_and_billed(tmp_path: Path) -> None:
    """With a 1 s deadline, 50 long streams are cut: each ends like any other stream, with a last chunk
    whose finish_reason is "shutdown", the usage chunk it asked for (equal to its ledger record) and
    [DONE]; exit 0."""
    results, ready, _, _, code, records = _drain_run(tmp_path, drain_timeout=1, max_tokens=3000)
    assert ready.status_code == 503
    assert code == 0
    assert len(records) == STREAMS
    for r in results:
        assert r["done"] and r["error"] is None and r["finish"] == "shutdown", r
        record = records[r["id"]]
        assert record["finish_reason"] == "shutdown"
        assert record["tokens"]["completion_tokens"] >= r["text_chunks"] > 0
        assert r["usage"]["completion_tokens"] == record["tokens"]["completion_tokens"], (r, record)
        assert r["usage"]["prompt_tokens"] == record["tokens"]["prompt_tokens"], (r, record)
