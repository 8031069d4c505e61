#!/usr/bin/env python3
"""tokenmill beside llama.cpp's OpenAI-compatible server, and beside its own engine, on one sweep.

One command builds tokenmill (release), then, one server at a time (never two: on a small
machine they would fight for the cores), on the same GGUF and the same number of threads:

  1. starts `tokenmill serve` and runs `tokenmill bench serve --sweep concurrency=LEVELS` on it;
  2. starts llama-cpp-python's server and runs the same `tokenmill bench serve` on it;
  3. runs `tokenmill bench engine` with the same sweep and workload (no HTTP);

then `tokenmill bench report` prints one Markdown table of all three and draws the plots
(benches/plots/*.png by default). Every run's raw results are kept as JSON.

    python3 benches/side_by_side.py                      # installs llama-cpp-python into .venv-llamacpp if missing

Standard library only; the server handling is single_stream.py's. See benches/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from single_stream import (  # noqa: E402  (the sibling script is the shared toolkit)
    DEFAULT_MODEL,
    REPO,
    SERVED_NAME,
    machine_info,
    make_server,
    run_text,
)

LLAMACPP_SPEC = "llama-cpp-python[server]==0.3.36"
# llama-cpp-python ignores `ignore_eos`; a large negative bias on SmolLM2's end-of-generation tokens
# (<|endoftext|> = 0, <|im_end|> = 2) makes its requests run to max_tokens as tokenmill's do.
SMOLLM2_NO_EOS = '{"logit_bias": {"0": -100, "2": -100}}'
DEFAULT_VENV = REPO / ".venv-llamacpp"


def cargo_target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def llamacpp_python(args: argparse.Namespace) -> str:
    """The interpreter that runs llama_cpp.server, installing it into a venv when asked or missing."""
    if args.llamacpp_python:
        return args.llamacpp_python
    venv_python = DEFAULT_VENV / "bin" / "python"
    for candidate in (str(venv_python), sys.executable):
        if Path(candidate).exists() and run_text([candidate, "-c", "import llama_cpp.server.app"]) is not None:
            return candidate
    if not args.install_llamacpp:
        sys.exit(f"no Python with llama_cpp.server: pass --llamacpp-python, or --install-llamacpp to build "
                 f"{LLAMACPP_SPEC} into {DEFAULT_VENV} (about 8 minutes on 2 cores)")
    print(f"installing {LLAMACPP_SPEC} into {DEFAULT_VENV} (builds llama.cpp from source)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(DEFAULT_VENV)], check=True)
    subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    LLAMACPP_SPEC], check=True)
    return str(venv_python)


def bench_args(args: argparse.Namespace, label: str, out: Path) -> list[str]:
    """The workload flags every run shares, so all three send the same requests."""
    return [
        "--sweep", f"concurrency={args.levels}", "--num-requests", str(args.num_requests),
        "--warmup", str(args.warmup), "--input-len", args.input_len, "--output-len", args.output_len,
        "--ignore-eos", "--seed", str(args.seed), "--label", label, "--json", str(out), "--no-progress",
    ]


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    print(f"$ {shlex.join(argv)}", file=sys.stderr)
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}")
    return done.stdout


def bench_server(name: str, args: argparse.Namespace, port: int, out: Path, extra: list[str]) -> None:
    server = make_server(name, args, port)
    if name == "llamacpp":
        # By default llama-cpp-python ends a running stream (with [DONE]) when another request
        # arrives; queue them instead, as any server under concurrent load should.
        server.argv += ["--interrupt_requests", "False"]
    print(f"[{name}] starting: {shlex.join(server.argv)} (log {server.log})", file=sys.stderr)
    try:
        server.start()
        ready = server.wait_ready(args.ready_timeout)
        print(f"[{name}] ready after {ready:.1f} s", file=sys.stderr)
        label = "llama.cpp" if name == "llamacpp" else name
        run([str(args.tokenmill_bin), "bench", "serve", "--base-url", f"http://127.0.0.1:{port}/v1",
             "--model", SERVED_NAME, "--tokenizer", str(args.model), *bench_args(args, label, out), *extra])
    finally:
        server.stop()
        print(f"[{name}] stopped", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenmill-bin", type=Path, default=cargo_target_dir() / "release" / "tokenmill")
    p.add_argument("--no-build", action="store_true", help="use --tokenmill-bin as it is")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file both servers load")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for each server and the engine")
    p.add_argument("--levels", default="1,2,4,8", help="concurrency levels")
    p.add_argument("--num-requests", type=int, default=16, help="measured requests per level")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each level")
    p.add_argument("--input-len", default="64", help="prompt tokens (N, uniform:A:B, normal:M:S)")
    p.add_argument("--output-len", default="64", help="output tokens, fixed with ignore_eos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", choices=("tokenmill", "llamacpp", "engine"),
                   help="run only these (repeatable); the report covers what ran")
    p.add_argument("--llamacpp-python", help="Python with llama-cpp-python[server] (default: .venv-llamacpp, "
                   "then this interpreter)")
    p.add_argument("--install-llamacpp", action="store_true",
                   help=f"build {LLAMACPP_SPEC} into .venv-llamacpp when no interpreter has it")
    p.add_argument("--llamacpp-extra-body", default=SMOLLM2_NO_EOS,
                   help="JSON fields added to llama.cpp's requests (default: keep SmolLM2 from ending early)")
    p.add_argument("--port-base", type=int, default=18531, help="tokenmill gets this port, llama.cpp the next")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--plots", type=Path, default=REPO / "benches" / "plots", help="where the PNGs go")
    p.add_argument("--results", type=Path, help="where the JSON results go (default: a new temp directory)")
    p.add_argument("--markdown", type=Path, help="also write the report (Markdown) here")
    args = p.parse_args()

    only = args.only or ["tokenmill", "llamacpp", "engine"]
    if not args.model.is_file():
        p.error(f"no model at {args.model} (run models/fetch-smollm2.sh, or pass --model)")
    if not args.no_build:
        run(["cargo", "build", "--release", "-p", "tokenmill"])
    if not os.access(args.tokenmill_bin, os.X_OK):
        p.error(f"no tokenmill binary at {args.tokenmill_bin}")
    if "llamacpp" in only:
        args.llamacpp_python = llamacpp_python(args)
    results_dir = args.results or Path(tempfile.mkdtemp(prefix="side-by-side-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="side-by-side-ledger-")
    # tokenmill as served by default: the signed ledger on, in a data directory of its own.
    args.tokenmill_args = ["--data-dir", data_dir]

    started = _dt.datetime.now(_dt.timezone.utc)
    files: list[Path] = []
    if "tokenmill" in only:
        files.append(results_dir / "tokenmill.json")
        bench_server("tokenmill", args, args.port_base, files[-1], [])
    if "llamacpp" in only:
        files.append(results_dir / "llamacpp.json")
        bench_server("llamacpp", args, args.port_base + 1, files[-1], ["--extra-body", args.llamacpp_extra_body])
    if "engine" in only:
        files.append(results_dir / "engine.json")
        env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "CANDLE_NUM_THREADS": str(args.threads)}
        run([str(args.tokenmill_bin), "bench", "engine", "--model", str(args.model),
             *bench_args(args, "engine", files[-1])], env=env)
    finished = _dt.datetime.now(_dt.timezone.utc)
    table = run([str(args.tokenmill_bin), "bench", "report", *map(str, files), "--plots", str(args.plots)])

    mach = machine_info()
    commit = run_text(["git", "rev-parse", "--short", "HEAD"], REPO) or "unknown"
    dirty = run_text(["git", "status", "--porcelain", "--untracked-files=no"], REPO)
    info: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "minutes": (finished - started).total_seconds() / 60,
        "commit": commit + ("+dirty" if dirty else ""),
    }
    lines = [
        f"- date: {info['date']}, {info['minutes']:.1f} minutes",
        f"- machine: {mach['cpu_model']}, {mach['usable_cpus']} usable CPUs; {args.threads} threads per server",
        f"- tokenmill: commit {info['commit']}, {run_text([str(args.tokenmill_bin), '--version'])}",
    ]
    if "llamacpp" in only:
        version = run_text([args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"])
        lines.append(f"- llama.cpp: llama-cpp-python {version}")
    lines += [
        f"- workload: concurrency {args.levels}, {args.num_requests} requests per level after "
        f"{args.warmup} warm-up, input {args.input_len} tokens, output {args.output_len} tokens (ignore_eos), "
        f"seed {args.seed}",
        f"- command: `{shlex.join([sys.executable, *sys.argv])}`",
        f"- raw results: {results_dir}",
        "",
        table.rstrip(),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
