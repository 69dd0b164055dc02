"""Training data: load records with `datasets`, tokenize with `Dataset.map`, pack into rows.

`data.source` is read the way `datasets` reads it: a hub id (`load_dataset`), local files of
any format it reads (txt, json/jsonl, csv, parquet, ..., compressed or not, globs), a folder
laid out as on the hub (its train/test files stay in their splits) or a `save_to_disk` folder
(`load_from_disk`). Records are plain text, alpaca instructions or chat `messages`.

Every process builds the same rows in the same order, and the rows of a global step are a
pure function of (stage offset, step, global batch), so a resumed run sees exactly the data
an uninterrupted run would have seen. Tokenized documents are cached by `Dataset.map`, so
under `accelerator.main_process_first()` the main process tokenizes and the others read.
"""
from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .recipe import DataSection, RecipeError

IGNORE_INDEX = -100
TEXT_FIELDS = ("text", "extract", "content")
ALPACA_FIELDS = ("instruction", "output")
CHAT_FIELD = "messages"
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
BLOCK = 8192  # documents tokenized (and cached) at a time: a run stops tokenizing once it has its rows
TOKENIZE_VERSION = "1"  # bump when the token rows of a format change, so old caches are not reused

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(RecipeError):
    """The data named by the recipe is missing, empty or in an unknown layout."""


def describe(data: DataSection) -> str:
    """The source as error messages name it."""
    if data.source is None:
        return "the embedded Wikipedia summaries (data.source null)"
    return f"data.source {data.source}" + (f" (config {data.name})" if data.name else "")


# -- where the records come from ----------------------------------------------------------------
def _module_for(path: str) -> tuple[str, dict]:
    """The `datasets` packaged builder and its options for a file name (compression ignored)."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    suffix = Path(name).suffix
    if suffix == ".text":
        suffix = ".txt"
    if suffix not in _EXTENSION_TO_MODULE:
        raise DataError(f"data.source {path}: `datasets` reads no {suffix or 'extension-less'} files; use "
                        ".txt, .json/.jsonl, .csv/.tsv, .parquet or .arrow files (optionally .gz), or a folder")
    module, kwargs = _EXTENSION_TO_MODULE[suffix]
    # a text file holds one document per paragraph (blank-line separated), not per line
    return module, {**kwargs, "sample_by": "paragraph"} if module == "text" else dict(kwargs)


def _looks_local(source: str | list[str]) -> bool:
    """Whether data.source names local files (a list, a path, a glob, a known file suffix)
    rather than a hub id; an existing path always wins, as in `datasets`."""
    if isinstance(source, list) or source.startswith((".", "/", "~")) or glob.has_magic(source):
        return True
    if Path(source).expanduser().exists():
        return True
    try:
        _module_for(source)
    except DataError:
        return False
    return True


def _local_files(items: list[str]) -> list[str]:
    """Every file the paths and globs in `items` name, globs expanded and sorted."""
    files: list[str] = []
    for item in items:
        path = str(Path(item).expanduser())
        if glob.has_magic(path):
            found = sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"data.source glob {item} matches no files: fix data.source")
            files.extend(found)
        elif Path(path).is_file():
            files.append(path)
        elif Path(path).is_dir():
            raise DataError(f"data.source {item} is a folder inside a list: list its files or a glob "
                            f"({item}/*.parquet), or set data.source to the folder alone")
        else:
            raise DataError(f"data file or folder {item} does not exist: fix data.source (a hub id, a local "
                            "file, folder or glob, or a list of files)")
    modules = {_module_for(f)[0] for f in files}
    if len(modules) > 1:
        raise DataError(f"data.source mixes file types ({', '.join(sorted(modules))}): use one type per run")
    return files


def _is_saved_to_disk(folder: Path) -> bool:
    import datasets

    cfg = datasets.config
    return ((folder / cfg.DATASET_STATE_JSON_FILENAME).is_file() and (folder / cfg.DATASET_INFO_FILENAME).is_file()
            or (folder / cfg.DATASETDICT_JSON_FILENAME).is_file())


def _split_names(split: str) -> list[str]:
    """The split names in a split expression (`train`, `train[:10%]+test`)."""
    return [re.split(r"\[", part)[0].strip() for part in split.split("+")]


def _check_split(data: DataSection, available: list[str]) -> None:
    missing = [s for s in _split_names(data.split) if s not in available]
    if missing:
        raise DataError(f"{describe(data)} has no split {missing[0]!r} (splits: {', '.join(available)}): "
                        f"set data.split to one of them")


def _empty(data: DataSection) -> DataError:
    return DataError(f"{describe(data)} (split {data.split}) is empty: point data.source at data with records")


def _from_builder(data: DataSection, path: str, name: str | None, **kwargs):
    """Prepare a `datasets` builder (hub id, folder or packaged module) and read data.split."""
    import datasets

    builder = datasets.load_dataset_builder(path, name, **kwargs)
    if "sample_by" in getattr(builder.config, "__dataclass_fields__", {}) and "sample_by" not in kwargs:
        builder = datasets.load_dataset_builder(path, name, sample_by="paragraph", **kwargs)  # a folder of .txt
    builder.download_and_prepare()
    splits = builder.info.splits or {}
    _check_split(data, list(splits))
    if all(splits[s].num_examples == 0 for s in _split_names(data.split)):
        raise _empty(data)
    return builder.as_dataset(split=data.split)


def _from_disk(data: DataSection, folder: Path):
    """A `save_to_disk` folder: a Dataset, or the data.split of a DatasetDict."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        _check_split(data, list(ds))
        if data.split not in ds:
            raise DataError(f"{describe(data)} is a save_to_disk folder: set data.split to a plain split name "
                            f"({', '.join(ds)}), not {data.split!r}")
        return ds[data.split]
    if ds.split is not None and str(ds.split) not in _split_names(data.split):
        raise DataError(f"{describe(data)} holds only split {ds.split!r}: set data.split={ds.split}")
    return ds


