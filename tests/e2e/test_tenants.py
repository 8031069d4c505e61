"""Tenants and API keys on a server started with a tenants file: `tokenmill tenants add`, 401s in
OpenAI's shape, usage billed to the key's tenant, and fair admission when one tenant floods."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from conftest import Server, server_binary, start_server
from e2e_support import MODEL, STORY_PROMPT, assert_error_body, httpx


@dataclass
class KeyedServer:
    server: Server
    keys: dict[str, str]  # tenant -> key
    tenants_file: Path
    usage_log: Path


def _add_key(binary: Path, tenants_file: Path, name: str, weight: int) -> str:
    done = subprocess.run(
        [str(binary), "tenants", "--file", str(tenants_file), "add", name, "--weight", str(weight)],
        capture_output=True,
        text=True,
        check=True,
    )
    key = done.stdout.strip()
    assert key.startswith("sk-tm-") and "\n" not in key, done.stdout
    assert key not in done.stderr
    return key


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """A server with tenants "flood" (weight 2) and "trickle" (weight 1), running at most 3 sequences at once."""
    binary = server_binary()
    directory = tmp_path_factory.mktemp("tenants")
    tenants_file = directory / "tenants.toml"
    usage_log = directory / "usage.jsonl"
    keys = {"flood": _add_key(binary, tenants_file, "flood", 2), "trickle": _add_key(binary, tenants_file, "trickle", 1)}
    args = ["--tenants", str(tenants_file), "--usage-log", str(usage_log), "--max-num-seqs", "3"]
    with start_server(binary, args) as server:
        yield KeyedServer(server, keys, tenants_file, usage_log)


def _client(keyed: KeyedServer, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed.server.base_url, api_key=keyed.keys[tenant], max_retries=0, timeout=120)


def test_the_tenants_file_keeps_only_hashes(keyed: KeyedServer) -> None:
    """The file names both tenants with their weights and holds no key in clear."""
    text = keyed.tenants_file.read_text()
    for key in keyed.keys.values():
        assert key not in text
    assert 'name = "flood"' in text and "weight = 2" in text
    assert text.count("sha256 = ") == 2


def test_missing_and_wrong_keys_get_401_in_openai_shape(keyed: KeyedServer) -> None:
    """No key, a wrong key and a malformed header are 401 with an OpenAI error; /health needs no key."""
    root = keyed.server.root
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    missing = httpx.post(f"{root}/v1/completions", json=body, timeout=30)
    assert_error_body(missing, 401, param=None)
    assert "API key" in missing.json()["error"]["message"]
    wrong = httpx.post(
        f"{root}/v1/completions", json=body, headers={"Authorization": "Bearer sk-tm-not-a-real-key-000"}, timeout=30
    )
    error = assert_error_body(wrong, 401, param=None)
    assert error["code"] == "invalid_api_key"
    assert "sk-tm-not-a-real-key-000" not in error["message"], "the presented key is echoed back"
    basic = httpx.get(f"{root}/v1/models", headers={"Authorization": "Basic abc"}, timeout=30)
    assert_error_body(basic, 401, param=None)
    assert httpx.get(f"{root}/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.server.base_url, api_key="sk-tm-wrong", max_retries=0).models.list()


def test_usage_is_billed_to_the_key_tenant(keyed: KeyedServer) -> None:
    """A request made with trickle's key is recorded for tenant trickle and that key's id."""
    response = _client(keyed, "trickle").completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    key_ids = {line.split('"')[1] for line in keyed.tenants_file.read_text().splitlines() if line.startswith("id = ")}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in keyed.usage_log.read_text().splitlines()]
        found = [r for r in records if r.get("request_id") == response.id]
        if found:
            break
        time.sleep(0.05)
    (record,) = found
    assert record["tenant"] == "trickle"
    assert record["key_id"] in key_ids
    assert record["tokens"]["completion_tokens"] == response.usage.completion_tokens


def test_a_flooding_tenant_does_not_starve_another(keyed: KeyedServer) -> None:
    """flood sends 20 requests, then trickle 2 (10:1). With weights 2:1 and 3 sequences at a time, flood gets about
    two of every three places while both wait: trickle's requests finish after about 4 of flood's, not after all 20."""
    flood, trickle = _client(keyed, "flood"), _client(keyed, "trickle")
    finished: list[tuple[float, str]] = []
    lock = threading.Lock()

    def run(client: openai.OpenAI, tenant: str) -> None:
        client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=12, temperature=0)
        with lock:
            finished.append((time.monotonic(), tenant))

    with ThreadPoolExecutor(max_workers=22) as pool:
        floods = [pool.submit(run, flood, "flood") for _ in range(20)]
        time.sleep(0.5)  # the flood is queued before the trickle arrives
        trickle_sent = time.monotonic()
        trickles = [pool.submit(run, trickle, "trickle") for _ in range(2)]
        for future in floods + trickles:
            future.result()
    # Only what finished while both tenants had work: from the trickle's arrival on.
    order = [tenant for at, tenant in sorted(finished) if at >= trickle_sent]
    last_trickle = max(i for i, tenant in enumerate(order) if tenant == "trickle")
    flood_before = order[:last_trickle].count("flood")
    # Arrival order alone would finish 20 floods first; fair shares give about 2 per trickle request.
    assert flood_before <= 8, order
    assert flood_before >= 1, order


def test_sighup_reloads_the_tenants_file_and_a_bad_file_keeps_the_keys_in_force(tmp_path: Path) -> None:
    """A key added while the server runs works after SIGHUP; a broken file on SIGHUP changes nothing."""
    binary = server_binary()
    tenants_file = tmp_path / "tenants.toml"
    first = _add_key(binary, tenants_file, "first", 1)
    with start_server(binary, ["--tenants", str(tenants_file), "--no-ledger"]) as server:
        def status(key: str) -> int:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
            return httpx.post(f"{server.base_url}/completions", json=body,
                              headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code

        def after_hangup(key: str, want: int) -> int:
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while (got := status(key)) != want and time.monotonic() < deadline:
                time.sleep(0.1)
            return got

        second = _add_key(binary, tenants_file, "second", 3)
        assert status(first) == 200
        assert status(second) == 401, "the file is read at start and on SIGHUP only"
        assert after_hangup(second, 200) == 200
        assert status(first) == 200

        tenants_file.write_text("this is not [ toml")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "not reloaded" not in server.log_path.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "not reloaded" in server.log_path.read_text(errors="replace")
        assert status(first) == 200 and status(second) == 200
        assert server.process.poll() is None, "SIGHUP must not stop the server"
