"""Hub data set ids are resolved before anything loads (#19): offline, an id that is not in the
datasets cache is refused with the cache, the offline switch and the local alternatives named,
before the tokenizer, the embedded model or the model load; an id that is cached is read from
the cache. Nothing here reaches the network: the hub is off, or `datasets` is replaced."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from linearize.distill import DataError, load_recipe
from linearize.distill import train as train_module
from linearize.distill.data import check_source, load_documents
from linearize.distill.train import distill

HUB_ID = "testorg/tiny_docs"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The hub off (as HF_HUB_OFFLINE=1 makes it) and an empty datasets cache of this test's own."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    return Path(datasets.config.HF_DATASETS_CACHE)


def cache_hub_dataset(cache: Path, repo_id: str, texts: list[str], tmp: Path) -> None:
    """Put `texts` in the datasets cache as `load_dataset(repo_id)` leaves a hub data set there:
    <namespace>___<name>/default/<version>/<hash>/<name>-train.arrow beside dataset_info.json."""
    source = tmp / "records.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    builder = datasets.load_dataset_builder("json", data_files={"train": str(source)}, cache_dir=str(tmp / "build"))
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # build/json/<config id>/<version>/<hash>
    namespace, name = repo_id.split("/")
    target = cache / f"{namespace}___{name}" / "default" / built.parent.name / built.name
    target.mkdir(parents=True)
    for f in built.iterdir():
        f.rename(target / f.name.replace("json-", f"{name}-"))


def data_section(**over):
    return load_recipe(None, [f"data.{k}={v}" for k, v in over.items()]).data


def test_an_uncached_hub_id_is_refused_offline_naming_the_cache_and_the_ways_out(offline):
    with pytest.raises(DataError) as e:
        check_source(data_section(source=HUB_ID))
    msg = str(e.value)
    for words in (f"hub data set '{HUB_ID}' is not in the datasets cache", str(offline), "HF_HUB_OFFLINE",
                  "HF_DATASETS_OFFLINE", f"datasets.load_dataset('{HUB_ID}')", "HF_DATASETS_CACHE",
                  "set data.source to local files"):
        assert words in msg, msg


def test_a_cached_hub_id_passes_offline_and_its_records_are_read(offline, tmp_path):
    cache_hub_dataset(offline, HUB_ID, ["w3 w4 w5", "w6 w7 w8", "w9 w10"], tmp_path)
    section = data_section(source=HUB_ID)
    check_source(section)
    assert load_documents(section)["text"] == ["w3 w4 w5", "w6 w7 w8", "w9 w10"]
    with pytest.raises(DataError, match="no split 'test'"):
        load_documents(data_section(source=HUB_ID, split="test"))


def test_the_refusal_comes_before_the_tokenizer_and_any_model_loads(offline, write_recipe, tmp_path, monkeypatch):
    """model.path null would build the embedded model first (half a minute); the data check
    must come before it, the tokenizer and the model, and leave output_dir unwritten."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the data source was checked")

    for name in ("resolve_model_path", "load_tokenizer", "build_model"):
        monkeypatch.setattr(train_module, name, loaded)
    recipe = load_recipe(write_recipe(model={"path": None}, data={"source": HUB_ID}))
    with pytest.raises(DataError, match="not in the datasets cache"):
        distill(recipe)
    assert not (tmp_path / "run").exists()


def test_an_uncached_hub_eval_source_is_refused_before_anything_loads(offline, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "resolve_model_path", lambda *a: pytest.fail("model resolved first"))
    recipe = load_recipe(write_recipe(eval={"every_tokens": 64, "source": HUB_ID}))
    with pytest.raises(DataError) as e:
        distill(recipe)
    msg = str(e.value)
    assert msg.startswith(f"eval.source: hub data set '{HUB_ID}' is not in the datasets cache"), msg
    assert "set eval.source to local files" in msg and "data.source" not in msg
    assert not (tmp_path / "run").exists()


def test_online_an_unreachable_hub_or_an_unknown_config_names_the_fix(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(path, name=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    with pytest.raises(DataError, match=r"could not reach the hub for data set 'org/data'.*ConnectError.*"
                                        r"HF_HUB_OFFLINE=1 to read it from the datasets cache"):
        check_source(data_section(source="org/data"))

    def unknown_config(path, name=None, **kwargs):
        raise ValueError(f"BuilderConfig '{name}' not found. Available: ['en', 'fr']")

    monkeypatch.setattr(datasets, "load_dataset_builder", unknown_config)
    with pytest.raises(DataError, match=r"org/data \(config de\).*not found. Available: \['en', 'fr'\].*data.name"):
        check_source(data_section(source="org/data", name="de"))


def test_local_sources_never_ask_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: pytest.fail("asked datasets for a hub id"))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "w1 w2"}) + "\n")
    for source in (str(tmp_path / "docs.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path)):
        check_source(data_section(source=source))
