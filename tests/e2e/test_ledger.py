"""The signed usage ledger with real processes and files: records match the responses clients got,
the ledger verifies offline with the public key alone, survives SIGKILL, and catches tampering."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from conftest import server_binary, start_server
from e2e_support import MODEL, STORY_PROMPT, httpx


def _tokenmill(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(server_binary()), *args], capture_output=True, text=True, check=check, timeout=120)


def _exported(ledger: Path) -> list[dict]:
    out = _tokenmill("ledger", "export", str(ledger), "--format", "jsonl").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _usage_ids(records: list[dict]) -> list[str]:
    return [r["request_id"] for r in records if r["type"] == "usage"]


def test_first_start_makes_a_private_key_and_records_verify_offline(tmp_path: Path) -> None:
    """A fresh data dir gets ledger.key (0600) and ledger.pub; after SIGTERM every response's id has one
    record, and `ledger verify` with the public key alone says ok."""
    data = tmp_path / "data"
    with start_server(server_binary(), ["--no-auth", "--data-dir", str(data)]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        ids = [client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=3, temperature=0).id
               for _ in range(5)]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        log = server.log_path.read_text()
    assert "ledger public key" in log
    key = data / "ledger.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = data / "ledger.pub"
    verified = _tokenmill("ledger", "verify", str(data / "ledger"), "--public-key", str(public))
    assert verified.stdout.startswith("ok:"), verified.stdout
    records = _exported(data / "ledger")
    usage_ids = _usage_ids(records)
    assert sorted(usage_ids) == sorted(ids), "one record per response, named by the response id"
    assert [r["seq"] for r in records] == list(range(len(records)))

    # The server refuses a private key others can read.
    os.chmod(key, 0o644)
    refused = subprocess.run(
        [str(server_binary()), "serve", "--no-auth", "--data-dir", str(data), "--port", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0 and "600" in refused.stderr


def test_sigkill_under_load_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """SIGKILL while 120 clients stream; restart on the same data dir: every request whose client got its
    final usage has exactly one record, nothing is recorded twice, and the ledger verifies."""
    data = tmp_path / "data"
    acknowledged: list[str] = []
    lock = threading.Lock()

    def stream(i: int, base_url: str) -> None:
        body = {"model": MODEL, "prompt": f"{i} {STORY_PROMPT}", "max_tokens": 6 + i % 20, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.Client(base_url=base_url, timeout=120) as http:
                with http.stream("POST", "/completions", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                with lock:
                                    acknowledged.append(chunk["id"])
        except (httpx.HTTPError, OSError):
            pass  # the server died under this client

    with start_server(server_binary(), ["--no-auth", "--data-dir", str(data), "--max-num-seqs", "64"]) as server:
        with ThreadPoolExecutor(max_workers=120) as pool:
            futures = [pool.submit(stream, i, server.base_url) for i in range(120)]
            deadline = time.monotonic() + 120
            while len(acknowledged) < 30 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=30)
            for f in futures:
                f.result(timeout=120)
    assert 30 <= len(acknowledged) < 120, "the kill must land mid-run"

    with start_server(server_binary(), ["--no-auth", "--data-dir", str(data)]) as server:
        assert httpx.get(f"{server.root}/health", timeout=10).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    verified = _tokenmill("ledger", "verify", str(data / "ledger"), "--public-key", str(data / "ledger.pub"))
    assert verified.stdout.startswith("ok:"), verified.stdout
    ids = _usage_ids(_exported(data / "ledger"))
    assert len(ids) == len(set(ids)), "a record exists twice"
    missing = set(acknowledged) - set(ids)
    assert not missing, f"{len(missing)} acknowledged requests have no record"


def test_proofs_check_with_public_keys_alone_and_tampering_is_named(tmp_path: Path) -> None:
    """prove/check-proof for a record and for consistency; a flipped byte makes verify fail naming the place."""
    data = tmp_path / "data"
    ledger, public = data / "ledger", data / "ledger.pub"
    with start_server(server_binary(), ["--no-auth", "--data-dir", str(data), "--checkpoint-every", "3"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        for _ in range(7):
            client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=2, temperature=0)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    proof = tmp_path / "record.proof"
    _tokenmill("ledger", "prove", str(ledger), "--record", "2", "--public-key", str(public), "--out", str(proof))
    checked = _tokenmill("ledger", "check-proof", str(proof), "--checkpoint", f"{proof}.checkpoint",
                         "--public-key", str(public))
    assert checked.stdout.startswith("ok: record 2 is in"), checked.stdout
    # The checkpoint notes' second lines are their tree sizes (docs/ledger-format.md).
    text = (ledger / "checkpoints").read_bytes().decode("utf-8", errors="replace")
    sizes = sorted({int(line) for line in text.splitlines() if line.strip().isdigit()})
    assert len(sizes) >= 2, f"checkpoints every 3 records: {sizes}"
    cons = tmp_path / "consistency.proof"
    _tokenmill("ledger", "prove", str(ledger), "--consistency", str(sizes[0]), str(sizes[-1]),
               "--public-key", str(public), "--out", str(cons))
    checked = _tokenmill("ledger", "check-proof", str(cons), "--checkpoint", f"{cons}.checkpoint",
                         "--old-checkpoint", f"{cons}.old-checkpoint", "--public-key", str(public))
    assert checked.stdout.startswith("ok: the checkpoint of"), checked.stdout

    segments = sorted(p for p in ledger.iterdir() if p.suffix == ".seg")
    assert segments, list(ledger.iterdir())
    segment = segments[0]
    original = segment.read_bytes()
    rng = random.Random(7)
    for offset in rng.sample(range(len(original)), 12):
        tampered = bytearray(original)
        tampered[offset] ^= 0x5A
        segment.write_bytes(bytes(tampered))
        result = _tokenmill("ledger", "verify", str(ledger), "--public-key", str(public), check=False)
        assert result.returncode != 0, f"flipping byte {offset} went unnoticed"
        assert segment.name in result.stderr and "byte" in result.stderr, result.stderr
    segment.write_bytes(original)
    assert _tokenmill("ledger", "verify", str(ledger), "--public-key", str(public)).returncode == 0


def _delete_nats_stream(stream: str) -> None:
    """Deletes a JetStream stream through NATS's text protocol, so the test leaves the server as it found it."""
    with socket.create_connection(("127.0.0.1", 4222), timeout=10) as sock:
        inbox = f"_INBOX.e2e.{random.randrange(1 << 30)}"
        sock.sendall(f'CONNECT {{"verbose":false}}\r\nSUB {inbox} 1\r\n'
                     f"PUB $JS.API.STREAM.DELETE.{stream} {inbox} 0\r\n\r\n".encode())
        reply = b""
        while b"MSG " not in reply:  # the API's answer arrives as a message on the inbox
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk.replace(b"PING\r\n", b"")
            if b"PING" in chunk:
                sock.sendall(b"PONG\r\n")
    assert b'"success":true' in reply, reply


