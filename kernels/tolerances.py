"""How close each fast backend stays to the fp64 reference (`naive.py`): the bound on the
relative error ||out - ref|| / ||ref|| by op, backend and input dtype, for the outputs (and
final states) and for the gradients of every input.

The kernel tests assert these bounds on random inputs, and docs/results.md states them from
this table (`scripts/results/render.py`), so the document says what the tests check.
"""
from __future__ import annotations

from typing import NamedTuple


class Bound(NamedTuple):
    forward: float  # outputs and final states
    gradients: float  # every input's gradient


# (op, backend, dtype) -> Bound; "torch" is the chunked PyTorch path (torch_chunk.py),
# "triton" the Triton path (triton_chunk.py; tested on the CPU under TRITON_INTERPRET=1).
TOLERANCES: dict[tuple[str, str, str], Bound] = {
    ("gla", "torch", "float64"): Bound(1e-10, 1e-10),
    ("gla", "torch", "float32"): Bound(2e-5, 2e-5),
    ("gla", "torch", "bfloat16"): Bound(1e-2, 1e-2),
    ("window", "torch", "float32"): Bound(1e-5, 1e-5),
    ("hybrid", "torch", "float32"): Bound(1e-5, 1e-4),
    ("gla", "triton", "float32"): Bound(1e-4, 1e-4),
    ("gla", "triton", "bfloat16"): Bound(2e-2, 2e-2),
    ("window", "triton", "float32"): Bound(1e-4, 1e-4),
    ("window", "triton", "bfloat16"): Bound(2e-2, 2e-2),
    ("hybrid", "triton", "float32"): Bound(1e-4, 1e-4),
    ("hybrid", "triton", "bfloat16"): Bound(2e-2, 2e-2),
}


def tolerance(op: str, backend: str, dtype) -> Bound:
    """The bound for `op` on `backend` with inputs of `dtype` (a torch.dtype or its name)."""
    key = (op, backend, str(dtype).removeprefix("torch."))
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for {key}; the table has {sorted(TOLERANCES)}")
    return TOLERANCES[key]
