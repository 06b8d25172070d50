"""atomic.py: a file or folder appears whole or not at all; an interrupted replace leaves a readable PATH.old."""
import os

import pytest

from atomic import atomic_folder, atomic_write, commit_folder, finished_folder, staging_folder, write_text


def test_atomic_write_replaces_whole_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_text(path, "first")
    assert path.read_text() == "first"

    def fail_half_way(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(path, fail_half_way)
    assert path.read_text() == "first" and os.listdir(path.parent) == ["out.json"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_folder_refuses_existing_and_leaves_nothing_on_error(tmp_path):
    with atomic_folder(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_text("1")
    assert (tmp_path / "ckpt" / "weights").read_text() == "1"
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        with atomic_folder(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_text("2")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "other") as tmp:
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_interrupted_replace_is_found_through_old(tmp_path):
    path = tmp_path / "ckpt"
    with atomic_folder(path) as tmp:
        (tmp / "meta.json").write_text("1")
    with atomic_folder(path, replace=True) as tmp:
        (tmp / "meta.json").write_text("2")
    assert (path / "meta.json").read_text() == "2" and not (tmp_path / "ckpt.old").exists()
    # a kill between the two renames of a replace: PATH.old holds the last good folder, PATH is missing
    staging = staging_folder(path)
    (staging / "meta.json").write_text("3")
    path.rename(tmp_path / "ckpt.old")
    assert finished_folder(path, "meta.json") == tmp_path / "ckpt.old"
    commit_folder(path, replace=True)
    assert finished_folder(path, "meta.json") == path and (path / "meta.json").read_text() == "3"


def test_folder_lock_refuses_a_second_holder_and_takes_over_a_stale_lock(tmp_path, capsys):
    import json
    import subprocess
    import sys
    from atomic import FolderInUse, folder_lock
    with folder_lock(tmp_path / "run") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(FolderInUse, match=f"in use by another run: process {os.getpid()} on"):
            with folder_lock(tmp_path / "run"):
                pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": holder["host"], "started": "earlier"}))
    with folder_lock(tmp_path / "run"):
        assert "no longer runs" in capsys.readouterr().err


def test_saved_tensors_follow_the_umask(tmp_path):
    import torch
    from atomic import save_tensors
    old = os.umask(0o022)
    try:
        save_tensors({"a": torch.zeros(2)}, tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
