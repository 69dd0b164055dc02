"""One run per output_dir (#19): a second `linearize distill` on a folder in use is refused,
the lock goes at exit, and a lock whose process died is taken over."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linearize.distill.lock import LOCK_FILE, OutputLock, OutputLockedError, stale_reason

REPO = Path(__file__).resolve().parents[3]
# the first run waits inside build_model (holding the lock) until the test creates the go file
HELD_RUN = """
import pathlib, sys, time
import linearize.distill.train as train
real, go = train.build_model, pathlib.Path(sys.argv[2])
def waiting(*args):
    while not go.exists():
        time.sleep(0.05)
    return real(*args)
train.build_model = waiting
from linearize.cli import main
sys.exit(main(["distill", sys.argv[1]]))
"""


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_run_on_the_same_output_dir_is_refused_while_the_first_runs(write_recipe, tmp_path):
    recipe, go = write_recipe(), tmp_path / "go"
    lock = tmp_path / "run" / LOCK_FILE
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN, str(recipe), str(go)], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert lock.exists(), first.communicate()[1][-3000:] if first.poll() is not None else "no lock"
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, "-m", "linearize.cli", "distill", str(recipe)], env=env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"in use by another linearize distill (pid {first.pid}" in second.stderr
        assert "another output_dir" in second.stderr and "Traceback" not in second.stderr
        go.touch()
        out, err = first.communicate(timeout=600)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert not lock.exists() and (tmp_path / "run" / "final" / "config.json").is_file()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(write_recipe, tmp_path, capsys):
    from linearize.distill import distill
    from linearize.distill.recipe import load_recipe

    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    distill(load_recipe(write_recipe()))
    assert f"removing the stale lock {out / LOCK_FILE} (its process {pid} is not running)" in capsys.readouterr().out
    assert not (out / LOCK_FILE).exists() and (out / "final").is_dir()


def test_the_lock_is_released_when_the_run_fails(write_recipe, tmp_path, assets):
    from linearize.distill import distill
    from linearize.distill.recipe import RecipeError, load_recipe

    recipe = load_recipe(write_recipe(), ["data.format=alpaca"])  # docs.jsonl has no alpaca fields
    with pytest.raises(RecipeError, match="alpaca"):
        distill(recipe)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_stale_and_held_locks(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    assert stale_reason(lock) is None
    lock.write_text(json.dumps({"pid": dead_pid(), "host": "another-machine", "started": "now"}))
    assert stale_reason(lock) is None  # another host's process cannot be checked: held
    lock.write_text("{half a rec")
    assert stale_reason(lock) is None  # maybe being written right now
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    assert "unreadable" in stale_reason(lock)


def test_the_lock_refuses_a_live_owner_and_removes_the_folder_it_created(tmp_path):
    out = tmp_path / "new" / "run"
    with OutputLock(out) as held:
        assert (out / LOCK_FILE).is_file()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}.*delete {out / LOCK_FILE}"):
            OutputLock(out).acquire()
        assert held.held
    assert not out.exists() and (tmp_path / "new").is_dir()
    out.mkdir(parents=True)
    with OutputLock(out):
        (out / "recipe.yaml").write_text("x")
    assert out.is_dir() and not (out / LOCK_FILE).exists()
