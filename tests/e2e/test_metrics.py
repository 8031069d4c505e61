"""GET /metrics: Prometheus text whose counters equal the usage the clients were given."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import openai

from e2e_support import MODEL, STORY_CHAT, STORY_PROMPT, httpx

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def _scrape(root: str) -> dict[str, float]:
    """Every sample, keyed by name plus labels as written."""
    response = httpx.get(f"{root}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def _sum(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{")[0] == name and all(w in key for w in want)
    )


def _idle(root: str) -> dict[str, float]:
    """A scrape taken once nothing is running or waiting (earlier tests' abandoned streams are gone)."""
    deadline = time.monotonic() + 30
    while True:
        samples = _scrape(root)
        busy = _sum(samples, "tokenmill_sequences_running") + _sum(samples, "tokenmill_sequences_waiting")
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_token_counters_equal_the_usage_clients_received(client: openai.OpenAI, tokenmill_server) -> None:
    """After 3 requests, the token and request counters moved by exactly what the clients' usage says."""
    root = tokenmill_server.root
    before = _idle(root)
    usages = [
        client.completions.create(model=MODEL, prompt=STORY_PROMPT, max_tokens=6, temperature=0).usage,
        client.chat.completions.create(model=MODEL, messages=STORY_CHAT, max_tokens=5, temperature=0).usage,
        # n=2 over a 3-block prompt: the second completion finds the first's blocks in the prefix cache.
        client.completions.create(model=MODEL, prompt=" ".join([STORY_PROMPT] * 3), max_tokens=4, temperature=0, n=2).usage,
    ]
    after = _idle(root)

    def moved(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert moved("tokenmill_prompt_tokens_total", model=MODEL) == sum(u.prompt_tokens for u in usages)
    assert moved("tokenmill_completion_tokens_total", model=MODEL) == sum(u.completion_tokens for u in usages)
    assert moved("tokenmill_cached_prompt_tokens_total", model=MODEL) == sum(
        u.prompt_tokens_details.cached_tokens for u in usages
    )
    assert moved("tokenmill_requests_total", endpoint="completions", outcome="length") == 2
    assert moved("tokenmill_requests_total", endpoint="chat_completions", outcome="length") == 1
    assert moved("tokenmill_time_to_first_token_seconds_count") == 3
    assert moved("tokenmill_request_duration_seconds_count") == 3
    assert moved("tokenmill_steps_total") > 0
    assert moved("tokenmill_ledger_append_seconds_count") == 3, "each usage record is made durable once"
    assert moved("tokenmill_prefix_cache_queried_tokens_total") >= moved("tokenmill_prefix_cache_hit_tokens_total") > 0


def test_refusals_are_counted_by_outcome(tokenmill_server) -> None:
    """A 400 and a 404 count as outcomes "invalid" and "not_found"; gauges of the KV cache are there."""
    root = tokenmill_server.root
    before = _scrape(root)
    httpx.post(f"{root}/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 9}, timeout=30)
    httpx.post(f"{root}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    after = _scrape(root)
    for outcome in ("invalid", "not_found"):
        name = "tokenmill_requests_total"
        assert _sum(after, name, outcome=outcome) - _sum(before, name, outcome=outcome) == 1, outcome
    assert _sum(after, "tokenmill_kv_blocks_free") + _sum(after, "tokenmill_kv_blocks_used") == 32768 / 16
    assert "tenant=" not in " ".join(after), "no tenant label unless the operator asks for one"


def test_every_metric_the_dashboard_charts_is_exported(tokenmill_server) -> None:
    """deploy/grafana-dashboard.json only charts metrics that /metrics really has (after some traffic)."""
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {m for e in exprs for m in re.findall(r"\b(tokenmill_[a-z_]+)", e)}
    scraped = {key.split("{")[0] for key in _scrape(tokenmill_server.root)}
    wanted = {n if n in scraped else n.removesuffix("_bucket") + "_bucket" for n in names}
    missing = sorted(n for n in wanted if n not in scraped)
    assert not missing, missing
