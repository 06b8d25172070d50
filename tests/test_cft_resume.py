"""cft.py killed at every point of a checkpoint save and of the final save (SIGKILL, injected through $CFT_KILL_AT or
a patched lower-level call), then --resume: the result equals the uninterrupted run bit for bit. The same for the
two-method demo (each method resumed where it stopped, finished ones skipped) and the ProMoT stage boundary (with
per-stage selection). And --resume never unpickles anything planted in a run or cache folder.

The killed runs are forked children of the test process (torch stays imported: a run costs seconds, not an import);
every run here uses one thread, so that killed, resumed and reference runs do the same arithmetic."""
import contextlib
import io
import json
import multiprocessing
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cft
import hf_checkpoint
import training
from conftest import ROOT, cft_argv, tiny_run_inputs

TRAIN = ["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--device", "cpu",
         "--no-progress", "--heldout-fraction", "0.2"]
RUN = ["--max-steps", "5", "--save-every", "2"]
PROMOT = ["--promot-prompt-steps", "2", "--max-steps", "2", "--promot-prompt-len", "4", "--save-every", "2",
          "--promot-select", "--promot-select-prompt-every", "1", "--promot-select-model-every", "1"]
DEMO = ["--max-steps", "3", "--save-every", "1", "--no-progress"]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quietly(args) -> str:
    printed = io.StringIO()
    with one_thread(), contextlib.redirect_stdout(printed):
        cft.main(args)
    return printed.getvalue()


def forked(args, kill_at: str | None = None, patch=None) -> int:
    """cft.main(args) in a forked child; its exit code (-9: SIGKILLed at the injected point)."""
    def child():
        torch.set_num_threads(1)
        if kill_at:
            os.environ["CFT_KILL_AT"] = kill_at
        if patch:
            patch()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cft.main(args)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(300)
    return process.exitcode


def die() -> None:
    os.kill(os.getpid(), 9)


