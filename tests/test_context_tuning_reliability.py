"""context_tuning.py on bad input: one line `error: ...`, a non-zero exit and nothing written; and the resumable
reproduction folder (--quick / --reproduce): resumed with the same settings, refused with others, never replaced."""
import dataclasses
import json
import math
import os
import shutil
import signal

import pytest
import torch

import context_tuning as ct
import ct_regression
import ct_reproduction
import hf_checkpoint
import icl_regression
from conftest import tiny_cfg
from data import Tokenizer
from hf_checkpoint import save_pretrained
from lora import apply_lora, save_peft_adapter
from model import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = {"name": "toy", "demos": [{"input": "The patient reported", "output": "pain"},
                                 {"input": "The drug reduced", "output": "the risk"}],
        "queries": [{"input": "We treated", "output": "pain", "options": ["pain", "revenue"]}]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path):
    """A tiny Hugging Face folder with its tokenizer, and a task file."""
    root = tmp_path_factory.mktemp("ct_reliability")
    model = create_model(tiny_cfg(Tokenizer(tokenizer_path).vocab_size), seed=0)
    save_pretrained(model, root / "ckpt")
    shutil.copy(tokenizer_path, root / "ckpt" / "tokenizer.model")
    (root / "tasks.jsonl").write_text(json.dumps(TASK) + "\n")
    return root


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


def refused(argv, fragment, folder):
    """main(argv) exits with one line `error: ...` holding `fragment`, and nothing under `folder` changed."""
    before = snapshot(folder)
    with pytest.raises(SystemExit) as e:
        ct.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and fragment in message, message
    assert snapshot(folder) == before
    return message


def text_args(root, *extra):
    return ["--tasks", str(root / "tasks.jsonl"), "--out", str(root / "new" / "r.jsonl"), "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--k", "0"], "--k must be positive"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--ct-prompt-dropout", "-0.1"], "--ct-prompt-dropout must be in [0, 1)"),
    (["--ttt-targets", "q_proj,foo_proj"], "--ttt-targets: 'foo_proj' not among"),
    (["--ttt-alpha", "-1"], "--ttt-alpha must be a positive number"),
    (["--ttt-rank", "0"], "--ttt-rank must be positive"),
    (["--ttt-permutations", "0"], "--ttt-permutations must be positive"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--budget", "0"], "--budget must be a positive number"),
    (["--recipe", "gsm8k"], "argument --recipe: invalid choice"),
    (["--reduction", "mean"], "argument --reduction: invalid choice"),
    (["--time", "9b"], "--time: unknown shape(s) 9b"),
    (["--model", "nosuch-model"], "model nosuch-model: not found in"),
    (["--model", "llama2-7b", "--random-init"], "--random-init: pass --tokenizer"),
    (["--model", "my/model", "--random-init", "--tokenizer", "t.model"], "--random-init needs --model with a preset"),
    (["--checkpoint", "/nonexistent/ckpt"], "no config.json"),
    (["--pretrained", "runs/x/pretrain"], "--pretrained: only with --quick or --reproduce"),
])
def test_bad_flags_are_one_line(checkpoint, extra, fragment):
    refused(text_args(checkpoint, *extra), fragment, checkpoint)


def test_bad_model_inputs_are_one_line(checkpoint, tmp_path, monkeypatch):
    ckpt = str(checkpoint / "ckpt")
    refused(text_args(checkpoint, "--checkpoint", ckpt, "--model", "llama2-7b"), "pass one of --checkpoint and --model",
            checkpoint)
    refused(text_args(checkpoint, "--checkpoint", ckpt, "--adapter", str(tmp_path / "none")),
            "adapter_config.json: no such file", checkpoint)
    refused(text_args(checkpoint, "--checkpoint", ckpt, "--device", "cuda"), "--device cuda: CUDA is not available",
            checkpoint) if not torch.cuda.is_available() else None
    # the memory check refuses before anything is allocated
    monkeypatch.setattr(hf_checkpoint, "available_bytes", lambda device: 2**20)
    refused(text_args(checkpoint, "--checkpoint", ckpt), "not enough memory on cpu", checkpoint)
    refused(text_args(checkpoint, "--model", "llama2-7b", "--random-init", "--tokenizer",
                      str(checkpoint / "ckpt" / "tokenizer.model")), "not enough memory on cpu", checkpoint)


