#!/usr/bin/env bash
# A short GPU measurement for one model, for iterating on the CUDA path (the full table is
# scripts/gpu-bench.sh): random-weight checkpoint, `silica bench` greedy at 1 and 64 streams
# with Silica's fused kernels on and off (SILICA_FUSED), TTFT of a 512-token prompt, and the
# teacher-forcing check (prefill and decode paths). Run on the GPU machine with .gpu carried:
#   MODEL=qwen2.5-3b scripts/gpu/quick.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
M=${MODEL:-qwen2.5-7b}
DT=${DTYPE:-f16}
BW=${BW:-3020}
SP=$(python3 -c 'import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))')
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
BIN=/tmp/silica-cuda
xz -dc .gpu/silica.xz > $BIN && chmod +x $BIN
TOK=/tmp/silica-tokenizer && mkdir -p $TOK && tar -C $TOK -xJf .gpu/tokenizer.tar.xz
ck=/tmp/ckpt-$M
if [ ! -f $ck/config.json ]; then
  python3 scripts/gpu/hf_reference_bench.py --model $M --save $ck --strategies greedy --lengths 50 | tail -1
  cp $TOK/* $ck/
fi
for fused in ${FUSED:-1 0}; do
  echo "== SILICA_FUSED=$fused"
  SILICA_FUSED=$fused $BIN bench --model $ck --device cuda --dtype $DT --strategy ${STRATEGIES:-greedy} \
    --max-tokens ${TOKENS:-128} --concurrency ${STREAMS:-1,64} --rounds ${ROUNDS:-1} --bandwidth-gbs $BW
  SILICA_FUSED=$fused $BIN bench --model $ck --device cuda --dtype $DT --strategy greedy --max-tokens 2 \
    --prompt-tokens 512 --concurrency 1
done
if [ "${CHECK:-1}" = 1 ]; then
  python3 scripts/gpu/check_logits.py $ck $BIN --dtype $DT
fi
