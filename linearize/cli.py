"""The `linearize` command line: convert, info, generate, distill, eval, report, bench, select-layers, select-heads."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .config import FEATURE_MAPS, GATES, INITS, METHODS, MIXINGS
from .sparse_cache import add_sparse_cache_arguments


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,5,10; got {text!r}")


def _layer_selection(text: str) -> list[int]:
    """--layers: a non-empty index list (an empty one would convert nothing and look like success)."""
    layers = _int_list(text)
    if not layers:
        raise argparse.ArgumentTypeError("no layer indices given, so no layer would be linearized; list them "
                                         "(e.g. 0,5,10) or leave --layers out to linearize every layer")
    return layers


def add_conversion_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion (unset options take the method's defaults)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="liger-gla / liger-hgrn2: parameter-free gates from the key (Liger Attention: window 64 + "
                        "recurrence, 0.5/0.5); lizard: Hedgehog maps, scalar gate, window 128 with 4 sink logits; "
                        "lolcats: Hedgehog linear attention over the keys past a 64-token window, one denominator "
                        "(as published); gated-deltanet: the gated delta rule beside a 64-token window + 4 sinks; "
                        "lightning: Liger Attention with Lightning's fixed per-head decay, normalized, window 64 + 4 sinks; "
                        "based: Based's Taylor feature map (16 -> 273 features) beside a 64-token window + 4 sinks; "
                        "window-sinks: softmax over 4 sink tokens + last 64 (no training). "
                        "Default: the recommended conversion, lolcats --init baseline --gate mamba2 --no-linear-rope "
                        "--state-sharing --sparse-cache 64 --window 512 "
                        "(the best measured at constant memory; README, docs/quality-at-length-128k.md)")
    g.add_argument("--window", type=int, help="sliding-window size of the softmax branch; 0 = pure recurrent form")
    g.add_argument("--sinks", dest="num_sink_tokens", type=int, help="number of sink tokens always attended")
    g.add_argument("--sink-logits", dest="num_sink_logits", type=int, help="learned meta-memory logits per head (Lizard)")
    g.add_argument("--gate", choices=GATES,
                   help="liger (pooled key), scalar (learned sigmoid), mamba2, lightning (fixed per-head decay), none")
    g.add_argument("--feature-map", choices=FEATURE_MAPS,
                   help="softmax (Liger), hedgehog (learned), taylor (Based), l2 (gated-deltanet)")
    g.add_argument("--feature-dim", type=int,
                   help="learned projection width: Hedgehog's (default: head dim) or Taylor's (default 16)")
    g.add_argument("--mixing", choices=MIXINGS, help="how the window and recurrent branches combine")
    g.add_argument("--softmax-layers", type=_int_list, default=[], help="layers that keep softmax attention, e.g. 0,15")
    g.add_argument("--layers", type=_layer_selection, help="only linearize these layers (default: all but --softmax-layers)")
    g.add_argument("--no-state-sharing", dest="share_state", action="store_false", default=None,
                   help="one recurrent state (and learned key map) per query head instead of per KV head "
                        "(more memory; lolcats' default)")
    g.add_argument("--state-sharing", dest="share_state", action="store_true",
                   help="one recurrent state (and learned key map) per KV head, shared by its query heads")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide the recurrence by its normalizer phi(q).z (Liger's published form has none)")
    g.add_argument("--linear-rope", action=argparse.BooleanOptionalAction, default=None,
                   help="feed RoPE'd q and k to the feature maps (LoLCATs as published); --no-linear-rope maps them "
                        "before RoPE, so a distilled model's linear mass does not grow with position")
    g.add_argument("--init", choices=INITS,
                   help="paper: the method's published initialisation; baseline: the untrained model is exactly "
                        "window + sinks (the linear branch starts at weight 0 and training adds it)")
    add_sparse_cache_arguments(g)
    add_full_heads_argument(g)


def _full_heads(text: str) -> dict[int, list[int]]:
    """--full-attention-heads "3:0,7:1,7:2" -> {3: [0], 7: [1, 2]}."""
    choice: dict[int, list[int]] = {}
    try:
        for item in text.replace(" ", "").split(","):
            if item:
                layer, head = item.split(":")
                choice.setdefault(int(layer), []).append(int(head))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer:kv_head pairs like 3:0,7:1,7:2; got {text!r}")
    return choice


def add_full_heads_argument(group) -> None:
    """--full-attention-heads (the head-level hybrid; `linearize select-heads` prints a value)."""
    group.add_argument("--full-attention-heads", type=_full_heads, default=None, metavar="L:H,..",
                       help="head-level hybrid (DuoAttention-style): these KV heads of linearized layers keep exact "
                            "softmax over every past token and a growing KV cache, e.g. 3:0,7:1 (layer:kv_head); "
                            "`linearize select-heads` measures a choice")


def config_from_args(args: argparse.Namespace):
    from .config import LinearizeConfig

    fields = dict(method=args.method, window=args.window, num_sink_tokens=args.num_sink_tokens,
                  num_sink_logits=args.num_sink_logits, gate=args.gate, feature_map=args.feature_map,
                  feature_dim=args.feature_dim, mixing=args.mixing, softmax_layers=args.softmax_layers,
                  layers=args.layers, share_state_across_group=args.share_state, normalize=args.normalize,
                  linear_rope=args.linear_rope, init=args.init, sparse_cache=args.sparse_cache, sparse_block=args.sparse_block,
                  sparse_per_kv_head=args.sparse_per_kv_head, full_attention_heads=args.full_attention_heads)
    given = {k: v for k, v in fields.items() if v is not None}  # None: the method's default
    if args.method is None:  # the recommended conversion, with what the user set on top
        return LinearizeConfig.recommended(**given)
    return LinearizeConfig(**given)


def saved_size_estimate(base_config, dtype: str | None) -> int:
    """Bytes the converted model takes on disk: parameter bytes x 1.1 (room for new parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(base_config)
    saved = dtype or getattr(base_config, "dtype", None) or "float32"
    elem = (getattr(torch, saved) if isinstance(saved, str) else saved).itemsize
    return int(1.1 * elem * sum(p.numel() for p in shapes.parameters()))


def output_folder(args: argparse.Namespace, config) -> Path:
    """--out, checked before anything is loaded (or built: the embedded model's first use takes a while)."""
    from .assets import DEFAULT_MODEL_NAME, cache_dir
    from .model_folder import check_output_folder

    name = args.model or DEFAULT_MODEL_NAME
    out = Path(args.out or f"linearized-{Path(name).name}-{config.method}")
    source = Path(args.model) if args.model else cache_dir() / DEFAULT_MODEL_NAME
    check_output_folder(out, [source] if source.exists() else [], overwrite=args.overwrite)
    return out


def check_convert_arguments(args: argparse.Namespace, config, source, name: str, out: Path) -> None:
    """The checks `convert` makes once the source is known and before the slow load."""
    from transformers import AutoConfig

    from .model_folder import CheckpointError, check_writable
    from .config import ConfigError

    try:
        base_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read the config of {name!r}: {e}") from e
    if str(getattr(base_config, "model_type", "")).startswith("linearized_"):
        raise CheckpointError(f"{name} is already a linearized model ({base_config.model_type}): convert the "
                              "original model instead, or use `linearize info` / `generate` on this one")
    num_layers = base_config.num_hidden_layers
    if not config.linearized_layers(num_layers):
        chosen = f"--layers {config.layers} minus " if config.layers is not None else ""
        raise ConfigError(f"no layer would be linearized: the model has {num_layers} layers and {chosen}"
                          f"--softmax-layers {config.softmax_layers} leaves none to convert")
    check_writable(out, saved_size_estimate(base_config, args.dtype))


def cmd_convert(args: argparse.Namespace) -> int:
    from .model_folder import model_source
    from .progress import progress_bars

    if args.list_families:
        from .families import family_table

        print(family_table())
        return 0
    config = config_from_args(args)
    out = output_folder(args, config)
    source, name = model_source(args.model)
    check_convert_arguments(args, config, source, name, out)
    with progress_bars(not args.quiet), no_transformers_bars() if args.quiet else contextlib.nullcontext():
        return convert_and_save(args, config, source, name, out)


@contextlib.contextmanager
def no_transformers_bars():
    """transformers' own loading and saving bars off inside the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def convert_and_save(args: argparse.Namespace, config, source, name: str, out: Path) -> int:
    """Load, check, convert and save (the slow part of `convert`), with progress bars where asked."""
    from .model_folder import load_model_from, save_folder
    from .convert import convert
    from .model_card import write_model_card
    from .summary import summarize

    t0 = time.perf_counter()
    model, tokenizer, name = load_model_from(source, name, args.dtype, args.allow_nonfinite)
    t1 = time.perf_counter()
    convert(model, config)
    t2 = time.perf_counter()
    replacing = out.is_dir() and any(out.iterdir())

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_model_card(model, folder, name=out.name, base=str(args.model) if args.model else name)

    save_folder(out, write)
    t3 = time.perf_counter()
    print(f"\nconverted {name} -> {out}" + (" (replaced what was there)" if replacing else ""))
    print(summarize(model))
    print(f"time                load {t1 - t0:.1f}s, convert {t2 - t1:.2f}s, save {t3 - t2:.1f}s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model_folder import load
    from .summary import summarize

    model = load(args.dir, allow_nonfinite=args.allow_nonfinite, sparse_cache=args.sparse_cache,
                 sparse_block=args.sparse_block, sparse_per_kv_head=args.sparse_per_kv_head)
    print(f"{args.dir}: {type(model).__name__}")
    print(summarize(model))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    generate_text(args.dir, prompt, max_new_tokens=args.max_new_tokens, teacher=args.teacher,
                  do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, chat=args.chat,
                  allow_nonfinite=args.allow_nonfinite, sparse_cache=args.sparse_cache,
                  sparse_block=args.sparse_block, sparse_per_kv_head=args.sparse_per_kv_head)
    return 0


NONFINITE_HELP = "load weights that hold NaN or inf instead of refusing them (for inspecting a broken model)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__.splitlines()[0] + " See README.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face causal LM into a linearized model and save it",
                       description="Convert MODEL (hub id or local folder; default: the embedded SmolLM2-135M-Instruct) "
                                   "and save a normal Hugging Face folder that linearize.load() and, after "
                                   "`import linearize`, AutoModelForCausalLM.from_pretrained() reload.")
    p.add_argument("model", nargs="?", help="hub id or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output folder (default: ./linearized-<model>-<method>); written beside it and "
                                 "renamed when complete. An earlier linearize output there is replaced; any other "
                                 "non-empty folder, or the source model, needs --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that is not a linearize output (even the source folder)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load and save in this dtype")
    p.add_argument("--list-families", action="store_true",
                   help="print the supported model families (and those refused, with why) and exit")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars: transformers' loading and saving bars, and the weight-check and layer bars "
                        "(those two are drawn only when stderr is a terminal)")
    add_conversion_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="summarize a saved linearized model")
    p.add_argument("dir", help="a folder written by `linearize convert` or save_pretrained")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    add_sparse_cache_arguments(p)
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
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    add_sparse_cache_arguments(p)
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
    "select-layers": ("linearize.layer_selection_cli", "add_select_layers_arguments", "run_select_layers",
                      "choose the layers that keep softmax attention by measured KL to the teacher (KL-guided "
                      "layer selection) and print the --softmax-layers value"),
    "select-heads": ("linearize.head_selection_cli", "add_select_heads_arguments", "run_select_heads",
                     "choose the KV heads that keep full attention (head-level hybrid) by the passkey answer loss "
                     "each one recovers and print the --full-attention-heads value"),
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
    from .model_folder import CheckpointError
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
