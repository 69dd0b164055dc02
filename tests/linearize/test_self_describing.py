"""A saved folder loads in a process that never imported linearize: config.json's auto_map
names the module saved beside the weights (transformers' trust_remote_code path), and stock
lm-eval's `hf` model gets the student."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import linearize
from linearize.hf_classes import AUTO_MODULE, auto_map

REPO = Path(__file__).resolve().parents[2]

FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ref = sys.argv[1], sys.argv[2]
assert "linearize" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
ids, logits = torch.load(ref)
with torch.no_grad():
    err = (model(ids).logits - logits).abs().max().item()
from lm_eval.models.huggingface import HFLM
lm = HFLM(pretrained=folder, trust_remote_code=True, device="cpu", batch_size=1)
print(type(model).__name__, err, type(lm.model).__name__)
"""


def fresh_python(code: str, *args, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def word_tokenizer():
    """A 128-word tokenizer matching the tiny models' vocabulary (lm-eval needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")


def saved(make_tiny_model, tmp_path, **config):
    model = linearize.convert(make_tiny_model("qwen3"), **config)
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        torch.save((ids, model(ids).logits), tmp_path / "ref.pt")
    return model, folder


def test_a_saved_folder_loads_with_trust_remote_code_alone(make_tiny_model, tmp_path):
    _, folder = saved(make_tiny_model, tmp_path, method="lolcats", window=4, gate="mamba2", sparse_cache=3,
                      sparse_block=2)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == auto_map()
    assert (folder / f"{AUTO_MODULE}.py").is_file()
    res = fresh_python(FRESH, folder, tmp_path / "ref.pt", tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    name, err, lm_name = res.stdout.split()[-3:]
    assert name == lm_name == "LinearizedQwen3ForCausalLM" and float(err) == 0.0


def test_without_trust_remote_code_transformers_says_to_pass_it(make_tiny_model, tmp_path):
    _, folder = saved(make_tiny_model, tmp_path, method="lizard", window=4)
    code = "import sys\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(sys.argv[1])"
    res = fresh_python(code, folder, tmp=tmp_path)
    assert res.returncode != 0 and "trust_remote_code=True" in res.stderr


def test_unconvert_takes_the_auto_map_away(make_tiny_model, tmp_path):
    model, folder = saved(make_tiny_model, tmp_path, method="liger-gla", window=4)
    loaded = linearize.load(folder)
    assert loaded.config.auto_map == auto_map()
    linearize.unconvert(loaded)
    assert not hasattr(loaded.config, "auto_map")
    loaded.save_pretrained(tmp_path / "plain")
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not (tmp_path / "plain" / f"{AUTO_MODULE}.py").exists()
