"""`serve` configuration in layers: defaults < --config file < TOKENMILL_* environment < flags."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from conftest import server_binary


def _print_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_") or k == "TOKENMILL_CACHE"}
    return subprocess.run(
        [str(server_binary()), "serve", *args, "--print-config"],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    """port: file 9000 < env 9100 < flag 9200; a key only in the file is used; the rest stay defaults."""
    config = tmp_path / "tokenmill.toml"
    config.write_text('port = 9000\nmax-num-seqs = 12\nno_auth = true\nmetrics_tenant_label = ["a", "b"]\n')
    layers = [
        ([], {}, 9000),
        ([], {"TOKENMILL_PORT": "9100"}, 9100),
        (["--port", "9200"], {"TOKENMILL_PORT": "9100"}, 9200),
    ]
    for flags, env, port in layers:
        done = _print_config("--config", str(config), *flags, env=env)
        assert done.returncode == 0, done.stderr
        merged = tomllib.loads(done.stdout)
        assert merged["port"] == port
        assert merged["max_num_seqs"] == 12
        assert merged["no_auth"] is True
        assert merged["metrics_tenant_label"] == ["a", "b"]
        assert merged["max_batched_tokens"] == 2048, "untouched settings keep their defaults"
    defaults = tomllib.loads(_print_config().stdout)
    assert defaults["port"] == 8000 and defaults["no_auth"] is False


def test_unknown_keys_and_bad_values_are_errors(tmp_path: Path) -> None:
    """A misspelt key or a wrong type fails with a message naming it, instead of being ignored."""
    typo = tmp_path / "typo.toml"
    typo.write_text("max_num_seq = 12\n")
    done = _print_config("--config", str(typo))
    assert done.returncode != 0 and "max_num_seq" in done.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('port = "eighty"\n')
    done = _print_config("--config", str(wrong))
    assert done.returncode != 0 and "eighty" in done.stderr
    done = _print_config(env={"TOKENMILL_MAX_NUM_SEQS": "many"})
    assert done.returncode != 0 and "many" in done.stderr
