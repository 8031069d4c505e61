"""`tokenmill witness serve` against a log written here, in Python, from the C2SP
texts alone (tlog-checkpoint, signed-note, tlog-witness, tlog-cosignature), with
Python's own Ed25519 (`cryptography`): the cosignatures it returns verify with
an implementation that shares no code with ours, its refusals carry the
protocol's statuses, and a witness killed with SIGKILL keeps what it cosigned.
"""

from __future__ import annotations

import base64
import hashlib
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import server_binary

ORIGIN = "cloud.example/ledger"
WITNESS = "backer.example/witness"
DASH = "\u2014"


def _sha256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _leaf(i: int, edit: int | None = None) -> bytes:
    record = f"record {i}" + (", rewritten" if i == edit else "")
    return _sha256(b"\x00", record.encode())


def _root(leaves: list[bytes]) -> bytes:
    """RFC 6962 2.1 Merkle tree hash."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return _sha256(b"\x01", _root(leaves[:k]), _root(leaves[k:]))


def _consistency(leaves: list[bytes], m: int) -> list[bytes]:
    """RFC 6962 2.1.2 PROOF(m, D[n])."""

    def subproof(m: int, d: list[bytes], complete: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if complete else [_root(d)]
        k = 1
        while k * 2 < n:
            k *= 2
        if m <= k:
            return subproof(m, d[:k], complete) + [_root(d[k:])]
        return subproof(m - k, d[k:], False) + [_root(d[:k])]

    return subproof(m, leaves, True)


class LogKey:
    """A log's Ed25519 key, with its signed-note key hash (type 0x01)."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.hash = _sha256(ORIGIN.encode(), b"\n\x01", self.public)[:4]

    def vkey(self) -> str:
        key = base64.b64encode(bytes([0x01]) + self.public).decode()
        return f"{ORIGIN}+{self.hash.hex()}+{key}"

    def sign_note(self, text: str) -> str:
        signature = self.private.sign(text.encode())
        return f"{text}\n{DASH} {ORIGIN} {base64.b64encode(self.hash + signature).decode()}\n"


def _checkpoint(leaves: list[bytes]) -> str:
    return f"{ORIGIN}\n{len(leaves)}\n{base64.b64encode(_root(leaves)).decode()}\n"


def _body(old: int, proof: list[bytes], note: str) -> str:
    return f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof) + "\n" + note


def _verify_cosignature(line: str, text: str, vkey: str) -> int:
    """Checks one cosignature line by the C2SP tlog-cosignature text; returns its time."""
    name, key_id, key = vkey.strip().split("+", 2)
    raw_key = base64.b64decode(key)
    assert raw_key[0] == 0x04, "a cosignature/v1 key has type byte 0x04"
    public = raw_key[1:]
    assert bytes.fromhex(key_id) == _sha256(name.encode(), b"\n\x04", public)[:4]
    assert line.startswith(f"{DASH} {name} ") and line.endswith("\n"), line
    raw = base64.b64decode(line.split(" ")[2])
    assert len(raw) == 4 + 8 + 64
    assert raw[:4] == bytes.fromhex(key_id)
    timestamp = int.from_bytes(raw[4:12], "big")
    message = f"cosignature/v1\ntime {timestamp}\n{text}".encode()
    Ed25519PublicKey.from_public_bytes(public).verify(raw[12:], message)  # raises if invalid
    return timestamp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(state: Path, key: Path, log: LogKey, port: int, log_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(server_binary()), "witness", "serve", "--listen", f"127.0.0.1:{port}", "--key", str(key),
         "--state", str(state), "--log", f"{ORIGIN}={log.vkey()}"],
        stdout=log_file.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_file.read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the witness did not listen:\n{log_file.read_text()}")


