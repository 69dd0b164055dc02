"""Held-out perplexity of the teacher and of every method straight after conversion.

    python scripts/conversion_quality.py [--model DIR] [--texts 64] [--max-length 1024] [--out FILE]

No training: this shows what each initialisation starts from. Texts are the embedded
held-out Wikipedia summaries, joined into documents of about --max-length tokens so the
recurrent branch is exercised beyond the window.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.assets import default_model_dir
from linearize.eval.heldout import joined_heldout_documents
from linearize.eval.perplexity import perplexity

VARIANTS = {
    "liger-gla (Liger Attention, window 64)": dict(method="liger-gla"),
    "liger-gla, window 0 (pure GLA)": dict(method="liger-gla", window=0),
    "liger-gla + normalize=True (our option)": dict(method="liger-gla", normalize=True),
    "liger-hgrn2 (window 64)": dict(method="liger-hgrn2"),
    "lizard (window 128, 4 sink logits)": dict(method="lizard"),
    "lolcats (window 64, shared denominator)": dict(method="lolcats"),
    "window-sinks (4 + 64, no training)": dict(method="window-sinks"),
    "liger-gla + softmax layers 0,15 (hybrid)": dict(method="liger-gla", softmax_layers=[0, 15]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", default="outputs/conversion_quality.json")
    ap.add_argument("--only", nargs="*", help="substrings: run only the variants whose name contains one")
    args = ap.parse_args()
    path = args.model or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    docs = joined_heldout_documents(tokenizer, args.texts, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        t0 = time.perf_counter()
        teacher = perplexity(model, tokenizer, docs, max_length=args.max_length, stride=args.max_length // 2)
        rows.append({"variant": "teacher (softmax attention)", "perplexity": teacher["perplexity"],
                     "tokens": teacher["tokens"], "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        for name, fields in VARIANTS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            linearize.convert(model, **fields)
            t0 = time.perf_counter()
            res = perplexity(model, tokenizer, docs, max_length=args.max_length, stride=args.max_length // 2)
            rows.append({"variant": name, "perplexity": res["perplexity"], "tokens": res["tokens"],
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            linearize.unconvert(model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n{len(docs)} documents of <= {args.max_length} tokens from {args.texts} held-out summaries\n")
    print("| variant | held-out perplexity | x teacher |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.2f} | {r['perplexity'] / rows[0]['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
