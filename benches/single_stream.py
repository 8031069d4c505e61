#!/usr/bin/env python3
"""Single-stream decode speed and time to first token: tokenmill against llama.cpp.

Starts one server at a time on loopback (never both: they would fight for the
same cores), on the same GGUF file and the same number of threads, and sends it
one streaming /v1/completions request at a time:

    tokenmill serve --model GGUF                         (RAYON_NUM_THREADS=T)
    python -m llama_cpp.server --model GGUF --n_threads T --n_threads_batch T --n_ctx 4096

For every request it records the time to the first text chunk (TTFT), the time
of every text chunk and the token counts, then prints a Markdown table of
medians per server and prompt length and, with --json, writes every raw
measurement. Standard library only; run it with a Python that has
llama-cpp-python[server] installed (or use --only tokenmill).

    python benches/single_stream.py --json /tmp/single_stream.json

See benches/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill")) / "models" / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
SERVED_NAME = "bench"  # the model id both servers answer to
SERVERS = ("tokenmill", "llamacpp")

# Prose that a small model continues at length (greedy decoding, raw completion,
# no chat template). Roughly 20, 100 and 400 tokens in SmolLM2's tokenizer; the
# exact counts are measured (prompt_tokens) and reported.
PROMPT_SHORT = "The old lighthouse keeper climbed the narrow stairs one last time, and as he reached the top he"

PROMPT_MEDIUM = (
    "Maria had lived in the mountain village all her life. Every morning she walked down the steep path "
    "to the river to fetch water, and every evening she sat by the window of her small stone house and "
    "watched the sun sink behind the peaks. The villagers said she knew every tree and every rock on the "
    "mountain. One autumn day, while she was filling her buckets at the river, she noticed something "
    "strange glinting between the stones. She bent down, pushed the cold water aside and"
)

PROMPT_LONG = (
    "The city of Aldermoor was built on seven hills, and on the highest of them stood the library. It was "
    "older than the walls, older than the river bridges, older even than the names of the streets, and "
    "nobody in the city could say who had laid its first stone. Its shelves climbed so high that the "
    "librarians used ladders on wheels to reach the top rows, and its reading rooms were lit by tall "
    "windows of coloured glass that painted the floors red, green and gold in the afternoon.\n\n"
    "Thomas had worked there for eleven years. He had started as a boy who swept the floors and carried "
    "books back to their places, and slowly he had learned the order of the rooms, the habits of the old "
    "readers and the secrets of the catalogue. He knew which stairs creaked and which windows leaked when "
    "it rained. He knew that the history of the northern provinces was kept in the east wing, that the "
    "books on astronomy had been moved twice during the great flood, and that the head librarian, a thin "
    "and silent woman called Mrs. Evers, drank exactly three cups of tea every day.\n\n"
    "What he did not know was what lay behind the small iron door at the end of the lowest corridor. The "
    "door was always locked. Mrs. Evers carried the only key on a chain around her neck, and whenever "
    "someone asked about the door she simply smiled and changed the subject. Over the years Thomas had "
    "heard many stories about it. Some said it hid the first books ever written in the city, others said "
    "it led to a tunnel under the hills, and a few of the older porters swore that on quiet nights they "
    "had heard music coming from behind it.\n\n"
    "On the evening of the first snow, Thomas stayed late to finish repairing a torn atlas. The building was "
    "empty and dark except for the lamp on his desk. It was almost midnight when he heard footsteps in the "
    "corridor below, slow and careful, and then the unmistakable sound of a key turning in an old lock. He "
    "put down his needle, took the lamp and went quietly down the stairs. At the end of the lowest "
    "corridor the iron door stood open, and a soft golden light was spilling out across the stones. Thomas "
    "held his breath, stepped closer and"
)

PROMPTS = {"short": PROMPT_SHORT, "medium": PROMPT_MEDIUM, "long": PROMPT_LONG}


# ---------------------------------------------------------------------------
# Measurements


@dataclass
class Measurement:
    """One streamed request, timed on the client. Times are seconds after the request was sent."""

    server: str
    prompt: str  # short | medium | long
    run: int  # -1 for warm-up
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None  # first chunk with non-empty text
    t_last_text_s: float | None = None  # last chunk with non-empty text
    t_done_s: float | None = None  # [DONE] (or end of stream)
    chunk_times_s: list[float] = field(default_factory=list)  # every chunk with non-empty text
    token_chunks: int = 0  # chunks with a choice and no finish_reason (text may be empty)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    completion_tokens_source: str | None = None  # usage | chunks
    retokenized_completion_tokens: int | None = None  # llama.cpp only: the output text tokenized again
    server_log: dict[str, float] | None = None  # llama.cpp only: its own llama_perf timings of this request
    decode_tps: float | None = None
    excluded_from_decode: str | None = None


def post_stream(host: str, port: int, body: dict[str, Any], timeout: float) -> tuple[int, list[tuple[float, dict | None]], float]:
    """POSTs a streaming /v1/completions; returns (status, [(t, event or None for [DONE])], t_end).

    Times are perf_counter seconds after the request bytes were handed to the socket
    (the TCP connection is opened first, so connecting is not in them).
    """
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=payload,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}")
        events: list[tuple[float, dict | None]] = []
        data_lines: list[str] = []
        while True:
            raw = resp.readline()
            if not raw:
                break
            line = raw.decode("utf-8").rstrip("\r\n")
            if line == "":  # end of one SSE event
                if data_lines:
                    t = time.perf_counter() - t0
                    data = "\n".join(data_lines)
                    data_lines = []
                    if data.strip() == "[DONE]":
                        events.append((t, None))
                        break
                    events.append((t, json.loads(data)))
                continue
            if line.startswith(":"):  # comment / keep-alive ping
                continue
            name, _, value = line.partition(":")
            if name == "data":
                data_lines.append(value[1:] if value.startswith(" ") else value)
        return resp.status, events, time.perf_counter() - t0
    finally:
        conn.close()


def post_json(port: int, path: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {resp.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data)
    finally:
        conn.close()


def count_tokens(port: int, text: str) -> int | None:
    """Tokens in `text` by llama-cpp-python's /extras/tokenize/count (the tokenizer its completions use)."""
    try:
        return int(post_json(port, "/extras/tokenize/count", {"model": SERVED_NAME, "input": text})["count"])
    except Exception:  # noqa: BLE001 - an extra, not a measurement
        return None


