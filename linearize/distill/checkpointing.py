"""Resumable training checkpoints, written so that a kill at any moment leaves a usable one.

Layout of `output_dir/checkpoints/`:

    stage1-step0000020/     params.safetensors (new + LoRA parameters, unwrapped names),
                            trainer.pt (scheduler, counters), trainer.json (readable copy),
                            optimizer.bin / random_states_<rank>.pkl (`sharding.save_state`)
    latest                  the name of the newest complete checkpoint, replaced last

A checkpoint is written under `.tmp-<name>`, fsynced, renamed into place, and only then is
`latest` replaced (write, fsync, `os.replace`). A kill during a save leaves a `.tmp-*`
folder that the next run removes; `latest` always names a complete checkpoint.

A checkpoint that cannot be read back (a truncated params.safetensors, a junk trainer.pt, a
disk error) is skipped on resume for the previous readable one (`usable_checkpoint`), and
a run that diverges is pointed back at the last one whose weights are finite and whose loss
was healthy (`last_good_checkpoint`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
PARAMS_FILE = "params.safetensors"
TRAINER_FILE = "trainer.pt"
TRAINER_JSON = "trainer.json"
# what sharding.save_state writes for one process (optimizer, RNG); checked on resume
ACCELERATE_FILES = ("optimizer.bin", "random_states_0.pkl")


class CheckpointMissingError(RuntimeError):
    """A `latest` pointer names a checkpoint that is not there or not complete."""


class CheckpointUnreadableError(RuntimeError):
    """A checkpoint file cannot be read back; `file` names it."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file} cannot be read ({reason})")
        self.file = file


@dataclass
class TrainerState:
    """Where a run stands: stage (1 or 2), optimizer steps done in it out of stage_steps,
    the global batch (rows per step over all processes) and the tokens seen so far."""

    stage: int
    step: int
    stage_steps: int
    global_batch: int
    tokens: int
    elapsed_s: float
    loss: float | None = None  # the loss of the step that ended here (it passed the guard)
    finite: bool = True  # every saved parameter is finite

    @property
    def stage_done(self) -> bool:
        return self.step >= self.stage_steps


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root` itself)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def latest_checkpoint(ckdir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = ckdir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = ckdir / name
    if not name or not (path / TRAINER_FILE).is_file() or not (path / PARAMS_FILE).is_file():
        raise CheckpointMissingError(f"{pointer} names {name!r}, which is missing or incomplete; "
                                     f"restore that folder or delete {ckdir} to start over")
    return path


def clean_partial(ckdir: Path) -> None:
    """Remove `.tmp-*` folders left by a save that was killed."""
    if ckdir.is_dir():
        for p in ckdir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, ckdir: Path, state: TrainerState, params: dict[str, torch.Tensor] | None,
                    scheduler_state: dict, keep: int, write_state) -> Path:
    """Write a checkpoint of the prepared objects (every process calls this).

    params: {name: tensor} of the parameters to keep (new + LoRA), on the main process.
    write_state(folder): writes the optimizer and RNG state (`sharding.save_state`, which
    keeps every frozen weight out under every mode).
    """
    name = checkpoint_name(state.stage, state.step)
    tmp, final = ckdir / f".tmp-{name}", ckdir / name
    if accelerator.is_main_process:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        write_state(tmp)
        if accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in (params or {}).items()}, str(tmp / PARAMS_FILE))
            torch.save({"trainer": asdict(state), "scheduler": scheduler_state}, tmp / TRAINER_FILE)
            (tmp / TRAINER_JSON).write_text(json.dumps(asdict(state), indent=2) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(ckdir)
            write_atomic(ckdir / LATEST, name + "\n")
            prune(ckdir, keep)
    except Exception:  # a failed write (disk full, I/O error) leaves no half checkpoint behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def prune(ckdir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (and always the one `latest` names)."""
    current = (ckdir / LATEST).read_text().strip()
    found = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("stage"))
    for p in found[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: Path) -> tuple[TrainerState, dict, dict[str, torch.Tensor]]:
    """(trainer state, scheduler state, saved parameters) of a checkpoint folder.

    Raises `CheckpointUnreadableError` naming the file that is missing, truncated or not ours.
    """
    trainer = path / TRAINER_FILE
    try:
        blob = torch.load(trainer, weights_only=False)
        state = TrainerState(**blob["trainer"])
        scheduler = blob["scheduler"]
    except Exception as e:  # pickle, zip, EOF, key and type errors all mean the same: unreadable
        raise CheckpointUnreadableError(trainer, f"{type(e).__name__}: {e}") from e
    try:
        params = load_file(str(path / PARAMS_FILE))
    except Exception as e:
        raise CheckpointUnreadableError(path / PARAMS_FILE, f"{type(e).__name__}: {e}") from e
    for name in ACCELERATE_FILES:
        f = path / name
        if f.is_file():
            try:
                torch.load(f, weights_only=False, map_location="cpu")
            except Exception as e:
                raise CheckpointUnreadableError(f, f"{type(e).__name__}: {e}") from e
    return state, scheduler, params


def all_finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values() if v.is_floating_point())


def checkpoints(ckdir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (names sort by stage, then step)."""
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("stage"))


def point_latest(ckdir: Path, path: Path | None) -> None:
    """Make `latest` name `path` (None: remove it, so the next run starts from the beginning)."""
    if path is None:
        (ckdir / LATEST).unlink(missing_ok=True)
    else:
        write_atomic(ckdir / LATEST, path.name + "\n")


def usable_checkpoint(ckdir: Path, warn, repoint: bool = True) -> Path | None:
    """The newest checkpoint that reads back, from the one `latest` names down.

    A checkpoint that is missing, incomplete or unreadable is skipped with `warn(message)`
    naming the bad file, and `latest` is repointed at the one found when `repoint` (the main
    process; the others find the same one).
    Raises `CheckpointMissingError` naming the bad files when none is usable.
    """
    pointer = ckdir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    older = [p for p in reversed(checkpoints(ckdir)) if p.name <= name] if name else []
    candidates = [ckdir / name] + [p for p in older if p.name != name] if name else older
    bad = []
    for path in candidates:
        try:
            if not path.is_dir():
                raise CheckpointUnreadableError(path, "the folder is missing")
            read_checkpoint(path)
        except CheckpointUnreadableError as e:
            bad.append(str(e))
            warn(f"checkpoint {path.name} is unusable: {e}; trying the previous one")
            continue
        if path.name != name:
            if repoint:
                point_latest(ckdir, path)
            warn(f"resuming from {path.name}, the newest readable checkpoint")
        return path
    raise CheckpointMissingError(f"no usable checkpoint in {ckdir}: {'; '.join(bad) or 'latest is empty'}. "
                                 f"Restore the file(s), or delete {ckdir} (or choose another output_dir) to start over")


def last_good_checkpoint(ckdir: Path, before: tuple[int, int]) -> Path | None:
    """The newest checkpoint before (stage, step) that reads back, has finite parameters and
    was saved after a healthy loss; None when there is none."""
    for path in reversed(checkpoints(ckdir)):
        try:
            state, _, params = read_checkpoint(path)
        except CheckpointUnreadableError:
            continue
        if (state.stage, state.step) < before and state.finite and all_finite(params):
            return path
    return None
