"""Loading that refuses weights which do not fit their config.json, naming what is wrong."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from .config import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated or does not match its config."""


def _key_text(key) -> str:
    """A loading-info entry as text; mismatched keys come as (name, saved shape, config.json shape)."""
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} saved {list(key[1])} vs config.json {list(key[2])}"
    return str(key)


def checked_from_pretrained(from_pretrained, path, *args, **kwargs):
    """(model, loading info) from `from_pretrained`, refusing weights that do not fit config.json.

    Shape mismatches are loaded as reported keys (ignore_mismatched_sizes) so the error can say
    which tensors disagree with config.json instead of blaming the weight file.
    """
    kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        model, info = from_pretrained(path, *args, output_loading_info=True, **kwargs)
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}, field `linearize`: {e}. Fix the file or convert "
                              "the model again") from e
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"could not load the weights in {path}: {e}. The checkpoint may be truncated or "
                              "corrupt: re-save or re-convert it.") from e
    problems = {k: sorted(map(_key_text, v)) for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if "missing_keys" in problems:
        problems["missing_keys"] = [k for k in problems["missing_keys"] if k not in tied]
        if not problems["missing_keys"]:
            del problems["missing_keys"]
    if problems:
        detail = "; ".join(f"{k}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for k, v in problems.items())
        where = ("the shapes in config.json (was hidden_size, head or layer count edited?)"
                 if "mismatched_keys" in problems else "its config.json and linearize config")
        raise CheckpointError(f"checkpoint {path} does not match {where} ({detail}). Weights would be left "
                              "random: restore config.json, or re-save the model with save_pretrained or convert "
                              "again.")
    return model, info