def _read(data: DataSection):
    """The records of data.split, from wherever data.source points."""
    items = data.source if isinstance(data.source, list) else [data.source]
    folder = Path(items[0]).expanduser()
    if len(items) == 1 and folder.is_dir():
        if _is_saved_to_disk(folder):
            return _from_disk(data, folder)
        return _from_builder(data, str(folder), data.name)
    if _looks_local(data.source):
        files = _local_files(items)
        if all(Path(f).stat().st_size == 0 for f in files):
            raise _empty(data)
        module, kwargs = _module_for(files[0])
        return _from_builder(data, module, None, data_files=files, **kwargs)
    return _from_builder(data, data.source, data.name)


def _hub_error(data: DataSection, e: Exception) -> DataError:
    """The DataError for a hub id that `datasets` could not resolve: offline, one missing from
    the datasets cache; online, an unreachable hub or a missing data set or config."""
    import datasets

    cfg = datasets.config
    get = f"python -c \"import datasets; datasets.load_dataset({data.source!r}{f', {data.name!r}' if data.name else ''})\""
    local = ("or set data.source to local files (a .jsonl/.parquet/.csv/.txt file, a glob, a folder laid out "
             "as on the hub, or a save_to_disk folder)")
    if cfg.HF_HUB_OFFLINE:
        return DataError(f"hub data set {data.source!r}{f' (config {data.name})' if data.name else ''} is not in the "
                         f"datasets cache ({cfg.HF_DATASETS_CACHE}) and the hub is off (HF_HUB_OFFLINE / "
                         f"HF_DATASETS_OFFLINE is set): cache it once with hub access ({get}), point "
                         f"HF_DATASETS_CACHE at the cache that holds it, {local}")
    if isinstance(e, ConnectionError):
        return DataError(f"could not reach the hub for data set {data.source!r} ({e}): check the network, set "
                         f"HF_HUB_OFFLINE=1 to read it from the datasets cache ({cfg.HF_DATASETS_CACHE}), {local}")
    return DataError(f"could not load hub data set {describe(data)}: {type(e).__name__}: {e}; fix data.source "
                     f"(a hub id org/name) or data.name, {local}")


def check_hub_id(data: DataSection) -> None:
    """DataError unless `datasets` resolves the hub id data.source (and data.name): offline,
    from the datasets cache alone (fast); online, from the hub (no data is downloaded)."""
    import datasets

    try:
        datasets.load_dataset_builder(data.source, data.name)
    except Exception as e:  # datasets raises many types for unreachable hubs and unknown names
        raise _hub_error(data, e) from e


