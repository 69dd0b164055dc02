"""Passkey at 2k and 4k, 4 depths x 3 trials (12 needles per length, each >= 256 tokens before
the question), for the recommended conversion (`linearize convert` with no --method, untrained)
or for a saved model folder.

    python scripts/passkey_recommended.py                       (the recommended conversion)
    python scripts/passkey_recommended.py --model FINAL --sparse-cache 64 [--sparse-per-kv-head] --name RUN
        -> docs/data/passkey-3trials/<name>.json (committed; the quality pages quote it)

Conversion fields can be overridden for the untrained model, e.g. `--set linear_rope=false`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.assets import default_model_dir
from linearize.eval.passkey import passkey_retrieval
from linearize.sparse_cache import add_sparse_cache_arguments

DATA = Path("docs/data/passkey-3trials")


def overrides(args) -> dict:
    """The --set FIELD=VALUE pairs, values parsed as YAML."""
    return {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}


def load_model(args, config: "linearize.LinearizeConfig | None", sparse: dict):
    """The --model folder with the `sparse` cache settings, or the embedded SmolLM2 converted
    with `config`."""
    if args.model:
        return linearize.load(args.model, **sparse).eval()
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    linearize.convert(model, config)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved (trained) model folder; default: convert the embedded SmolLM2")
    add_sparse_cache_arguments(p.add_argument_group("LoLA's sparse cache when loading --model"))
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="conversion overrides (untrained)")
    p.add_argument("--name", default="recommended-untrained", help="record name under docs/data/passkey-3trials/")
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args(argv)
    if args.set and args.model:
        p.error("--set overrides the conversion of the untrained model; a --model folder keeps its own")
    sparse = {"sparse_cache": args.sparse_cache, "sparse_block": args.sparse_block,
              "sparse_per_kv_head": args.sparse_per_kv_head}
    if not args.model and any(v is not None for v in sparse.values()):
        p.error("the sparse-cache flags apply to a --model folder; for the untrained model use --set, e.g. "
                "--set sparse_cache=32")
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    sets = overrides(args)
    config = None if args.model else linearize.LinearizeConfig.recommended(**sets)
    model = load_model(args, config, sparse)
    t0 = time.time()
    with torch.no_grad():
        pk = passkey_retrieval(model, tok, [2048, 4096], [0.1, 0.3, 0.5, 0.7], args.trials, min_distance=256)
    out = DATA / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model or "recommended conversion", **sparse, "overrides": args.set, "passkey": pk,
              "seconds": time.time() - t0}
    if config is not None:  # what the recommended conversion was when this ran, not when a page reads it
        record["conversion"] = {k: v for k, v in config.to_dict().items()
                                if k in (*linearize.config.RECOMMENDED, *sets)}
    out.write_text(json.dumps(record, indent=1))
    print(out, pk["accuracy"], f"{pk['mean_accuracy']:.1f} %", f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
