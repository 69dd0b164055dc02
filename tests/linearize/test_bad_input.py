"""Bad input never passes silently (#19): each case runs through the real CLI in a subprocess.

One tiny random Llama (with a character tokenizer) is saved once per module; every case gets
its own folder, and all cases run concurrently (each process spends seconds importing torch).
Each asserts the exit code, a message naming the problem, no traceback, and that its inputs,
the shared model and everything outside its folder are unchanged. Distill cases whose recipe
should be refused before the model loads point at a copy with junk weights, so a check that
ran after the load would read "could not load" instead.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

import linearize
from linearize.model_folder import CheckpointError, check_writable, save_folder

from helpers.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[2]


def tree(path: Path) -> dict[str, str]:
    """Relative path -> content hash ('dir' for folders) of everything under path (or the file)."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


@dataclass
class Case:
    args: list
    rc: int = 2
    words: list = field(default_factory=list)  # each must appear in stderr (rc 2) or stdout (rc 0)
    absent: list = field(default_factory=list)  # must not appear in stderr
    keep: list = field(default_factory=list)  # paths that must be byte-identical afterwards
    new: list = field(default_factory=list)  # names the command may add to its case folder
    gone: list = field(default_factory=list)  # paths in the case folder that must not exist afterwards


def edit_config(folder: Path, change) -> Path:
    data = json.loads((folder / "config.json").read_text())
    change(data)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def nonfinite_copy(conv: Path, d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(conv, d / "broken"))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, :3] = float("nan")
    tensors["lm_head.weight"][1, 0] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def read_only_target(d: Path) -> Path:
    """A path whose parent refuses writes: a chmod 555 folder, or /sys when running as root."""
    if os.geteuid() != 0:
        (d / "ro").mkdir()
        os.chmod(d / "ro", 0o555)
        return d / "ro" / "out"
    if not Path("/sys").is_dir():
        pytest.skip("running as root without /sys: no read-only location to write into")
    return Path("/sys/linearize-bad-input-test")


def case_folder(root: Path, name: str) -> Path:
    """A new folder for one case (the case's name), in which its inputs are prepared."""
    d = root / name
    d.mkdir()
    return d


