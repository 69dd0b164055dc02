"""The quality-at-length runs: what each one converts and trains (RUNS, RECIPE_EXTRAS), LoLA
entries evaluated on another run's model (SPARSE), the reference rows (REFERENCES) and each
run's control (control_of), the page's labels, and a run's decode-state size from its conversion."""
from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch

# A window longer than every evaluated length: window attention there is the teacher's own.
TEACHER_WINDOW = 8192
# The recommended conversion as trained: LoLA's sparse cache is an evaluation-time option.
RECOMMENDED_TRAINED = dict(method="lolcats", init="baseline", gate="mamba2", linear_rope=False)
# name -> (linearize config, stage 1 on? (None: not trained at all), stage 2 trains the new
# parameters too?). window-sinks-lora is the control: the same LoRA budget with no recurrence.
RUNS = {
    "teacher": None,
    "window-sinks": (dict(method="window-sinks"), None, False),
    "window-sinks-lora": (dict(method="window-sinks"), False, False),
    # the fair ceiling for trained runs: the teacher's own attention (a window longer than every
    # evaluated length computes it) with the same LoRA, so the domain fit every trained run gets
    # from its LoRA is in the reference too
    "teacher-lora": (dict(method="window-sinks", window=TEACHER_WINDOW), False, False),
    # the control for kept softmax layers: the same layers as recommended-kl4 over window + sinks,
    # the same LoRA, no recurrence
    "window-sinks-kl4-lora": (dict(method="window-sinks", softmax_layers=[14, 17, 20, 23]), False, False),
    # the control for Lizard, whose window is 128: the same window over window + sinks, the same LoRA
    "window-sinks-w128-lora": (dict(method="window-sinks", window=128), False, False),
    # the control for the shipped default's window: window 512 + sinks, the same LoRA
    "window-sinks-w512-lora": (dict(method="window-sinks", window=512), False, False),
    # truncation at about the decode state of the window-64 LoLCATs conversions with LoLA 64
    # (28.3 MiB at 16k) or without (12.0 MiB), with no training: window 512 + 4 sinks holds 22.6 MiB
    "window-sinks-w512": (dict(method="window-sinks", window=512), None, False),
    # truncation holding the shipped default's decode state as a plain window: 59.2 MiB, the
    # default's 60.1 before its decoding stopped keeping the window's keys twice (now 51.7)
    "window-sinks-w1344": (dict(method="window-sinks", window=1344), None, False),
    # the same for the default's decode state with LoLA's pairs per head: 51.5 MiB
    "window-sinks-w1168": (dict(method="window-sinks", window=1168), None, False),
    # the same plain window with the same LoRA: the equal-memory control for the distilled default
    "window-sinks-w1344-lora": (dict(method="window-sinks", window=1344), False, False),
    # and at exactly the default's decode state with LoLA's pairs per head (51.5 MiB against 51.7)
    "window-sinks-w1168-lora": (dict(method="window-sinks", window=1168), False, False),
    # the decode state of the default with a state per query head and its pairs per KV head
    # (43.1 MiB against 43.2) while each layer kept its own copy of the RoPE rotation
    "window-sinks-w978": (dict(method="window-sinks", window=978), None, False),
    # and since the layers keep one copy (39.07 MiB against 39.08)
    "window-sinks-w886": (dict(method="window-sinks", window=886), None, False),
    # the default's decode state (one state per KV head, recommended-w512-shared + LoLA 64 per
    # KV head: 32.91 MiB against 32.93), untrained and with the same LoRA
    "window-sinks-w746": (dict(method="window-sinks", window=746), None, False),
    "window-sinks-w746-lora": (dict(method="window-sinks", window=746), False, False),
    "lolcats-paper-untrained": (dict(method="lolcats"), None, None),
    "lolcats-paper": (dict(method="lolcats"), True, False),
    "lolcats-baseline": (dict(method="lolcats", init="baseline"), True, True),
    "lolcats-baseline-gate": (dict(method="lolcats", init="baseline", gate="mamba2"), True, True),
    "lolcats-baseline-gate-norope": (dict(method="lolcats", init="baseline", gate="mamba2", linear_rope=False), True,
                                    True),
    "lolcats-baseline-gate-norope-ssd": (dict(method="lolcats", init="baseline", gate="mamba2", linear_rope=False),
                                        True, True),
    # the recommended conversion with the softmax layers `linearize select-layers` chose
    # (budgets 2 and 4, untrained, docs/recall-beyond-the-window.md)
    "recommended-kl1": (dict(RECOMMENDED_TRAINED, softmax_layers=[20]), True, True),
    "recommended-kl2": (dict(RECOMMENDED_TRAINED, softmax_layers=[20, 23]), True, True),
    "recommended-kl4": (dict(RECOMMENDED_TRAINED, softmax_layers=[14, 17, 20, 23]), True, True),
    # the same with a stage 1 that learns (#12): 64k tokens at 512-token rows (128 steps) instead
    # of 16k at the page's rows (4 steps at 4,096)
    "recommended-kl4-s1short": (dict(RECOMMENDED_TRAINED, softmax_layers=[14, 17, 20, 23]), True, True),
    # stage 1's rows alone: the page's 16k stage-1 tokens at 512-token rows (32 steps), so stage 2
    # reads exactly the rows recommended-kl4 reads
    "recommended-kl4-s1rows512": (dict(RECOMMENDED_TRAINED, softmax_layers=[14, 17, 20, 23]), True, True),
    # the fixed first + middle choice shipped before select-layers, at the same count as kl2
    "recommended-fixed2": (dict(RECOMMENDED_TRAINED, softmax_layers=[0, 15]), True, True),
    "liger-gla-baseline": (dict(method="liger-gla", init="baseline"), True, True),
    # the recommended conversion at Lizard's window, beside window-sinks-w128-lora: does the window
    # that makes Lizard's lead help the recommended conversion too?
    "recommended-w128": (dict(RECOMMENDED_TRAINED, window=128), True, True),
    # the conversion `linearize convert` makes (window 512) distilled at the page's budget, beside
    # window-sinks-w512-lora: does training the recurrence pay at the window users get?
    "recommended-w512": (dict(RECOMMENDED_TRAINED, window=512), True, True),
    # the same with one recurrent state (and key feature map) per KV head, shared by its query
    # heads: a third of the state's memory on SmolLM2; does the recurrence keep its worth?
    "recommended-w512-shared": (dict(RECOMMENDED_TRAINED, window=512, share_state_across_group=True), True, True),
    # issue #17's delta rule at the recommended conversion's budget (no LoLA: its sparse cache
    # needs LoLCATs' past-window mixing)
    "gated-deltanet-baseline": (dict(method="gated-deltanet", init="baseline"), True, True),
    "lizard-baseline": (dict(method="lizard", init="baseline"), True, True),
    # issue #17's other recurrences, to compare with liger-gla-baseline at the same budget
    "lightning-baseline": (dict(method="lightning", init="baseline"), True, True),
    "based-baseline": (dict(method="based", init="baseline"), True, True),
    # the same with the new parameters (branch weights, gates, maps) at lr 1e-2 in stage 2
    "gated-deltanet-baseline-fastmix": (dict(method="gated-deltanet", init="baseline"), True, True),
    "liger-gla-baseline-fastmix": (dict(method="liger-gla", init="baseline"), True, True),
}
# Recipe sections a run sets beyond the shared recipe (merged into it).
RECIPE_EXTRAS = {
    # scheduled sliding-window dropout: each layer trains a step with a 16-token window with
    # probability 0.5 at the start of stage 2, falling to 0 at its end
    "lolcats-baseline-gate-norope-ssd": {"stage2": {"window_dropout": {"rate": 0.5, "final_rate": 0.0, "window": 16}}},
    "gated-deltanet-baseline-fastmix": {"stage2": {"new_parameters_lr": 1.0e-2}},
    "liger-gla-baseline-fastmix": {"stage2": {"new_parameters_lr": 1.0e-2}},
    "recommended-kl4-s1short": {"stage1": {"seq_len": 512, "max_tokens": 65536}},
    "recommended-kl4-s1rows512": {"stage1": {"seq_len": 512}},
}


