#!/usr/bin/env bash
# Build the CUDA `silica` binary on this GPU-less machine and pack what the GPU machine needs
# into .gpu/ (git-ignored, carried with the device tool):
#   .gpu/silica.xz          stripped, xz-compressed binary (sm_90: H100/H200)
#   .gpu/tokenizer.tar.xz   tokenizer.json, tokenizer_config.json, chat_template.jinja (Qwen2.5)
#                           (the random-weight checkpoints built there have none)
# First build ~25 min on 2 cores (candle-kernels' nvcc step); later ones are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolchain.sh)"
cargo build --release --locked --features cuda --target-dir target/cuda -p silica
mkdir -p .gpu
strip -o .gpu/silica target/cuda/release/silica
xz -9 -T2 -f .gpu/silica
if [ ! -f .gpu/tokenizer.tar.xz ]; then
  scripts/fetch-demo-models.sh qwen2.5-coder-0.5b >&2
  PY=$(scripts/ref/setup-venv.sh | tail -n1)
  tmp=$(mktemp -d)
  "$PY" - "$tmp" <<'PY'
import sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained("models", gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
t.save_pretrained(sys.argv[1])
PY
  tar -C "$tmp" -cJf .gpu/tokenizer.tar.xz tokenizer.json tokenizer_config.json chat_template.jinja
  rm -rf "$tmp"
fi
ls -l .gpu
