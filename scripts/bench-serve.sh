#!/usr/bin/env bash
# Both demo models served together by one `silica serve`: each model's decode tokens/s
# (single stream, then 8 concurrent streams) and memory (per-model estimate from /models,
# and the process's resident set).
#   scripts/bench-serve.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-18900}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-2}
BIN=target/release/silica
[ -x "$BIN" ] || cargo build --release --locked
$BIN serve --port "$PORT" --model qwen2.5-coder-0.5b --model qwen2.5-coder-1.5b 2>/tmp/silica-bench-serve.log &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
until curl -sf "localhost:$PORT/health" | grep -q '"ok"' && ! curl -s "localhost:$PORT/health" | grep -q loading; do sleep 1; done
python3 - "$PORT" "$PID" <<'PY'
import json, sys, threading, urllib.request
port, pid = sys.argv[1], sys.argv[2]
def post(body):
    r = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(r, timeout=600))
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) * 1024
prompt = "Write a detailed story about a lighthouse keeper."
print("| model | streams | decode tok/s per stream | aggregate tok/s | TTFT ms (mean) |")
print("| --- | --- | --- | --- | --- |")
for model in ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]:
    post({"model": model, "prompt": "Hi", "max_tokens": 4})  # warm-up
    for streams in (1, 8):
        out = [None] * streams
        def run(i):
            out[i] = post({"model": model, "prompt": f"{prompt} ({i})", "max_tokens": 64, "temperature": 0})
        ts = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        import time; t0 = time.time()
        [t.start() for t in ts]; [t.join() for t in ts]
        wall = time.time() - t0
        per = sum(o["timings"]["decode_tokens_per_s"] for o in out) / streams
        toks = sum(o["usage"]["completion_tokens"] for o in out)
        ttft = sum(o["timings"]["time_to_first_token_ms"] for o in out) / streams
        print(f"| {model} | {streams} | {per:.1f} | {toks / wall:.1f} | {ttft:.0f} |")
models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/models"))["models"]
print()
print("| model | weights (file) | KV cache | total |")
print("| --- | --- | --- | --- |")
gib = lambda b: f"{b / 2**30:.2f} GiB"
for m in models:
    mem = m["memory"]
    print(f"| {m['name']} | {gib(mem['weights_bytes'])} | {gib(mem['kv_cache_bytes'])} | {gib(mem['total_bytes'])} |")
print(f"\nprocess resident set after the runs: {gib(rss())}")
PY
