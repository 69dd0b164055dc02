"""Training data: load documents with `datasets`, tokenize, pack into fixed-length rows.

Every process builds the same rows in the same order, and the rows of a global step are a
pure function of (stage offset, step, global batch), so a resumed run sees exactly the data
an uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .recipe import DataSection, RecipeError

IGNORE_INDEX = -100
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEXT_FIELDS = ("text", "extract", "content")
ALPACA_FIELDS = ("instruction", "output")

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


def _local_files(source: str | list[str]) -> list[Path] | None:
    """The local files `source` names, or None when it reads as a hub data set id."""
    items = source if isinstance(source, list) else [source]
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in LOCAL_BUILDERS)
            if not found:
                raise DataError(f"data.source folder {p} holds no {'/'.join(LOCAL_BUILDERS)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.suffix.lower() in LOCAL_BUILDERS or isinstance(source, list) or item.startswith((".", "/", "~")):
            raise DataError(f"data file {p} does not exist: fix data.source (a hub id, a local file or a folder)")
        else:
            return None
    bad = [str(f) for f in files if f.suffix.lower() not in LOCAL_BUILDERS]
    if bad:
        raise DataError(f"cannot read {', '.join(bad)}: data.source files must be {', '.join(LOCAL_BUILDERS)}")
    builders = {LOCAL_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DataError(f"data.source mixes file types ({', '.join(sorted(builders))}); use one type per run")
    return files


def load_documents(data: DataSection):
    """The raw records as a `datasets.Dataset` (hub id, local files or the embedded text)."""
    import datasets

    if data.source is None:
        from ..assets import MissingAssetError, training_texts

        try:
            return datasets.Dataset.from_dict({"text": training_texts()})
        except MissingAssetError as e:
            raise DataError(f"data.source is null (the embedded Wikipedia summaries) but {e}; "
                            "or set data.source") from e
    files = _local_files(data.source)
    try:
        if files is not None:
            builder = LOCAL_BUILDERS[files[0].suffix.lower()]
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        else:
            ds = datasets.load_dataset(data.source, data.name, split=data.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreachable hubs and bad files
        what = ", ".join(map(str, files)) if files is not None else f"hub data set {data.source!r}"
        hint = ("check the file's format" if files is not None else
                "without hub access, download it beforehand or point data.source at local files")
        raise DataError(f"could not load {what}: {type(e).__name__}: {e}; {hint}") from e
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{data.source} has several splits ({', '.join(ds)}): set data.split")
    return ds


def detect_format(columns: list[str], data: DataSection) -> tuple[str, str | None]:
    """(format, text field) for records with these columns."""
    fmt = data.format
    if fmt == "auto":
        fmt = "alpaca" if all(c in columns for c in ALPACA_FIELDS) else "text"
    if fmt == "alpaca":
        missing = [c for c in ALPACA_FIELDS if c not in columns]
        if missing:
            raise DataError(f"data.format=alpaca needs fields instruction, (input,) output; the records lack "
                            f"{', '.join(missing)} (fields: {', '.join(columns)})")
        return fmt, None
    field = data.text_field or next((c for c in TEXT_FIELDS if c in columns), None)
    if field is None or field not in columns:
        raise DataError(f"no text field in the records (fields: {', '.join(columns)}): set data.text_field")
    return fmt, field


def _documents(ds, tokenizer, fmt: str, field: str | None, add_bos: bool, chunk: int = 512):
    """Yield (input_ids, labels) per document, labels IGNORE_INDEX where no loss applies."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    for start in range(0, len(ds), chunk):
        rows = ds[start:start + chunk]
        if fmt == "text":
            texts = [t for t in rows[field] if isinstance(t, str) and t.strip()]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                doc = bos + ids + eos
                yield doc, [IGNORE_INDEX] + doc[1:]
        else:
            inputs = rows.get("input") or [""] * len(rows["instruction"])
            prompts = [(PROMPT_WITH_INPUT if (inp or "").strip() else PROMPT_NO_INPUT).format(instruction=ins, input=inp)
                       for ins, inp in zip(rows["instruction"], inputs)]
            p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer([o or "" for o in rows["output"]], add_special_tokens=False)["input_ids"]
            for p, r in zip(p_ids, r_ids):
                if not r:
                    continue
                doc = bos + p + r + eos
                yield doc, [IGNORE_INDEX] * (len(bos) + len(p)) + r + eos


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


def build_rows(data: DataSection, tokenizer, seq_len: int, batch_size: int, rows_needed: int, seed: int) -> TokenRows:
    """Tokenize documents (shuffled with `seed`) until `rows_needed` rows of `seq_len` exist
    or the data ends (later passes reuse the rows in a new order)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which separates documents: set tokenizer.eos_token")
    ds = load_documents(data)
    if len(ds) == 0:
        raise DataError(f"the data set {data.source or '(embedded text)'} is empty: point data.source at data with records")
    fmt, field = detect_format(list(ds.column_names), data)
    if data.shuffle:
        ds = ds.shuffle(seed=seed)
    if data.max_documents is not None:
        ds = ds.select(range(min(data.max_documents, len(ds))))
    positions = data.boundaries == "positions" or (data.boundaries == "auto" and batch_size == 1)
    T = seq_len
    ids_rows: list[list[int]] = []
    lab_rows: list[list[int]] = []
    pos_rows: list[list[int]] = []
    mask_rows: list[list[int]] = []
    n_docs = 0
    if data.packing:
        buf_ids: list[int] = []
        buf_lab: list[int] = []
        buf_pos: list[int] = []
        for doc, lab in _documents(ds, tokenizer, fmt, field, data.add_bos):
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
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for doc, lab in _documents(ds, tokenizer, fmt, field, data.add_bos):
            doc, lab = doc[:T], lab[:T]
            if len(doc) < 2 or all(x == IGNORE_INDEX for x in lab[1:]):
                continue
            n_docs += 1
            fill = T - len(doc)
            ids_rows.append(doc + [pad] * fill)
            lab_rows.append(lab + [IGNORE_INDEX] * fill)
            mask_rows.append([1] * len(doc) + [0] * fill)
            pos_rows.append(list(range(T)))
            if len(ids_rows) >= rows_needed:
                break
    if not ids_rows:
        what = f"{seq_len} tokens" if data.packing else "2 tokens with a response"
        raise DataError(f"the data yields no training row of {what} ({n_docs} documents after tokenization): "
                        "add data, lower seq_len, or check data.format / data.text_field")
    input_ids = torch.tensor(ids_rows, dtype=torch.long)
    labels = torch.tensor(lab_rows, dtype=torch.long)
    position_ids = torch.tensor(pos_rows, dtype=torch.long) if (positions and data.packing) else None
    attention_mask = torch.tensor(mask_rows, dtype=torch.long) if not data.packing else None
    return TokenRows(input_ids, labels, position_ids, attention_mask, n_docs)
