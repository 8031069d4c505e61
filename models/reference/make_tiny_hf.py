#!/usr/bin/env python3
"""Tiny Hugging Face-layout models and their logits from transformers.

For each architecture tokenmill loads from a Hugging Face directory (Llama 2/3,
Qwen2, Mistral) this builds a tiny model with seeded random weights in
transformers (PyTorch), an implementation independent of tokenmill, and writes
into crates/tokenmill-models/tests/data/tiny-<arch>/:

  * config.json and model.safetensors (bf16 weights), as `save_pretrained`
    writes them: the files tokenmill's loader reads;
  * reference.json: the token ids fed and the logits transformers computes at
    every position, in float32 from the bf16 weights (upcast), so tokenmill's
    CPU path (which also upcasts) can be held to float32 rounding.

Weights are drawn with a larger spread than a trained model's (std 0.2, norms
around 1), so attention is not uniform and the logits spread: a mistake in
rotary pairing, grouping or masking moves them far more than rounding does.

    python models/reference/make_tiny_hf.py      # needs torch, transformers, safetensors

See models/reference/README.md.
"""

import argparse
import json
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "crates" / "tokenmill-models" / "tests" / "data"

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

ARCHS = {
    # Untied head and no biases.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    # q/k/v biases, tied head, a different rope base.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)),
    # Llama 3.1's rotary rescaling, with an original context short enough that
    # the tiny head's pairs fall in all three bands (kept, interpolated, divided).
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(tie_word_embeddings=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # A sliding window larger than the context: equal to full attention.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(tie_word_embeddings=False, sliding_window=4096)),
}

# 40 tokens, fed in one forward.
TOKENS = [1, 17, 250, 3, 99, 381, 42, 42, 7, 160, 5, 311, 64, 200, 8, 77, 128, 0, 383, 12,
          19, 301, 45, 46, 47, 2, 270, 90, 150, 33, 222, 111, 9, 10, 11, 340, 58, 6, 190, 4]


def build(arch: str, seed: int) -> None:
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(**{**COMMON, **extra}, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    out = OUT / f"tiny-{arch}"
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # The reference: the same bf16 weights, upcast, run in float32.
    model = model_cls.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0]
    reference = {
        "generator": "models/reference/make_tiny_hf.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": seed,
        "tokens": TOKENS,
        "logits": [[round(float(x), 6) for x in row] for row in logits],
    }
    (out / "reference.json").write_text(json.dumps(reference) + "\n")
    (out / "generation_config.json").unlink(missing_ok=True)
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, logits {tuple(logits.shape)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args()
    for i, arch in enumerate(ARCHS):
        build(arch, args.seed + i)


if __name__ == "__main__":
    main()
