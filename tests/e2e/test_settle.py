"""`tokenmill settle` on a ledger written by a real `tokenmill serve` run: the statement's gross revenue
equals the exported usage priced by hand, the same inputs print the same bytes, a ledger rebuilt from its
JSON export settles identically, and a tampered ledger is refused with a non-zero exit."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import openai

from conftest import server_binary, start_server
from e2e_support import MODEL, STORY_PROMPT

PRICES = {"input": 200_000, "cached_input": 50_000, "output": 800_000}


def _tokenmill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(server_binary()), *args], capture_output=True, text=True, timeout=120)


def _round_half_even(numerator: int, denominator: int) -> int:
    q, r = divmod(numerator, denominator)
    if 2 * r > denominator or (2 * r == denominator and q % 2 == 1):
        q += 1
    return q


def _contract(path: Path, model: str, month: datetime) -> None:
    path.write_text(
        f"""
id = "e2e"
currency = "USD"
[parties]
cloud = "Cloud"
backer = "Backer"
[term]
start = "{month:%Y-%m}-01"
period_months = 1
periods = 2
grace_hours = 24
[[revenue_share]]
from_period = 1
bps = 2000
[prices."{model}"]
input = {PRICES["input"]}
cached_input = {PRICES["cached_input"]}
output = {PRICES["output"]}
[capacity]
gpus = 1
buyback_price_per_gpu_hour = 1_000_000
buyback_cap_per_month = 100_000_000
"""
    )


def test_settle_a_served_ledger(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with start_server(server_binary(), ["--no-auth", "--data-dir", str(data), "--capacity-interval", "1"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        for n in range(4):
            client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=2 + n, temperature=0)
        time.sleep(2.5)  # a few whole capacity intervals
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    ledger, public = data / "ledger", data / "ledger.pub"

    export = _tokenmill("ledger", "export", str(ledger), "--format", "jsonl", "--checkpoints")
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    usage = [r for r in lines if r["type"] == "usage"]
    assert len(usage) == 4
    month = datetime.fromisoformat(usage[0]["finished_at"][:19]).replace(tzinfo=timezone.utc)
    period = f"{month:%Y-%m}"
    in_month = [r for r in usage if r["finished_at"].startswith(period)]
    contract = tmp_path / "contract.toml"
    _contract(contract, usage[0]["model"], month)

    def settle(ledger_dir: Path, fmt: str) -> subprocess.CompletedProcess:
        return _tokenmill("settle", "--contract", str(contract), "--ledger", str(ledger_dir),
                          "--public-key", str(public), "--period", period, "--format", fmt)

    result = settle(ledger, "json")
    assert result.returncode == 0, result.stderr
    statement = json.loads(result.stdout)
    tokens = {
        "input": sum(r["prompt_tokens"] - r["cached_prompt_tokens"] for r in in_month),
        "cached_input": sum(r["cached_prompt_tokens"] for r in in_month),
        "output": sum(r["completion_tokens"] for r in in_month),
    }
    expected = {k: _round_half_even(n * PRICES[k], 1_000_000) for k, n in tokens.items() if n > 0}
    assert statement["revenue"]["by_kind"] == expected
    assert statement["revenue"]["total"] == sum(expected.values())
    assert statement["revenue_share"]["total"] == _round_half_even(sum(expected.values()) * 2000, 10_000)
    assert statement["records"]["usage"] == len(in_month)
    assert statement["final"] is False, "no checkpoint can be signed after a cutoff that has not come"
    # The final checkpoint written at shutdown covers every record; the statement names it.
    records = sum(1 for r in lines if r["type"] != "checkpoint")
    verified = _tokenmill("ledger", "verify", str(ledger), "--public-key", str(public))
    assert verified.returncode == 0, verified.stderr
    assert statement["checkpoint"]["tree_size"] == records
    assert f"root {statement['checkpoint']['root']}" in verified.stdout
    assert statement["capacity"]["lines"][0]["records"] >= 1

    # Same inputs, same bytes, in every format.
    for fmt in ["json", "csv", "table"]:
        first, second = settle(ledger, fmt), settle(ledger, fmt)
        assert first.returncode == 0 and first.stdout == second.stdout, fmt
    assert "revenue_total" in settle(ledger, "csv").stdout

    # A ledger rebuilt from its JSON lines export settles to the same statement.
    exported = tmp_path / "export.jsonl"
    exported.write_text(export.stdout)
    rebuilt = tmp_path / "rebuilt"
    imported = _tokenmill("ledger", "import", str(exported), "--out", str(rebuilt), "--public-key", str(public))
    assert imported.returncode == 0, imported.stderr
    assert settle(rebuilt, "json").stdout == result.stdout

    # One flipped byte in a record: settle refuses, naming the record, and prints no statement.
    tampered = tmp_path / "tampered"
    shutil.copytree(ledger, tampered)
    segment = sorted(tampered.glob("*.seg"))[0]
    raw = bytearray(segment.read_bytes())
    raw[40] ^= 0x01
    segment.write_bytes(bytes(raw))
    refused = settle(tampered, "json")
    assert refused.returncode != 0
    assert "verification failed" in refused.stderr and "record 0" in refused.stderr, refused.stderr
    assert refused.stdout == ""