def test_cosignatures_verify_independently_and_the_state_survives_sigkill(tmp_path: Path) -> None:
    made = subprocess.run([str(server_binary()), "witness", "key", "--name", WITNESS, "--dir", str(tmp_path / "keys")],
                          capture_output=True, text=True, check=True)
    vkey = made.stdout.strip()
    assert (tmp_path / "keys" / "witness.vkey").read_text().strip() == vkey
    assert (tmp_path / "keys" / "witness.key").stat().st_mode & 0o777 == 0o600
    log = LogKey()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/add-checkpoint"
    args = (tmp_path / "state", tmp_path / "keys" / "witness.key", log, port, tmp_path / "witness.log")
    proc = _start(*args)
    ledger = [_leaf(i) for i in range(13)]
    try:
        with httpx.Client(timeout=10) as http:
            # First contact: old 0, no proof.
            text = _checkpoint(ledger[:5])
            first = http.post(url, content=_body(0, [], log.sign_note(text)))
            assert first.status_code == 200, first.text
            stamp = _verify_cosignature(first.text, text, vkey)
            assert abs(stamp - time.time()) < 120
            # A consistency proof made here, in Python, from 5 to 9.
            text = _checkpoint(ledger[:9])
            second = http.post(url, content=_body(5, _consistency(ledger[:9], 5), log.sign_note(text)))
            assert second.status_code == 200, second.text
            _verify_cosignature(second.text, text, vkey)
            # The log's key over the note is required: another key is 403.
            stranger = LogKey()
            forged = http.post(url, content=_body(9, [], stranger.sign_note(_checkpoint(ledger[:9]))))
            assert forged.status_code == 403, forged.text
        # Killed without warning, restarted on the same state.
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = _start(*args)
        with httpx.Client(timeout=10) as http:
            stale = http.post(url, content=_body(0, [], log.sign_note(_checkpoint(ledger[:13]))))
            assert stale.status_code == 409
            assert stale.headers["content-type"] == "text/x.tlog.size"
            assert stale.text == "9\n"
            # A rewritten history signed with the log's own key: refused.
            rewritten = [_leaf(i, edit=3) for i in range(13)]
            fork = http.post(url, content=_body(9, [], log.sign_note(_checkpoint(rewritten[:9]))))
            assert fork.status_code == 409, fork.text
            longer = http.post(url, content=_body(9, _consistency(rewritten, 9), log.sign_note(_checkpoint(rewritten))))
            assert longer.status_code == 422, longer.text
            # The true history goes on from where it was.
            text = _checkpoint(ledger)
            third = http.post(url, content=_body(9, _consistency(ledger, 9), log.sign_note(text)))
            assert third.status_code == 200, third.text
            _verify_cosignature(third.text, text, vkey)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def _tokenmill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(server_binary()), *args], capture_output=True, text=True, timeout=120)