class Sparse(NamedTuple):
    """A LoLA entry: LoLA's sparse cache set at evaluation on another run's model, no training of
    its own. source: the run whose trained model it loads (an untrained run: its conversion);
    budget: pairs per layer and head; per_kv_head: pairs per KV head, shared by its query
    heads (`sparse_per_kv_head`); block: tokens between selections (None: the conversion's, 64)."""
    source: str
    budget: int
    per_kv_head: bool = False
    block: int | None = None


SPARSE = {
    "lolcats-baseline-untrained+lola64": Sparse("lolcats-baseline-untrained", 64),
    "lolcats-baseline-untrained+lola256": Sparse("lolcats-baseline-untrained", 256),
    "lolcats-baseline+lola64": Sparse("lolcats-baseline", 64),
    "lolcats-baseline-gate+lola64": Sparse("lolcats-baseline-gate", 64),
    "lolcats-baseline-gate-untrained+lola64": Sparse("lolcats-baseline-gate-untrained", 64),
    "lolcats-baseline-gate-norope-untrained+lola64": Sparse("lolcats-baseline-gate-norope-untrained", 64),
    "lolcats-baseline-gate+lola256": Sparse("lolcats-baseline-gate", 256),
    "lolcats-baseline-gate-norope+lola64": Sparse("lolcats-baseline-gate-norope", 64),
    "lolcats-baseline-gate-norope-ssd+lola64": Sparse("lolcats-baseline-gate-norope-ssd", 64),
    "recommended-kl1+lola64": Sparse("recommended-kl1", 64),
    "recommended-kl2+lola64": Sparse("recommended-kl2", 64),
    "recommended-kl4+lola64": Sparse("recommended-kl4", 64),
    "recommended-kl4-s1short+lola64": Sparse("recommended-kl4-s1short", 64),
    "recommended-fixed2+lola64": Sparse("recommended-fixed2", 64),
    "recommended-w128+lola64": Sparse("recommended-w128", 64),
    "recommended-kl1-untrained+lola64": Sparse("recommended-kl1-untrained", 64),
    "recommended-w512-untrained+lola64": Sparse("recommended-w512-untrained", 64),
    "recommended-w512+lola64": Sparse("recommended-w512", 64),
    # smaller budgets on the distilled default: what each MiB of LoLA buys
    "recommended-w512+lola16": Sparse("recommended-w512", 16),
    "recommended-w512+lola32": Sparse("recommended-w512", 32),
    # pairs per KV head, shared by its 3 query heads' states (`sparse_per_kv_head`): 64 per group
    # holds a third of LoLA 64's pairs, 192 as many
    "recommended-w512+lola64kv": Sparse("recommended-w512", 64, per_kv_head=True),
    "recommended-w512+lola192kv": Sparse("recommended-w512", 192, per_kv_head=True),
    "recommended-w512-untrained+lola64kv": Sparse("recommended-w512-untrained", 64, per_kv_head=True),
    "recommended-w512-shared+lola64kv": Sparse("recommended-w512-shared", 64, per_kv_head=True),
    "recommended-w512-shared-untrained+lola64kv": Sparse("recommended-w512-shared-untrained", 64, per_kv_head=True),
    # a selection every 16 tokens, not 64: fewer tokens wait beyond the window (2.1 MiB less);
    # untrained 12.43 against 12.40, the same passkey, and 4x the selections: the default keeps 64
    "recommended-w512+lola64kv-b16": Sparse("recommended-w512", 64, per_kv_head=True, block=16),
    "recommended-w512-shared+lola64kv-b16": Sparse("recommended-w512-shared", 64, per_kv_head=True, block=16),
    "recommended-w512-shared-untrained+lola64kv-b16": Sparse("recommended-w512-shared-untrained", 64,
                                                             per_kv_head=True, block=16),
}