def test_the_ledger_published_to_nats_rebuilds_a_ledger_that_verifies(tmp_path: Path) -> None:
    """serve --nats-url publishes every record and checkpoint; `ledger pull` rebuilds the same ledger."""
    data = tmp_path / "data"
    stream = f"e2e-{os.getpid()}-{random.randrange(1 << 30)}"
    try:
        _publish_and_pull(tmp_path, data, stream)
    finally:
        _delete_nats_stream(stream)


def _publish_and_pull(tmp_path: Path, data: Path, stream: str) -> None:
    args = ["--no-auth", "--data-dir", str(data), "--nats-url", "nats://127.0.0.1:4222", "--nats-stream", stream]
    with start_server(server_binary(), args) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        for _ in range(4):
            client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=2, temperature=0)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    rebuilt = tmp_path / "rebuilt"
    pulled = _tokenmill("ledger", "pull", "--nats", "nats://127.0.0.1:4222", "--stream", stream,
                        "--out", str(rebuilt), "--public-key", str(data / "ledger.pub"))
    assert pulled.stdout.startswith("ok:"), pulled.stdout
    assert _exported(rebuilt) == _exported(data / "ledger")
    verified = _tokenmill("ledger", "verify", str(rebuilt), "--public-key", str(data / "ledger.pub"))
    original = _tokenmill("ledger", "verify", str(data / "ledger"), "--public-key", str(data / "ledger.pub"))
    # Same records, checkpoints (the final one at shutdown included) and root.
    assert verified.stdout == original.stdout.replace(str(data / "ledger"), str(rebuilt))
    assert "0 records after the last checkpoint" in verified.stdout