def check_source(data: DataSection) -> None:
    """DataError when data.source names local files that are not there (or that `datasets`
    cannot read), a hub id `datasets` cannot resolve (offline: not in its cache) or the
    embedded text is missing: the check before the model loads. Folders are read later, by
    `load_documents`."""
    if data.source is None:
        from ..assets import MissingAssetError, training_texts

        try:
            training_texts()
        except MissingAssetError as e:
            raise DataError(f"data.source is null (the embedded Wikipedia summaries) but {e}; "
                            "or set data.source") from e
        return
    items = data.source if isinstance(data.source, list) else [data.source]
    if not items:
        raise DataError("data.source is an empty list: name a hub data set, a file, a folder or a glob")
    if len(items) == 1 and Path(items[0]).expanduser().is_dir():
        return
    if _looks_local(data.source):
        _local_files(items)
    else:
        check_hub_id(data)


def load_documents(data: DataSection):
    """The records of data.split as a `datasets.Dataset` (hub id, local files or folders, a
    `save_to_disk` folder, or the embedded text); DataError names the source and the fix."""
    import datasets

    if data.source is None:
        from ..assets import MissingAssetError, training_texts

        if data.split != "train":
            raise DataError(f"data.split={data.split}: the embedded Wikipedia summaries (data.source null) have one "
                            "split, train; set data.split=train (data.max_documents bounds how many are used) or "
                            "set data.source")
        try:
            return datasets.Dataset.from_dict({"text": training_texts()})
        except MissingAssetError as e:
            raise DataError(f"data.source is null (the embedded Wikipedia summaries) but {e}; "
                            "or set data.source") from e
    try:
        ds = _read(data)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreachable hubs and bad files
        local = _looks_local(data.source)
        what = f"data.source {data.source}" if local else f"hub data set {data.source!r}"
        hint = ("check the files' format" if local else
                "without hub access, download it beforehand or point data.source at local files")
        raise DataError(f"could not load {what}: {type(e).__name__}: {e}; {hint}") from e
    if len(ds) == 0:
        raise _empty(data)
    return ds


def detect_format(columns: list[str], data: DataSection) -> tuple[str, str | None]:
    """(format, field) for records with these columns: the text field for `text`, the
    messages field for `chat`, None for `alpaca`."""
    fmt = data.format
    if fmt == "auto":
        if all(c in columns for c in ALPACA_FIELDS):
            fmt = "alpaca"
        else:
            fmt = "chat" if CHAT_FIELD in columns and data.text_field in (None, CHAT_FIELD) else "text"
    fields = ", ".join(columns)
    if fmt == "alpaca":
        missing = [c for c in ALPACA_FIELDS if c not in columns]
        if missing:
            raise DataError(f"data.format=alpaca needs fields instruction, (input,) output; {describe(data)} lacks "
                            f"{', '.join(missing)} (fields: {fields})")
        return fmt, None
    default = CHAT_FIELD if fmt == "chat" else next((c for c in TEXT_FIELDS if c in columns), None)
    field = data.text_field or default
    if field is None:
        raise DataError(f"no text field in {describe(data)} (fields: {fields}): set data.text_field to the field "
                        "holding the text")
    if field not in columns:
        raise DataError(f"{field!r} is not a field of {describe(data)} (fields: {fields}): "
                        f"set data.text_field to one of them")
    return fmt, field


# -- tokenization: one document per record, cached by Dataset.map --------------------------------
def _text_docs(batch, tokenizer, field: str, bos: list[int], eos: list[int]):
    texts = [t for t in batch[field] if isinstance(t, str) and t.strip()]
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        doc = bos + ids + eos
        yield doc, [IGNORE_INDEX] + doc[1:]


