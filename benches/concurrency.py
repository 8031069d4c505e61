#!/usr/bin/env python3
"""Aggregate output tokens/s of tokenmill at 1, 4, 16 and 64 concurrent streams, and the engine's
step overhead (time per step outside the model's forward: scheduling, metering, sampling, events).

For each concurrency level C it starts a fresh `tokenmill serve` (so each level's step figures are
its own), sends one warm-up request, then runs C client threads, each sending `--requests` streaming
/v1/completions one after another (temperature 0, `max_tokens` `--max-tokens`, a prompt unique to
the request so the prefix cache cannot serve it). It reports completion tokens per second of wall
time over the whole level (first request sent to last [DONE]), the median time to first token and
the median per-stream decode rate, then stops the server with SIGTERM and reads the engine's own
figures from its log line "engine stopped": steps, forward ms per step, overhead ms per step.

    cargo build --release -p tokenmill
    python3 benches/concurrency.py --json /tmp/concurrency.json

Standard library only; see benches/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import statistics
import subprocess
import tempfile
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from single_stream import (  # noqa: E402  (the sibling script is the shared toolkit)
    DEFAULT_MODEL,
    PROMPT_MEDIUM,
    PROMPT_SHORT,
    REPO,
    SERVED_NAME,
    machine_info,
    make_server,
    numbered,
    post_stream,
)

ENGINE_STOPPED = re.compile(
    r"engine stopped.*?steps\S*?=\S*?(\d+).*?forward_ms_per_step\S*?=\S*?([0-9.]+).*?overhead_ms_per_step\S*?=\S*?([0-9.]+)"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_request(port: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    _, events, elapsed = post_stream("127.0.0.1", port, body, timeout=600)
    text_times = [t for t, e in events if e and e.get("choices") and e["choices"][0].get("text")]
    usage = next((e["usage"] for _, e in events if e and e.get("usage")), None)
    tokens = usage["completion_tokens"] if usage else 0
    decode = None
    if len(text_times) > 1 and tokens > 1:
        decode = (tokens - 1) / (text_times[-1] - text_times[0])
    return {"start": started, "end": started + elapsed, "completion_tokens": tokens,
            "ttft_s": text_times[0] if text_times else None, "decode_tps": decode}


def run_level(args: argparse.Namespace, streams: int, port: int) -> dict[str, Any]:
    server = make_server("tokenmill", args, port)
    server.start()
    try:
        server.wait_ready(120)
        one_request(port, numbered(PROMPT_SHORT, 0), 8)  # warm-up
        results: list[dict[str, Any]] = []
        lock = threading.Lock()
        prompts = [PROMPT_SHORT, PROMPT_MEDIUM]

        def client(index: int) -> None:
            for k in range(args.requests):
                n = 1 + index * args.requests + k
                result = one_request(port, numbered(prompts[n % 2], n), args.max_tokens)
                with lock:
                    results.append(result)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    log = ANSI.sub("", server.log.read_text(errors="replace"))
    engine = ENGINE_STOPPED.search(log)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    decodes = [r["decode_tps"] for r in results if r["decode_tps"] is not None]
    level = {
        "streams": streams,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "median_ttft_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
        "median_stream_decode_tps": statistics.median(decodes) if decodes else None,
        "engine_steps": int(engine.group(1)) if engine else None,
        "forward_ms_per_step": float(engine.group(2)) if engine else None,
        "overhead_ms_per_step": float(engine.group(3)) if engine else None,
        "server_log": str(server.log),
        "results": results,
    }
    print(f"{streams:>3} streams: {tokens} tokens in {wall:.1f} s = {level['aggregate_tps']:.1f} tok/s; "
          f"overhead {level['overhead_ms_per_step']:.3f} ms/step", file=sys.stderr)
    return level


def markdown(info: dict[str, Any], levels: list[dict[str, Any]]) -> str:
    base = levels[0]["aggregate_tps"]
    lines = [
        f"- date: {info['date']}; machine: {info['machine']['cpu_model']}, {info['machine']['usable_cpus']} CPUs",
        f"- tokenmill commit {info['commit']}; threads {info['threads']}; max_tokens {info['max_tokens']}; "
        f"{info['requests_per_stream']} requests per stream",
        f"- command: `{info['command']}`",
        "",
        "| streams | ledger | requests | output tokens | wall s | aggregate tok/s | x one stream | median TTFT ms "
        "| median per-stream tok/s | steps | forward ms/step | overhead ms/step | overhead % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        fwd, over = lv["forward_ms_per_step"], lv["overhead_ms_per_step"]
        share = f"{100 * over / (fwd + over):.2f}" if fwd and over is not None else "-"
        lines.append(
            f"| {lv['streams']} | {lv['ledger']} | {lv['requests']} | {lv['completion_tokens']} | {lv['wall_s']:.1f} "
            f"| {lv['aggregate_tps']:.1f} | {lv['aggregate_tps'] / base:.2f} | {lv['median_ttft_ms']:.0f} "
            f"| {lv['median_stream_decode_tps']:.1f} | {lv['engine_steps']} | {fwd:.2f} | {over:.3f} | {share} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenmill-bin", type=Path, default=REPO / "target" / "release" / "tokenmill")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2, help="requests per stream, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=18451)
    parser.add_argument("--ledger", default="on", help="on, off, or on,off to run every level both ways")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "commit": commit + ("+dirty" if dirty else ""), "threads": args.threads, "max_tokens": args.max_tokens,
            "requests_per_stream": args.requests, "command": " ".join(sys.argv)}
    levels = []
    modes = args.ledger.split(",")
    for s in args.streams.split(","):
        for mode in modes:
            # "on": the signed ledger in a fresh data directory, as served by default.
            ledger_args = ["--no-ledger"] if mode == "off" else ["--data-dir", tempfile.mkdtemp(prefix="bench-data-")]
            args.tokenmill_args = ["--max-num-seqs", "64", *ledger_args]
            level = run_level(args, int(s), args.port)
            level["ledger"] = mode
            levels.append(level)
    print(markdown(info, levels))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "levels": levels}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
