"""A cft.py run folder: one process at a time, what the run was, where it stopped, and whether it may go on.

    OUT/.lock                       the process working in the folder (atomic.folder_lock: pid, host, start time)
    OUT/config.json                 the run's settings; --resume refuses a setting that would change the trajectory
    OUT/metrics.jsonl               one record per optimiser step (cut back to the checkpoint on --resume)
    OUT/checkpoints/step-N/         training state (training.py: safetensors + state.json, never pickle); the state
                                    also holds the training data's fingerprint, so a changed corpus is refused
    OUT/selected/STAGE-step-N/      ProMoT --promot-select: the best state of a stage so far (promot.py)
    OUT/final/                      the trained model and result.json, built in a staging folder and renamed once
The built-in demo trains several methods: one such folder per method below OUT (OUT/cft, OUT/cpt), each resumed
where it stopped or skipped when finished. Every refusal here is a one-line ValueError that says what to do.
"""
import hashlib
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import data
from atomic import FolderInUse, folder_lock, write_text
from training import read_training_meta

# CFTConfig fields that may change between a run and its --resume: none of them changes the trajectory.
RESUMABLE_CHANGES = {"resume", "stop_after", "save_every", "eval_every", "progress", "workers", "cache_dir", "out",
                     "device", "model_dir", "memory_check"}
LOCK_NAME = ".lock"


# ----------------------------------------------------------------------------------------------------------------------
# Fault injection for the crash tests: CFT_KILL_AT=POINT (or POINT@N, the N-th time) SIGKILLs this process there.