def test_results_file_edge_cases(checkpoint, tmp_path, capsys):
    ckpt = str(checkpoint / "ckpt")
    argv = ["--checkpoint", ckpt, "--tasks", str(checkpoint / "tasks.jsonl"), "--method", "icl", "--device", "cpu"]
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n{}\n")
    refused([*argv, "--out", str(garbage)], "garbage.jsonl:1: not a results line", tmp_path)
    refused([*argv, "--out", str(tmp_path)], "is a folder; text tasks write a JSONL file", tmp_path)
    # a last line cut short by a killed run is dropped, and the run resumes
    out = tmp_path / "r.jsonl"
    ct.main([*argv, "--out", str(out)])
    finished = out.read_text()
    out.write_text(finished + '{"task": "toy", "meth')
    ct.main([*argv, "--out", str(out), "--method", "ct-kv", "--steps", "1"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in lines] == ["icl", "ct-kv"] and "incomplete last line" in capsys.readouterr().err


def test_adapter_flag_loads_a_peft_folder(checkpoint, tmp_path):
    ckpt = checkpoint / "ckpt"
    model = create_model(tiny_cfg(Tokenizer(str(ckpt / "tokenizer.model")).vocab_size), seed=0)
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_()
    save_peft_adapter(model, tmp_path / "adapter")
    out = tmp_path / "r.jsonl"
    ct.main(["--checkpoint", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--tasks",
             str(checkpoint / "tasks.jsonl"), "--method", "icl", "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text())["method"] == "icl"
    bad = tmp_path / "bad_adapter"
    shutil.copytree(tmp_path / "adapter", bad)
    (bad / "adapter_config.json").write_text("{")
    refused(["--checkpoint", str(ckpt), "--adapter", str(bad), "--tasks", str(checkpoint / "tasks.jsonl"),
             "--out", str(tmp_path / "other.jsonl"), "--device", "cpu"], "adapter_config.json: not valid JSON",
            tmp_path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished `--reproduce tiny` run, on an untrained test-sized backbone saved as if pretrained (the run reuses a
    finished OUT/pretrain; pretraining itself is icl_regression's, tested there)."""
    out = tmp_path_factory.mktemp("ct_tiny") / "run"
    cfg = icl_regression.REGRESSION_PRESETS["test"]
    meta = {"kind": "pretrain", "n_dims": cfg.n_dims, "model_config": dataclasses.asdict(cfg.model_config()),
            "config": dataclasses.asdict(cfg), "seed": 0, "step": 0, "done": True, "history": []}
    icl_regression.save_regression_checkpoint(out / "pretrain", icl_regression.build_regression_model(cfg, 0), meta)
    ct.main(["--reproduce", "tiny", "--out", str(out), "--device", "cpu"])
    return out


def test_reproduction_resumes_and_never_replaces_foreign_results(tiny_run, tmp_path, capsys):
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results) == {"shifted/k2", "shifted/k3", "offset/k2", "offset/k3"}
    for cell in results.values():
        for stats in cell.values():
            assert stats["seeds"] == 2 and stats["tasks"] == 4 and "mse_ci95" in stats and "mse_minus_icl_ci95" in stats
    # resume: delete some finished runs, run again: only they are recomputed, and the results are the same
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    records = json.loads((copy / "records.json").read_text())
    dropped = [key for key in records["runs"] if "/seed1/" in key and key.endswith("/ttt+ct-kv")]
    for key in dropped:
        del records["runs"][key]
    (copy / "records.json").write_text(json.dumps(records))
    ct.main(["--reproduce", "tiny", "--out", str(copy), "--device", "cpu"])
    assert json.loads((copy / "results.json").read_text()) == results
    # other settings in the folder: refused; results.json of something else: never replaced
    records["config"]["steps"] = 99
    (copy / "records.json").write_text(json.dumps(records))
    refused(["--reproduce", "tiny", "--out", str(copy)], "holds a run with other settings (steps)", copy)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"mine": 1}')
    refused(["--quick", "--out", str(foreign)], "results.json exists", foreign)
    (tmp_path / "file").write_text("x")
    refused(["--quick", "--out", str(tmp_path / "file")], "is a file", tmp_path)
    (copy / "records.json").write_text("[1, 2")
    refused(["--reproduce", "tiny", "--out", str(copy)], "not a records file", copy)


def test_a_folder_in_use_is_refused(tiny_run, tmp_path):
    busy = tmp_path / "busy"
    shutil.copytree(tiny_run, busy)
    (busy / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "now"}))
    message = refused(["--reproduce", "tiny", "--out", str(busy)], "is in use by another", busy)
    assert str(os.getpid()) in message


def test_more_seeds_continue_a_finished_run(tiny_run, tmp_path):
    more = tmp_path / "more"
    shutil.copytree(tiny_run, more)
    ct.main(["--reproduce", "tiny", "--seeds", "3", "--out", str(more), "--device", "cpu"])
    results = json.loads((more / "results.json").read_text())
    assert all(s["seeds"] == 3 and s["tasks"] == 6 for cell in results.values() for s in cell.values())
    assert json.loads((more / "records.json").read_text())["lrs"] == json.loads(
        (tiny_run / "records.json").read_text())["lrs"]  # the sweep is not redone


def test_model_by_name_from_model_dir_and_tokenizer_from_its_folder(checkpoint, tmp_path, capsys):
    """--model NAME is looked up in --model-dir (hf_checkpoint.resolve_model); the tokenizer comes from the folder."""
    models = tmp_path / "models"
    shutil.copytree(checkpoint / "ckpt", models / "llama2-7b")
    out = tmp_path / "r.jsonl"
    ct.main(["--model", "llama2-7b", "--model-dir", str(models), "--tasks", str(checkpoint / "tasks.jsonl"),
             "--method", "icl", "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text())["method"] == "icl"
    assert f"model: {models / 'llama2-7b'}" in capsys.readouterr().out


def test_a_budget_cut_writes_what_is_done_and_a_rerun_finishes(tiny_run, tmp_path, capsys):
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tiny_run / "pretrain", cut / "pretrain")
    ct.main(["--reproduce", "tiny", "--out", str(cut), "--device", "cpu", "--budget", "0.001"])
    assert json.loads((cut / "results.json").read_text()) == {} and "budget reached" in capsys.readouterr().out
    assert json.loads((cut / "run.json").read_text())["finished"] is False
    ct.main(["--reproduce", "tiny", "--out", str(cut), "--device", "cpu"])
    assert json.loads((cut / "results.json").read_text()) == json.loads((tiny_run / "results.json").read_text())


def test_cells_batched_across_seeds_and_a_shared_backbone_give_the_same_numbers(tiny_run, tmp_path, monkeypatch):
    """task_batch only groups tasks (each trains with its own seed): the tiny grid with every seed of a cell in one
    optimisation (and the sweep's rates together) gives the records of one seed's batch at a time; --pretrained reuses
    another folder's backbone of the same settings and refuses one of other settings."""
    from ct_regression import CT_REPRODUCTIONS
    monkeypatch.setitem(CT_REPRODUCTIONS, "tiny", dataclasses.replace(CT_REPRODUCTIONS["tiny"], task_batch=12))
    wide = tmp_path / "wide"
    ct.main(["--reproduce", "tiny", "--out", str(wide), "--device", "cpu", "--pretrained", str(tiny_run / "pretrain")])
    assert not (wide / "pretrain").exists()
    assert [u[2] for u in ct_reproduction.grid_units(CT_REPRODUCTIONS["tiny"])][0] == [(0, 0), (1, 0)]
    old, new = (json.loads((f / "records.json").read_text()) for f in (tiny_run, wide))
    assert set(new["runs"]) == set(old["runs"])
    for key, record in old["runs"].items():
        assert new["runs"][key]["mse"] == pytest.approx(record["mse"], rel=1e-4, abs=1e-5), key
    for family, table in old["sweep"].items():
        for method, by_lr in table.items():
            assert new["sweep"][family][method] == pytest.approx(by_lr, rel=1e-4, abs=1e-5)
    # the sweep keeps to task_batch too (one (rate, task) pair per optimisation here), with the same numbers
    sizes, run_batch = [], ct_reproduction.run_batch
    monkeypatch.setattr(ct_reproduction, "run_batch", lambda reg, q, k, xs, *a, **kw: sizes.append(len(xs)) or
                        run_batch(reg, q, k, xs, *a, **kw))
    reg, _ = icl_regression.load_regression_model(tiny_run / "pretrain")
    one = dataclasses.replace(CT_REPRODUCTIONS["tiny"], task_batch=1)
    table = ct_reproduction.sweep_learning_rates(reg.eval().requires_grad_(False), one, "offset")
    assert set(sizes) == {1} and table.keys() == old["sweep"]["offset"].keys()
    for method, by_lr in old["sweep"]["offset"].items():
        assert table[method] == pytest.approx(by_lr, rel=1e-4, abs=1e-5)
    cfg = dataclasses.replace(icl_regression.REGRESSION_PRESETS["test"], n_layers=3)
    other = tmp_path / "other" / "pretrain"
    meta = {"kind": "pretrain", "n_dims": cfg.n_dims, "model_config": dataclasses.asdict(cfg.model_config()),
            "config": dataclasses.asdict(cfg), "seed": 0, "step": 0, "done": True, "history": []}
    icl_regression.save_regression_checkpoint(other, icl_regression.build_regression_model(cfg, 0), meta)
    refused(["--reproduce", "tiny", "--out", str(tmp_path / "x"), "--pretrained", str(other)], "n_layers=3", tmp_path)


def test_records_of_another_backbone_or_an_older_format_are_refused(tiny_run, tmp_path):
    """records.json names its backbone (settings, seed, final quality) and its format: a run on another backbone, or
    records written before either was recorded, are refused before anything is written."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    records = json.loads((run / "records.json").read_text())
    assert records["config"]["format"] == ct_reproduction.RECORDS_FORMAT
    assert records["config"]["backbone"]["seed"] == 0 and records["config"]["backbone"]["config"]["n_layers"] > 0
    cfg = dataclasses.replace(icl_regression.REGRESSION_PRESETS["test"])
    other = tmp_path / "other" / "pretrain"
    meta = {"kind": "pretrain", "n_dims": cfg.n_dims, "model_config": dataclasses.asdict(cfg.model_config()),
            "config": dataclasses.asdict(cfg), "seed": 0, "step": 0, "done": True, "history": [],
            "quality": {"nmse_at_2d": 0.5}}  # the same settings, trained to another end
    icl_regression.save_regression_checkpoint(other, icl_regression.build_regression_model(cfg, 0), meta)
    refused(["--reproduce", "tiny", "--out", str(run), "--pretrained", str(other)], "holds a run on the backbone", run)
    bare = tmp_path / "bare"  # records made on --pretrained, resumed without it: OUT/pretrain would be a new backbone
    bare.mkdir()
    shutil.copy(run / "records.json", bare / "records.json")
    refused(["--reproduce", "tiny", "--out", str(bare)], "(to be pretrained)", bare)
    del records["config"]["format"]
    (run / "records.json").write_text(json.dumps(records))
    refused(["--reproduce", "tiny", "--out", str(run)], "records format 1 of an earlier version", run)
    with pytest.raises(ValueError, match="at most 1000"):
        ct_reproduction.check_task_count(dataclasses.replace(ct_regression.CT_REPRODUCTIONS["tiny"],
                                                             tasks_per_seed=1001))


def test_sigterm_during_the_grid_still_writes_the_results(tiny_run, tmp_path, monkeypatch, capsys):
    """A SIGTERM (timeout's) between two runs: records, results.json/md and run.json of what finished are written;
    a deadline stops a batch before its next run."""
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tiny_run / "pretrain", cut / "pretrain")
    calls, adapt = [], ct_reproduction.adapt_tasks
    sweep = sum(len(ct_regression.SWEEP_LRS.get(m, ct_regression.SWEEP_LRS_DEFAULT)) for m in ct_regression.SWEPT)

    def adapt_then_terminate(*args, **kwargs):
        calls.append(1)
        if len(calls) == sweep + 4:  # the first grid unit's fourth run
            os.kill(os.getpid(), signal.SIGTERM)
        return adapt(*args, **kwargs)
    monkeypatch.setattr(ct_reproduction, "adapt_tasks", adapt_then_terminate)
    with pytest.raises(KeyboardInterrupt):
        ct.main(["--reproduce", "tiny", "--out", str(cut), "--device", "cpu"])
    assert "interrupted: run the same command again" in capsys.readouterr().out
    assert len(json.loads((cut / "records.json").read_text())["runs"]) == 3
    assert json.loads((cut / "run.json").read_text())["finished"] is False and (cut / "results.md").is_file()
    assert json.loads((cut / "results.json").read_text()) == {}  # no unit has every method yet
    reg, _ = icl_regression.load_regression_model(cut / "pretrain")
    q = ct_regression.CT_REPRODUCTIONS["tiny"]
    xs, ys, seeds = ct_reproduction.unit_tasks(q, reg, "shifted", [(0, 0)])
    runs = ct_reproduction.reproduction_runs(q, 2)
    saved = []
    assert not ct_reproduction.run_batch(reg, q, 2, xs, ys, seeds, runs, set(), lambda *a: saved.append(a),
                                         deadline=0) and not saved
    assert ct_reproduction.run_batch(reg, q, 2, xs, ys, seeds, runs, set(runs) - {"icl"},
                                     lambda *a: saved.append(a), deadline=math.inf) and len(saved) == 1
