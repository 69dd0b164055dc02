"""Passkey of a distilled LoLCATs model with LoLA's sparse cache, its learned linear factor
lam scaled: does the linear branch's mass drown the exact needle?

    python scripts/passkey_linear_factor.py FINAL_DIR [--sparse-cache 64] [--scales 1 0.5 0.25 0]

Prints the accuracy at 2k / 4k (4 depths, every needle >= 256 tokens before the question) for
each scale of every layer's `linearize_linear_factor`; nothing is saved.
"""
import argparse
import time

import torch
from transformers import AutoTokenizer

import linearize
from linearize.assets import default_model_dir
from linearize.eval.passkey import passkey_retrieval


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("final")
    p.add_argument("--sparse-cache", type=int, default=64)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    p.add_argument("--trials", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = linearize.load(args.final, sparse_cache=args.sparse_cache).eval()
    learned = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("linearize_linear_factor")}
    if not learned:
        raise SystemExit(f"{args.final} has no learned linear factor (convert with init='baseline' and distill)")
    for scale in args.scales:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in learned:
                    param.copy_(learned[name] * scale)
            t0 = time.time()
            pk = passkey_retrieval(model, tok, [2048, 4096], [0.1, 0.3, 0.5, 0.7], args.trials, min_distance=256)
        print(f"lam x {scale}: 2k / 4k by depth {pk['accuracy']}, mean {pk['mean_accuracy']:.1f} % "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