_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """A place where a crash must leave a resumable folder; tests name it in $CFT_KILL_AT to die exactly there."""
    wanted = os.environ.get("CFT_KILL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point == name:
        _kill_counts[name] = _kill_counts.get(name, 0) + 1
        if _kill_counts[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------------
# Claiming a folder: the lock, and no folder left behind by a run refused over bad input


@contextmanager
def claimed_folder(path, env, what: str = "cft.py run"):
    """Hold PATH's lock (rank 0; every rank refuses together) while the block runs. A folder this call created is
    removed again if it is empty when the block ends, so a refused run leaves nothing behind."""
    path = Path(path)
    created = not path.exists()
    error, lock = None, None
    if env.is_main:
        if path.exists() and not path.is_dir():
            error = f"--out {path} is a file, not a folder"
        else:
            try:
                lock = folder_lock(path, what)
                lock.__enter__()
            except FolderInUse as e:
                error, lock = str(e), None
            except OSError as e:
                error, lock = f"--out {path}: cannot write there ({e.strerror or e})", None
    try:
        if env.sum([float(error is not None)])[0]:
            raise ValueError(error or f"--out {path}: refused on rank 0")
        yield path
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
        if env.is_main and created:
            try:
                path.rmdir()  # only when empty
            except OSError:
                pass


def _contents(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


# ----------------------------------------------------------------------------------------------------------------------
# Where a folder stands, and what a run started with or without --resume may do with it


def checkpoint_steps(folder) -> list[tuple[int, Path]]:
    """(step, path) of FOLDER/checkpoints/step-N, oldest first. A step-* entry that is not step-<number> is refused
    (a renamed copy would otherwise be ignored silently, or taken for the latest)."""
    found = []
    for path in (Path(folder) / "checkpoints").glob("step-*"):
        number = path.name.removeprefix("step-")
        if not number.isdigit():
            raise ValueError(f"{path}: not a checkpoint name (cft.py writes step-<number>); move it out of "
                             f"{path.parent} to go on")
        found.append((int(number), path))
    return sorted(found)


def latest_checkpoint(folder) -> Path | None:
    steps = checkpoint_steps(folder)
    return steps[-1][1] if steps else None


def checkpoint_progress(path: Path) -> dict:
    """The state.json of a checkpoint, checked to hold this project's step and stage."""
    try:
        meta = read_training_meta(path)
    except ValueError as e:
        raise ValueError(f"{e}; remove {path} to resume from step 0") from None
    if not isinstance(meta.get("step"), int) or meta.get("stage") not in ("prompt", "model"):
        raise ValueError(f"{path / 'state.json'}: no step or stage (not a cft.py checkpoint); remove {path} to "
                         f"resume from step 0")
    return meta


def method_finished(folder) -> bool:
    """final/ appears whole (renamed once), so its presence means the method finished."""
    return (Path(folder) / "final").is_dir()


def run_state(folder) -> str:
    """Where the run in FOLDER stands, in words: finished, stopped at step-N, stopped before its first checkpoint,
    not started (absent or empty), or not a run folder."""
    folder = Path(folder)
    if method_finished(folder):
        return "finished"
    if (folder / "config.json").is_file():
        ckpt = latest_checkpoint(folder)
        return f"stopped at {ckpt.name}" if ckpt else "stopped before its first checkpoint"
    return "not a run folder" if _contents(folder) else "not started"


def plan_start(folder, resume: bool) -> Path | str:
    """What a run may do with FOLDER: "start" (fresh), "finished" (skip it), a checkpoint to resume from, or "restart"
    (--resume of a run that stopped before its first checkpoint: step 0, same settings). Otherwise a ValueError
    saying what to do. (A --resume of a folder that does not exist is refused by the caller before it is created.)"""
    folder = Path(folder)
    state = run_state(folder)
    if not resume:
        if state == "finished":
            raise ValueError(f"--out {folder} holds a finished run ({folder / 'final'}); choose a new --out")
        if state.startswith("stopped"):
            todo = "continue it" if "step-" in state else "start it again from step 0 with the same settings"
            raise ValueError(f"--out {folder} holds a run that {state}; pass --resume to {todo}, or choose a new --out")
        if state == "not a run folder":
            raise ValueError(f"--out {folder} exists and is not empty; choose a new folder")
        return "start"
    if state == "finished":
        return "finished"
    if state == "not a run folder":
        raise ValueError(f"--resume: {folder} is not a cft.py run folder (no config.json); pass the run's own --out, "
                         f"or leave out --resume to start a new run in an empty folder")
    if state == "not started":  # begun but killed before it wrote anything: nothing to continue
        return "start"
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        return "restart"
    checkpoint_progress(ckpt)
    return ckpt


def check_demo_folder(folder, method_folders: list[Path], resume: bool) -> None:
    """The top folder of a demo (one folder per method inside). Without --resume it must be empty (else a message
    saying where each method stands and what to do); with it, it may hold nothing but the method folders."""
    folder = Path(folder)
    names = {Path(m).name for m in method_folders}
    foreign = sorted(set(_contents(folder)) - names)
    if resume:
        if foreign:
            raise ValueError(f"--resume: {folder} is not the folder of a cft.py demo run (it holds {foreign[0]}); "
                             f"pass the run's own --out")
        return
    if foreign or not _contents(folder):
        if foreign:
            raise ValueError(f"--out {folder} exists and is not empty; choose a new folder")
        return
    states = {Path(m).name: run_state(m) for m in method_folders}
    where = ", ".join(f"{name} {state}" for name, state in states.items())
    if all(state == "finished" for state in states.values()):
        raise ValueError(f"--out {folder} holds a finished run ({where}); choose a new --out")
    raise ValueError(f"--out {folder} holds a run ({where}); pass --resume to continue it, or choose a new --out")


# ----------------------------------------------------------------------------------------------------------------------
# The run's record: its settings (config.json), the data it trains on (a fingerprint in every checkpoint)


def write_config(folder, record: dict) -> None:
    """Start a run's record: config.json, and the (empty) checkpoints folder."""
    write_text(Path(folder) / "config.json", json.dumps(record, indent=1))
    (Path(folder) / "checkpoints").mkdir(exist_ok=True)


def check_config(folder, record: dict, defaults: dict | None = None) -> None:
    """Refuse --resume with a setting that changes the trajectory (RESUMABLE_CHANGES may change). A model given by
    name is the same model wherever its folder is found, so its resolved path is not compared; a setting the saved
    record lacks (added to cft.py since) must be at its default (`defaults`)."""
    path = Path(folder) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the run's settings are unknown, so it cannot be "
                         f"resumed: choose a new --out") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a cft.py run record; choose a new --out")
    skip = RESUMABLE_CHANGES | ({"checkpoint"} if record.get("model") and not record.get("random_init") else set())
    for key, value in record.items():
        if key not in saved and defaults is not None and defaults.get(key) == value:
            continue
        if key not in skip and saved.get(key) != value:
            raise ValueError(f"--resume: --{key.replace('_', '-')} is {value!r} but the run in {folder} used "
                             f"{saved.get(key)!r}")


def data_fingerprint(*arrays) -> str:
    """A hash of the training rows (tokens, loss mask, documents, stage sizes): any change of corpus, prompts,
    tokenizer or row settings changes it."""
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.data)
    return h.hexdigest()


def check_data(meta: dict, now: dict, ckpt: Path) -> None:
    """Refuse to resume onto other training data than the checkpoint's (meta["data"] as saved, `now` as built)."""
    saved = meta.get("data")
    if saved is not None and saved.get("fingerprint") != now["fingerprint"]:
        raise ValueError(f"--resume: the training data differ from those of {ckpt} ({now['documents']} documents in "
                         f"{now['rows']} rows now, {saved.get('documents')} in {saved.get('rows')} then): the corpus, "
                         f"prompts or tokenizer changed; resume with the run's data or start a new --out")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and the result


def read_metrics(folder) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [record for _, record in data.read_jsonl(path)] if path.is_file() else []


def rewrite_metrics(folder, records: list[dict]) -> None:
    write_text(Path(folder) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(folder, record: dict) -> None:
    with open(Path(folder) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_result(folder, method: str) -> dict:
    """A finished method's result (final/result.json: method, accuracies before and after, final loss); a final/
    written before result.json existed gives just the method."""
    path = Path(folder) / "final" / "result.json"
    if not path.exists():
        return {"method": method}
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); remove {path.parent} to train the method again") from None
    if not isinstance(result, dict) or "method" not in result:
        raise ValueError(f"{path}: not a cft.py result; remove {path.parent} to train the method again")
    return result