def measure(server: str, port: int, prompt_name: str, prompt: str, run: int, max_tokens: int,
            min_decode_tokens: int, timeout: float) -> Measurement:
    m = Measurement(server=server, prompt=prompt_name, run=run)
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        status, events, t_end = post_stream("127.0.0.1", port, body, timeout)
    except Exception as err:  # noqa: BLE001 - reported, never hidden
        m.error = f"{type(err).__name__}: {err}"
        return m
    m.status = status
    m.t_done_s = t_end
    usage = None
    texts = []
    for t, event in events:
        if event is None:
            m.t_done_s = t
            continue
        if "error" in event:
            m.error = json.dumps(event["error"])[:500]
            return m
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            text = choice.get("text") or ""
            if choice.get("finish_reason"):
                m.finish_reason = choice["finish_reason"]
            else:
                m.token_chunks += 1
            if text:
                texts.append(text)
                m.chunk_times_s.append(t)
    m.text = "".join(texts)
    if m.chunk_times_s:
        m.ttft_s = m.chunk_times_s[0]
        m.t_last_text_s = m.chunk_times_s[-1]
    if usage:
        m.prompt_tokens = usage.get("prompt_tokens")
        m.completion_tokens = usage.get("completion_tokens")
        m.completion_tokens_source = "usage"
    else:  # llama-cpp-python ignores stream_options: one chunk per token (see README)
        m.completion_tokens = m.token_chunks
        m.completion_tokens_source = "chunks"
        # Counted after the timed stream; a cross-check, not the figure used.
        m.prompt_tokens = count_tokens(port, prompt)
        m.retokenized_completion_tokens = count_tokens(port, m.text)
    if m.ttft_s is None:
        m.error = "no text in the stream"
        return m
    m.ok = True
    n = m.completion_tokens or 0
    span = (m.t_last_text_s or 0) - m.ttft_s
    if n < min_decode_tokens:
        m.excluded_from_decode = f"only {n} completion tokens (finish_reason={m.finish_reason})"
    elif span <= 0:
        m.excluded_from_decode = "all text arrived in one chunk"
    else:
        m.decode_tps = (n - 1) / span
    return m


