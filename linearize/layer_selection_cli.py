"""`linearize select-layers`: score each layer by KL to the teacher and write the softmax_layers choice."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .layer_selection import SCORES, layer_scores, select_softmax_layers, token_rows

# The conversion options whose value is None (or [] for --softmax-layers) when not given.
_CONVERSION_DESTS = ("method", "window", "num_sink_tokens", "num_sink_logits", "gate", "feature_map", "feature_dim",
                     "mixing", "layers", "share_state", "normalize", "linear_rope", "init", "sparse_cache",
                     "sparse_block", "sparse_per_kv_head", "full_attention_heads")


def add_select_layers_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .cli import NONFINITE_HELP, add_conversion_arguments

    p.add_argument("model", nargs="?",
                   help="SOURCE: a hub id or folder of the original model, converted here with the conversion "
                        "options; or a folder saved by `linearize convert`/distill (scored as saved, e.g. after "
                        "stage 1); default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--budget", type=int, required=True, metavar="N",
                   help="how many scored layers keep softmax attention (1 .. layers - 1)")
    p.add_argument("--score", choices=SCORES, default="restore",
                   help="restore (the paper's direction): KL recovered by restoring softmax in one layer of the "
                        "all-linear student; single: KL with only that layer linearized")
    p.add_argument("--texts", default="held-out", metavar="held-out|FILE",
                   help="held-out: the held-out Wikipedia summaries joined into --length-token documents; "
                        "FILE: a UTF-8 text file cut into consecutive --length-token rows")
    p.add_argument("--num-texts", type=int, default=8, help="rows to score on (default 8)")
    p.add_argument("--length", type=int, default=1024, help="tokens per row (default 1024)")
    p.add_argument("--out", help="write the scores and the choice here as JSON")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load in this dtype")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    add_conversion_arguments(p)
    return p


def scoring_rows(tokenizer, texts: str, num_texts: int, length: int) -> list[torch.Tensor]:
    """--texts as up to `num_texts` LongTensors [1, <= length]."""
    if num_texts < 1 or length < 2:
        raise ValueError(f"--num-texts must be >= 1 and --length >= 2, got {num_texts} and {length}")
    if texts == "held-out":
        from .eval.heldout import HELDOUT_SIZE, joined_heldout_documents

        return token_rows(tokenizer, joined_heldout_documents(tokenizer, HELDOUT_SIZE, length)[:num_texts], length)
    path = Path(texts)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {texts!r} is neither 'held-out' nor a text file")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"]
    rows = [r for r in ids.split(length, dim=1)[:num_texts] if r.shape[1] >= 2]
    if not rows:
        raise ValueError(f"{path} holds under 2 tokens: give a longer text")
    return rows


def scored_model(args: argparse.Namespace):
    """(model, tokenizer, name): SOURCE as saved when it is converted, else converted here."""
    from .model_folder import load_base_model
    from .cli import config_from_args
    from .convert import convert
    from .state import is_linearized

    model, tokenizer, name = load_base_model(args.model, args.dtype, args.allow_nonfinite)
    if tokenizer is None:
        raise ValueError(f"{name} has no tokenizer to cut --texts with: save one beside the model")
    given = [d for d in _CONVERSION_DESTS if getattr(args, d) is not None] + (["softmax_layers"] if args.softmax_layers else [])
    if is_linearized(model):
        if given:
            raise ValueError(f"{name} is already converted: conversion options ({', '.join(given)}) would be "
                             "ignored; leave them out, or pass the original model to convert it here")
        return model.eval(), tokenizer, name
    return convert(model.eval(), config_from_args(args)), tokenizer, name


def run_select_layers(args: argparse.Namespace) -> int:
    from .state import linearize_state

    t0 = time.perf_counter()
    model, tokenizer, name = scored_model(args)
    rows = scoring_rows(tokenizer, args.texts, args.num_texts, args.length)
    scores = layer_scores(model, rows, score=args.score, progress=lambda line: print(line, flush=True))
    chosen = select_softmax_layers(scores, args.budget)
    config = linearize_state(model).config.to_dict() | {"softmax_layers": chosen}
    argument = "--softmax-layers " + ",".join(map(str, chosen))
    print(f"\n{name}, {config['method']}, score {args.score}, {len(rows)} rows of <= {args.length} tokens "
          f"({args.texts}), {time.perf_counter() - t0:.0f}s")
    print(scores.table())
    print(f"\nsoftmax layers for budget {args.budget}: {chosen}\nconvert with: {argument}")
    if args.out:
        result = dict(source=name, score=args.score, kl="forward KL(teacher || student), nats/token",
                      texts=args.texts, rows=len(rows), length=args.length, tokens=scores.tokens,
                      all_linear_kl=scores.all_linear_kl, scores={str(i): v for i, v in scores.per_layer.items()},
                      already_softmax=scores.kept, budget=args.budget, softmax_layers=chosen,
                      convert_arguments=argument, linearize_config=config)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