def sparse_settings(name: str) -> dict:
    """The `linearize.load` / `LinearizeConfig` keywords of a SPARSE entry ({} for other runs)."""
    if name not in SPARSE:
        return {}
    entry = SPARSE[name]
    block = {} if entry.block is None else {"sparse_block": entry.block}
    return dict(sparse_cache=entry.budget, sparse_per_kv_head=entry.per_kv_head, **block)


RUNS["lolcats-baseline-untrained"] = (dict(method="lolcats", init="baseline"), None, None)
# budget 1 of `linearize select-layers` on 4 held-out rows (layer 20; on 8 rows budget 2 chose
# [20, 23]), untrained: with init baseline this is window + sinks with one softmax layer
RUNS["recommended-kl1-untrained"] = (dict(RECOMMENDED_TRAINED, softmax_layers=[20]), None, None)
# the recommended conversion at window 512, untrained: with init baseline that is window 512 +
# sinks (window-sinks-w512) until LoLA keeps pairs past the window
RUNS["recommended-w512-untrained"] = (dict(RECOMMENDED_TRAINED, window=512), None, None)
RUNS["recommended-w512-shared-untrained"] = (dict(RECOMMENDED_TRAINED, window=512, share_state_across_group=True),
                                             None, None)
RUNS["lolcats-baseline-gate-untrained"] = (dict(method="lolcats", init="baseline", gate="mamba2"), None, None)
RUNS["lolcats-baseline-gate-norope-untrained"] = (dict(method="lolcats", init="baseline", gate="mamba2",
                                                    linear_rope=False), None, None)