# ---------------------------------------------------------------------------
# Servers


class Server:
    """A server process in its own process group, logging to a temp file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, health_path: str):
        self.name, self.argv, self.env, self.port, self.health_path = name, argv, env, port, health_path
        self.log = Path(tempfile.mkstemp(prefix=f"single_stream-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if port_in_use(self.port):
            raise RuntimeError(f"{self.name}: port {self.port} is already in use (try --port-base)")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                   f"log {self.log}:\n{tail(self.log)}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.health_path)
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log {self.log}:\n{tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


PERF_RE = re.compile(r"llama_perf_context_print:\s+(prompt eval|eval) time =\s+([0-9.]+) ms /\s+(\d+) (?:tokens|runs)")


def llama_perf(log_text: str) -> dict[str, float] | None:
    """llama.cpp's own timings of one request, from the lines it logs when the request ends.

    `eval` covers the decode steps after the first token (runs = completion tokens - 1);
    llama-cpp-python's `prompt eval` figures are not reliable (it often logs ~0 ms).
    """
    out: dict[str, float] = {}
    for kind, ms, n in PERF_RE.findall(log_text):
        key = "prompt_eval" if kind == "prompt eval" else "eval"
        out[f"{key}_ms"], out[f"{key}_n"] = float(ms), int(n)
    if out.get("eval_ms"):
        out["eval_tps"] = out["eval_n"] / out["eval_ms"] * 1000
    return out or None


def cpu_busy_ticks() -> int | None:
    """Busy clock ticks of the whole machine so far (/proc/stat)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int | None:
    """utime + stime of a process, all its threads, so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"<cannot read {path}: {err}>"


def make_server(name: str, args: argparse.Namespace, port: int) -> Server:
    env = dict(os.environ)
    if name == "tokenmill":
        # candle's CPU kernels and rayon both size their pools from these.
        env["RAYON_NUM_THREADS"] = str(args.threads)
        env["CANDLE_NUM_THREADS"] = str(args.threads)
        argv = [str(args.tokenmill_bin), "serve", "--model", str(args.model), "--served-model-name", SERVED_NAME,
                "--host", "127.0.0.1", "--port", str(port), "--no-auth", *getattr(args, "tokenmill_args", [])]
        return Server(name, argv, env, port, "/health")
    argv = [args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(args.model), "--model_alias", SERVED_NAME,
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
            "--host", "127.0.0.1", "--port", str(port)]
    return Server(name, argv, env, port, "/v1/models")


# ---------------------------------------------------------------------------
# Provenance


def run_text(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    return {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "kernel": platform.release(), "python": platform.python_version(), "hostname": platform.node()}


def provenance(args: argparse.Namespace, servers: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "model": str(args.model),
        "model_bytes": args.model.stat().st_size if args.model.exists() else None,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "max_tokens": args.max_tokens,
        "min_decode_tokens": args.min_decode_tokens,
        "loadavg_start": list(os.getloadavg()),
    }
    if "tokenmill" in servers:
        commit = run_text(["git", "rev-parse", "HEAD"], REPO)
        dirty = run_text(["git", "status", "--porcelain", "--untracked-files=no"], REPO)
        info["tokenmill_commit"] = (commit or "unknown") + ("+dirty" if dirty else "")
        info["tokenmill_version"] = run_text([str(args.tokenmill_bin), "--version"])
        info["tokenmill_bin"] = str(args.tokenmill_bin)
        try:
            mtime = args.tokenmill_bin.stat().st_mtime
            info["tokenmill_bin_mtime"] = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds")
            committed = run_text(["git", "log", "-1", "--format=%ct"], REPO)
            if committed and mtime < int(committed):
                info["tokenmill_bin_stale"] = "the binary is older than the commit: it may not be built from it"
        except (OSError, ValueError):
            pass
    if "llamacpp" in servers:
        info["llama_cpp_python"] = run_text([args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"])
        info["llama_cpp_system_info"] = run_text([args.llamacpp_python, "-c",
                                                  "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"])
    return info


# ---------------------------------------------------------------------------
# Report


def summarize(results: list[Measurement]) -> list[dict[str, Any]]:
    rows = []
    for server in SERVERS:
        for prompt in PROMPTS:
            ms = [m for m in results if m.server == server and m.prompt == prompt and m.run >= 0]
            if not ms:
                continue
            ok = [m for m in ms if m.ok]
            ttft = [m.ttft_s * 1000 for m in ok]
            tps = [m.decode_tps for m in ok if m.decode_tps is not None]
            ptok = sorted({m.prompt_tokens for m in ok if m.prompt_tokens is not None})
            ctok = [m.completion_tokens for m in ok if m.completion_tokens is not None]
            rows.append({
                "server": server, "prompt": prompt,
                "prompt_tokens": ptok,
                "requests": len(ms), "failed": len(ms) - len(ok),
                "excluded_from_decode": sum(1 for m in ok if m.excluded_from_decode),
                "ttft_ms_median": statistics.median(ttft) if ttft else None,
                "ttft_ms_min": min(ttft) if ttft else None, "ttft_ms_max": max(ttft) if ttft else None,
                "decode_tps_median": statistics.median(tps) if tps else None,
                "decode_tps_min": min(tps) if tps else None, "decode_tps_max": max(tps) if tps else None,
                "completion_tokens_median": statistics.median(ctok) if ctok else None,
                "tokens_per_text_chunk": (sum(ctok) / sum(len(m.chunk_times_s) for m in ok)) if ok else None,
            })
    return rows


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], results: list[Measurement]) -> str:
    mach = info["machine"]
    lines = [
        f"## Single-stream decode and TTFT ({info['date']})",
        "",
        f"- machine: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs ({mach['usable_cpus']} usable), "
        f"load average at start {info['loadavg_start'][0]:.2f}",
        f"- model: `{info['model']}`; {info['threads']} threads; greedy; max_tokens {info['max_tokens']}; "
        f"{info['runs']} runs per prompt after {info['warmup']} warm-up requests",
    ]
    if "tokenmill_commit" in info:
        line = (f"- tokenmill: commit {info['tokenmill_commit']} ({info.get('tokenmill_version')}), "
                f"binary built {info.get('tokenmill_bin_mtime')}")
        if "tokenmill_bin_stale" in info:
            line += f" (**{info['tokenmill_bin_stale']}**)"
        lines.append(line)
    if "llama_cpp_python" in info:
        lines.append(f"- llama.cpp: llama-cpp-python {info['llama_cpp_python']}")
    for name, phase in info.get("phases", {}).items():
        line = (f"- {name}: ready in {fmt(phase.get('ready_s'))} s; load average "
                f"{phase['loadavg_before'][0]:.2f} before, {phase.get('loadavg_after', [float('nan')])[0]:.2f} after")
        if "other_cpus" in phase:
            line += (f"; during the measured requests the server used {phase['server_cpus']:.2f} CPUs "
                     f"and everything else {phase['other_cpus']:.2f} CPUs")
            if phase["other_cpus"] > 0.25:
                line += " (**busy machine: figures not trustworthy**)"
        lines.append(line)
    lines += [
        f"- command: `{info['command']}`",
        "",
        "| server | prompt | prompt tokens | TTFT ms (median) | TTFT ms (min–max) | decode tok/s (median) "
        "| decode tok/s (min–max) | completion tokens (median) | tokens / text chunk | ok / requests | excluded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ptok = ", ".join(str(p) for p in r["prompt_tokens"]) or "—"
        lines.append(
            f"| {r['server']} | {r['prompt']} | {ptok} | {fmt(r['ttft_ms_median'])} "
            f"| {fmt(r['ttft_ms_min'])}–{fmt(r['ttft_ms_max'])} | {fmt(r['decode_tps_median'])} "
            f"| {fmt(r['decode_tps_min'])}–{fmt(r['decode_tps_max'])} | {fmt(r['completion_tokens_median'], 0)} "
            f"| {fmt(r['tokens_per_text_chunk'], 2)} | {r['requests'] - r['failed']} / {r['requests']} "
            f"| {r['excluded_from_decode']} |")
    notes = [m for m in results if m.run >= 0 and (not m.ok or m.excluded_from_decode)]
    if notes:
        lines += ["", "Requests left out:"]
        for m in notes:
            lines.append(f"- {m.server} {m.prompt} run {m.run}: {m.error or m.excluded_from_decode}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


def numbered(prompt: str, n: int) -> str:
    """The prompt under a heading unique to this request, so no server can serve it from a prefix cache.

    The same request number gets the same text on every server; 10..99 keep the token count fixed.
    """
    return f"Chapter {10 + n % 90}\n\n{prompt}"


def bench_server(name: str, args: argparse.Namespace, port: int, info: dict[str, Any],
                 results: list[Measurement]) -> None:
    server = make_server(name, args, port)
    phase: dict[str, Any] = {"argv": server.argv, "log": str(server.log), "port": port,
                             "loadavg_before": list(os.getloadavg())}
    if name == "tokenmill":
        phase["env"] = {k: server.env[k] for k in ("RAYON_NUM_THREADS", "CANDLE_NUM_THREADS")}
    info.setdefault("phases", {})[name] = phase
    print(f"[{name}] starting: {shlex.join(server.argv)} (log {server.log})", file=sys.stderr)
    try:
        server.start()
        phase["ready_s"] = server.wait_ready(args.ready_timeout)
        print(f"[{name}] ready after {phase['ready_s']:.1f} s", file=sys.stderr)
        names = list(PROMPTS)
        for i in range(args.warmup):
            prompt_name = names[i % len(names)]
            m = measure(name, port, prompt_name, numbered(PROMPTS[prompt_name], 90 - 1 - i), -1,
                        min(args.max_tokens, 32), 1, args.request_timeout)
            results.append(m)
            if not m.ok:
                raise RuntimeError(f"{name}: warm-up request failed: {m.error}; log {server.log}:\n{tail(server.log)}")
        request = 0
        pid = server.proc.pid if server.proc else 0
        wall0, busy0, own0 = time.monotonic(), cpu_busy_ticks(), process_ticks(pid)
        for run in range(args.runs):
            for prompt_name in names:
                log_at = server.log.stat().st_size
                m = measure(name, port, prompt_name, numbered(PROMPTS[prompt_name], request), run,
                            args.max_tokens, args.min_decode_tokens, args.request_timeout)
                request += 1
                if name == "llamacpp":
                    with open(server.log, "rb") as log:
                        log.seek(log_at)
                        m.server_log = llama_perf(log.read().decode(errors="replace"))
                results.append(m)
                status = (f"TTFT {fmt(m.ttft_s and m.ttft_s * 1000)} ms, {m.completion_tokens} tokens "
                          f"({m.completion_tokens_source}, {len(m.chunk_times_s)} text chunks), "
                          f"decode {fmt(m.decode_tps)} tok/s") if m.ok else f"FAILED: {m.error}"
                if m.server_log and "eval_tps" in m.server_log:
                    status += (f"; llama.cpp log: {m.server_log['eval_n']:.0f} decode steps at "
                               f"{m.server_log['eval_tps']:.1f} tok/s")
                if m.retokenized_completion_tokens is not None:
                    status += f"; output text re-tokenized: {m.retokenized_completion_tokens} tokens"
                if m.excluded_from_decode:
                    status += f" [excluded: {m.excluded_from_decode}]"
                print(f"[{name}] run {run} {prompt_name:6s} prompt_tokens={m.prompt_tokens}: {status}", file=sys.stderr)
                if not m.ok and server.proc is not None and server.proc.poll() is not None:
                    raise RuntimeError(f"{name} died; log {server.log}:\n{tail(server.log)}")
        wall, busy1, own1 = time.monotonic() - wall0, cpu_busy_ticks(), process_ticks(pid)
        if None not in (busy0, busy1, own0, own1) and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            phase["measured_wall_s"] = wall
            phase["server_cpus"] = (own1 - own0) / hz / wall
            phase["other_cpus"] = max(0.0, ((busy1 - busy0) - (own1 - own0)) / hz / wall)
    finally:
        phase["loadavg_after"] = list(os.getloadavg())
        server.stop()
        print(f"[{name}] stopped", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenmill-bin", type=Path, default=REPO / "target" / "release" / "tokenmill")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file both servers load")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for each server")
    p.add_argument("--runs", type=int, default=5, help="measured requests per prompt and server")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests after start")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-decode-tokens", type=int, default=32,
                   help="requests that end (EOS) with fewer completion tokens are left out of decode tok/s")
    p.add_argument("--only", choices=SERVERS, help="benchmark one server only")
    p.add_argument("--port-base", type=int, default=18431, help="tokenmill gets this port, llama.cpp the next")
    p.add_argument("--llamacpp-python", default=sys.executable,
                   help="Python interpreter with llama-cpp-python[server] installed")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a server to load")
    p.add_argument("--request-timeout", type=float, default=600.0, help="socket timeout of one request")
    p.add_argument("--json", type=Path, help="write provenance, summary and every raw measurement here")
    args = p.parse_args()

    servers = [args.only] if args.only else list(SERVERS)
    if not args.model.is_file():
        p.error(f"no model at {args.model} (run models/fetch-smollm2.sh, or pass --model)")
    if "tokenmill" in servers and not os.access(args.tokenmill_bin, os.X_OK):
        p.error(f"no tokenmill binary at {args.tokenmill_bin} (cargo build --release -p tokenmill, or --tokenmill-bin)")
    if "llamacpp" in servers and run_text([args.llamacpp_python, "-c", "import llama_cpp.server.app"]) is None:
        p.error(f"{args.llamacpp_python} cannot import llama_cpp.server: install 'llama-cpp-python[server]' "
                "or pass --llamacpp-python, or use --only tokenmill")

    # Ctrl-C raises KeyboardInterrupt; make SIGTERM do the same so the finally blocks stop the servers.
    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (cmd &)

    info = provenance(args, servers)
    results: list[Measurement] = []
    failed = None
    try:
        for name in servers:
            bench_server(name, args, args.port_base + SERVERS.index(name), info, results)
    except KeyboardInterrupt:
        failed = "interrupted"
    except RuntimeError as err:
        failed = str(err)
    info["loadavg_end"] = list(os.getloadavg())
    if failed:
        info["incomplete"] = failed.splitlines()[0]
        print(f"error: {failed}", file=sys.stderr)

    rows = summarize(results)
    print(markdown(info, rows, results))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "summary": rows, "prompts": PROMPTS,
                                         "measurements": [asdict(m) for m in results]}, indent=1) + "\n")
        print(f"\nraw measurements: {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
