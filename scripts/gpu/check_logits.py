#!/usr/bin/env python3
"""Correctness on the GPU: teacher forcing over a fixed sequence on the same weights.

transformers in FP32 is the reference: it writes a sequence (random prompt + its own greedy
continuation), then gives every position's logits in one forward. Silica (`silica logits`, the
device and dtype under test) prints each position's top logits for the same sequence. Reported:
the share of positions whose FP32 top-2 margin exceeds 0.1 where Silica's top-1 equals the
reference's (target >= 99%), and the largest relative logit error on Silica's top tokens; once
with every position in one prefill pass, once with positions after the prompt run as decode
steps (several copies of the sequence at different lengths decoded together).

  check_logits.py CKPT SILICA_BIN --dtype f16 [--steps 256]
"""
import argparse, json, subprocess, sys, tempfile

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("silica")
ap.add_argument("--dtype", default="f16")
ap.add_argument("--steps", type=int, default=256)
ap.add_argument("--prompt-len", type=int, default=32)
ap.add_argument("--streams", type=int, default=4)
args = ap.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.ckpt, torch_dtype=torch.float32).cuda().eval()
g = torch.Generator().manual_seed(0)
prompt = torch.randint(1000, 100000, (1, args.prompt_len), generator=g).cuda()
with torch.no_grad():
    seq = model.generate(prompt, max_new_tokens=args.steps - args.prompt_len + 1, min_new_tokens=args.steps - args.prompt_len + 1,
                         do_sample=False, pad_token_id=0)[:, : args.steps]
    ref = model(seq).logits[0].float()  # [steps, vocab]
top2 = ref.topk(2, dim=-1)
margin = (top2.values[:, 0] - top2.values[:, 1]).cpu()
ref_top1 = top2.indices[:, 0].cpu()
del model
torch.cuda.empty_cache()

with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(seq[0].tolist(), f)
ref_cpu = ref.cpu()


def score(ours):
    assert len(ours) == args.steps, (len(ours), args.steps)
    confident = agree = 0
    max_rel = 0.0
    for i, row in enumerate(ours):
        scale = ref_cpu[i].abs().max().item()
        for tok, logit in row:
            max_rel = max(max_rel, abs(logit - ref_cpu[i, tok].item()) / max(scale, 1e-6))
        if margin[i] > 0.1:
            confident += 1
            agree += int(row[0][0] == ref_top1[i].item())
    share = agree / confident if confident else float("nan")
    return {"confident_steps": confident, "top1_agree": agree, "agree_share": round(share, 4),
            "max_rel_logit_error": round(max_rel, 5), "target_met": bool(confident and share >= 0.99)}


base = [args.silica, "logits", "--model", args.ckpt, "--device", "cuda", "--dtype", args.dtype, "--tokens", f.name, "--top", "5"]
# Prefill: every position's logits from one forward pass.
prefill = score(json.loads(subprocess.run(base, check=True, capture_output=True, text=True).stdout))
# Decode: the prompt in one pass, then each position as a decode step, with --streams copies of
# different lengths decoded together (their logits compared with the first copy's).
dec = json.loads(subprocess.run(base + ["--decode-from", str(args.prompt_len), "--streams", str(args.streams)],
                                check=True, capture_output=True, text=True).stdout)
decode = score(dec["top"])
decode["streams"] = args.streams
decode["copy_max_rel_diff"] = round(dec["copy_max_rel_diff"], 5)
print(json.dumps({"dtype": args.dtype, "steps": args.steps, "prefill": prefill, "decode": decode}))