RUNS.update({name: None for name in SPARSE})
# References and controls: rows to compare trained runs with, never judged themselves.
REFERENCES = ("teacher", "window-sinks", "window-sinks-lora", "teacher-lora", "window-sinks-kl4-lora",
              "window-sinks-w128-lora", "window-sinks-w512-lora", "window-sinks-w512", "window-sinks-w1344",
              "window-sinks-w1344-lora", "window-sinks-w1168", "window-sinks-w1168-lora", "window-sinks-w978",
              "window-sinks-w886", "window-sinks-w746", "window-sinks-w746-lora")


def spec_of(name: str) -> tuple | None:
    """The RUNS entry of the model `name` evaluates (a LoLA entry's source run's); None for an
    unconverted run."""
    return RUNS.get(SPARSE.get(name, (name, None))[0])


def conversion_of(name: str) -> dict | None:
    """The linearize config of the model `name` evaluates; None for an unconverted run."""
    spec = spec_of(name)
    return spec[0] if spec else None


def is_trained(name: str) -> bool:
    """Whether `name` evaluates a distilled model (a LoLA entry: its source run's)."""
    spec = spec_of(name)
    return bool(spec) and spec[1] is not None


def control_of(name: str, measured=REFERENCES) -> str | None:
    """The reference run that is `name`'s control: the same LoRA on window + sinks, no recurrence,
    with the same softmax layers kept, and the same window where such a control exists (else the
    page says the control's window differs). None when the run keeps softmax layers and no such
    control exists (the page then compares with window-sinks-lora and says it lacks them).
    Only the references in `measured` are candidates."""
    layers = (conversion_of(name) or {}).get("softmax_layers")
    controls = [ref for ref in REFERENCES
                if ref in measured and is_control(ref) and RUNS[ref][0].get("softmax_layers") == layers]
    same_window = [ref for ref in controls if window_of(ref) == window_of(name)]
    return (same_window or controls or [None])[0]


def is_control(name: str) -> bool:
    """A reference that trains the same LoRA on window + sinks, at a window shorter than the
    evaluated lengths (the teacher + LoRA, whose window covers them, is the ceiling, not a control)."""
    spec = RUNS.get(name)
    return bool(spec) and spec[1] is False and spec[0].get("method") == "window-sinks" \
        and spec[0].get("window", 0) < TEACHER_WINDOW


def is_truncation(name: str) -> bool:
    """A reference that is window + sinks attention alone, at a window shorter than the evaluated
    lengths: plain truncation, with or without the LoRA."""
    conversion = conversion_of(name) or {}
    return name in REFERENCES and conversion.get("method") == "window-sinks" and not conversion.get("softmax_layers") \
        and window_of(name) < TEACHER_WINDOW


def window_of(name: str) -> int | None:
    """The exact-attention window of the run's conversion (its method's default when unset),
    None for an unconverted run."""
    import linearize

    conversion = conversion_of(name)
    return linearize.LinearizeConfig(**conversion).resolved().window if conversion is not None else None


