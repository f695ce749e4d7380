#!/usr/bin/env bash
# Silica on the GPU machine, in one go: measured bandwidth, random-weight Qwen2.5 checkpoints
# with the exact 7B / 3B configurations, transformers (eager) timed on them as the peer, then
# `silica bench` in FP16 and BF16 (short / medium / long responses × strategies, 1/8/32/64
# streams, TTFT of a 512-token prompt) and the teacher-forcing correctness check. Prints one
# table (also $OUT/summary.md, with the raw JSON in $OUT/raw.tar.gz).
#
# Here, first: scripts/build-cuda.sh (fills .gpu/). There (device tool, carry .gpu):
#   scripts/gpu-bench.sh                 # both models
#   MODELS=qwen2.5-3b scripts/gpu-bench.sh
# Knobs: MODELS, LENGTHS (50,150,300), BW (GB/s; measured when unset), CHECK=0 skips the
# correctness check, BF16_STRATEGIES (greedy,top-p), ROUNDS (3: the single-stream strategies in
# turn, each row its median round).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/silica-gpu-bench}
# Raw JSON per run goes to RAW (the device tool returns at most 8 files from $OUT); the
# summary, the log and a tarball of RAW go to $OUT.
RAW=/tmp/silica-gpu-raw
mkdir -p "$OUT" "$RAW"
MODELS=${MODELS:-qwen2.5-7b qwen2.5-3b}
LENGTHS=${LENGTHS:-50,150,300}
SP=$(python3 -c 'import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))')
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
BIN=/tmp/silica-cuda
xz -dc .gpu/silica.xz > $BIN && chmod +x $BIN
TOK=/tmp/silica-tokenizer && mkdir -p $TOK && tar -C $TOK -xJf .gpu/tokenizer.tar.xz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RAW/gpu.txt"
if [ -z "${BW:-}" ]; then
  BW=$(python3 scripts/gpu/bandwidth.py | tee "$RAW/bandwidth.txt" | sed -E 's/bandwidth_gbs=([0-9]+).*/\1/')
fi
echo "bandwidth: $BW GB/s"
for m in $MODELS; do
  ck=/tmp/ckpt-$m
  echo "[$(date +%T)] $m: transformers peer + checkpoint"
  python3 scripts/gpu/hf_reference_bench.py --model $m --dtype float16 --save $ck --json "$RAW/hf-$m.json" \
    --bandwidth-gbs "$BW" --strategies greedy,sampling,top_k,top_p,beam4 --lengths "$LENGTHS" > "$RAW/hf-$m.log"
  cp $TOK/* $ck/
  for dt in f16 bf16; do
    echo "[$(date +%T)] $m: silica $dt"
    if [ $dt = f16 ]; then strategies=greedy,sample,top-k,top-p,beam; else strategies=${BF16_STRATEGIES:-greedy,top-p}; fi
    # The strategies in turn, ROUNDS times, each row its median round: the comparisons between
    # strategies (top-k / top-p within 3% of greedy) then do not depend on the device's drift.
    $BIN bench --model $ck --device cuda --dtype $dt --strategy $strategies --max-tokens "$LENGTHS" \
      --concurrency 1 --rounds "${ROUNDS:-3}" --bandwidth-gbs "$BW" --json > "$RAW/silica-$m-$dt-strategies.json"
    $BIN bench --model $ck --device cuda --dtype $dt --strategy greedy --max-tokens 64 \
      --concurrency 8,32,64 --bandwidth-gbs "$BW" --json > "$RAW/silica-$m-$dt-streams.json"
    $BIN bench --model $ck --device cuda --dtype $dt --strategy greedy --max-tokens 2 --prompt-tokens 512 \
      --concurrency 1 --json > "$RAW/silica-$m-$dt-ttft512.json"
  done
  if [ "${CHECK:-1}" = 1 ]; then
    echo "[$(date +%T)] $m: correctness check"
    python3 scripts/gpu/check_logits.py $ck $BIN --dtype f16 > "$RAW/check-$m.json"
  fi
  rm -rf $ck
done
python3 scripts/gpu/summarize.py "$RAW" "$BW" | tee "$OUT/summary.md"
tar -C "$RAW" -czf "$OUT/raw.tar.gz" .