def build_cases(src: Path, conv: Path, root: Path) -> dict[str, Case]:
    """Every case, its folder prepared; names say what the user did."""
    cases, folder = {}, partial(case_folder, root)
    d = folder("out_is_a_file")
    (d / "notes.txt").write_text("mine")
    cases[d.name] = Case(["convert", src, "--out", d / "notes.txt"], words=["is an existing file"], keep=[d])
    d = folder("out_holds_another_model")
    other = Path(shutil.copytree(src, d / "other"))
    cases[d.name] = Case(["convert", src, "--out", other], words=["not empty", "another model", "--overwrite"],
                         keep=[d])
    d = folder("out_holds_user_files")
    (d / "work").mkdir()
    (d / "work" / "notes.txt").write_text("mine")
    cases[d.name] = Case(["convert", src, "--out", d / "work"], words=["not empty", "--overwrite"], keep=[d])
    d = folder("out_is_the_source")
    model = Path(shutil.copytree(src, d / "model"))
    cases[d.name] = Case(["convert", model, "--out", model], words=["source model folder"], keep=[d])
    d = folder("overwrite_replaces_another_model")
    other = Path(shutil.copytree(src, d / "other"))
    cases[d.name] = Case(["convert", src, "--out", other, "--overwrite"], rc=0, words=["replaced what was there"])
    d = folder("earlier_output_is_replaced")
    ours = Path(shutil.copytree(conv, d / "ours"))
    cases[d.name] = Case(["convert", src, "--out", ours, "--method", "liger-gla"], rc=0, words=["liger-gla"])
    d = folder("out_not_writable")
    cases[d.name] = Case(["convert", src, "--out", read_only_target(d)], words=["not writable", "--out"], keep=[d])
    d = folder("eval_out_not_writable")
    cases[d.name] = Case(["eval", conv, "--metrics", "perplexity", "--out", read_only_target(d)],
                         words=["not writable", "--out"], absent=["Loading"], keep=[d])
    d = folder("report_out_not_writable")
    cases[d.name] = Case(["report", d, "--out", read_only_target(d) / "report.md"], words=["not writable", "--out"],
                         keep=[d])
    d = folder("sparse_cache_on_liger")
    cases[d.name] = Case(["convert", src, "--method", "liger-gla", "--sparse-cache", "8", "--out", d / "x"],
                         words=["sparse_cache needs", "lolcats"], keep=[d])
    d = folder("info_sparse_cache_on_lizard")
    cases[d.name] = Case(["info", conv, "--sparse-cache", "8"], words=["sparse_cache needs", "reconvert"], keep=[d])
    d = folder("layers_empty")
    cases[d.name] = Case(["convert", src, "--layers", "", "--out", d / "x"], words=["--layers", "no layer"], keep=[d])
    d = folder("softmax_layers_cover_all")
    cases[d.name] = Case(["convert", src, "--softmax-layers", "0,1", "--out", d / "x"],
                         words=["no layer would be linearized", "2 layers"], keep=[d])
    d = folder("convert_a_linearized_model")
    cases[d.name] = Case(["convert", conv, "--out", d / "x"], words=["already a linearized model"], keep=[d])
    nan_words = ["NaN or inf", "model.layers.0.mlp.up_proj.weight", "lm_head.weight", "--allow-nonfinite"]
    d = folder("info_nonfinite")
    cases[d.name] = Case(["info", nonfinite_copy(conv, d)], words=nan_words, keep=[d])
    d = folder("generate_nonfinite")
    cases[d.name] = Case(["generate", nonfinite_copy(conv, d), "--prompt", "hi"], words=nan_words, keep=[d])
    d = folder("info_allow_nonfinite")
    cases[d.name] = Case(["info", nonfinite_copy(conv, d), "--allow-nonfinite"], rc=0, words=["parameters added"],
                         keep=[d])
    d = folder("generate_allow_nonfinite")
    cases[d.name] = Case(["generate", nonfinite_copy(conv, d), "--prompt", "hi", "--max-new-tokens", "2",
                          "--allow-nonfinite"], rc=0, words=["tokens/s"], keep=[d])
    edits = {
        "config_without_linearize_key": (lambda c: c.pop("linearize"), ["config.json", "no `linearize` field"]),
        "config_bad_linearize_field": (lambda c: c["linearize"].update(window="abc"),
                                       ["config.json", "`linearize`", "window must be an integer"]),
        "config_hidden_size_edited": (lambda c: c.update(hidden_size=32), ["config.json", "hidden_size"]),
    }
    for name, (change, words) in edits.items():
        d = folder(name)
        edited = edit_config(Path(shutil.copytree(conv, d / "model")), change)
        cases[name] = Case(["info", edited], words=words, absent=["truncated"], keep=[d])
    return cases


def write_recipe(d: Path, name: str = "recipe.yaml", **tree) -> Path:
    """A small distill recipe in case folder d: tiny model, lizard, text file, 1 step per stage."""
    import yaml

    base = {"output_dir": str(d / "run"), "model": {"path": str(d.parent.parent / "tiny")},
            "linearize": {"method": "lizard", "window": 4}, "data": {"source": str(d.parent.parent / "docs.txt")},
            "seq_len": 16, "stage1": {"max_steps": 1}, "stage2": {"max_steps": 1}, "progress": False}
    base.update(tree)
    (d / name).write_text(yaml.safe_dump(base))
    return d / name


