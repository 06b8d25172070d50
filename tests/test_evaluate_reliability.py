"""evaluate.py under bad input and concurrent runs: every refusal is one line `error: ...` naming the flag or file,
a non-zero exit, and nothing written or changed; --out is claimed at start (a second run, a read-only folder, a
path under a file fail before any scoring) and only this run's own placeholder is ever replaced."""
import json
import os
import socket

import pytest
import torch

import eval_report as er
import evaluate as ev
from conftest import LLAMA_TOKENIZER, needs_data, tiny_cfg
from hf_checkpoint import save_pretrained
from model import create_model


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def refused(argv, fragment, folder):
    """Run the CLI in-process; require a one-line error holding `fragment`, and `folder` unchanged."""
    before = snapshot(folder)
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and fragment in message, (argv, message)
    assert snapshot(folder) == before, argv
    return message


def result_file(path, tasks):
    path.write_text(json.dumps({"name": path.stem, "tasks": tasks}))
    return str(path)


def test_compare_with_malformed_files_and_entries_is_one_line(tmp_path):
    good = result_file(tmp_path / "good.json", {"medqa": {"accuracy": 0.3, "n": 4}})
    cases = [
        ([str(tmp_path / "missing.json")], "missing.json: no such file"),
        ([result_file(tmp_path / "empty.json", {})], "empty.json: 'tasks' is empty"),
        ([result_file(tmp_path / "nometric.json", {"fiqa-sa": {"n": 3}})],
         "nometric.json: tasks['fiqa-sa'] has no numeric accuracy"),
        ([result_file(tmp_path / "text.json", {"medqa": {"accuracy": "high"}})],
         "text.json: tasks['medqa']: accuracy is 'high', expected a number"),
        ([result_file(tmp_path / "scalar.json", {"medqa": 3})], "scalar.json: tasks['medqa'] is not an object"),
        ([result_file(tmp_path / "subjects.json", {"mmlu-medical": {"accuracy": 0.5, "subjects": [1]}})],
         "subjects.json: tasks['mmlu-medical']: subjects is not an object"),
        ([result_file(tmp_path / "subject.json", {"mmlu-medical": {"accuracy": 0.5, "subjects": {"anatomy": {}}}})],
         "tasks['mmlu-medical/anatomy'] has no numeric"),
        ([result_file(tmp_path / "stderr.json", {"medqa": {"accuracy": 0.5, "accuracy_stderr": [0.1]}})],
         "accuracy_stderr is [0.1], expected a number"),
        ([good, str(tmp_path)], "a folder (expected a result JSON"),
    ]
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes(b'{"tasks": "\xe9"}')
    (tmp_path / "running.json").write_text(json.dumps({"running": {"pid": 123, "host": "h", "started": "t"}}))
    cases += [([str(tmp_path / "broken.json")], "broken.json: not valid JSON"),
              ([str(tmp_path / "list.json")], "list.json: no 'tasks' object"),
              ([str(tmp_path / "latin1.json")], "latin1.json: not UTF-8 text"),
              ([str(tmp_path / "running.json")], "running.json: an evaluation is still writing it (process 123")]
    for files, fragment in cases:
        refused(["--compare", *files], fragment, tmp_path)
    (tmp_path / "taken.csv").write_text("mine")
    refused(["--compare", good, "--compare-out", str(tmp_path / "taken.csv")], "--compare-out", tmp_path)
    refused(["--compare", good, "--compare-out", str(tmp_path / "good.json" / "x.csv")], "is not a folder", tmp_path)
    refused(["--compare", str(tmp_path / "broken.json"), "--compare-out", str(tmp_path / "new.csv")],
            "not valid JSON", tmp_path)  # a bad input file: no CSV either
    assert (tmp_path / "taken.csv").read_text() == "mine"