def die_on_call(module, name: str, nth: int = 1):
    """A patch: the nth call of module.name kills the process before it does anything."""
    def patch():
        original, calls = getattr(module, name), []

        def deadly(*args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                die()
            return original(*args, **kwargs)
        setattr(module, name, deadly)
    return patch


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    return tiny_run_inputs(tmp_path_factory.mktemp("cft-kill"), tokenizer_path, 40)


def args(setup: Path, out: Path, *extra) -> list[str]:
    return cft_argv(setup, out, TRAIN, *extra)


def assert_same_run(out: Path, reference: Path):
    """Losses (held-out too), final weights and soft prompt: bit for bit."""
    trajectory = lambda run: [(r["step"], r["stage"], r["loss"], r["grad_norm"], r.get("heldout_loss"),
                               r.get("selected")) for r in cft.read_metrics(run)]
    assert trajectory(out) == trajectory(reference)
    for name in ("model.safetensors", "soft_prompt.safetensors"):
        if (reference / "final" / name).exists():
            a, b = load_file(reference / "final" / name), load_file(out / "final" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "final" / "tokenizer.model").is_file() and not list(out.glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    quietly(args(setup, out, *RUN))
    return out


KILL_POINTS = [
    ("before-first-checkpoint", "checkpoint-begin@1", None),
    ("checkpoint-rank-file-written", None, die_on_call(training, "write_text", 2)),
    ("checkpoint-before-rename", None, die_on_call(training, "commit_folder", 2)),
    ("checkpoint-renamed-old-kept", "checkpoint-written@2", None),
    ("checkpoint-old-removed", "checkpoint-rotated@1", None),
    ("final-weights-half", None, die_on_call(hf_checkpoint, "_write_metadata")),
    ("final-weights-staged", "final-weights@1", None),
    ("final-complete-before-rename", "final-staged@1", None),
    ("final-renamed", "final-committed@1", None),
]


@pytest.mark.parametrize("point, kill_at, patch", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_killed_anywhere_in_a_save_then_resumed_equals_the_uninterrupted_run(setup, reference, tmp_path, point,
                                                                           kill_at, patch):
    out = tmp_path / "run"
    assert forked(args(setup, out, *RUN), kill_at, patch) == -9  # died at the point, not elsewhere
    if point == "before-first-checkpoint":  # neither message points at the other: it says what to do
        with pytest.raises(SystemExit, match="stopped before its first checkpoint; pass --resume to start it again "
                                             "from step 0"):
            quietly(args(setup, out, *RUN))
    printed = quietly(args(setup, out, *RUN, "--resume"))
    assert ("finished earlier" in printed) == (point == "final-renamed")
    assert_same_run(out, reference)
    assert not (out / ".lock").exists()  # the dead run's lock was taken over, and released


def test_promot_killed_at_the_stage_boundary_resumes_exactly(setup, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    quietly(args(setup, reference, *PROMOT))
    assert forked(args(setup, out, *PROMOT), "checkpoint-written@1") == -9
    meta = training.read_training_meta(out / "checkpoints" / "step-2")
    assert (meta["step"], meta["stage"], meta["selection"]["stage"]) == (2, "prompt", "prompt")
    assert (out / "selected").is_dir()  # the stage's best prompt, needed when the boundary is crossed again
    printed = quietly(args(setup, out, *PROMOT, "--resume"))
    assert "resumed from" in printed and "prompt stage: keeping the state of step" in printed
    assert [r["stage"] for r in cft.read_metrics(out)] == ["prompt", "prompt", "model", "model"]
    assert_same_run(out, reference)
    assert not (out / "selected").exists()  # the snapshots go once final/ holds the best


def test_the_demo_resumes_each_method_where_it_stopped_and_skips_finished_ones(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    reference, out = tmp_path / "reference", tmp_path / "run"
    quietly(["--out", str(reference), *DEMO, *cache])
    # cft: checkpoints after steps 1 and 2 (none after its last step); cpt: the 4th checkpoint is its step 2
    assert forked(["--out", str(out), *DEMO, *cache], "checkpoint-written@4") == -9
    assert (out / "cft" / "final").is_dir() and not (out / "cpt" / "final").exists()
    with pytest.raises(SystemExit, match=r"holds a run \(cft finished, cpt stopped at step-2\); pass --resume"):
        quietly(["--out", str(out), *DEMO, *cache])
    printed = quietly(["--out", str(out), *DEMO, *cache, "--resume"])
    assert "cft: finished earlier" in printed and "resumed from" in printed and "cpt/checkpoints/step-2" in printed
    assert "\ncft " in printed and "\ncpt " in printed  # both rows of the accuracy table
    for method in ("cft", "cpt"):
        assert_same_run(out / method, reference / method)
    result = lambda run: {k: v for k, v in json.loads((run / "final" / "result.json").read_text()).items()
                          if k != "seconds"}
    assert result(out / "cpt") == result(reference / "cpt")
    # a method of the demo on its own, in its folder: the same run record, so it may be resumed alone
    assert "finished earlier" in quietly(["--out", str(out / "cpt"), "--method", "cpt", *DEMO, *cache, "--resume"])


# ----------------------------------------------------------------------------------------------------------------------
# No pickle: a planted payload would create a marker file if it were ever unpickled.


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_files_planted_in_the_run_folder(setup, reference, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    quietly(args(setup, out, *RUN, "--stop-after", "2"))
    step = out / "checkpoints" / "step-2"
    for name in (".metadata", "__0_0.distcp", "optimizer.pt", "model.bin", "rng_state.pth"):
        (step / name).write_bytes(pickle.dumps(Payload(marker)))
    (out / "training_args.bin").write_bytes(pickle.dumps(Payload(marker)))
    quietly(args(setup, out, *RUN, "--resume"))
    assert not marker.exists()
    assert_same_run(out, reference)


def test_a_pickle_in_place_of_the_state_file_or_the_token_cache_is_refused_unexecuted(setup, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    cache = tmp_path / "cache"
    quietly(args(setup, out, *RUN, "--stop-after", "2", "--cache-dir", str(cache)))
    (out / "checkpoints" / "step-2" / "rank-0-of-1.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(SystemExit, match="damaged checkpoint"):
        quietly(args(setup, out, *RUN, "--resume", "--cache-dir", str(cache)))
    for tokens in cache.glob("tokens-*.npz"):
        tokens.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(SystemExit, match="tokenization cache file is damaged"):
        quietly(args(setup, tmp_path / "other", *RUN, "--cache-dir", str(cache)))
    assert not marker.exists()


def test_no_module_of_the_project_can_unpickle():
    """Every module of the project (cft.py's resume path included): no pickle import, no torch.load without
    weights_only, no np.load(allow_pickle=True)."""
    for path in sorted(ROOT.glob("*.py")):
        name, code = path.stem, path.read_text()
        unpickling = r"^\s*(import pickle|from pickle)|pickle\.loads?\(|allow_pickle\s*=\s*True"
        assert not re.search(unpickling, code, re.M), name
        for call in re.findall(r"torch\.load\([^)]*\)", code):
            assert "weights_only=True" in call, (name, call)
