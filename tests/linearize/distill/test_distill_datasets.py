"""Data through `datasets` (issue #13, item 3): hub-style folders keep their splits,
`save_to_disk` folders, every file format and glob `datasets` reads, hub ids, chat records
with loss on assistant turns only, tokenization cached by `Dataset.map`, and errors that name
the source and the fix. All data is written to tmp folders; nothing comes from the hub."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import csv
import gzip
import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from linearize.distill import DataError, build_rows, load_recipe
from linearize.distill import data as data_module
from linearize.distill.data import IGNORE_INDEX, load_documents

TRAIN_WORDS = [f"w{i}" for i in range(0, 60)]
TEST_WORDS = [f"w{i}" for i in range(100, 120)]


@pytest.fixture(scope="module")
def tok(assets):
    return AutoTokenizer.from_pretrained(assets / "model")


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """Each test tokenizes into its own cache, so a cache hit is never another test's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def data_section(**over):
    return load_recipe(None, [f"data.{k}={v}" for k, v in over.items()]).data


def docs(words: list[str], n: int, k: int = 6) -> list[str]:
    return [" ".join(words[(i + j) % len(words)] for j in range(k)) for i in range(n)]


@pytest.fixture
def hub_folder(tmp_path):
    """A folder laid out as on the hub: data/train-*.parquet (50 rows), data/test-*.parquet (10)."""
    root = tmp_path / "hub-style"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": docs(TRAIN_WORDS, 50)}).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"text": docs(TEST_WORDS, 10)}).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    return root


def word_ids(tok, words):
    return set(tok.convert_tokens_to_ids(words))


def test_hub_style_folder_keeps_the_test_split_out_of_training(hub_folder, tok):
    assert len(load_documents(data_section(source=str(hub_folder)))) == 50
    assert len(load_documents(data_section(source=str(hub_folder), split="test"))) == 10
    rows = build_rows(data_section(source=str(hub_folder)), tok, 16, 1, 10**6, 0)
    seen = set(rows.input_ids.flatten().tolist())
    assert rows.num_documents == 50 and not seen & word_ids(tok, TEST_WORDS)
    test_rows = build_rows(data_section(source=str(hub_folder), split="test"), tok, 16, 1, 10**6, 0)
    assert test_rows.num_documents == 10 and set(test_rows.input_ids.flatten().tolist()) & word_ids(tok, TEST_WORDS)
    assert len(load_documents(data_section(source=str(hub_folder), split="train[:5]"))) == 5


def test_save_to_disk_folders(tmp_path, tok):
    single = tmp_path / "saved-dataset"
    datasets.Dataset.from_dict({"text": docs(TRAIN_WORDS, 12)}).save_to_disk(str(single))
    rows = build_rows(data_section(source=str(single)), tok, 16, 1, 10**6, 0)
    assert rows.num_documents == 12
    both = tmp_path / "saved-dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs(TRAIN_WORDS, 7)}),
                          "validation": datasets.Dataset.from_dict({"text": docs(TEST_WORDS, 3)})}).save_to_disk(str(both))
    assert len(load_documents(data_section(source=str(both)))) == 7
    assert load_documents(data_section(source=str(both), split="validation"))["text"] == docs(TEST_WORDS, 3)
    with pytest.raises(DataError, match=r"no split 'test'.*train, validation.*set data.split"):
        load_documents(data_section(source=str(both), split="test"))


def test_csv_jsonl_gz_globs_and_lists(tmp_path, tok):
    texts = docs(TRAIN_WORDS, 9)
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(texts))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[3 * i:3 * i + 3]))
    for source in (tmp_path / "a.csv", tmp_path / "b.jsonl.gz", shards / "*.jsonl"):
        ds = load_documents(data_section(source=str(source), shuffle="false"))
        assert sorted(ds["text"]) == sorted(texts), source
    listed = dataclasses.replace(data_section(shuffle="false"),
                                 source=[str(shards / "part-0.jsonl"), str(shards / "part-[12].jsonl")])
    assert load_documents(listed)["text"] == texts
    rows = build_rows(data_section(source=str(tmp_path / "a.csv"), shuffle="false"), tok, 8, 1, 10**6, 0)
    expected = [tok.bos_token_id] + tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows.input_ids.flatten().tolist()[:len(expected)] == expected


def test_hub_ids_go_to_datasets_with_name_and_split(hub_folder, tok, monkeypatch):
    """A hub id is handed to `datasets` as an id (with its config name), never read as a path;
    the real builder is swapped for the local hub-style folder, so nothing is downloaded."""
    real = datasets.load_dataset_builder
    calls = []

    def fake_builder(path, name=None, **kwargs):
        calls.append((path, name))
        assert path == "someone/tiny-corpus" and name == "clean"
        return real(str(hub_folder), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder)
    ds = load_documents(data_section(source="someone/tiny-corpus", name="clean", split="test"))
    assert len(ds) == 10 and calls[0] == ("someone/tiny-corpus", "clean")
    with pytest.raises(DataError, match=r"someone/tiny-corpus.*no split 'validation'.*train, test"):
        load_documents(data_section(source="someone/tiny-corpus", name="clean", split="validation"))


CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }} : {{ m['content'] }} "
                 "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}### assistant : {% endif %}")


@pytest.fixture
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


def chat_records():
    return [
        {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"},
                      {"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6 w7 w8"}]},
        {"messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10"},
                      {"role": "assistant", "content": "w11"}]},
    ]


def test_chat_records_loss_on_assistant_turns_only(tmp_path, chat_tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_records()))
    rows = build_rows(data_section(source=str(path), packing="false", shuffle="false"), chat_tok, 32, 1, 10, 0)
    eos = chat_tok.eos_token_id
    for r, record in enumerate(chat_records()):
        rendered = chat_tok.apply_chat_template(record["messages"], tokenize=False)
        ids = rows.input_ids[r][rows.attention_mask[r] == 1].tolist()
        assert ids == [chat_tok.bos_token_id] + chat_tok(rendered, add_special_tokens=False)["input_ids"]
        labelled = rows.labels[r][rows.labels[r] != IGNORE_INDEX].tolist()
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert labelled == sum((chat_tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers), [])
    packed = build_rows(data_section(source=str(path), shuffle="false"), chat_tok, 8, 1, 10, 0)
    assert packed.num_documents == 2


def test_chat_records_need_a_chat_template(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_records()))
    with pytest.raises(DataError, match="chat template"):
        build_rows(data_section(source=str(path)), tok, 16, 1, 4, 0)


def test_tokenization_is_cached_by_dataset_map(assets, tok, monkeypatch):
    section = data_section(source=str(assets / "alpaca.json"))
    first = build_rows(section, tok, 32, 1, 10**6, 0)

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")

    monkeypatch.setattr(data_module, "_tokenize_batch", must_not_run)
    again = build_rows(section, tok, 32, 1, 10**6, 0)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.labels, again.labels)


def test_errors_name_the_source_and_the_fix(tmp_path, hub_folder, tok):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}.*does not exist.*data.source"):
        load_documents(data_section(source=str(missing)))
    with pytest.raises(DataError, match=r"matches no files.*data.source"):
        load_documents(data_section(source=str(tmp_path / "*.jsonl")))
    with pytest.raises(DataError, match=rf"{hub_folder}.*no split 'validation'.*train, test.*set data.split"):
        load_documents(data_section(source=str(hub_folder), split="validation"))
    with pytest.raises(DataError, match=r"'body' is not a field.*text.*set data.text_field"):
        build_rows(data_section(source=str(hub_folder), text_field="body"), tok, 16, 1, 4, 0)
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(DataError, match=r"empty.csv.*is empty"):
        load_documents(data_section(source=str(tmp_path / "empty.csv")))


def test_cli_exits_2_on_a_data_error(write_recipe, hub_folder, capsys):
    from linearize.distill.cli_commands import run_distill

    recipe = write_recipe(data={"source": str(hub_folder), "split": "validation"})
    rc = run_distill(argparse.Namespace(recipe=str(recipe), overrides=[], print_recipe=False))
    assert rc == 2 and "no split 'validation'" in capsys.readouterr().err