def test_a_server_keeps_serving_while_its_witness_is_down_and_settlement_rests_on_cosigned_checkpoints(
        tmp_path: Path) -> None:
    import json
    from datetime import datetime, timezone

    import openai

    from conftest import start_server
    from e2e_support import MODEL
    from test_settle import _contract

    origin = "cloud.example/e2e-ledger"
    assert _tokenmill("ledger", "keygen", "--out", str(tmp_path / "log")).returncode == 0
    log_key, log_pub = tmp_path / "log" / "ledger.key", tmp_path / "log" / "ledger.pub"
    assert _tokenmill("witness", "key", "--name", WITNESS, "--dir", str(tmp_path / "w")).returncode == 0
    witness_vkey = tmp_path / "w" / "witness.vkey"
    port = _free_port()
    data = tmp_path / "data"
    ledger = data / "ledger"
    witness_log = tmp_path / "witness.log"

    def verify(*extra: str) -> subprocess.CompletedProcess:
        return _tokenmill("ledger", "verify", str(ledger), "--public-key", str(log_pub),
                          "--witness-key", str(witness_vkey), *extra)

    witness = None
    args = ["--no-auth", "--data-dir", str(data), "--signing-key", str(log_key), "--ledger-origin", origin,
            "--checkpoint-interval-ms", "100", "--witness", f"http://127.0.0.1:{port}={witness_vkey}"]
    try:
        with start_server(server_binary(), args) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            # The witness is down: every request is still served.
            for n in range(3):
                done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=2 + n)
                assert done.usage.completion_tokens >= 1
            assert "cosigned no checkpoint" in verify().stdout
            # The witness comes up; the server catches up with one proof.
            witness = subprocess.Popen(
                [str(server_binary()), "witness", "serve", "--listen", f"127.0.0.1:{port}",
                 "--key", str(tmp_path / "w" / "witness.key"), "--state", str(tmp_path / "wstate"),
                 "--log", f"{origin}={log_pub}"],
                stdout=witness_log.open("ab"), stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and "cosigned size" not in verify().stdout:
                time.sleep(0.5)
            assert "cosigned size" in verify().stdout, witness_log.read_text()
            client.completions.create(model=MODEL, prompt="And then", max_tokens=3)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
        # The final checkpoint, signed at shutdown, was cosigned on the way out.
        final = verify("--min-cosigners", "1")
        assert final.returncode == 0, final.stdout + final.stderr
    finally:
        if witness is not None:
            witness.send_signal(signal.SIGTERM)
            witness.wait(timeout=10)

    export = _tokenmill("ledger", "export", str(ledger), "--format", "jsonl")
    usage = [r for r in map(json.loads, export.stdout.splitlines()) if r["type"] == "usage"]
    assert len(usage) == 4
    month = datetime.fromisoformat(usage[0]["finished_at"][:19]).replace(tzinfo=timezone.utc)
    contract = tmp_path / "contract.toml"
    _contract(contract, usage[0]["model"], month)

    def settle(ledger_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return _tokenmill("settle", "--contract", str(contract), "--ledger", str(ledger_dir),
                          "--public-key", str(log_pub), "--period", f"{month:%Y-%m}", "--format", "json", *extra)

    witnessed = settle(ledger, "--witness-key", str(witness_vkey), "--min-cosigners", "1")
    assert witnessed.returncode == 0, witnessed.stderr
    statement = json.loads(witnessed.stdout)
    assert statement["checkpoint"]["cosigned_by"] == [WITNESS]
    assert statement["records"]["usage"] == 4
    plain = json.loads(settle(ledger).stdout)
    assert plain["revenue"] == statement["revenue"], "the same history, the same money"

    # The JSON lines export carries the cosigned checkpoints; a ledger
    # rebuilt from it settles on them the same way.
    full = _tokenmill("ledger", "export", str(ledger), "--format", "jsonl", "--checkpoints")
    kinds = [json.loads(line)["type"] for line in full.stdout.splitlines()]
    assert "cosigned_checkpoint" in kinds
    assert kinds.index("cosigned_checkpoint") > kinds.index("checkpoint")
    exported = tmp_path / "export.jsonl"
    exported.write_text(full.stdout)
    rebuilt = tmp_path / "rebuilt"
    imported = _tokenmill("ledger", "import", str(exported), "--out", str(rebuilt), "--public-key", str(log_pub))
    assert imported.returncode == 0, imported.stderr
    again = settle(rebuilt, "--witness-key", str(witness_vkey), "--min-cosigners", "1")
    assert again.returncode == 0 and again.stdout == witnessed.stdout, again.stderr

    # Another history under the same key and origin (the cloud's second
    # ledger): the witness never saw it, so it cannot be settled on.
    fork_data = tmp_path / "fork"
    fork_args = ["--no-auth", "--data-dir", str(fork_data), "--signing-key", str(log_key), "--ledger-origin", origin]
    with start_server(server_binary(), fork_args) as server:
        openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0).completions.create(
            model=MODEL, prompt="A different story", max_tokens=2)
    fork = fork_data / "ledger"
    assert settle(fork).returncode == 0, "it verifies under the cloud's own key"
    refused = settle(fork, "--witness-key", str(witness_vkey))
    assert refused.returncode != 0 and "no checkpoint" in refused.stderr, refused.stderr
    # Borrowing the true ledger's cosignatures does not help: they cosign another root.
    (fork / "cosignatures").write_bytes((ledger / "cosignatures").read_bytes())
    borrowed = settle(fork, "--witness-key", str(witness_vkey))
    assert borrowed.returncode != 0 and "not one of the ledger's own" in borrowed.stderr, borrowed.stderr


def test_the_documented_witness_vector_verifies_with_another_ed25519() -> None:
    """docs/ledger-format.md 9.1, checked from the seed up with `cryptography`."""
    seed = bytes(range(0x20, 0x40))
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    name = "witness.example/golden"
    key_id = _sha256(name.encode(), b"\n\x04", public)[:4]
    vkey = f"{name}+{key_id.hex()}+{base64.b64encode(bytes([0x04]) + public).decode()}"
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ledger-format.md").read_text()
    assert vkey in doc
    text = "tokenmill.example/golden\n3\n4aPaFxwMhy/jv3JNZHI7OimdaCTzwJKGfd0X06M0G1A=\ntime 1700000100000\n"
    line = next(l for l in doc.splitlines() if l.startswith(f"{DASH} {name} "))
    assert _verify_cosignature(line + "\n", text, vkey) == 1700000200
