"""The model under benchmark: its facts, random inputs, and the teacher/student roles (the same
weights under `linearize.teacher`)."""
from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from linearize import is_linearized
from linearize.state import linearize_state

ROLES = ("teacher", "student")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_info(model: torch.nn.Module) -> dict:
    """Name, layers, heads, dtype and linearize config of a (converted) model."""
    cfg = model.config
    p = next(model.parameters())
    info = {
        "name": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "class": type(model).__name__,
        "parameters": sum(x.numel() for x in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "dtype": str(p.dtype).replace("torch.", ""),
        "device": str(p.device),
    }
    if is_linearized(model):
        st = linearize_state(model)
        info["method"] = st.config.method
        info["linearize"] = st.config.to_dict()
        info["softmax_layers"] = [i for i in range(st.num_layers) if i not in set(st.layers)]
    return info


def random_ids(model: torch.nn.Module, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch_size, length] token ids drawn uniformly from the vocabulary (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, length), generator=g)
    return ids.to(model_device(model))


def progress(total: int, desc: str, enabled: bool = True):
    """A progress bar on stderr over `total` runs."""
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=not enabled, file=sys.stderr)


def require_linearized(model: torch.nn.Module) -> None:
    if not is_linearized(model):
        raise ValueError(f"{type(model).__name__} is not linearized: the benchmarks compare a converted model "
                         "(student) with its own softmax attention (teacher); call linearize.convert(model) first")


def role_pairs(rows: list[dict], key: str) -> dict:
    """{row[key]: {role: row}} in increasing `key`: each measured length's teacher and student rows."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], {})[r["role"]] = r
    return dict(sorted(out.items()))


def ordered_roles(repeat: int) -> tuple[str, ...]:
    """Teacher first on even repeats, student first on odd ones, so drift hits both alike."""
    return ROLES if repeat % 2 == 0 else ROLES[::-1]
