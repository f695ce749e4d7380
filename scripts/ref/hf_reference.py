#!/usr/bin/env python3
"""Hugging Face transformers reference outputs for Silica parity tests.

Runs on CPU in float32, offline (HF_HUB_OFFLINE=1), deterministically. Every
subcommand writes one JSON document to stdout (or --out FILE). See
scripts/ref/README.md for the exact schemas.

  hf_reference.py tokenize --gguf M.gguf --texts texts.json
  hf_reference.py chat     --gguf M.gguf --messages messages.json
  hf_reference.py greedy   (--gguf M.gguf | --model-dir DIR) --prompts prompts.json --max-new-tokens N [--top K]
  hf_reference.py logits   (--gguf M.gguf | --model-dir DIR) --ids ids.json
  hf_reference.py make-tiny --arch qwen2|qwen3 --out-dir DIR [--seed 0]

Expected failures (missing file, bad JSON, bad arguments, too-large output)
print "hf_reference: error: ..." to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Offline before anything from the HF stack is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequant progress bar

SCHEMA_VERSION = 1
MAX_LOGIT_VALUES = 5_000_000


class UserError(Exception):
    """An expected failure: reported as a one-line message, exit status 2."""


# ----------------------------------------------------------------------------- helpers


def fail(msg: str, code: int = 2) -> "NoReturn":  # type: ignore[name-defined]
    print(f"hf_reference: error: {msg}", file=sys.stderr)
    sys.exit(code)


def read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} file {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {path} is not UTF-8: {e}") from None


def check_gguf(path: str) -> tuple[str, str]:
    if not os.path.isfile(path):
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"not a GGUF file (bad magic): {path}")
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


def check_model_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"model directory has no config.json: {path}")
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise UserError(f"model directory has no *.safetensors file: {path}")
    return os.path.abspath(path)


def f32(x: float) -> float:
    """A float32 value as the shortest decimal that round-trips it (9 sig. digits)."""
    return float(f"{x:.9g}")


def sig6(x: float) -> float:
    return float(f"{x:.6g}")


def setup_torch(threads: int):
    import torch

    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.logging.disable_progress_bar()
    except AttributeError:
        pass
    return transformers


def meta(args, **extra) -> dict:
    import torch
    import transformers

    m = {
        "schema_version": SCHEMA_VERSION,
        "command": args.cmd,
        "source": (
            {"gguf": args.gguf}
            if getattr(args, "gguf", None)
            else {"model_dir": args.model_dir}
            if getattr(args, "model_dir", None)
            else None
        ),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "device": "cpu",
        "threads": args.threads,
    }
    m.update(extra)
    return m


def load_tokenizer(args):
    quiet_transformers()
    from transformers import AutoTokenizer

    d, name = check_gguf(args.gguf)
    return AutoTokenizer.from_pretrained(d, gguf_file=name, local_files_only=True)


def load_model(args):
    torch = setup_torch(args.threads)
    transformers = quiet_transformers()
    from transformers import AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    kw = dict(local_files_only=True, attn_implementation=args.attn, **dtype_kw)
    t0 = time.perf_counter()
    if args.gguf:
        d, name = check_gguf(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **kw)
    else:
        d = check_model_dir(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(d, **kw)
    model = model.to(torch.float32).eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    info = {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "attn_implementation": args.attn,
        "load_seconds": round(load_s, 3),
    }
    return torch, model, info


def validate_id_list(ids, where: str, vocab: int | None = None) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise UserError(f"{where}: expected a non-empty list of token ids")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise UserError(f"{where}: token id {t!r} is not a non-negative integer")
        if vocab is not None and t >= vocab:
            raise UserError(f"{where}: token id {t} >= vocab size {vocab}")
    return ids


def write_out(args, doc: dict):
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
    else:
        sys.stdout.write(text)
        sys.stdout.write("\n")


# ----------------------------------------------------------------------------- subcommands


def cmd_tokenize(args):
    texts = read_json(args.texts, "--texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise UserError("--texts: expected a JSON list of strings")
    setup_torch(args.threads)
    tok = load_tokenizer(args)
    results = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    return {"meta": meta(args, tokenizer=type(tok).__name__), "results": results}


def _is_conversation(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def cmd_chat(args):
    data = read_json(args.messages, "--messages")
    if _is_conversation(data) and data:
        convs = [data]
    elif isinstance(data, list) and data and all(_is_conversation(c) and c for c in data):
        convs = data
    else:
        raise UserError(
            "--messages: expected a conversation (list of {\"role\",\"content\"} objects) "
            "or a list of conversations"
        )
    setup_torch(args.threads)
    tok = load_tokenizer(args)
    if not getattr(tok, "chat_template", None):
        raise UserError("tokenizer has no chat template (tokenizer.chat_template missing in the GGUF)")
    results = []
    for conv in convs:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        results.append({"messages": conv, "text": text, "ids": ids})
    return {"meta": meta(args, tokenizer=type(tok).__name__), "results": results}


def cmd_greedy(args):
    prompts = read_json(args.prompts, "--prompts")
    if not isinstance(prompts, list) or not prompts:
        raise UserError("--prompts: expected a non-empty JSON list of {\"prompt_ids\": [...]} objects")
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or "prompt_ids" not in p:
            raise UserError(f"--prompts[{i}]: expected an object with \"prompt_ids\"")
        validate_id_list(p["prompt_ids"], f"--prompts[{i}].prompt_ids")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if args.top < 1:
        raise UserError("--top must be >= 1")

    torch, model, info = load_model(args)
    vocab = info["vocab_size"]
    k = min(args.top, vocab)
    results = []
    t_all = time.perf_counter()
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = validate_id_list(p["prompt_ids"], f"--prompts[{i}].prompt_ids", vocab)
            t0 = time.perf_counter()
            # Plain greedy with the model's KV cache: argmax of the raw logits, no
            # logits processors, no EOS stop -> exactly N tokens. (Equivalent to
            # generate(do_sample=False, min_new_tokens=N, max_new_tokens=N) whenever
            # EOS is never the argmax; min_new_tokens would instead mask EOS.)
            input_ids = torch.tensor([ids], dtype=torch.long)
            past = None
            generated, steps = [], []
            for _ in range(args.max_new_tokens):
                out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                row = out.logits[0, -1].float()
                top_v, top_i = torch.topk(row, k)  # sorted descending
                chosen = int(torch.argmax(row))  # first index among ties
                steps.append(
                    {
                        "top": [[int(t), f32(float(v))] for v, t in zip(top_v, top_i)],
                        "chosen_id": chosen,
                        "chosen_logit": f32(float(row[chosen])),
                    }
                )
                generated.append(chosen)
                input_ids = torch.tensor([[chosen]], dtype=torch.long)
            dt = time.perf_counter() - t0
            r = {"index": i}
            if "name" in p:
                r["name"] = p["name"]
            r.update(
                {
                    "prompt_len": len(ids),
                    "generated_ids": generated,
                    "steps": steps,
                    "seconds": round(dt, 3),
                }
            )
            results.append(r)
            print(
                f"hf_reference: prompt {i}: {len(ids)} prompt + {len(generated)} new tokens in {dt:.2f}s",
                file=sys.stderr,
            )
    total = time.perf_counter() - t_all
    return {
        "meta": meta(
            args,
            model=info,
            max_new_tokens=args.max_new_tokens,
            top_k=k,
            decode="greedy argmax of raw logits, KV cache, no EOS stop",
            generate_seconds=round(total, 3),
        ),
        "results": results,
    }


def cmd_logits(args):
    seqs = read_json(args.ids, "--ids")
    if not isinstance(seqs, list) or not seqs:
        raise UserError("--ids: expected a non-empty JSON list of token-id lists")
    for i, s in enumerate(seqs):
        validate_id_list(s, f"--ids[{i}]")
    positions = sum(len(s) for s in seqs)

    # Cheap size check before loading weights, when the vocab is known up front.
    if args.model_dir:
        cfg_path = os.path.join(check_model_dir(args.model_dir), "config.json")
        vocab0 = read_json(cfg_path, "config.json").get("vocab_size")
        if isinstance(vocab0, int) and vocab0 * positions > MAX_LOGIT_VALUES:
            raise UserError(
                f"refusing to dump {vocab0} x {positions} = {vocab0 * positions} logits "
                f"(limit {MAX_LOGIT_VALUES}); use a tiny vocabulary or fewer positions"
            )

    torch, model, info = load_model(args)
    vocab = info["vocab_size"]
    if vocab * positions > MAX_LOGIT_VALUES:
        raise UserError(
            f"refusing to dump {vocab} x {positions} = {vocab * positions} logits "
            f"(limit {MAX_LOGIT_VALUES}); use a tiny vocabulary or fewer positions"
        )
    results = []
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            validate_id_list(s, f"--ids[{i}]", vocab)
            out = model(input_ids=torch.tensor([s], dtype=torch.long), use_cache=False)
            lg = out.logits[0].float()
            results.append(
                {
                    "ids": s,
                    "argmax": [int(a) for a in torch.argmax(lg, dim=-1)],
                    "logits": [[sig6(v) for v in row] for row in lg.tolist()],
                }
            )
    return {"meta": meta(args, model=info, rounding="6 significant digits"), "results": results}


def cmd_make_tiny(args):
    """Tiny random Qwen2/Qwen3 safetensors checkpoint (for tests of the --model-dir path)."""
    torch = setup_torch(args.threads)
    quiet_transformers()
    common = dict(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if args.arch == "qwen2":
        from transformers import Qwen2Config as C, Qwen2ForCausalLM as M

        cfg = C(**common)
    else:
        from transformers import Qwen3Config as C, Qwen3ForCausalLM as M

        cfg = C(head_dim=16, **common)
    torch.manual_seed(args.seed)
    model = M(cfg).to(torch.float32).eval()
    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    return {
        "meta": meta(args, arch=args.arch, seed=args.seed),
        "results": [
            {
                "out_dir": os.path.abspath(args.out_dir),
                "config_class": C.__name__,
                "model_class": M.__name__,
                "files": sorted(os.listdir(args.out_dir)),
                "num_parameters": int(sum(p.numel() for p in model.parameters())),
            }
        ],
    }


# ----------------------------------------------------------------------------- CLI


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse usage errors: one clear line, exit 2
        self.print_usage(sys.stderr)
        fail(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="hf_reference.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    def common(sp, model_source: str | None):
        sp.add_argument("--out", help="write the JSON here instead of stdout")
        sp.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
        if model_source == "gguf":
            sp.add_argument("--gguf", required=True, help="GGUF file (tokenizer + chat template from its metadata)")
        elif model_source == "either":
            g = sp.add_mutually_exclusive_group(required=True)
            g.add_argument("--gguf", help="GGUF model file (dequantized to float32 by transformers)")
            g.add_argument("--model-dir", help="HF checkpoint dir (config.json + *.safetensors)")
            sp.add_argument(
                "--attn",
                default="eager",
                choices=["eager", "sdpa"],
                help="attention implementation (default eager)",
            )

    sp = sub.add_parser("tokenize", help="HF tokenizer ids for a JSON list of strings")
    common(sp, "gguf")
    sp.add_argument("--texts", required=True, help="JSON file: list of strings")
    sp.set_defaults(func=cmd_tokenize)

    sp = sub.add_parser("chat", help="rendered chat prompt (+ generation prompt) and its ids")
    common(sp, "gguf")
    sp.add_argument("--messages", required=True, help="JSON file: conversation or list of conversations")
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("greedy", help="greedy decoding of exactly N tokens with top-K raw logits")
    common(sp, "either")
    sp.add_argument("--prompts", required=True, help='JSON file: [{"prompt_ids": [...]}, ...]')
    sp.add_argument("--max-new-tokens", type=int, required=True)
    sp.add_argument("--top", type=int, default=10, help="top-K logits per step (default 10)")
    sp.set_defaults(func=cmd_greedy)

    sp = sub.add_parser("logits", help="teacher-forced full logits (tiny vocabularies only)")
    common(sp, "either")
    sp.add_argument("--ids", required=True, help="JSON file: list of token-id lists")
    sp.set_defaults(func=cmd_logits)

    sp = sub.add_parser("make-tiny", help="write a tiny random Qwen2/Qwen3 safetensors checkpoint")
    common(sp, None)
    sp.add_argument("--arch", choices=["qwen2", "qwen3"], required=True)
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--vocab", type=int, default=512)
    sp.set_defaults(func=cmd_make_tiny)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.out:
            d = os.path.dirname(os.path.abspath(args.out))
            if not os.path.isdir(d):
                raise UserError(f"--out directory does not exist: {d}")
        doc = args.func(args)
        write_out(args, doc)
    except UserError as e:
        fail(str(e))
    except ImportError as e:
        fail(f"{e} (run scripts/ref/setup-venv.sh and use the venv python it prints)")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:  # stdout closed early (e.g. piped into head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
