#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one:
#   1. installs the real SmolLM2 model into the model cache (once);
#   2. makes .venv with the pinned Python test dependencies (once);
#   3. runs the Rust tests (unit, integration, the llama.cpp reference checks);
#   4. runs the end-to-end tests: the official openai SDK against a real
#      `tokenmill serve` on a loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

bash models/fetch-smollm2.sh

venv=.venv
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/e2e/requirements.txt "$venv/.requirements"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
    cp tests/e2e/requirements.txt "$venv/.requirements"
fi

cargo build --workspace --bins
cargo test --workspace
TOKENMILL_BIN="$PWD/target/debug/tokenmill" "$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider
