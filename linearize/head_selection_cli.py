"""`linearize select-heads`: score each (layer, KV head) by passkey retrieval and write the full_attention_heads choice."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .head_selection import head_scores, heads_argument, passkey_rows, select_full_heads


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.5; got {text!r}")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1024,2048; got {text!r}")


def add_select_heads_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .cli import NONFINITE_HELP, add_conversion_arguments

    p.add_argument("model", nargs="?",
                   help="SOURCE: a hub id or folder of the original model, converted here with the conversion "
                        "options; or a folder saved by `linearize convert`/distill (scored as saved); default: "
                        "the embedded SmolLM2-135M-Instruct")
    p.add_argument("--budget", type=int, required=True, metavar="N",
                   help="how many KV heads keep full attention (1 .. converted layers x KV heads)")
    p.add_argument("--lengths", type=_ints, default=[1024], metavar="L,..",
                   help="passkey prompt lengths in tokens (default 1024)")
    p.add_argument("--depths", type=_floats, default=[0.2, 0.5], metavar="D,..",
                   help="needle depths in [0, 1] (default 0.2,0.5); each length x depth is one prompt")
    p.add_argument("--min-distance", type=int, default=None, metavar="TOKENS",
                   help="refuse prompts whose needle ends closer than this to the question (default: the "
                        "conversion's window, so that the answer needs more than the window)")
    p.add_argument("--out", help="write the scores and the choice here as JSON")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load in this dtype")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    add_conversion_arguments(p)
    return p


def run_select_heads(args: argparse.Namespace) -> int:
    from .layer_selection_cli import scored_model
    from .state import linearize_state

    t0 = time.perf_counter()
    model, tokenizer, name = scored_model(args)
    config = linearize_state(model).config
    min_distance = config.window if args.min_distance is None else args.min_distance
    rows = passkey_rows(tokenizer, args.lengths, args.depths, min_distance=min_distance)
    scores = head_scores(model, rows, progress=lambda line: print(line, flush=True))
    chosen = select_full_heads(scores, args.budget)
    argument = "--full-attention-heads " + heads_argument(chosen)
    print(f"\n{name}, {config.method}, {len(rows)} passkey prompts (lengths {args.lengths}, depths {args.depths}), "
          f"{time.perf_counter() - t0:.0f}s")
    print(scores.table())
    print(f"\nfull-attention KV heads for budget {args.budget}: {chosen}\nconvert with: {argument}")
    if args.out:
        result = dict(source=name, score="answer CE(no head full) - CE(this head full), nats/answer token",
                      lengths=args.lengths, depths=args.depths, min_distance=min_distance, prompts=len(rows),
                      answer_tokens=scores.answer_tokens, base_loss=scores.base_loss,
                      scores={f"{layer}:{head}": v for (layer, head), v in scores.per_head.items()},
                      already_full=scores.kept, budget=args.budget,
                      full_attention_heads={str(k): v for k, v in chosen.items()}, convert_arguments=argument,
                      linearize_config=config.to_dict() | {"full_attention_heads": chosen})
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
