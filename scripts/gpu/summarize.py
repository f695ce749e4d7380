#!/usr/bin/env python3
"""One table from a scripts/gpu-bench.sh run: transformers vs Silica per model, dtype,
strategy, length and concurrency, with memory-bandwidth utilisation."""
import glob, json, os, sys

out, bw = sys.argv[1], float(sys.argv[2])
print(f"\nGPU: {open(os.path.join(out, 'gpu.txt')).read().strip()}; bandwidth {bw:.0f} GB/s\n")
print("| engine | model | dtype | strategy | new tokens | streams | aggregate tok/s | decode tok/s per stream | TTFT ms | ITL p50 / p95 ms | bandwidth |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(out, "hf-*.json"))):
    h = json.load(open(f))
    for r in h["rows"]:
        mbu = f"{r['mbu'] * 100:.0f}%" if "mbu" in r else "-"
        print(f"| transformers eager | {h['model']} | fp16 | {r['strategy']} | {r['new_tokens']} | 1 | {r['tok_s']} | {r['decode_tok_s']} | {r['ttft_ms']} | - | {mbu} |")
for f in sorted(glob.glob(os.path.join(out, "silica-*.json"))):
    name = os.path.basename(f)[len("silica-"):-len(".json")]
    model, dtype, kind = name.rsplit("-", 2)
    for r in json.load(open(f)):
        bwu = f"{r['bandwidth_utilisation'] * 100:.0f}%" if r.get("bandwidth_utilisation") is not None else "-"
        itl = f"{r['itl_ms_p50']:.2f} / {r['itl_ms_p95']:.2f}" if r["itl_ms_p50"] > 0 else "-"  # beams stream nothing
        label = r["strategy"] + (f" (prompt {r['prompt_tokens']})" if r.get("prompt_tokens") else "")
        print(f"| silica | {model} | {dtype} | {label} | {r['max_tokens']} | {r['concurrency']} | {r['aggregate_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.1f} | {itl} | {bwu} |")
for f in sorted(glob.glob(os.path.join(out, "check-*.json"))):
    print(f"\ncorrectness {os.path.basename(f)[6:-5]}: {open(f).read().strip()}")
