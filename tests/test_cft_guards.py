"""cft.py's guards of a run folder: one process per --out (a live holder refuses the run naming it, a dead one's lock
is taken over), never a checkpoint of a state that cannot train on (non-finite loss or gradient, or weights past
saving), and a full disk during a checkpoint or the final save: one line, the half-written folder gone, the last
checkpoint intact, and --resume afterwards equal to the uninterrupted run."""
import errno
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import cft
from conftest import cft_argv, printed_by, tiny_run_inputs

TRAIN = ["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--device", "cpu",
         "--no-progress", "--heldout-fraction", "0", "--max-steps", "4", "--save-every", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    return tiny_run_inputs(tmp_path_factory.mktemp("cft-guards"), tokenizer_path, 30)


def args(setup: Path, out: Path, *extra) -> list[str]:
    return cft_argv(setup, out, TRAIN, *extra)


def quietly(argv) -> str:
    return printed_by(cft.main, argv)


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    quietly(args(setup, out))
    return out


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in cft.read_metrics(out)]


# ----------------------------------------------------------------------------------------------------------------------
# One process per folder


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / ".lock").write_text(json.dumps(lock))
        for extra in ([], ["--resume"]):
            with pytest.raises(SystemExit, match=rf"^error: {out} is in use by another cft.py run: process "
                                                 rf"{holder.pid} on {socket.gethostname()}"):
                quietly(args(setup, out, *extra))
        assert json.loads((out / ".lock").read_text()) == lock and sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_runs_lock_is_taken_over_with_a_message(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    quietly(args(setup, out, "--max-steps", "1"))
    assert f"taking over the lock of process {dead.pid}" in capsys.readouterr().err
    assert (out / "final").is_dir() and not (out / ".lock").exists()


def test_the_demo_locks_its_method_folders_too(tmp_path):
    """A single-method run inside a demo folder and the demo itself exclude each other."""
    out = tmp_path / "demo"
    (out / "cpt").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "cpt" / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(SystemExit, match=rf"cpt is in use by another cft.py run: process {holder.pid}"):
            quietly(["--out", str(out), "--max-steps", "1", "--no-progress", "--resume", "--cache-dir",
                     str(tmp_path / "cache")])
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------------------------------
# Never a checkpoint of a state that cannot train on


def test_weights_blown_up_by_the_first_step_are_never_saved(setup, tmp_path):
    """--lr 1e30: the first step leaves finite weights of ~1e30, whose loss is not finite. Not saved, and the message
    names no such checkpoint."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        quietly(args(setup, out, "--lr", "1e30"))
    message = str(e.value.code)
    assert "with the weights after step 1: not saving them" in message and "last good checkpoint: none" in message
    assert not any((out / "checkpoints").iterdir())


def test_a_later_nan_names_a_checkpoint_that_trains_on(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = cft.train_step
    calls = []

    def nan_at_step_4(*a, **k):
        calls.append(1)
        loss, grad_norm = real_step(*a, **k)
        return (float("nan"), grad_norm) if len(calls) == 4 else (loss, grad_norm)
    monkeypatch.setattr(cft, "train_step", nan_at_step_4)
    with pytest.raises(SystemExit, match=r"loss is nan at step 4; stopping \(last good checkpoint: .*step-3;"):
        quietly(args(setup, out))
    named = load_file(out / "checkpoints" / "step-3" / "rank-0-of-1.safetensors")
    assert all(torch.isfinite(t).all() for k, t in named.items() if t.is_floating_point())
    monkeypatch.setattr(cft, "train_step", real_step)


def test_a_non_finite_gradient_norm_stops_before_it_reaches_the_weights(setup, tmp_path, monkeypatch):
    real_step = cft.train_step
    monkeypatch.setattr(cft, "train_step", lambda *a, **k: (real_step(*a, **k)[0], float("inf")))
    with pytest.raises(SystemExit, match=r"gradient norm is inf at step 1; stopping \(last good checkpoint: none"):
        quietly(args(setup, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------------------------
# A full disk


def full_disk_on(monkeypatch, when):
    """safetensors' save_file raises ENOSPC for files `when(path)` picks (the failure a full disk gives)."""
    real = safetensors.torch.save_file

    def save_file(tensors, path, *a, **k):
        if when(Path(path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_disk_full_during_a_checkpoint(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    full_disk_on(monkeypatch, lambda path: "step-3" in str(path))
    with pytest.raises(SystemExit) as e:
        quietly(args(setup, out))
    message = str(e.value.code)
    assert message.startswith("error: step 3: could not write the checkpoint") and "\n" not in message
    assert "No space left on device" in message and "last good checkpoint" in message and "step-2" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # intact; no half-written staging folder
    monkeypatch.undo()  # space freed
    quietly(args(setup, out, "--resume"))
    assert losses(out) == losses(reference)


def test_disk_full_during_the_final_save(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    full_disk_on(monkeypatch, lambda path: "final" in str(path))
    with pytest.raises(SystemExit, match=r"^error: could not write .*final \(No space left on device\); free space "
                                         r"and --resume"):
        quietly(args(setup, out))
    assert not (out / "final").exists() and not list(out.glob(".final*"))
    monkeypatch.undo()
    quietly(args(setup, out, "--resume"))
    assert losses(out) == losses(reference)
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_writing_metrics_is_one_line(setup, tmp_path, monkeypatch):
    import run_folder
    real = run_folder.append_metrics

    def append(folder, record):
        if record["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "metrics.jsonl"))
        real(folder, record)
    monkeypatch.setattr(cft, "append_metrics", append)
    with pytest.raises(SystemExit, match=r"^error: .*metrics.jsonl: No space left on device$"):
        quietly(args(setup, tmp_path / "run"))
