#!/usr/bin/env bash
# Silica against llama.cpp on the CPU, same GGUF files, same machine, same run.
#
# llama.cpp comes from the `llama-cpp-python` package on PyPI, built from its source
# distribution (so it is compiled for this CPU) into a cached venv under .bench-cpu-peer/
# (git-ignored; the first run takes several minutes to compile). Both engines run with 2
# threads, one after the other, never at the same time. Printed: a markdown ratio table of
# decode tok/s (short prompt, 128 new tokens, greedy) and prefill tok/s (512-token prompt) for
# both demo models, plus each engine's peak resident set. This shared machine's speed drifts
# from minute to minute, so the two engines alternate: ROUNDS rounds (default 3), each one
# llama.cpp process (a prefill and a decode) then Silica (a prefill and a decode), and each
# figure is that engine's best over the rounds, the same rule for both; every round's figures
# are printed too (stderr), so the spread can be reported.
#
#   scripts/bench-cpu-peer.sh                 # both demo models
#   scripts/bench-cpu-peer.sh --install-only  # only build the llama.cpp venv
#   MODELS="qwen2.5-coder-0.5b" scripts/bench-cpu-peer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
THREADS=${THREADS:-2}
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
VENV=$ROOT/.bench-cpu-peer/venv
MODELS=${MODELS:-"qwen2.5-coder-0.5b qwen2.5-coder-1.5b"}
DECODE_TOKENS=${DECODE_TOKENS:-128}
PREFILL_TOKENS=${PREFILL_TOKENS:-512}
ROUNDS=${ROUNDS:-3}

# 1. llama.cpp through llama-cpp-python, compiled from the sdist, cached.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source into $VENV (several minutes)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" \
        "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
fi
[ "${1:-}" = "--install-only" ] && exit 0

# 2. Silica, release build.
cargo build --release --locked -q
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/silica
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

busy() { pgrep -f "target/cuda|nvcc|cicc|ptxas" >/dev/null || pgrep -x silica >/dev/null; }
if busy; then echo "warning: other heavy processes are running; timings will be low" >&2; fi

# Peak resident set of a command, from /usr/bin/time if present.
peak() { # peak FILE CMD...
    local f=$1; shift
    if [ -x /usr/bin/time ]; then /usr/bin/time -f "%M" -o "$f" "$@"; else "$@"; echo 0 >"$f"; fi
}

for MODEL in $MODELS; do
    GGUF=$(ls "$ROOT"/models/${MODEL}-instruct-*.gguf | head -1)
    # The prompts: a raw text of exactly PREFILL_TOKENS tokens (counted by llama.cpp's
    # tokenizer, which is the GGUF's own) and a short one for decode.
    "$VENV/bin/python" - "$GGUF" "$PREFILL_TOKENS" "$OUT/$MODEL" <<'PY'
import sys, llama_cpp
path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
base = ("The history of computing spans centuries, from the abacus to modern processors, "
        "and includes many inventors and ideas. ")
text = base * 64
toks = llm.tokenize(text.encode(), add_bos=False, special=False)[:n]
open(out + ".long.txt", "w").write(llm.detokenize(toks).decode())
open(out + ".short.txt", "w").write("Write a detailed essay about the history of computing.")
PY
    # One round: llama.cpp (prefill the long prompt in one batch, best of two; decode 128
    # tokens after the short one), then Silica (`silica generate` on the same prompts, raw
    # text, greedy).
    llama_run() { # llama_run ROUND
        peak "$OUT/$MODEL.llama$1.rss" "$VENV/bin/python" - "$GGUF" "$THREADS" "$DECODE_TOKENS" "$OUT/$MODEL" \
            >"$OUT/$MODEL.llama$1.json" <<'PY'
import json, sys, time, numpy as np, llama_cpp
path, threads, ndec, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
def prefill(text):
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.reset()  # eval() then drops the cached positions from 0 on
    t0 = time.perf_counter(); llm.eval(toks); return len(toks), time.perf_counter() - t0
def argmax():
    return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
long_text = open(base + ".long.txt").read()
prefill("Hello there, warm-up.")
n, dt = prefill(long_text)
# Greedy decode after the short prompt, one token per eval, as a generation loop does.
prefill(open(base + ".short.txt").read())
tok = argmax()
t0 = time.perf_counter()
for _ in range(ndec):
    llm.eval([tok])
    tok = argmax()
dec = ndec / (time.perf_counter() - t0)
print(json.dumps({"prefill_tokens": n, "prefill_tps": n / dt, "decode_tps": dec}))
PY
    }
    silica_run() { # silica_run PROMPTFILE MAXTOK LOG
        peak "$3.rss" "$BIN" generate --model "$MODEL" --raw --prompt "$(cat "$1")" --max-tokens "$2" \
            >/dev/null 2>"$3"
    }
    for i in $(seq "$ROUNDS"); do
        llama_run "$i"
        silica_run "$OUT/$MODEL.long.txt" 1 "$OUT/$MODEL.silica.pf$i"
        silica_run "$OUT/$MODEL.short.txt" "$DECODE_TOKENS" "$OUT/$MODEL.silica.dec$i"
    done
    # And through the engine loop: `silica bench`, one stream, decode after a synthetic
    # 512-token prompt (1000 / inter-token latency p50).
    "$BIN" bench --model "$MODEL" --concurrency 1 --max-tokens "$DECODE_TOKENS" \
        --prompt-tokens "$PREFILL_TOKENS" --json >"$OUT/$MODEL.bench.json" 2>/dev/null || echo '[]' >"$OUT/$MODEL.bench.json"