def poisoned_copy(src: Path, d: Path) -> Path:
    """src with junk weights: a command that loads the model fails with 'could not load'."""
    folder = Path(shutil.copytree(src, d / "poisoned"))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def build_distill_cases(src: Path, conv: Path, root: Path, done_run: Path) -> dict[str, Case]:
    """distill and eval cases; every refusal names the key and the fix before any model loads
    (the recipes point at a model with junk weights, so a load would say 'could not load')."""
    cases, folder = {}, partial(case_folder, root)
    early = ["could not load", "Loading"]
    docs = root.parent / "docs.txt"
    bad = {
        "distill_unknown_key": ({"stage1": {"max_tokenz": 5}}, ["unknown recipe key", "stage1.max_tokenz",
                                                                "did you mean max_tokens"]),
        "distill_negative_budget": ({"stage2": {"max_tokens": -100}}, ["stage2.max_tokens must be >= 1",
                                                                       "stage2.enabled=false"]),
        "distill_seq_len_zero": ({"seq_len": 0}, ["seq_len must be at least 2 tokens", "got 0"]),
        "distill_lr_nonfinite": ({"stage1": {"max_steps": 1, "optimizer": {"lr": "inf"}}},
                                 ["stage1.optimizer.lr must be a finite number", "set a finite value"]),
        "distill_lora_dropout": ({"stage2": {"lora": {"dropout": 1.5}}}, ["stage2.lora.dropout", "[0, 1)"]),
        "distill_missing_data": ({"data": {"source": "/nonexistent/docs.jsonl"}},
                                 ["/nonexistent/docs.jsonl", "does not exist", "fix data.source"]),
        "distill_data_glob_matches_nothing": ({"data": {"source": "/nonexistent/*.parquet"}},
                                              ["matches no files", "fix data.source"]),
        "distill_data_split_missing": ({"data": {"source": str(docs), "split": "validation"}},
                                       ["no split 'validation'", "splits: train", "set data.split"]),
        "distill_embedded_data_split": ({"data": {"split": "train[:10%]"}},
                                        ["data.split=train[:10%]", "one split, train", "data.max_documents"]),
        "distill_data_field_missing": ({"data": {"source": str(docs), "text_field": "body"}},
                                       ["'body' is not a field", "fields: text", "set data.text_field"]),
        "distill_data_hub_id_not_cached": ({"data": {"source": "linearize-tests/no-such-data"}},
                                           ["hub data set 'linearize-tests/no-such-data' is not in the datasets cache",
                                            "HF_HUB_OFFLINE", "set data.source to local files"]),
    }
    for name, (tree, words) in bad.items():
        d = folder(name)
        recipe = write_recipe(d, **{"model": {"path": str(poisoned_copy(src, d))}, **tree})
        cases[name] = Case(["distill", recipe], words=words, absent=early, keep=[d])
    d = folder("distill_model_path_missing")
    cases[d.name] = Case(["distill", write_recipe(d, model={"path": str(d / "nope")})],
                         words=["model.path", "does not exist", "hub id"], absent=early, keep=[d])
    d = folder("distill_lora_target_missing")
    cases[d.name] = Case(["distill", write_recipe(d, stage2={"max_steps": 1, "lora": {"target_modules": ["qproj"]}})],
                         words=["stage2.lora.target_modules ['qproj']", "q_proj"])
    d = folder("distill_override_typo")
    cases[d.name] = Case(["distill", write_recipe(d, model={"path": str(poisoned_copy(src, d))}),
                          "stage2.optimizer.lrr=1e-3"], words=["stage2.optimizer.lrr", "did you mean lr"],
                         absent=early, keep=[d])
    d = folder("distill_resume_changed_model")
    run = Path(shutil.copytree(done_run, d / "run"))
    recipe = write_recipe(d, linearize={"method": "lizard", "window": 8}, resume=True)
    cases[d.name] = Case(["distill", recipe], words=["the recipe changed", "linearize", "window",
                                                    "Resume with the original values"], absent=early + ["[distill]"],
                         keep=[d])
    d = folder("distill_output_in_use")
    (d / "run").mkdir()
    (d / "run" / "distill.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                        "started": "now"}))
    cases[d.name] = Case(["distill", write_recipe(d, model={"path": str(poisoned_copy(src, d))})],
                         words=["in use by another linearize distill", f"pid {os.getpid()}", "another output_dir"],
                         absent=early, keep=[d])
    nan_words = ["NaN or inf", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    d = folder("distill_nonfinite_source")
    broken = nonfinite_copy(src, d)
    cases[d.name] = Case(["distill", write_recipe(d, model={"path": str(broken)})],
                         words=nan_words + ["model.allow_nonfinite=true"])
    eval_args = ["--tasks", "none", "--metrics", "ppl", "--ppl-texts", "1", "--max-length", "32", "--stride", "16"]
    d = folder("eval_nonfinite")
    cases[d.name] = Case(["eval", nonfinite_copy(conv, d), *eval_args, "--out", d / "out"],
                         words=nan_words + ["--allow-nonfinite"], keep=[d])
    d = folder("eval_allow_nonfinite")
    cases[d.name] = Case(["eval", nonfinite_copy(conv, d), *eval_args, "--out", d / "out", "--allow-nonfinite"],
                         rc=0, words=["results.json"])
    d = folder("convert_nonfinite_source")
    cases[d.name] = Case(["convert", nonfinite_copy(src, d), "--out", d / "x"], words=nan_words + ["--allow-nonfinite"],
                         keep=[d])
    return cases


def build_run_and_eval_cases(src: Path, conv: Path, root: Path, done_run: Path) -> dict[str, Case]:
    """#19 items 4, 8, 9 (distill) and 11 (eval) through the real CLI: a run that diverges, a
    corrupt latest checkpoint, a read-only output_dir; an eval that cannot run offline or at all."""
    cases, folder = {}, partial(case_folder, root)
    d = folder("distill_diverges")
    cases[d.name] = Case(["distill", write_recipe(d, stage1={"max_steps": 4, "optimizer": {"lr": 1e6}},
                                                  stage2={"enabled": False})],
                         words=["Stopped before updating the weights", "final was not exported",
                                "Lower stage1.optimizer.lr"], gone=["run/final"])
    d = folder("distill_resume_corrupt_latest")
    run = Path(shutil.copytree(done_run, d / "run"))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    params = run / "checkpoints" / latest / "params.safetensors"
    params.write_bytes(params.read_bytes()[:100])
    cases[d.name] = Case(["distill", write_recipe(d, resume=True)], rc=0,
                         words=[f"warning: checkpoint {latest} is unusable", "resuming from stage1-step0000001"])
    d = folder("distill_output_not_writable")
    cases[d.name] = Case(["distill", write_recipe(d, output_dir=str(read_only_target(d)),
                                                  model={"path": str(poisoned_copy(src, d))})],
                         words=["not writable", "output_dir"], absent=["could not load", "Loading"], keep=[d])
    d = folder("eval_task_offline")
    cases[d.name] = Case(["eval", conv, "--tasks", "piqa", "--metrics", "none", "--out", d / "out"],
                         words=["task piqa: its documents cannot be loaded", "--include-path"], absent=["Loading"],
                         keep=[d])
    for name, limit in (("eval_limit_zero", "0"), ("eval_limit_negative", "-1")):
        d = folder(name)
        cases[name] = Case(["eval", conv, "--limit", limit, "--out", d / "out"], words=["--limit must be > 0"],
                           absent=["Loading"], keep=[d])
    d = folder("eval_folder_without_tokenizer")
    bare = d / "bare"
    bare.mkdir()
    for f in conv.iterdir():
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, bare / f.name)
    cases[d.name] = Case(["eval", bare, "--tasks", "none", "--out", d / "out"],
                         words=[f"{bare} has no usable tokenizer", "tokenizer.json"], absent=["Loading"], keep=[d])
    return cases


def finished_run(root: Path) -> Path:
    """A distill run folder (1 step per stage) that resume cases copy."""
    from linearize.distill import distill
    from linearize.distill.recipe import load_recipe

    d = root / "done"
    d.mkdir(parents=True)
    distill(load_recipe(write_recipe(d)))
    return d / "run"


def run_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "linearize.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """(cases, results, trees before, trees after, source trees): every case run once, concurrently."""
    root = tmp_path_factory.mktemp("bad_input")
    src, conv = root / "tiny", root / "converted"
    save_tiny_model(src)
    model = linearize.load(src)
    linearize.convert(model, method="lizard", window=4)
    model.save_pretrained(conv)
    shutil.copy(src / "tokenizer.json", conv)
    shutil.copy(src / "tokenizer_config.json", conv)
    (root / "docs.txt").write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps. " * 4
                                                for i in range(40)))
    cases_root = root / "cases"
    cases_root.mkdir()
    done_run = finished_run(root / "prepared")
    cases = {**build_cases(src, conv, cases_root), **build_distill_cases(src, conv, cases_root, done_run),
             **build_run_and_eval_cases(src, conv, cases_root, done_run)}
    shared_before = (tree(src), tree(conv))
    before = {name: tree(cases_root / name) for name in cases}
    with ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_cli, case.args, cases_root / name) for name, case in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    after = {name: tree(cases_root / name) for name in cases}
    yield cases, results, before, after, shared_before, (tree(src), tree(conv))
    for name in ("out_not_writable", "eval_out_not_writable", "report_out_not_writable", "distill_output_not_writable"):
        ro = cases_root / name / "ro"
        if ro.exists():
            os.chmod(ro, 0o755)


CASE_NAMES = [
    "out_is_a_file", "out_holds_another_model", "out_holds_user_files", "out_is_the_source",
    "overwrite_replaces_another_model", "earlier_output_is_replaced", "out_not_writable", "eval_out_not_writable",
    "report_out_not_writable", "sparse_cache_on_liger", "info_sparse_cache_on_lizard", "layers_empty",
    "softmax_layers_cover_all", "convert_a_linearized_model", "info_nonfinite", "generate_nonfinite",
    "info_allow_nonfinite", "generate_allow_nonfinite", "config_without_linearize_key", "config_bad_linearize_field",
    "config_hidden_size_edited",
    "distill_unknown_key", "distill_negative_budget", "distill_seq_len_zero", "distill_lr_nonfinite",
    "distill_lora_dropout", "distill_missing_data", "distill_data_glob_matches_nothing", "distill_override_typo",
    "distill_data_split_missing", "distill_data_field_missing", "distill_data_hub_id_not_cached",
    "distill_embedded_data_split",
    "distill_resume_changed_model", "distill_model_path_missing", "distill_lora_target_missing",
    "distill_output_in_use", "distill_nonfinite_source", "eval_nonfinite",
    "eval_allow_nonfinite", "convert_nonfinite_source",
    "distill_diverges", "distill_resume_corrupt_latest", "distill_output_not_writable", "eval_task_offline",
    "eval_limit_zero", "eval_limit_negative", "eval_folder_without_tokenizer",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(battery, name):
    cases, results, before, after, shared_before, shared_after = battery
    case, res = cases[name], results[name]
    text = res.stderr if case.rc else res.stdout
    assert res.returncode == case.rc, res.stderr[-3000:]
    for word in case.words:
        assert word in text, f"{word!r} missing from:\n{text[-3000:]}"
    for word in case.absent + ["Traceback"]:
        assert word not in res.stderr, res.stderr[-3000:]
    assert shared_after == shared_before, "the shared tiny models changed"
    if case.keep:
        assert after[name] == before[name], f"{name} changed its folder"
    for path in case.gone:
        assert not any(p == path or p.startswith(path + "/") for p in after[name]), f"{name} left {path}"
    assert not any(Path(p).name.startswith(".") for p in after[name]), f"staging folder left: {after[name]}"
    assert not Path("/sys/linearize-bad-input-test").exists()


def test_every_case_is_checked(battery):
    assert sorted(battery[0]) == sorted(CASE_NAMES)


def test_overwrite_and_replace_leave_one_complete_linearized_folder(battery):
    _, results, _, after, _, _ = battery
    other = after["overwrite_replaces_another_model"]
    assert "other/config.json" in other and "other/model.safetensors" in other
    ours = after["earlier_output_is_replaced"]
    assert "ours/model.safetensors" in ours and not [p for p in ours if p.count("/") > 1]


def test_free_space_is_checked_before_loading(tmp_path):
    with pytest.raises(CheckpointError, match=r"needs about [\d,]+ MiB.*MiB free"):
        check_writable(tmp_path / "out", 1 << 62)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_the_old_folder_and_no_partial_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def fail(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left"):
        save_folder(out, fail)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["config.json"]