def _alpaca_docs(batch, tokenizer, bos: list[int], eos: list[int]):
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    prompts = [(PROMPT_WITH_INPUT if (inp or "").strip() else PROMPT_NO_INPUT).format(instruction=ins, input=inp)
               for ins, inp in zip(batch["instruction"], inputs)]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([o or "" for o in batch["output"]], add_special_tokens=False)["input_ids"]
    for p, r in zip(p_ids, r_ids):
        if r:
            yield bos + p + r + eos, [IGNORE_INDEX] * (len(bos) + len(p)) + r + eos


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: each turn runs
    from the end of the conversation before it (with the generation prompt) to its own end."""
    def render(msgs, prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt) if msgs else ""

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, through = render(messages[:i], prompt=True), render(messages[:i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError("the tokenizer's chat template does not render a conversation's first turns as the start "
                            "of the whole conversation, so its assistant turns cannot be located: use data.format=text "
                            "on a rendered text field instead")
        spans.append((len(before), len(through)))
    return full, spans


def _chat_docs(batch, tokenizer, field: str, bos: list[int], eos: list[int]):
    convs = [[{k: v for k, v in m.items() if v is not None} for m in msgs] for msgs in batch[field] if msgs]
    rendered = [_assistant_spans(tokenizer, msgs) for msgs in convs]
    if not rendered:
        return
    try:
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError("data.format=chat needs a fast tokenizer (with offsets) to find the assistant tokens") from e
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX for t, (s, _) in zip(ids, offsets)]
        if all(x == IGNORE_INDEX for x in labels):
            continue  # no assistant turn: nothing to learn from this record
        if bos and ids[:1] != bos:
            ids, labels = bos + ids, [IGNORE_INDEX] + labels
        if ids[-1:] != eos:  # the separator only; the template's own end of turn carries the loss
            ids, labels = ids + eos, labels + [IGNORE_INDEX]
        labels[0] = IGNORE_INDEX
        yield ids, labels


def _tokenize_batch(batch, tokenizer, fmt: str, field: str | None, add_bos: bool) -> dict[str, list]:
    """`Dataset.map` function: records -> documents (input_ids, labels IGNORE_INDEX where no loss
    applies); records without text or response give no document."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if fmt == "text":
        docs = _text_docs(batch, tokenizer, field, bos, eos)
    elif fmt == "alpaca":
        docs = _alpaca_docs(batch, tokenizer, bos, eos)
    else:
        docs = _chat_docs(batch, tokenizer, field, bos, eos)
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for ids, labels in docs:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def _tokenizer_digest(tokenizer) -> str:
    """A stable hash of everything in the tokenizer that changes the token rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = (type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
             tokenizer.bos_token_id, tokenizer.eos_token_id)
    return hashlib.sha256((vocab + repr(extra)).encode()).hexdigest()


def tokenized_documents(ds, tokenizer, fmt: str, field: str | None, add_bos: bool):
    """Yield (input_ids, labels) per document, tokenizing BLOCK records at a time with a batched
    `Dataset.map` cached under the datasets cache (keyed by the records and the tokenizer), so a
    second run or another process reads the tokens instead of computing them."""
    import datasets

    feature = getattr(datasets, "List", datasets.Sequence)(datasets.Value("int32"))  # List: datasets >= 4
    features = datasets.Features({"input_ids": feature, "labels": feature})
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "linearize-tokenized"
    cache.mkdir(parents=True, exist_ok=True)
    settings = (TOKENIZE_VERSION, ds._fingerprint, fmt, field, add_bos, _tokenizer_digest(tokenizer))
    for start in range(0, len(ds), BLOCK):
        stop = min(start + BLOCK, len(ds))
        key = hashlib.sha256(repr((settings, start, stop)).encode()).hexdigest()[:40]
        part = ds.select(range(start, stop), keep_in_memory=True).map(
            _tokenize_batch, batched=True, remove_columns=ds.column_names, features=features,
            fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "field": field, "add_bos": add_bos},
            new_fingerprint=key, cache_file_name=str(cache / f"{key}.arrow"),
            desc=f"tokenizing {fmt} records {start}-{stop}")
        columns = part[:]
        yield from zip(columns["input_ids"], columns["labels"])


@dataclass
class TokenRows:
    """Rows of training tokens.

    input_ids, labels: [N, T] int64 (labels IGNORE_INDEX where no loss applies; the model
    predicts labels[t] from tokens < t). position_ids: [N, T] restarting at 0 per document
    (boundaries=positions) or None. attention_mask: [N, T] (unpacked rows) or None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    num_documents: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def order(self, start: int, count: int, seed: int) -> list[int]:
        """Row indices for global sample positions start .. start+count-1: the rows in order in
        the first pass, then a fresh seeded permutation per later pass."""
        n = len(self)
        out, pos = [], start
        while len(out) < count:
            epoch, i = divmod(pos, n)
            take = min(count - len(out), n - i)
            if epoch == 0:
                out.extend(range(i, i + take))
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
                out.extend(perm[i:i + take].tolist())
            pos += take
        return out

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Model inputs for these rows: input_ids/labels [B, T] (+ position_ids, attention_mask)."""
        idx = torch.tensor(rows, dtype=torch.long)
        out = {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids[idx]
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask[idx]
        return out

    def label_count(self, rows: list[int]) -> int:
        """Number of predicted tokens (labels at positions >= 1) in these rows."""
        return int((self.labels[torch.tensor(rows, dtype=torch.long), 1:] != IGNORE_INDEX).sum())


def _pack(docs, T: int, rows_needed: int) -> tuple[list, list, list, int]:
    """Concatenate documents into rows of T tokens; position ids restart at 0 per document."""
    ids_rows, lab_rows, pos_rows = [], [], []
    buf_ids: list[int] = []
    buf_lab: list[int] = []
    buf_pos: list[int] = []
    n_docs = 0
    for doc, lab in docs:
        n_docs += 1
        buf_ids += doc
        buf_lab += lab
        buf_pos += range(len(doc))
        while len(buf_ids) >= T:
            ids_rows.append(buf_ids[:T])
            lab_rows.append(buf_lab[:T])
            p = buf_pos[:T]
            # a document cut at the row start counts from 0 again
            first_restart = next((i for i, v in enumerate(p) if v == 0), T)
            pos_rows.append(list(range(first_restart)) + p[first_restart:])
            buf_ids, buf_lab, buf_pos = buf_ids[T:], buf_lab[T:], buf_pos[T:]
        if len(ids_rows) >= rows_needed:
            break
    return ids_rows, lab_rows, pos_rows, n_docs


def _pad(docs, T: int, pad: int, rows_needed: int) -> tuple[list, list, list, int]:
    """One document per row, truncated to T and right-padded; rows with no loss are dropped."""
    ids_rows, lab_rows, mask_rows = [], [], []
    n_docs = 0
    for doc, lab in docs:
        doc, lab = doc[:T], lab[:T]
        if len(doc) < 2 or all(x == IGNORE_INDEX for x in lab[1:]):
            continue
        n_docs += 1
        fill = T - len(doc)
        ids_rows.append(doc + [pad] * fill)
        lab_rows.append(lab + [IGNORE_INDEX] * fill)
        mask_rows.append([1] * len(doc) + [0] * fill)
        if len(ids_rows) >= rows_needed:
            break
    return ids_rows, lab_rows, mask_rows, n_docs


def records(data: DataSection, tokenizer):
    """(records, format, field) of data.split, checked against the tokenizer: DataError for a
    missing split or field, chat records without a chat template, a tokenizer without EOS.
    Cheap to call again (`datasets` caches what it read), so runs call it before the model loads."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which separates documents: set tokenizer.eos_token")
    ds = load_documents(data)
    fmt, field = detect_format(list(ds.column_names), data)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{describe(data)} holds chat records ({field!r}) but the tokenizer has no chat template: "
                        "use a chat model (its tokenizer has one) or data.format=text with a text field")
    return ds, fmt, field


