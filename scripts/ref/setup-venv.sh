#!/usr/bin/env bash
# Create/update the cached Python venv used by the Hugging Face reference checks.
#
#   scripts/ref/setup-venv.sh            # -> prints the venv python path on the last line
#   PYTHON=python3.11 scripts/ref/setup-venv.sh
#   SILICA_REF_VENV=/some/dir scripts/ref/setup-venv.sh
#
# The venv lives at <repo>/.venv (git-ignored). A stamp file inside it records the
# sha256 of scripts/ref/requirements.txt; when it matches, nothing is installed and
# the script returns in well under a second. No stdin is read (works with CI=true).
#
# NOTE on size: PyPI's torch for linux x86_64 is the CUDA build and pulls the
# nvidia-* runtime wheels; there is no CPU-only torch on PyPI for x86_64 and the
# CPU-only index of the PyTorch project is not reachable here. `pip install --no-deps torch`
# does not import (libtorch_cuda.so NEEDs libcublas/libcudnn/libnccl/...), so the
# normal, full set is installed (~4.6 GiB on disk; see README.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SILICA_REF_VENV:-$repo/.venv}"
req="$here/requirements.txt"
py="${PYTHON:-python3}"

hash="$( (cat "$req"; "$py" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -d' ' -f1)"
stamp="$venv/.silica-ref-stamp"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
    echo "ref venv up to date: $venv" >&2
    echo "$venv/bin/python"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating venv at $venv" >&2
    "$py" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# All versions (the full transitive closure) are pinned in requirements.txt.
"$venv/bin/python" -m pip install --quiet --progress-bar off -r "$req" >&2
# Smoke check: the reference stack imports and torch runs a CPU matmul.
"$venv/bin/python" - >&2 <<'EOF'
import torch, transformers, gguf, tokenizers, accelerate, numpy, jinja2, openai
x = torch.ones(2, 2) @ torch.ones(2, 2)
assert float(x.sum()) == 8.0
print(f"torch {torch.__version__}, transformers {transformers.__version__}, gguf {__import__('importlib.metadata').metadata.version('gguf')}")
EOF
echo "$hash" > "$stamp"
echo "ref venv ready in $(( $(date +%s) - start ))s: $venv" >&2
echo "$venv/bin/python"
