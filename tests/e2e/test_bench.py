"""`tokenmill bench`: against the real server, a misbehaving fake server, and the engine.

- Against the session's real `tokenmill serve`, the token counts the bench records for
  every request equal the server's own usage records (its --usage-log), joined by
  response id.
- A fake server that answers errors, drops connections mid-stream and sends malformed
  SSE makes the bench count each failure by kind and finish normally.
- The same seed sends the same prompts and lengths (seen from the server side).
- `bench engine` runs a sweep in-process and draws its plots; `bench report` combines
  results files.
- Every results file validates against docs/bench-result.schema.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest

from conftest import REPO_ROOT, Server, server_binary
from e2e_support import MODEL

SCHEMA = json.loads((REPO_ROOT / "docs" / "bench-result.schema.json").read_text())
CACHE = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `tokenmill bench ARGS`; fails the test unless it exits 0 (or, with ok=False, non-zero)."""
    command = [str(server_binary()), "bench", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert (done.returncode == 0) == ok, \
        f"{command} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def load_results(path: Path) -> dict:
    results = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(results, SCHEMA, cls=jsonschema.Draft202012Validator)
    return results


def usage_records(path: Path) -> dict[str, dict]:
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "usage":
            records[record["request_id"]] = record
    return records


def test_token_counts_equal_the_servers_usage_records(tokenmill_server: Server, tmp_path: Path) -> None:
    if tokenmill_server.usage_log is None:
        pytest.skip("an external server: its usage log is not ours to read")
    out = tmp_path / "serve.json"
    done = bench(
        "serve", "--base-url", tokenmill_server.base_url, "--model", MODEL,
        "--concurrency", "2", "--num-requests", "4", "--warmup", "1",
        "--input-len", "uniform:12:24", "--output-len", "8", "--ignore-eos",
        "--seed", "3", "--goodput", "ttft_ms=60000", "--json", str(out), "--no-progress",
    )
    assert "| serve | concurrency 2 | 4 | 0 |" in done.stdout, done.stdout
    results = load_results(out)
    level = results["levels"][0]
    assert level["summary"]["completed"] == 4 and level["summary"]["errors"] == {}
    assert level["summary"]["goodput"]["good_requests"] == 4
    usage = usage_records(tokenmill_server.usage_log)
    for request in level["requests"]:
        assert request["ok"], request
        record = usage[request["response_id"]]
        assert request["prompt_tokens"] == record["tokens"]["prompt_tokens"]
        assert request["output_tokens"] == record["tokens"]["completion_tokens"] == 8
        assert request["output_tokens_source"] == "usage"
        # Synthetic prompts are exactly as long as drawn, in the server's own count.
        assert request["prompt_tokens"] == request["expected_prompt_tokens"]
        assert 12 <= request["prompt_tokens"] <= 24
        # One chunk per token, unless the server held text back (a split UTF-8 character,
        # an end-of-text token past which ignore_eos goes on): then the bench says so.
        assert 1 <= request["content_chunks"] <= 8
        assert (request["token_mismatch"] is None) == (request["content_chunks"] == 8)
        assert len(request["itl_ms"]) == request["content_chunks"] - 1
        assert 0 < request["ttft_ms"] <= request["e2e_ms"]
    assert level["summary"]["output_tokens"] == 32


def test_chat_prompts_count_the_template_and_say_so(tokenmill_server: Server, tmp_path: Path) -> None:
    if tokenmill_server.usage_log is None:
        pytest.skip("an external server: its usage log is not ours to read")
    out = tmp_path / "chat.json"
    bench(
        "serve", "--base-url", tokenmill_server.base_url, "--model", MODEL, "--endpoint", "chat",
        "--num-requests", "2", "--warmup", "0", "--input-len", "10", "--output-len", "6",
        "--ignore-eos", "--json", str(out), "--no-progress",
    )
    level = load_results(out)["levels"][0]
    usage = usage_records(tokenmill_server.usage_log)
    for request in level["requests"]:
        record = usage[request["response_id"]]
        assert request["output_tokens"] == record["tokens"]["completion_tokens"] == 6
        # The chat template wraps the 10-token message: the difference is reported.
        assert request["prompt_tokens"] == record["tokens"]["prompt_tokens"] > 10
        assert "usage.prompt_tokens" in request["token_mismatch"]
    assert level["summary"]["token_mismatches"] == 2


# ---------------------------------------------------------------------------
# A server that misbehaves on purpose


MODES = ["ok", "http_500", "http_429", "truncated", "dropped", "malformed", "stream_error", "miscount", "cut_short"]


class FakeServer:
    """Answers request n with MODES[n % len(MODES)]; remembers every request body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    mode = MODES[len(fake.bodies) % len(MODES)]
                    fake.bodies.append(body)
                fake.answer(self, mode)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(h: BaseHTTPRequestHandler, mode: str) -> None:
        def chunk(text: str, finish: str | None = None) -> bytes:
            reason = json.dumps(finish)
            return f'data: {{"id":"cmpl-fake","choices":[{{"index":0,"text":"{text}","finish_reason":{reason}}}]}}\n\n'.encode()

        usage = b'data: {"id":"cmpl-fake","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":%d}}\n\n'
        if mode.startswith("http_"):
            status = int(mode[5:])
            payload = json.dumps({"error": {"message": f"fake {status}", "type": "x"}}).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        if mode == "dropped":
            # Chunked framing cut inside a chunk: a transport error for the client.
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            data = chunk("a")
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.write(b"100\r\ndata: {\"id\"")
            h.wfile.flush()
            h.close_connection = True
            return
        h.send_header("Connection", "close")
        h.end_headers()
        if mode == "truncated":
            # A clean close before [DONE].
            h.wfile.write(chunk("a") + chunk("b"))
        elif mode == "malformed":
            h.wfile.write(chunk("a") + b"data: {not json\n\n" + b"data: [DONE]\n\n")
        elif mode == "stream_error":
            h.wfile.write(chunk("a") + b'data: {"error":{"message":"engine fell over"}}\n\n' + b"data: [DONE]\n\n")
        elif mode == "cut_short":
            # [DONE] before any finish_reason (as llama-cpp-python interrupts a stream).
            h.wfile.write(chunk("a") + b"data: [DONE]\n\n")
        else:
            count = 3 if mode == "ok" else 5
            h.wfile.write(chunk("a") + chunk("b") + chunk("c", "length") + usage % count + b"data: [DONE]\n\n")
        h.close_connection = True

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one two"}\n{"prompt": "three four", "output_len": 3}\n')
    return path


def test_a_misbehaving_server_is_reported_not_fatal(fake_server: FakeServer, prompt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "fake.json"
    done = bench(
        "serve", "--base-url", fake_server.base_url, "--model", "fake", "--prompts", str(prompt_file),
        "--num-requests", str(len(MODES)), "--warmup", "0", "--output-len", "3",
        "--timeout", "20", "--json", str(out), "--no-progress",
    )
    level = load_results(out)["levels"][0]
    summary = level["summary"]
    assert summary["errors"] == {
        "http_500": 1, "http_429": 1, "incomplete_stream": 1, "connection_dropped": 1,
        "malformed_sse": 1, "stream_error": 1, "no_finish_reason": 1,
    }, summary
    assert (summary["completed"], summary["failed"]) == (2, 7)
    by_index = {r["index"]: r for r in level["requests"]}
    ok, miscount = by_index[0], by_index[MODES.index("miscount")]
    assert ok["ok"] and ok["output_tokens"] == 3 and ok["token_mismatch"] is None
    assert miscount["ok"] and miscount["output_tokens"] == 5
    assert "completion_tokens is 5 but 3 content chunks" in miscount["token_mismatch"]
    assert summary["token_mismatches"] == 1
    assert by_index[1]["error"]["message"] == "fake 500"
    assert "failed with http_429 (first: fake 429)" in done.stdout
    assert "token counts disagreed in 1 requests" in done.stdout


def test_an_unreachable_server_is_counted_as_connect_errors(prompt_file: Path, tmp_path: Path) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    out = tmp_path / "down.json"
    done = bench(
        "serve", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "fake", "--prompts", str(prompt_file),
        "--num-requests", "3", "--warmup", "1", "--json", str(out), "--no-progress", ok=False,
    )
    # Nothing measured is a failure of the run, and the results still say why.
    assert "every request of level concurrency 1 failed (3 connect)" in done.stderr, done.stderr
    level = load_results(out)["levels"][0]
    assert level["summary"]["errors"] == {"connect": 3}
    assert level["warmup_failed"] == 1


def test_the_base_url_works_with_or_without_v1_and_a_wrong_one_fails_the_run(
        tokenmill_server: Server, tmp_path: Path) -> None:
    root = tokenmill_server.base_url.removesuffix("/v1")
    common = ["--model", MODEL, "--tokenizer", str(GGUF), "--num-requests", "2", "--warmup", "0",
              "--input-len", "8", "--output-len", "2", "--no-progress"]
    for base in [root, root + "/", tokenmill_server.base_url]:
        out = tmp_path / "ok.json"
        bench("serve", "--base-url", base, *common, "--json", str(out))
        assert load_results(out)["levels"][0]["summary"]["completed"] == 2, base
    # A base URL the server does not serve: every request is a 404, and the
    # run exits non-zero instead of reporting a level of nothing.
    wrong = bench("serve", "--base-url", root + "/nope", *common, ok=False)
    assert "every request of level" in wrong.stderr and "http_404" in wrong.stderr, wrong.stderr


def test_the_same_seed_sends_the_same_work(fake_server: FakeServer, tmp_path: Path) -> None:
    if not GGUF.is_file():
        pytest.fail(f"no model at {GGUF}: run models/fetch-smollm2.sh", pytrace=False)

    def sent(seed: int) -> list[tuple[str, int]]:
        start = len(fake_server.bodies)
        bench(
            "serve", "--base-url", fake_server.base_url, "--model", "fake", "--tokenizer", str(GGUF),
            "--num-requests", "4", "--warmup", "0", "--input-len", "uniform:5:40",
            "--output-len", "uniform:1:50", "--seed", str(seed), "--no-progress",
        )
        return [(b["prompt"], b["max_tokens"]) for b in fake_server.bodies[start:]]

    first, again, other = sent(11), sent(11), sent(12)
    assert first == again
    assert first != other
    assert len({p for p, _ in first}) == 4, "prompts differ from request to request"


def test_engine_sweep_with_plots_and_a_combined_report(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    plots = tmp_path / "plots"
    done = bench(
        "engine", "--model", MODEL, "--sweep", "concurrency=1,2", "--num-requests", "2", "--warmup", "1",
        "--input-len", "16", "--output-len", "4", "--ignore-eos", "--json", str(out),
        "--plots", str(plots), "--no-progress",
    )
    assert "| engine | concurrency 1 |" in done.stdout and "| engine | concurrency 2 |" in done.stdout
    results = load_results(out)
    assert results["target"]["kind"] == "engine"
    assert [lv["load"]["concurrency"] for lv in results["levels"]] == [1, 2]
    for level in results["levels"]:
        assert level["summary"]["completed"] == 2
        for request in level["requests"]:
            assert (request["prompt_tokens"], request["output_tokens"]) == (16, 4)
    for name in ("latency_cdf_engine.png", "throughput_vs_concurrency.png", "latency_vs_concurrency.png"):
        png = plots / name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert png.stat().st_size > 10_000, f"{name} looks empty"

    # Two results side by side: one table, one set of plots with a line each.
    second = tmp_path / "engine2.json"
    copy = dict(results, label="again")
    second.write_text(json.dumps(copy))
    combined = tmp_path / "combined"
    done = bench("report", str(out), str(second), "--plots", str(combined))
    assert "| again | concurrency 2 |" in done.stdout
    assert (combined / "latency_cdf_again.png").is_file()
    assert (combined / "throughput_vs_concurrency.png").is_file()