def build_rows(data: DataSection, tokenizer, seq_len: int, batch_size: int, rows_needed: int, seed: int) -> TokenRows:
    """Tokenize documents (shuffled with `seed`) until `rows_needed` rows of `seq_len` exist
    or the data ends (later passes reuse the rows in a new order)."""
    ds, fmt, field = records(data, tokenizer)
    if data.shuffle:
        ds = ds.shuffle(seed=seed, keep_in_memory=True)
    if data.max_documents is not None:
        ds = ds.select(range(min(data.max_documents, len(ds))), keep_in_memory=True)
    docs = tokenized_documents(ds, tokenizer, fmt, field, data.add_bos)
    T = seq_len
    if data.packing:
        ids_rows, lab_rows, pos_rows, n_docs = _pack(docs, T, rows_needed)
        mask_rows = None
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids_rows, lab_rows, mask_rows, n_docs = _pad(docs, T, pad, rows_needed)
        pos_rows = None
    if not ids_rows:
        what = f"{seq_len} tokens" if data.packing else "2 tokens with a response"
        raise DataError(f"the data yields no training row of {what} ({n_docs} documents after tokenization): "
                        "add data, lower seq_len, or check data.format / data.text_field")
    positions = data.boundaries == "positions" or (data.boundaries == "auto" and batch_size == 1)
    return TokenRows(
        input_ids=torch.tensor(ids_rows, dtype=torch.long),
        labels=torch.tensor(lab_rows, dtype=torch.long),
        position_ids=torch.tensor(pos_rows, dtype=torch.long) if (positions and data.packing) else None,
        attention_mask=torch.tensor(mask_rows, dtype=torch.long) if mask_rows is not None else None,
        num_documents=n_docs,
    )