LABELS = {
    "teacher": "teacher (softmax)",
    "window-sinks": "window 64 + 4 sinks, untrained",
    "window-sinks-lora": "window 64 + 4 sinks + the same LoRA (control)",
    "teacher-lora": "teacher + the same LoRA (the fair ceiling)",
    "window-sinks-kl4-lora": "window 64 + 4 sinks, softmax in [14, 17, 20, 23], the same LoRA (control)",
    "window-sinks-w128-lora": "window 128 + 4 sinks + the same LoRA (Lizard's window; control)",
    "window-sinks-w512": "window 512 + 4 sinks, untrained",
    "window-sinks-w512-lora": "window 512 + 4 sinks + the same LoRA (the default's window; control)",
    "window-sinks-w1344": "window 1344 + 4 sinks, untrained (more decode state than the default)",
    "window-sinks-w1344-lora": "window 1344 + 4 sinks + the same LoRA (more decode state than the default; control)",
    "window-sinks-w1168": "window 1168 + 4 sinks, untrained (the decode state of the default with a state and LoLA per query head)",
    "window-sinks-w1168-lora": "window 1168 + 4 sinks + the same LoRA (the decode state of the default with a state and LoLA per query head; control)",
    "window-sinks-w978": "window 978 + 4 sinks, untrained (the decode state of the default with a state per query head and a rotation per layer)",
    "window-sinks-w886": "window 886 + 4 sinks, untrained (the decode state of the default with a state per query head)",
    "window-sinks-w746": "window 746 + 4 sinks, untrained (the default's decode state)",
    "window-sinks-w746-lora": "window 746 + 4 sinks + the same LoRA (the default's decode state; control)",
    "lolcats-paper-untrained": "LoLCATs as published, untrained",
    "lolcats-paper": "LoLCATs as published (init paper)",
    "lolcats-baseline": "LoLCATs, init baseline",
    "lolcats-baseline-gate": "LoLCATs + Mamba2 decay gate, init baseline",
    "lolcats-baseline-gate-norope": "LoLCATs + Mamba2 gate, init baseline, feature maps before RoPE",
    "liger-gla-baseline": "Liger Attention, init baseline",
    "lizard-baseline": "Lizard (window 128, not 64), init baseline",
    "lightning-baseline": "Lightning decay (Liger maps, fixed per-head decay, window 64 + 4 sinks), init baseline",
    "based-baseline": "Based (Taylor map, no decay, window 64 + 4 sinks), init baseline",
    "gated-deltanet-baseline-fastmix": "Gated DeltaNet, init baseline, new parameters at lr 1e-2 in stage 2",
    "liger-gla-baseline-fastmix": "Liger Attention, init baseline, new parameters at lr 1e-2 in stage 2",
    "lolcats-baseline-untrained": "LoLCATs, init baseline, untrained (= window + sinks)",
    "lolcats-baseline-untrained+lola64": "LoLCATs, init baseline, untrained + LoLA sparse cache 64",
    "lolcats-baseline-untrained+lola256": "LoLCATs, init baseline, untrained + LoLA sparse cache 256",
    "lolcats-baseline+lola64": "LoLCATs, init baseline + LoLA sparse cache 64",
    "lolcats-baseline-gate+lola64": "LoLCATs + Mamba2 gate, init baseline + LoLA sparse cache 64",
    "lolcats-baseline-gate-untrained+lola64": "LoLCATs + Mamba2 gate, init baseline, untrained + LoLA sparse cache 64",
    "lolcats-baseline-gate-norope-untrained+lola64": "LoLCATs + Mamba2 gate, init baseline, maps before RoPE, untrained + LoLA 64",
    "lolcats-baseline-gate+lola256": "LoLCATs + Mamba2 gate, init baseline + LoLA sparse cache 256",
    "lolcats-baseline-gate-norope+lola64": "LoLCATs + Mamba2 gate, init baseline, feature maps before RoPE + LoLA 64",
    "lolcats-baseline-gate-norope-ssd": "LoLCATs + Mamba2 gate, init baseline, maps before RoPE, window dropout (stage 2)",
    "lolcats-baseline-gate-norope-ssd+lola64": "LoLCATs + Mamba2 gate, maps before RoPE, window dropout + LoLA 64",
    "gated-deltanet-baseline": "Gated DeltaNet (delta rule + Mamba2 gate, window 64 + 4 sinks), init baseline",
    "recommended-kl1": "recommended, softmax in the KL-chosen layer [20]",
    "recommended-kl2": "recommended, softmax in the 2 KL-chosen layers [20, 23]",
    "recommended-w128": "recommended, window 128 (Lizard's)",
    "recommended-w128+lola64": "recommended, window 128 + LoLA 64",
    "recommended-kl1-untrained": "recommended, softmax in the KL-chosen layer [20], untrained",
    "recommended-kl1-untrained+lola64": "recommended, softmax in the KL-chosen layer [20], untrained + LoLA 64",
    "recommended-w512-untrained": "recommended at window 512, untrained (= window 512 + sinks)",
    "recommended-w512-untrained+lola64": "recommended at window 512, untrained + LoLA 64 per head",
    "recommended-w512": "recommended at window 512, a state per query head, distilled",
    "recommended-w512+lola64": "recommended at window 512, a state per query head, distilled + LoLA 64 per head",
    "recommended-w512+lola16": "recommended at window 512, a state per query head, distilled + LoLA 16 per head",
    "recommended-w512+lola32": "recommended at window 512, a state per query head, distilled + LoLA 32 per head",
    "recommended-w512+lola64kv": "recommended at window 512, a state per query head, distilled + LoLA 64 per KV head",
    "recommended-w512+lola192kv": "recommended at window 512, a state per query head, distilled + LoLA 192 per KV head",
    "recommended-w512-untrained+lola64kv": "recommended at window 512, a state per query head, untrained + LoLA 64 per KV head",
    "recommended-w512-shared": "recommended at window 512 (the default: one state per KV head), distilled",
    "recommended-w512-shared+lola64kv": "recommended at window 512 (the default: one state per KV head), distilled + LoLA 64 per KV head",
    "recommended-w512+lola64kv-b16": "recommended at window 512, a state per query head, distilled + LoLA 64 per KV head, selected every 16 tokens",
    "recommended-w512-shared-untrained+lola64kv": "recommended at window 512 (the default: one state per KV head), untrained + LoLA 64 per KV head",
    "recommended-w512-shared+lola64kv-b16": "recommended at window 512, one state per KV head, distilled + LoLA 64 per KV head, selected every 16 tokens (not the default)",
    "recommended-w512-shared-untrained+lola64kv-b16": "recommended at window 512, one state per KV head, untrained + LoLA 64 per KV head, selected every 16 tokens (not the default)",
    "recommended-kl1+lola64": "recommended, 1 KL-chosen softmax layer + LoLA 64",
    "recommended-kl2+lola64": "recommended, 2 KL-chosen softmax layers + LoLA 64",
    "recommended-kl4": "recommended, softmax in the 4 KL-chosen layers [14, 17, 20, 23]",
    "recommended-kl4+lola64": "recommended, 4 KL-chosen softmax layers + LoLA 64",
    "recommended-kl4-s1short": "recommended, 4 KL-chosen softmax layers, stage 1 64k tokens at 512-token rows",
    "recommended-kl4-s1short+lola64": "recommended, 4 KL-chosen layers, stage 1 64k at 512-token rows + LoLA 64",
    "recommended-kl4-s1rows512": "recommended, 4 KL-chosen softmax layers, stage 1's 16k tokens at 512-token rows",
    "recommended-fixed2": "recommended, softmax in the fixed first + middle layers [0, 15]",
    "recommended-fixed2+lola64": "recommended, fixed softmax layers [0, 15] + LoLA 64",
}


@functools.lru_cache(maxsize=1)
def _plain_model():
    from linearize.assets import default_model_dir
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def decode_state_mib(name: str, context: int = 16384) -> float | None:
    """MiB of one sequence's decode state at `context` tokens for the run's conversion (the KV
    cache for the teacher): recurrent states, windows, LoLA pairs and the KV caches of kept
    softmax layers, from `linearize.summary` on the run's configuration (no weights needed)."""
    import linearize
    from linearize.summary import summarize

    source = SPARSE.get(name, (name, None))[0]
    source = "teacher" if source == "teacher-lora" else source  # its 8,192-token window is the teacher's attention
    if source not in RUNS:
        return None
    model = copy.deepcopy(_plain_model())
    if RUNS[source] is not None:
        linearize.convert(model, linearize.LinearizeConfig(**RUNS[source][0], **sparse_settings(name)))
    return summarize(model, (context,)).state_bytes[context] / 2**20
