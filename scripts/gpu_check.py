#!/usr/bin/env python3
"""Checks and measures tokenmill on a GPU machine; writes gpu-check.json and a Markdown table.

Run by scripts/gpu-check.sh (see there for the arguments). Every step records its result or its
error and the run goes on, so one call of the device tool brings back everything it could measure.

Correctness
  kernels   every CUDA kernel (kernels/) against its CPU reference on fresh random inputs, f32, bf16
            and f16, several shapes (`tokenmill gpu kernels`).
  smollm2   SmolLM2 (GGUF) greedy on --device against the CPU: the same tokens up to the first step
            where the CPU's top-1/top-2 logprob margin is under 0.5.
  random    A small Llama and Qwen2 with random bf16 weights (`tokenmill model random-weights`):
            tokenmill's logits on --device within 1e-2 (relative to the row's largest) of
            transformers' on the same safetensors; once through our kernels and once through
            candle's ops (TOKENMILL_GPU_KERNELS=0), so a kernel bug shows as a gap between the two.
  coldstart time from `serve` to the first token with an empty CUDA JIT cache (a fresh machine),
            then again with the cache the first start filled (a warm one).
Speed (Llama-3-8B's architecture with random bf16 weights, `serve --random-weights`)
  bandwidth the device's copy bandwidth (PyTorch, in the same run): the roofline's denominator.
  decode    batch-1 decode tok/s (1 / median TPOT) and its share of the roofline
            (bandwidth / weight bytes).
  sweep     output tok/s at each concurrency, 1000 input / 1000 output tokens, `tokenmill bench serve`.
  ttft      median time to first token of a 1000-token prompt at concurrency 1.
  overhead  the engine's per-step time outside the forward, from its "engine stopped" log line.
  graphs    launch overhead: a 4-layer model's per-step forward time (where launches, not maths,
            dominate) at 1 and 8 concurrent sequences, with decode CUDA graphs and without
            (TOKENMILL_CUDA_GRAPHS=0), and whether graphs were captured.

`--dry-run-cpu` runs the same steps on the CPU with tiny shapes, to test this script without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 8192, "vocab_size": 128256, "tie_word_embeddings": False, "hidden_act": "silu",
}
SMALL = {  # correctness: big enough for real GEMM tiles, small enough to be quick
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "vocab_size": 32000,
    "hidden_act": "silu",
}
TINY = {  # --dry-run-cpu
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 2048, "vocab_size": 49152, "tie_word_embeddings": False, "hidden_act": "silu",
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the",
]
ENGINE_STOPPED = re.compile(r"engine stopped.*?steps\S*?=\S*?(\d+).*?forward_ms_per_step\S*?=\S*?([0-9.]+)"
                            r".*?overhead_ms_per_step\S*?=\S*?([0-9.]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tokenmill serve` on a free loopback port, logging to a file under the output folder."""

    def __init__(self, args: argparse.Namespace, name: str, extra: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = args.out / f"serve-{name}.log"
        argv = [str(args.bin), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--no-auth",
                "--no-ledger", "--served-model-name", "m", *extra]
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve {name} exited {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"serve {name} not ready after {args.start_timeout} s")

    def post(self, path: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data}")
        return data

    def log_text(self) -> str:
        return ANSI.sub("", self.log.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def greedy(server: Server, prompt: str, tokens: int) -> list[tuple[str, float]]:
    """(token, top-1 minus top-2 logprob) per step of a greedy completion."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": 2}
    lp = server.post("/v1/completions", body)["choices"][0]["logprobs"]
    steps = []
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        values = sorted(top.values(), reverse=True)
        steps.append((token, values[0] - values[1] if len(values) > 1 else float("inf")))
    return steps


def check_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    cpu = Server(args, "smollm2-cpu", ["--model", args.smollm2, "--device", "cpu"])
    try:
        expected = [greedy(cpu, p, 48) for p in PROMPTS]
    finally:
        cpu.stop()
    dev = Server(args, "smollm2-dev", ["--model", args.smollm2, "--device", args.device])
    try:
        got = [greedy(dev, p, 48) for p in PROMPTS]
    finally:
        dev.stop()
    cases = []
    for prompt, want, have in zip(PROMPTS, expected, got):
        # Compare up to the first step whose CPU margin is under 0.5: past a near tie, either
        # token is a correct greedy choice and the continuations may part.
        limit = next((i for i, (_, margin) in enumerate(want) if margin < 0.5), len(want))
        agree = all(w[0] == h[0] for w, h in zip(want[:limit], have[:limit]))
        cases.append({"prompt": prompt, "compared_steps": limit, "agree": agree})
    compared = sum(c["compared_steps"] for c in cases)
    return {"pass": all(c["agree"] for c in cases) and compared > 0, "compared_steps": compared, "cases": cases}


def check_random(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    results = {}
    tokens = list(range(1, 200, 3))
    for arch in ("llama", "qwen2"):
        config = {**SMALL, "model_type": arch, "tie_word_embeddings": arch == "qwen2"}
        work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{arch}-"))
        (work / "config.json").write_text(json.dumps(config))
        run([str(args.bin), "model", "random-weights", "--config", str(work / "config.json"), "--seed", "1",
             "--dtype", "bf16", "--out", str(work / "model")])
        torch_device = "cpu" if args.device == "cpu" else "cuda"
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        model = transformers.AutoModelForCausalLM.from_pretrained(work / "model", torch_dtype=dtype)
        model = model.to(torch_device).eval()
        with torch.no_grad():
            theirs = model(torch.tensor([tokens], device=torch_device)).logits[0].float().cpu().tolist()
        # Our kernels on one prefill, and on a prefill of 40 tokens then decode steps; candle's ops.
        paths = {"kernels": ({}, []), "kernels_decode": ({}, ["--decode-from", "40"]),
                 "candle_ops": ({"TOKENMILL_GPU_KERNELS": "0"}, [])}
        for path, (env, extra) in paths.items():
            ours = json.loads(run([str(args.bin), "model", "logits", "--model", str(work / "model"), "--device",
                                   args.device, "--tokens", ",".join(map(str, tokens)), *extra], env=env))["logits"]
            worst = 0.0
            for row, ref in zip(ours, theirs):
                scale = max(abs(x) for x in ref)
                worst = max(worst, max(abs(a - b) for a, b in zip(row, ref)) / scale)
            results[f"{arch}_{path}"] = {"max_relative_error": worst, "pass": worst < 1e-2}
    return {"pass": all(r["pass"] for r in results.values()), **results}


def check_kernels(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cpu":
        return {"skipped": "cpu"}
    path = args.out / "kernels.json"
    done = subprocess.run([str(args.bin), "gpu", "kernels", "--device", args.device, "--json", str(path)],
                          capture_output=True, text=True, timeout=1200)
    (args.out / "kernels.log").write_text(done.stdout + done.stderr)
    reports = json.loads(path.read_text()) if path.exists() else []
    failed = [r for r in reports if not r.get("passed")]
    worst: dict[str, float] = {}
    for r in reports:
        key = f"{r['kernel']}/{r['dtype']}"
        if r.get("max_error") is not None:
            worst[key] = max(worst.get(key, 0.0), r["max_error"])
    return {"pass": done.returncode == 0 and bool(reports) and not failed, "checks": len(reports),
            "failed": failed[:20], "worst_error": worst, "summary": done.stdout.strip().splitlines()[-1:]}


def time_to_first_token(args: argparse.Namespace, name: str, env: dict[str, str]) -> dict[str, Any]:
    """Seconds from spawning `serve` to the end of a 1-token completion."""
    started = time.monotonic()
    server = Server(args, name, ["--model", args.smollm2, "--device", args.device], env)
    try:
        ready = time.monotonic() - started
        server.post("/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        first = time.monotonic() - started
        warm_up = re.search(r"warm-up forward done\S*\s+ms\S*?=\S*?([0-9.]+)", server.log_text())
    finally:
        server.stop()
    return {"ready_s": round(ready, 2), "first_token_s": round(first, 2),
            "warm_up_forward_ms": float(warm_up.group(1)) if warm_up else None}


def coldstart(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix="gpu-check-jit-cache-"))
    env = {"CUDA_CACHE_PATH": str(cache)}
    return {"jit_cache": str(cache), "fresh": time_to_first_token(args, "cold-fresh", env),
            "warm": time_to_first_token(args, "cold-warm", env)}


def bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "cpu":
        return {"skipped": "cpu"}
    n = 1 << 30  # 1 GiB of bytes, copied device to device
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    reps = 50
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # Each copy reads and writes n bytes.
    return {"bytes_per_s": 2 * n * reps / seconds, "gb_per_s": 2 * n * reps / seconds / 1e9}


def speed(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    config = TINY if args.dry_run_cpu else LLAMA3_8B
    path = args.out / "speed-config.json"
    path.write_text(json.dumps(config))
    h, i, layers, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], \
        config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    params = v * h * 2 + layers * (h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h) + h
    weight_bytes = params * (4 if args.device == "cpu" else 2)
    levels = "1,2" if args.dry_run_cpu else "1,8,32,64,128,256"
    in_len, out_len = (64, 32) if args.dry_run_cpu else (1000, 1000)
    server = Server(args, "speed", ["--model", args.smollm2, "--random-weights", str(path), "--device",
                                    args.device, "--max-num-seqs", "256", "--kv-cache-tokens",
                                    str(64 * 1024 if args.dry_run_cpu else 600_000)])
    try:
        run([str(args.bin), "bench", "serve", "--base-url", f"http://127.0.0.1:{server.port}/v1", "--model", "m",
             "--tokenizer", args.smollm2, "--sweep", f"concurrency={levels}", "--input-len", str(in_len),
             "--output-len", str(out_len), "--ignore-eos", "--duration", str(args.level_seconds), "--warmup", "1",
             "--json", str(args.out / "bench.json"), "--plots", str(args.out / "plots")], timeout=3000)
    finally:
        server.stop()
    bench = json.loads((args.out / "bench.json").read_text())
    engine = ENGINE_STOPPED.search(server.log_text())
    out: dict[str, Any] = {"config": config, "parameters": params, "weight_bytes": weight_bytes,
                           "bench_json": str(args.out / "bench.json")}
    out["levels"] = summarize_levels(bench)
    first = out["levels"][0] if out["levels"] else {}
    if first.get("tpot_ms_p50"):
        out["batch1_decode_tok_s"] = 1000.0 / first["tpot_ms_p50"]
        out["ttft_ms_p50"] = first.get("ttft_ms_p50")
        bw = results.get("bandwidth", {}).get("bytes_per_s")
        if bw:
            roofline = bw / weight_bytes
            out["roofline_tok_s"] = roofline
            out["roofline_percent"] = 100.0 * out["batch1_decode_tok_s"] / roofline
    if engine:
        out["engine_steps"] = int(engine.group(1))
        out["forward_ms_per_step"] = float(engine.group(2))
        out["overhead_ms_per_step"] = float(engine.group(3))
    return out


def graphs(args: argparse.Namespace) -> dict[str, Any]:
    config = TINY if args.dry_run_cpu else {**SMALL, "model_type": "llama", "rope_theta": 10000.0,
                                            "tie_word_embeddings": False}
    path = args.out / "graphs-config.json"
    path.write_text(json.dumps(config))
    out: dict[str, Any] = {"config": config}
    for name, env in (("with_graphs", {}), ("without_graphs", {"TOKENMILL_CUDA_GRAPHS": "0"})):
        server = Server(args, f"graphs-{name}", ["--model", args.smollm2, "--random-weights", str(path),
                                                 "--device", args.device, "--max-num-seqs", "8"], env)
        try:
            run([str(args.bin), "bench", "serve", "--base-url", f"http://127.0.0.1:{server.port}/v1", "--model",
                 "m", "--tokenizer", args.smollm2, "--sweep", "concurrency=1,8", "--input-len", "32",
                 "--output-len", "128", "--ignore-eos", "--duration", str(min(args.level_seconds, 20.0)),
                 "--warmup", "1", "--json", str(args.out / f"graphs-{name}.json")], timeout=600)
        finally:
            server.stop()
        log = server.log_text()
        engine = ENGINE_STOPPED.search(log)
        out[name] = {
            "captured": len(re.findall(r"captured a decode CUDA graph", log)),
            "capture_failed": "CUDA graph capture failed" in log,
            "levels": summarize_levels(json.loads((args.out / f"graphs-{name}.json").read_text())),
        }
        if engine:
            out[name].update(steps=int(engine.group(1)), forward_ms_per_step=float(engine.group(2)),
                             overhead_ms_per_step=float(engine.group(3)))
    return out


def summarize_levels(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures this check reports, from `tokenmill bench` JSON (docs/bench-result.schema.json)."""
    rows = []
    for level in bench.get("levels", []):
        s = level.get("summary", {})
        rows.append({
            "level": level.get("load", {}).get("concurrency"),
            "output_tok_s": s.get("output_throughput"),
            "ttft_ms_p50": (s.get("ttft_ms") or {}).get("p50"),
            "tpot_ms_p50": (s.get("tpot_ms") or {}).get("p50"),
            "errors": s.get("failed"),
        })
    return rows


def run(argv: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def step(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    started = time.monotonic()
    try:
        results[name] = fn()
    except Exception as exc:  # one failed step must not lose the others' results
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = round(time.monotonic() - started, 1)
    print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})[:400]}",
          file=sys.stderr)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"- date {results['date']}; {results.get('gpu', 'no GPU')}; command `{results['command']}`", ""]
    lines += ["| check | result |", "|---|---|"]
    for name in ("kernels", "smollm2", "random"):
        r = results.get(name, {})
        verdict = ("error: " + r["error"][:80] if "error" in r else "skipped" if "skipped" in r
                   else "not run" if not r else "pass" if r.get("pass") else "FAIL")
        lines.append(f"| {name} | {verdict} |")
    cold = results.get("coldstart", {})
    for which in ("fresh", "warm"):
        if which in cold:
            lines.append(f"| serve to first token, {which} JIT cache | {cold[which]['first_token_s']:.2f} s "
                         f"(ready {cold[which]['ready_s']:.2f} s) |")
    bw = results.get("bandwidth", {})
    if "gb_per_s" in bw:
        lines.append(f"| copy bandwidth | {bw['gb_per_s']:.0f} GB/s |")
    gr = results.get("graphs", {})
    for which in ("with_graphs", "without_graphs"):
        if gr.get(which, {}).get("forward_ms_per_step") is not None:
            g = gr[which]
            lines.append(f"| forward ms/step, small model, {which.replace('_', ' ')} | "
                         f"{g['forward_ms_per_step']:.3f} (+{g['overhead_ms_per_step']:.3f} outside; "
                         f"{g['captured']} graphs) |")
    sp = results.get("speed", {})
    for key in ("batch1_decode_tok_s", "roofline_tok_s", "roofline_percent", "ttft_ms_p50", "overhead_ms_per_step"):
        if sp.get(key) is not None:
            lines.append(f"| {key} | {sp[key]:.2f} |")
    if sp.get("levels"):
        lines += ["", "| concurrency | output tok/s | TTFT p50 ms | TPOT p50 ms | errors |", "|---|---|---|---|---|"]
        def num(x: Any) -> str:
            return f"{x:.1f}" if isinstance(x, (int, float)) else "-"

        for lv in sp["levels"]:
            lines.append(f"| {lv['level']} | {num(lv['output_tok_s'])} | {num(lv['ttft_ms_p50'])} | "
                         f"{num(lv['tpot_ms_p50'])} | {lv['errors']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, required=True, help="a tokenmill built with --features cuda")
    parser.add_argument("--smollm2", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (or a known name)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--level-seconds", type=float, default=60.0, help="bench time per concurrency level")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--only", default="kernels,smollm2,random,coldstart,graphs,bandwidth,speed")
    parser.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on the CPU: tests this script")
    args = parser.parse_args()
    if args.dry_run_cpu:
        args.device, args.level_seconds = "cpu", min(args.level_seconds, 5.0)
    if not Path(args.smollm2).is_file():
        # A known name: `bench --tokenizer` needs the file it stands for.
        cache = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
        known = cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if known.is_file():
            args.smollm2 = str(known)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                               "command": " ".join(sys.argv), "device": args.device}
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if not args.dry_run_cpu else None
    if gpu is not None and gpu.returncode == 0:
        results["gpu"] = gpu.stdout.strip()
    only = set(args.only.split(","))
    for name, fn in (("kernels", lambda: check_kernels(args)), ("smollm2", lambda: check_smollm2(args)),
                     ("random", lambda: check_random(args)), ("coldstart", lambda: coldstart(args)),
                     ("graphs", lambda: graphs(args)),
                     ("bandwidth", lambda: bandwidth(args)), ("speed", lambda: speed(args, results))):
        if name in only:
            step(results, name, fn)
    (args.out / "gpu-check.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "gpu-check.md").write_text(table + "\n")
    print(table)
    failed = [n for n in ("kernels", "smollm2", "random") if n in results and not results[n].get("pass")
              and not results[n].get("skipped")]
    return 1 if failed or any("error" in results[n] for n in results if isinstance(results[n], dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
