#!/usr/bin/env python3
"""Serving throughput with the signed ledger on against off, measured in the same run.

Two `tokenmill serve` processes run side by side for the whole measurement: "on" writes the
signed, hash-chained ledger in a fresh data directory (the default), "off" runs with
`--no-ledger`. Only one of them has work at any moment; an idle server waits on its queue and uses
no CPU. The measurement is a series of rounds; in each round both servers get the same work, one
after the other, in ABBA order (on, off, then off, on, ...) so that a slow drift of the machine
falls on both equally:

- `--streams` client threads, each sending `--requests` streaming /v1/completions one after
  another: temperature 0, `max_tokens` `--max-tokens` with `ignore_eos`, so every request makes
  exactly that many tokens and both servers do identical work;
- every request's prompt carries a heading unique to (round, stream, request), so no request is
  served from the prefix cache; the two servers receive the same prompts in a round.

For each run it reports completion tokens per second of wall time (first request sent to last
[DONE]). The result is the per-round ratio on/off and its median over the rounds: the pairing
cancels the drift that separate runs would leave in.

    cargo build --release -p tokenmill
    python3 benches/ledger_overhead.py --rounds 8 --json /tmp/ledger_overhead.json

Standard library only; it borrows the server handling and SSE client of `single_stream.py`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
import tempfile
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
    post_stream,
)


def one_request(port: int, prompt: str, max_tokens: int) -> int:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    status, events, _ = post_stream("127.0.0.1", port, body, timeout=600)
    usage = next((e["usage"] for _, e in events if e and e.get("usage")), None)
    if status != 200 or usage is None:
        raise RuntimeError(f"request to port {port} failed: status {status}")
    return int(usage["completion_tokens"])


def run_once(port: int, round_no: int, args: argparse.Namespace) -> dict[str, Any]:
    """One round's work against one server; returns its tokens and wall time."""
    tokens = [0] * args.streams
    errors: list[BaseException] = []
    prompts = [PROMPT_SHORT, PROMPT_MEDIUM]

    def client(stream: int) -> None:
        try:
            for k in range(args.requests):
                heading = f"Story {round_no:02d}.{stream:02d}.{k:02d}"
                tokens[stream] += one_request(port, f"{heading}\n\n{prompts[(stream + k) % 2]}", args.max_tokens)
        except BaseException as exc:  # reported after the join; a failed run must not pass silently
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(args.streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    total = sum(tokens)
    return {"tokens": total, "wall_s": wall, "tps": total / wall}


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """Nanoseconds on a CPU so far of each thread of a process, by thread name (/proc/PID/task/TID/schedstat)."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between the listing and the read
        out[name] = out.get(name, 0) + ns
    return out


def cpu_split(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """CPU time used during a run: by the ledger's writer thread, and by the whole process."""
    used = {name: ns - before.get(name, 0) for name, ns in after.items()}
    return {"ledger_cpu_ms": used.get("ledger-writer", 0) / 1e6, "process_cpu_ms": sum(used.values()) / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenmill-bin", type=Path, default=REPO / "target" / "release" / "tokenmill")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per stream per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--port", type=int, default=18461, help="'on' listens here, 'off' on the next port")
    parser.add_argument("--a-a", action="store_true",
                        help="control run: both servers with --no-ledger, to show the method's own noise floor")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    on_args = ["--no-ledger"] if args.a_a else ["--data-dir", tempfile.mkdtemp(prefix="bench-ledger-")]
    mode_args = {"on": on_args, "off": ["--no-ledger"]}
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        # Fresh processes every round, started and run in alternating order: a process started first
        # was seen to run a few percent faster than its twin, and alternation cancels that too.
        order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
        servers = {}
        for offset, mode in enumerate(order):
            args.tokenmill_args = ["--max-num-seqs", "64", *mode_args[mode]]
            servers[mode] = (make_server("tokenmill", args, args.port + offset), args.port + offset)
        try:
            for mode in order:
                server, port = servers[mode]
                server.start()
                server.wait_ready(120)
                one_request(port, "Warm-up\n\n" + PROMPT_SHORT, 8)
            for mode in order:
                server, port = servers[mode]
                before = thread_cpu_ns(server.proc.pid)
                run = run_once(port, r, args)
                after = thread_cpu_ns(server.proc.pid)
                run.update(round=r, ledger=mode, **cpu_split(before, after))
                runs.append(run)
                print(f"round {r} ledger {mode:>3}: {run['tokens']} tokens in {run['wall_s']:.2f} s "
                      f"= {run['tps']:.1f} tok/s; ledger-writer CPU {run['ledger_cpu_ms']:.1f} ms of "
                      f"{run['process_cpu_ms']:.0f} ms", file=sys.stderr)
        finally:
            for server, _ in servers.values():
                server.stop()

    by_round = {(run["round"], run["ledger"]): run["tps"] for run in runs}
    ratios = [by_round[(r, "on")] / by_round[(r, "off")] for r in range(args.rounds)]
    on = [by_round[(r, "on")] for r in range(args.rounds)]
    off = [by_round[(r, "off")] for r in range(args.rounds)]
    on_runs = [run for run in runs if run["ledger"] == "on"]
    ledger_cpu_share = sum(run["ledger_cpu_ms"] for run in on_runs) / sum(run["process_cpu_ms"] for run in on_runs)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    summary = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "commit": commit, "command": " ".join(sys.argv),
        "streams": args.streams, "requests_per_stream": args.requests, "max_tokens": args.max_tokens,
        "rounds": args.rounds, "threads": args.threads, "a_a_control": args.a_a,
        "median_tps_on": statistics.median(on), "median_tps_off": statistics.median(off),
        "median_ratio_on_off": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
        "ledger_writer_cpu_share": ledger_cpu_share, "runs": runs,
    }
    print(f"- date {summary['date']}; {summary['machine']['cpu_model']}, {summary['machine']['usable_cpus']} CPUs; "
          f"commit {commit}")
    print(f"- command: `{summary['command']}`")
    print(f"- {args.rounds} rounds x {args.streams} streams x {args.requests} requests x {args.max_tokens} tokens "
          f"(ignore_eos) per server per round\n")
    print("| round | on tok/s | off tok/s | on/off |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        print(f"| {r} | {on[r]:.1f} | {off[r]:.1f} | {ratios[r]:.4f} |")
    print(f"| median | {summary['median_tps_on']:.1f} | {summary['median_tps_off']:.1f} | "
          f"{summary['median_ratio_on_off']:.4f} |")
    print(f"\nper-round on/off from {min(ratios):.4f} to {max(ratios):.4f}; the ledger-writer thread used "
          f"{100 * ledger_cpu_share:.3f}% of the 'on' server's CPU time")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
