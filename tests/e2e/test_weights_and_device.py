"""`serve --random-weights CONFIG.json` (an architecture with seeded random weights) and `--device`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import server_binary, start_server
from e2e_support import MODEL, httpx

# A small Llama with SmolLM2's vocabulary, so SmolLM2's tokenizer can speak for it.
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 512, "vocab_size": 49152, "tie_word_embeddings": False, "hidden_act": "silu",
}


def _complete(seed: int, config: Path) -> tuple[str, list[float], str]:
    """Greedy 12 tokens from a fresh server with random weights drawn with `seed`: text, their logprobs, log."""
    args = ["--no-auth", "--no-ledger", "--random-weights", str(config), "--seed", str(seed)]
    with start_server(server_binary(), args) as server:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "logprobs": 0}
        response = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert response.json()["usage"]["completion_tokens"] == 12
        log = re.sub(r"\x1b\[[0-9;]*m", "", server.log_path.read_text(errors="replace"))
    return choice["text"], choice["logprobs"]["token_logprobs"], log


def test_random_weights_are_served_and_the_seed_decides_them(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    text, logprobs, log = _complete(5, config)
    assert "model loaded on cpu" in log
    assert "random_weights=true" in log
    assert len(logprobs) == 12
    # Two processes with the same seed build the same model: the same tokens with the same
    # probabilities. Another seed is another model (its tokens may agree, its numbers do not).
    assert _complete(5, config)[:2] == (text, logprobs)
    assert _complete(6, config)[1] != logprobs


def test_a_config_the_tokenizer_does_not_fit_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_LLAMA, "vocab_size": 1000}))
    done = _serve_once("--random-weights", str(config))
    assert done.returncode != 0
    assert "tokenizer has 49152 tokens but the model only 1000" in done.stderr


def test_cuda_on_a_build_without_it_is_an_error_not_the_cpu() -> None:
    done = _serve_once("--device", "cuda")
    assert done.returncode != 0
    assert "built without CUDA" in done.stderr


def test_an_unknown_device_is_a_usage_error() -> None:
    done = _serve_once("--device", "gpu")
    assert done.returncode == 2
    assert "not a device" in done.stderr


def _serve_once(*args: str) -> subprocess.CompletedProcess:
    """`serve` that is expected to exit before it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_") or k == "TOKENMILL_CACHE"}
    return subprocess.run(
        [str(server_binary()), "serve", "--model", MODEL, "--no-auth", "--no-ledger", "--port", "1", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "crates" / "tokenmill-models" / "tests" / "data"


def _logits(*args: str) -> list[list[float]]:
    done = subprocess.run([str(server_binary()), "model", "logits", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["logits"]


def test_model_logits_of_a_hugging_face_directory_match_transformers() -> None:
    """`tokenmill model logits` on the tiny Qwen2 that transformers ran (models/reference/make_tiny_hf.py)."""
    reference = json.loads((TINY / "tiny-qwen2" / "reference.json").read_text())
    ours = _logits("--model", str(TINY / "tiny-qwen2"), "--tokens", ",".join(map(str, reference["tokens"])))
    assert len(ours) == len(reference["logits"])
    for row, theirs in zip(ours, reference["logits"]):
        scale = max(abs(x) for x in theirs)
        assert max(abs(a - b) for a, b in zip(row, theirs)) / scale < 1e-4


def test_decode_steps_give_the_logits_of_one_prefill() -> None:
    """`--decode-from`: 20 tokens fed one per forward (the decode path, gpu-check's `kernels_decode`)
    give transformers' logits, as one prefill does; `--decode-from` outside 1..=len is refused."""
    reference = json.loads((TINY / "tiny-qwen2" / "reference.json").read_text())
    tokens = ",".join(map(str, reference["tokens"]))
    start = max(1, len(reference["tokens"]) - 20)
    stepped = _logits("--model", str(TINY / "tiny-qwen2"), "--tokens", tokens, "--decode-from", str(start))
    assert len(stepped) == len(reference["logits"])
    for row, theirs in zip(stepped, reference["logits"]):
        scale = max(abs(x) for x in theirs)
        assert max(abs(a - b) for a, b in zip(row, theirs)) / scale < 1e-4
    bad = subprocess.run([str(server_binary()), "model", "logits", "--device", "cpu", "--model",
                          str(TINY / "tiny-qwen2"), "--tokens", tokens, "--decode-from", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--decode-from 0" in bad.stderr


def test_random_weights_written_as_safetensors_are_the_same_model(tmp_path: Path) -> None:
    """The directory `model random-weights` writes loads back as the model `--random-weights` builds."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_LLAMA, "vocab_size": 500}))
    out = tmp_path / "random"
    done = subprocess.run([str(server_binary()), "model", "random-weights", "--config", str(config), "--seed", "9",
                           "--dtype", "f32", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    tokens = "1,2,3,400,5,6"
    from_file = _logits("--model", str(out), "--tokens", tokens)
    built = _logits("--random-weights", str(config), "--seed", "9", "--tokens", tokens)
    assert from_file == built
    assert from_file != _logits("--random-weights", str(config), "--seed", "10", "--tokens", tokens)
    # A token outside the vocabulary is an error, not a panic.
    bad = subprocess.run([str(server_binary()), "model", "logits", "--model", str(out), "--tokens", "500"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "outside the vocabulary" in bad.stderr
