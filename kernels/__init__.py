"""Kernels behind every mixer (`linearize.kernels`): one signature per op, a dispatcher that
picks the backend per call (see `dispatch`), and per op folder (gla, delta, window, hybrid)
one file per implementation: `naive.py` (the fp64 reference), `torch_chunk.py` (chunked
PyTorch, the CPU path), `torch_recurrent.py` (PyTorch token loop for decoding),
`triton_chunk.py` (the GPU path) and `triton_recurrent.py` (fused Triton decode), where the op
has one; files with another role are named for it (`hybrid/combine.py`, `window/max_score.py`).

This folder is installed as `linearize.kernels`. Run from the repository root, Python can
also find it as a top-level `kernels`, the name of the PyPI package that transformers
(>= 5.25) imports; when that happens the import is handed to the installed package.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or ".") != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError("`import kernels` found linearize's kernels/ folder (run from the repository root) and no "
                          "installed PyPI package `kernels`: `pip install kernels`, or run from another folder")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .dispatch import (BACKENDS, ENV_VAR, cached_window_attention, combine_past_window, delay_into_state,
                           gated_delta_rule, gated_linear_attention, hybrid_attention, linear_key_mask,
                           linear_recurrence, past_window_attention, recurrent_gated_delta_rule,
                           recurrent_gated_linear_attention, select_backend, sliding_window_attention,
                           sparse_past_window_attention, triton_available, window_max_score)

    __all__ = ["BACKENDS", "ENV_VAR", "cached_window_attention", "combine_past_window", "delay_into_state",
               "gated_delta_rule", "gated_linear_attention", "hybrid_attention", "linear_key_mask",
               "linear_recurrence", "past_window_attention", "recurrent_gated_delta_rule",
               "recurrent_gated_linear_attention", "select_backend", "sliding_window_attention",
               "sparse_past_window_attention", "triton_available", "window_max_score"]