done

python3 - "$OUT" "$ROUNDS" $MODELS <<'PY'
import glob, json, os, re, sys
out, rounds, models = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def field(path, name):
    m = re.search(name + r": ([0-9.]+) tok/s", open(path).read())
    return float(m.group(1)) if m else float("nan")
def count(path):
    m = re.search(r"prompt tokens: ([0-9]+)", open(path).read())
    return int(m.group(1)) if m else 0
def rss(path):
    try: return int(open(path).read().split()[-1]) * 1024
    except Exception: return 0
gib = lambda x: f"{x / 2**30:.2f} GiB"
print("| model | metric | llama.cpp | Silica `generate` | Silica / llama.cpp | Silica `bench` (engine loop, 1 stream) |")
print("| --- | --- | --- | --- | --- | --- |")
for m in models:
    b = f"{out}/{m}"
    lls = [json.load(open(f"{b}.llama{i}.json")) for i in range(1, rounds + 1)]
    pfs = [field(f"{b}.silica.pf{i}", "prefill") for i in range(1, rounds + 1)]
    decs = [field(f"{b}.silica.dec{i}", "decode") for i in range(1, rounds + 1)]
    # Every round, in order (stderr), then each engine's best.
    for i, (l, p, d) in enumerate(zip(lls, pfs, decs), 1):
        print(f"{m} round {i}: decode llama.cpp {l['decode_tps']:.1f} Silica {d:.1f}; "
              f"prefill llama.cpp {l['prefill_tps']:.1f} Silica {p:.1f}", file=sys.stderr)
    ll = {"prefill_tokens": lls[0]["prefill_tokens"], "prefill_tps": max(l["prefill_tps"] for l in lls),
          "decode_tps": max(l["decode_tps"] for l in lls)}
    pf, dec = max(pfs), max(decs)
    rows = json.load(open(b + ".bench.json"))
    row = rows[0] if isinstance(rows, list) and rows else (rows if isinstance(rows, dict) else {})
    bdec = row.get("decode_tokens_per_s") or row.get("per_stream_tokens_per_s")
    # (Its time to first token is not a prefill figure: the warm-up request's prompt blocks
    # are in the prefix cache.)
    print(f"| {m} | decode tok/s (128 new tokens) | {ll['decode_tps']:.1f} | {dec:.1f} | **{dec / ll['decode_tps']:.2f}×** | {bdec:.1f} |" if bdec else
          f"| {m} | decode tok/s (128 new tokens) | {ll['decode_tps']:.1f} | {dec:.1f} | **{dec / ll['decode_tps']:.2f}×** | n/a |")
    print(f"| {m} | prefill tok/s ({ll['prefill_tokens']} / {count(b + '.silica.pf1')} tokens) | {ll['prefill_tps']:.1f} | {pf:.1f} | **{pf / ll['prefill_tps']:.2f}×** | |")
print()
print("| model | GGUF file | llama.cpp peak RSS | Silica `generate` peak RSS (512-token prompt) | Silica / file |")
print("| --- | --- | --- | --- | --- |")
for m in models:
    b = f"{out}/{m}"
    size = os.path.getsize(glob.glob(f"models/{m}-instruct-*.gguf")[0])
    s = max(rss(f"{b}.silica.pf{i}.rss") for i in range(1, rounds + 1))
    ll_rss = max(rss(f"{b}.llama{i}.rss") for i in range(1, rounds + 1))
    print(f"| {m} | {gib(size)} | {gib(ll_rss)} | {gib(s)} | {s / size:.2f}× |")
PY