def test_bad_flags_are_one_line_and_write_nothing(tmp_path):
    tok = ["--tokenizer", str(LLAMA_TOKENIZER)]
    model = ["--random-init", *tok]
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "r_samples").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "adapter").mkdir()
    cases = [
        (model + ["--tasks", "mmlu-medical,nope"], "--tasks: unknown task 'nope'"),
        (model + ["--tasks", ","], "--tasks: unknown task"),
        (model + ["--limit", "0"], "--limit 0: expected an integer >= 1"),
        (model + ["--shots", "-1"], "--shots -1: expected an integer >= 0"),
        (model + ["--gen-tokens", "0"], "--gen-tokens 0: expected an integer >= 1"),
        (model + ["--batch-tokens", "0"], "--batch-tokens 0"),
        (model + ["--limit", "x"], "argument --limit: invalid int value: 'x'"),
        (model + ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        *([(model + ["--device", "cuda"], "--device cuda: no CUDA device")] if not torch.cuda.is_available() else []),
        (model + ["--precision", "fp8"], "argument --precision: invalid choice"),
        (model + ["--limit-mode", "last"], "argument --limit-mode: invalid choice"),
        (model + ["--suite", "icl", "--shots", "2"], "--shots: the icl suite sets its own k"),
        (model + ["--leak-labels", "True,False"], "--leak-labels: a comma-separated list of labels, with --suite"),
        (model + ["--suite", "icl-gen", "--leak-labels", " , "], "--leak-labels"),
        (model + ["--log-samples"], "--log-samples writes beside the results: pass --out"),
        (model + ["--out", str(tmp_path / "r.json"), "--log-samples"], "--log-samples"),
        (model + ["--out", str(tmp_path / "taken.json")], "taken.json exists; refusing to overwrite it"),
        (model + ["--out", str(tmp_path)], "exists; refusing to overwrite it"),
        (model + ["--compare-out", str(tmp_path / "c.csv")], "--compare-out goes with --compare"),
        (["--random-init", "--tasks", "medqa"], "--random-init needs --tokenizer"),
        (["--tasks", "medqa"], "no model: pass --model NAME"),
        (["--checkpoint", str(tmp_path), "--model", "llama2-7b"], "--checkpoint names the model folder"),
        (model + ["--model", "gpt-9"], "--random-init --model gpt-9: not a preset"),
        (["--model", "no-such-model", "--model-dir", str(tmp_path)], "model no-such-model: not found in"),
        (["--checkpoint", str(tmp_path / "no-weights")] + tok, "config.json: no such file"),
        (model + ["--tokenizer", str(tmp_path / "none.model")], "none.model: no such file"),
    ]
    for argv, fragment in cases:
        refused(argv, fragment, tmp_path)
    assert (tmp_path / "taken.json").read_text() == "{}"


@needs_data
def test_bad_model_parts_and_data_are_refused_before_out_is_claimed(tmp_path):
    model = ["--random-init", "--tokenizer", str(LLAMA_TOKENIZER), "--tasks", "medqa", "--limit", "1"]
    out = ["--out", str(tmp_path / "new" / "r.json")]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    (tmp_path / "data" / "medqa-usmle-4opt").mkdir(parents=True)
    (tmp_path / "data" / "medqa-usmle-4opt" / "phrases_no_exclude_test.jsonl").write_text('{"question": 1}\n')
    cases = [
        (model + out + ["--adapter", str(tmp_path / "adapter")], "adapter_config.json: no such file"),
        (model + out + ["--soft-prompt", str(tmp_path / "junk.safetensors")], "junk.safetensors: not a safetensors"),
        (model + out + ["--data-dir", str(tmp_path / "nowhere")], "phrases_no_exclude_test.jsonl: no such file "
                                                                  "(expected data layout: evaluate.py --help)"),
        (model + out + ["--data-dir", str(tmp_path / "data")], "phrases_no_exclude_test.jsonl:1: field 'question'"),
        (model + ["--out", str(tmp_path / "junk.safetensors" / "r.json")], "is not a folder"),
    ]
    for argv, fragment in cases:
        refused(argv, fragment, tmp_path)


@needs_data
def test_failures_after_the_claim_leave_nothing_behind(tmp_path, tokenizer_path):
    save_pretrained(create_model(tiny_cfg(), seed=0), tmp_path / "model", tokenizer=tokenizer_path)
    for shard in (tmp_path / "model").glob("*.safetensors"):
        shard.write_bytes(b"\x00" * 8)  # weights corrupted after the config was read
    argv = ["--tasks", "medqa", "--limit", "1", "--out", str(tmp_path / "a" / "b" / "r.json")]
    refused(["--checkpoint", str(tmp_path / "model")] + argv, "model.safetensors: truncated or corrupt", tmp_path)
    # the memory check refuses a model that cannot fit, before allocating it
    message = refused(["--random-init", "--model", "llama2-70b", "--precision", "fp32", "--tokenizer",
                       str(LLAMA_TOKENIZER)] + argv, "not enough memory on cpu", tmp_path)
    assert "--no-memory-check" in message
    assert not (tmp_path / "a").exists()


def test_out_claim_is_taken_at_start_and_only_the_claim_is_replaced(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    with er.claimed_output(out) as claim:
        assert json.loads(out.read_text())["running"]["pid"] == os.getpid()
        with pytest.raises(er.DataError, match="r.json exists; refusing"):  # a second run with the same --out
            with er.claimed_output(out):
                pass
        claim.write('{"done": 1}\n')
    assert json.loads(out.read_text()) == {"done": 1}
    # someone replaces the file during the run: it is left alone
    other = tmp_path / "o.json"
    with er.claimed_output(other) as claim:
        other.unlink()
        other.write_text("theirs")
        with pytest.raises(er.DataError, match="replaced or removed by someone else"):
            claim.write("mine")
    assert other.read_text() == "theirs"
    # an interrupted run removes its placeholder; a placeholder of a dead process is taken over with a note
    with pytest.raises(KeyboardInterrupt):
        with er.claimed_output(tmp_path / "k.json"):
            raise KeyboardInterrupt
    assert not (tmp_path / "k.json").exists()
    stale = tmp_path / "s.json"
    stale.write_text(json.dumps({"running": {"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "started": "x"}}))
    with er.claimed_output(stale) as claim:
        claim.write("{}")
    assert "taking over the placeholder of process" in capsys.readouterr().err and stale.read_text() == "{}"
    # a folder this process cannot write fails at once (simulated: the tests may run as root)
    monkeypatch.setattr(er.os, "access", lambda *a: False)
    with pytest.raises(er.DataError, match="is not writable"):
        with er.claimed_output(tmp_path / "ro" / "r.json"):
            pass
    assert not (tmp_path / "ro").exists()


def test_read_only_out_folder_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(er.os, "access", lambda *a: False)
    refused(["--compare", result_file(tmp_path / "a.json", {"medqa": {"accuracy": 0.5}}), "--compare-out",
             str(tmp_path / "d.csv")], "the folder", tmp_path)
