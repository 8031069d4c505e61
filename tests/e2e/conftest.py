"""Fixtures for the end-to-end tests: one real `tokenmill serve` per test session.

The server binary is `$TOKENMILL_BIN`, or `<repo>/target/debug/tokenmill`. It is
started on a free loopback port with `serve --model smollm2`, polled on
`GET /health` until it answers 200, and stopped with SIGTERM (then SIGKILL after
10 s) when the session ends. Its stdout and stderr go to one temporary log file,
whose last lines are attached to the report of every failing test.

Environment:
  TOKENMILL_BIN                   server binary (default: <repo>/target/debug/tokenmill)
  TOKENMILL_CACHE                 passed through; where the server finds its models
  TOKENMILL_E2E_BASE_URL          use an already running server (".../v1"); start none
  TOKENMILL_E2E_SERVER_ARGS       extra arguments appended to the `serve` command line
  TOKENMILL_E2E_STARTUP_TIMEOUT   seconds to wait for /health (default 120)
  TOKENMILL_API_KEY               bearer token the clients send (default: a dummy key)
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from e2e_support import MODEL, httpx, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "tokenmill"
STARTUP_TIMEOUT_S = float(os.environ.get("TOKENMILL_E2E_STARTUP_TIMEOUT", "120"))
SHUTDOWN_GRACE_S = 10.0
REQUEST_TIMEOUT_S = 120.0
API_KEY = os.environ.get("TOKENMILL_API_KEY", "sk-tokenmill-e2e")


@dataclass
class Server:
    """A tokenmill server under test."""

    base_url: str  # "http://127.0.0.1:PORT/v1"
    root: str  # "http://127.0.0.1:PORT"
    process: subprocess.Popen | None  # None when the server was started elsewhere
    log_path: Path | None
    usage_log: Path | None = None  # the server's --usage-log, when we started it


# The running server, for the report hook below (hooks cannot request fixtures).
_current_server: Server | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(proc: subprocess.Popen, root: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no attempt made"
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                pytest.fail(
                    f"tokenmill exited with code {code} before /health answered.\n"
                    f"--- server log ({log_path}) ---\n{tail(log_path)}",
                    pytrace=False,
                )
            try:
                response = http.get(f"{root}/health")
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.TransportError as err:
                last_error = repr(err)
            time.sleep(0.25)
    pytest.fail(
        f"tokenmill did not answer GET /health with 200 within {STARTUP_TIMEOUT_S:.0f} s "
        f"(last: {last_error}).\n--- server log ({log_path}) ---\n{tail(log_path)}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=SHUTDOWN_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def tokenmill_server() -> Iterator[Server]:
    """Start `tokenmill serve` on a free loopback port; stop it at the end of the session."""
    global _current_server

    external = os.environ.get("TOKENMILL_E2E_BASE_URL")
    if external:
        base_url = external.rstrip("/")
        _current_server = Server(base_url, base_url.removesuffix("/v1"), None, None)
        yield _current_server
        _current_server = None
        return

    binary = server_binary()
    usage_log = Path(tempfile.mkdtemp(prefix="tokenmill-e2e-")) / "usage.jsonl"
    extra = ["--no-auth", "--usage-log", str(usage_log)]
    extra += shlex.split(os.environ.get("TOKENMILL_E2E_SERVER_ARGS", ""))
    with start_server(binary, extra) as server:
        server.usage_log = usage_log
        _current_server = server
        try:
            yield server
        finally:
            _current_server = None


@contextlib.contextmanager
def start_server(binary: Path, args: list[str]) -> Iterator[Server]:
    """Run `tokenmill serve --model smollm2 ARGS` on a free loopback port until the block ends."""
    port = _free_port()
    root = f"http://127.0.0.1:{port}"
    if "--data-dir" not in args and "--no-ledger" not in args:
        # Every server keeps its signed ledger (and makes its key) in a directory of its own.
        args = [*args, "--data-dir", tempfile.mkdtemp(prefix="tokenmill-e2e-data-")]
    command = [str(binary), "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "RUST_BACKTRACE": os.environ.get("RUST_BACKTRACE", "1")}

    log_file = tempfile.NamedTemporaryFile(prefix="tokenmill-e2e-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    log_file.write(f"$ {shlex.join(command)}\n".encode())
    log_file.flush()
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        server = Server(f"{root}/v1", root, proc, log_path)
        _wait_until_healthy(proc, root, log_path)
        yield server
    finally:
        _stop(proc)
        log_file.close()
        print(f"\ntokenmill server log: {log_path}")


def server_binary() -> Path:
    """The tokenmill binary under test."""
    binary = Path(os.environ.get("TOKENMILL_BIN", DEFAULT_BIN))
    if not binary.is_file():
        pytest.fail(
            f"tokenmill binary not found at {binary}: run `cargo build` or set TOKENMILL_BIN",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def base_url(tokenmill_server: Server) -> str:
    """The OpenAI base URL of the server under test: http://127.0.0.1:PORT/v1."""
    return tokenmill_server.base_url


@pytest.fixture(scope="session")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    """The official OpenAI SDK pointed at the server; no retries, so failures show at once."""
    sdk = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    yield sdk
    sdk.close()


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    """A raw HTTP client whose relative paths resolve under /v1 (e.g. "/completions")."""
    with httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=REQUEST_TIMEOUT_S,
    ) as raw:
        yield raw


@pytest.fixture(autouse=True)
def _server_still_running(tokenmill_server: Server) -> Iterator[None]:
    """Fail the test during which the server process died, instead of every later one."""
    yield
    proc = tokenmill_server.process
    if proc is not None and proc.poll() is not None:
        pytest.fail(f"tokenmill exited with code {proc.returncode} during this test", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the tail of the server log to the report of every failing test."""
    report = yield
    if report.failed and _current_server is not None and _current_server.log_path is not None:
        report.sections.append(
            (f"tokenmill server log, last lines ({_current_server.log_path})", tail(_current_server.log_path))
        )
    return report
