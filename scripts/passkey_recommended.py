"""Passkey at 2k and 4k, 4 depths x 3 trials (12 needles per length, each >= 256 tokens before
the question), for the recommended conversion (`linearize convert` with no --method), untrained.

    python scripts/passkey_recommended.py   -> outputs/sparse-cache/passkey-recommended-3trials.json

docs/quality-at-length.md quotes it (scripts/quality_at_length.py reads the file).
"""
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.assets import default_model_dir
from linearize.eval.passkey import passkey_retrieval

OUT = Path("outputs/sparse-cache/passkey-recommended-3trials.json")


def main() -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    linearize.convert(model, linearize.LinearizeConfig.recommended())
    t0 = time.time()
    with torch.no_grad():
        pk = passkey_retrieval(model, tok, [2048, 4096], [0.1, 0.3, 0.5, 0.7], 3, min_distance=256)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"passkey": pk, "seconds": time.time() - t0}, indent=1))
    print(pk["accuracy"], f"{pk['mean_accuracy']:.1f} %", f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
