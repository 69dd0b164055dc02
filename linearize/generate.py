"""Streaming generation from a saved model, reporting speed and cache memory."""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .cache import LinearizeCache
from .model_folder import load, resolve_model_folder
from .convert import is_linearized
from .convert import teacher as teacher_mode


@dataclass
class GenerationReport:
    text: str
    new_tokens: int
    seconds: float
    cache_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def cache_nbytes(cache) -> int:
    """Bytes held by a LinearizeCache or a transformers DynamicCache."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nelement() * t.element_size()
    return total


def generate_text(model_dir: str | Path, prompt: str, *, max_new_tokens: int = 64, teacher: bool = False,
                  do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, chat: bool = False,
                  stream=sys.stdout, allow_nonfinite: bool = False, sparse_cache: int | None = None,
                  sparse_block: int | None = None, sparse_per_kv_head: bool | None = None) -> GenerationReport:
    """Generate from `prompt`, streaming tokens to `stream`; returns text, speed and cache bytes.

    Weights holding NaN or inf are refused (they would print an empty line) unless allow_nonfinite.
    sparse_cache, sparse_block, sparse_per_kv_head: LoLA's sparse cache for a LoLCATs model (None: as saved).
    """
    model_dir = resolve_model_folder(model_dir)
    model = load(model_dir, allow_nonfinite=allow_nonfinite, sparse_cache=sparse_cache, sparse_block=sparse_block,
                 sparse_per_kv_head=sparse_per_kv_head)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{model_dir} has no tokenizer ({e}); save one beside the model") from e
    if chat and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    use_student_cache = is_linearized(model) and not teacher
    cache = LinearizeCache(model) if use_student_cache else None
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    streamer = _Streamer(tokenizer, stream)
    ctx = teacher_mode(model) if teacher else contextlib.nullcontext()
    with ctx, torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                             streamer=streamer, cache=cache, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    report = GenerationReport(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds,
                              cache_nbytes(cache))
    label = "teacher (softmax attention)" if teacher or not is_linearized(model) else "linearized"
    print(f"\n[{label}] {report.new_tokens} tokens in {report.seconds:.2f}s = {report.tokens_per_second:.1f} tokens/s; "
          f"cache {report.cache_bytes / 2**20:.2f} MiB", file=stream)
    return report


class _Streamer:
    """TextStreamer-like printer that flushes every token to any text stream."""

    def __init__(self, tokenizer, stream):
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._inner.on_finalized_text = lambda text, stream_end=False: (stream.write(text), stream.flush())

    def put(self, value):
        self._inner.put(value)

    def end(self):
        self._inner.end()
