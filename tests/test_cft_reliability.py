"""cft.py on bad input: every case ends in one line `error: ...` naming the flag or file, exit status 1, and nothing
the user had (corpus, prompts, the --out folder or its absence) is changed. Run in-process; two cases also as a real
process (exit status and stderr)."""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cft
from conftest import ROOT, _generated_sentences, tiny_cfg
from hf_checkpoint import save_pretrained
from model import create_model

TRAIN = ["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3", "--lr", "1e-3",
         "--device", "cpu", "--no-progress", "--heldout-fraction", "0.1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    """A tiny HF checkpoint with its tokenizer, a corpus, and a run stopped with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("cft-bad")
    save_pretrained(create_model(tiny_cfg(512), seed=0), root / "ckpt")
    shutil.copy(tokenizer_path, root / "ckpt" / "tokenizer.model")
    lines = [json.dumps({"text": " ".join(_generated_sentences(3 + i % 5, seed=i))}) for i in range(30)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    cft.main(argv(root, root / "stopped", "--save-every", "1", "--stop-after", "2"))
    return root


def argv(base: Path, out: Path, *extra) -> list[str]:
    return ["--checkpoint", str(base / "ckpt"), "--data", str(base / "corpus.jsonl"), "--out", str(out),
            "--cache-dir", str(base / "cache"), *TRAIN, *extra]


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder` with its content hash: what the user has."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def write_gz(path: Path, text: str, cut: int | None = None) -> Path:
    raw = gzip.compress(text.encode())
    path.write_bytes(raw[:cut] if cut else raw)
    return path


def stopped_run(base: Path, user: Path) -> Path:
    """A copy of the stopped run in the user's folder, to damage."""
    shutil.copytree(base / "stopped", user / "run")
    return user / "run"


def corpus_lines(base: Path) -> str:
    return (base / "corpus.jsonl").read_text()


# Each case: (id, a function (base, user folder) -> (argv, expected fragment)). The user folder is snapshotted.
def case_data(name, make, fragment):
    return name, lambda b, u: (argv(b, u / "out", "--data", str(make(b, u))), fragment)


def case_flags(name, flags, fragment):
    return name, lambda b, u: (argv(b, u / "out", *flags), fragment)


def case_file_flag(name, flag, make, fragment, *more):
    return name, lambda b, u: (argv(b, u / "out", flag, str(make(b, u)), *more), fragment)


def case_resume(name, damage, fragment, *more):
    def build(b, u):
        run = stopped_run(b, u)
        damage(b, run)
        return argv(b, run, "--resume", *more), fragment
    return name, build


def changed_corpus(b: Path, u: Path):
    """The run's corpus file replaced by another one at the same path (here: the run's record names the user's copy,
    whose content then changes)."""
    run = stopped_run(b, u)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"data": str(u / "corpus.jsonl")}, indent=1))
    (u / "corpus.jsonl").write_text(corpus_lines(b).split("\n", 1)[1])  # one document fewer
    args = argv(b, run, "--resume")
    args[args.index("--data") + 1] = str(u / "corpus.jsonl")
    return args, "the training data differ from those of"


def planted_config(body):
    def make(b, u):
        folder = u / "badckpt"
        shutil.copytree(b / "ckpt", folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(body(config)))
        return folder
    return make


CASES = [
    # corpora: gzip, JSON, missing
    case_data("gz-truncated", lambda b, u: write_gz(u / "c.jsonl.gz", corpus_lines(b), cut=60), "c.jsonl.gz:"),
    case_data("gz-not-gzip", lambda b, u: (u / "c.jsonl.gz").write_text(corpus_lines(b)) and u / "c.jsonl.gz",
              "Not a gzipped file"),
    case_data("txt-gz-not-gzip", lambda b, u: (u / "d").mkdir() or (u / "d" / "a.txt.gz").write_text("text")
              and u / "d", "unreadable"),
    case_data("json-gz-truncated", lambda b, u: write_gz(u / "c.json.gz", json.dumps(
        [{"text": t} for t in _generated_sentences(50)]), cut=80), "c.json.gz: unreadable"),
    case_data("corpus-missing", lambda b, u: u / "nope.jsonl", "nope.jsonl: no such file"),
    case_data("corpus-folder-empty", lambda b, u: (u / "e").mkdir() or u / "e", "no corpus files"),
    case_data("corpus-bad-json", lambda b, u: (u / "c.jsonl").write_text('{"text": "a"}\n{oops\n') and u / "c.jsonl",
              "c.jsonl:2: not valid JSON"),
    case_data("corpus-empty", lambda b, u: (u / "c.jsonl").write_text("\n") and u / "c.jsonl", "empty corpus"),
    case_flags("text-field", ["--text-field", "body"], "corpus.jsonl:1: no field 'body'"),
    # --prompts
    case_file_flag("prompts-empty", "--prompts", lambda b, u: (u / "p.txt").write_text("\n\n") and u / "p.txt",
                   "p.txt: no prompts found"),
    case_file_flag("prompts-bad-json", "--prompts", lambda b, u: (u / "p.json").write_text('["a", ') and u / "p.json",
                   "not a valid JSON list of prompts"),
    case_file_flag("prompts-not-strings", "--prompts", lambda b, u: (u / "p.json").write_text('["a", 3]')
                   and u / "p.json", "expected a JSON list of strings"),
    case_file_flag("prompts-not-utf8", "--prompts", lambda b, u: (u / "p.txt").write_bytes(b"\xff\xfe bad\n")
                   and u / "p.txt", "p.txt: not UTF-8 text"),
    case_file_flag("prompts-missing", "--prompts", lambda b, u: u / "p.txt", "--prompts: "),
    # --instruct-data / --general-data
    case_file_flag("instruct-missing", "--instruct-data", lambda b, u: u / "i.jsonl", "--instruct-data: "),
    case_file_flag("instruct-bad-json", "--instruct-data", lambda b, u: (u / "i.jsonl").write_text("{x\n")
                   and u / "i.jsonl", "i.jsonl:1: not valid JSON"),
    case_file_flag("instruct-no-response", "--instruct-data", lambda b, u: (u / "i.jsonl").write_text(
        '{"prompt": "q"}\n') and u / "i.jsonl", "no field 'response'"),
    case_file_flag("instruct-not-string", "--instruct-data", lambda b, u: (u / "i.jsonl").write_text(
        '{"prompt": "q", "response": 3}\n') and u / "i.jsonl", "field 'response' is int"),
    case_file_flag("instruct-too-long", "--instruct-data", lambda b, u: (u / "i.jsonl").write_text(json.dumps(
        {"prompt": "word " * 200, "response": "ok"}) + "\n") and u / "i.jsonl", "no instruction example fits"),
    case_file_flag("general-missing", "--general-data", lambda b, u: u / "g.jsonl", "--general-data: "),
    case_file_flag("general-no-field", "--general-data", lambda b, u: (u / "g.jsonl").write_text('{"body": "a"}\n')
                   and u / "g.jsonl", "g.jsonl:1: no field 'text'"),
    # numbers
    case_flags("batch-size-0", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    case_flags("micro-batch-size-0", ["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
    case_flags("batch-not-divisible", ["--batch-size", "3"], "must be a multiple of processes"),
    case_flags("batch-larger-than-rows", ["--batch-size", "200"], "training rows of 128 tokens for a global batch"),
    case_flags("heldout-fraction-1", ["--heldout-fraction", "1"],
               "--heldout-fraction 1.0: expected a number in [0, 1)"),
    case_flags("lr-nan", ["--lr", "nan"], "--lr nan"),
    case_flags("stop-after-0", ["--stop-after", "0"], "--stop-after 0: must be at least 1"),
    case_flags("max-steps-0", ["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    case_flags("seq-len-too-long", ["--seq-len", "1000"], "exceeds the model's max_seq_len 512"),
    case_flags("merge-without-lora", ["--merge-lora"], "--merge-lora needs --lora-rank"),
    case_flags("select-without-heldout", ["--promot-select", "--heldout-fraction", "0"], "pass --heldout-fraction"),
    case_flags("fp16", ["--precision", "fp16"], "training in fp16 needs loss scaling"),
    # --out
    case_flags("out-not-empty", [], "exists and is not empty"),
    # models and tokenizers
    case_flags("model-and-checkpoint", ["--model", "llama2-7b"], "pass either --model or --checkpoint"),
    case_flags("model-dir-alone", ["--model-dir", "/nowhere"], "--model-dir is where --model NAME is looked up"),
    case_file_flag("tokenizer-missing", "--tokenizer", lambda b, u: u / "t.model", "t.model: no such file"),
    case_file_flag("tokenizer-garbage", "--tokenizer", lambda b, u: (u / "t.model").write_text("junk") and
                   u / "t.model", "not a sentencepiece model"),
    ("checkpoint-zero-heads", lambda b, u: (argv(b, u / "out", "--checkpoint", str(planted_config(
        lambda c: c | {"num_attention_heads": 0})(b, u))), "num_attention_heads")),
    ("checkpoint-string-vocab", lambda b, u: (argv(b, u / "out", "--checkpoint", str(planted_config(
        lambda c: c | {"vocab_size": "512"})(b, u))), "vocab_size")),
    ("checkpoint-config-list", lambda b, u: (argv(b, u / "out", "--checkpoint", str(planted_config(
        lambda c: [c])(b, u))), "expected a JSON object")),
    # --resume: what the folder holds
    case_resume("resume-changed-lr", lambda b, r: None, "--lr is 0.01 but the run in", "--lr", "1e-2"),
    ("resume-changed-corpus", lambda b, u: changed_corpus(b, u)),
    case_resume("resume-state-not-json", lambda b, r: (r / "checkpoints/step-2/state.json").write_text("{"),
                "state.json: not valid JSON"),
    case_resume("resume-state-no-step", lambda b, r: (r / "checkpoints/step-2/state.json").write_text(
        json.dumps({"world_size": 1, "shapes": {}})), "no step or stage"),
    case_resume("resume-rank-file-missing", lambda b, r: (r / "checkpoints/step-2/rank-0-of-1.safetensors").unlink(),
                "rank-0-of-1.safetensors: missing"),
    case_resume("resume-rank-file-truncated", lambda b, r: (r / "checkpoints/step-2/rank-0-of-1.safetensors")
                .write_bytes((r / "checkpoints/step-2/rank-0-of-1.safetensors").read_bytes()[:500]),
                "damaged checkpoint"),
    case_resume("resume-step-best", lambda b, r: shutil.copytree(r / "checkpoints/step-2", r / "checkpoints/step-best"),
                "step-best: not a checkpoint name"),
    case_resume("resume-config-not-json", lambda b, r: (r / "config.json").write_text("{"), "config.json: not valid"),
    ("resume-missing-folder", lambda b, u: (argv(b, u / "out", "--resume"), "does not exist; leave out --resume")),
    ("resume-foreign-folder", lambda b, u: ((u / "out").mkdir() or (u / "out" / "notes.txt").write_text("x") and
                                            argv(b, u / "out", "--resume"), "is not a cft.py run folder")),
    ("stopped-run-without-resume", lambda b, u: (argv(b, stopped_run(b, u)), "stopped at step-2; pass --resume")),
]


@pytest.mark.parametrize("name, build", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_1_and_nothing_changes(base, tmp_path, name, build):
    user = tmp_path / "user"
    user.mkdir()
    args, fragment = build(base, user)
    if name == "out-not-empty":
        (user / "out").mkdir()
        (user / "out" / "mine.txt").write_text("user data")
    before = snapshot(user)
    with pytest.raises(SystemExit) as e:
        cft.main(args)
    message = e.value.code
    assert isinstance(message, str), "a SystemExit with a message exits with status 1"
    assert message.startswith("error: ") and "\n" not in message and fragment in message, message
    assert snapshot(user) == before


def test_at_least_thirty_bad_input_cases():
    assert len(CASES) >= 30


def test_a_real_process_prints_one_line_and_exits_1(base, tmp_path):
    extra, fragment = ["--data", "/nonexistent/corpus.jsonl"], "no such file"
    result = subprocess.run([sys.executable, str(ROOT / "cft.py"), *argv(base, tmp_path / "out", *extra)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert not (tmp_path / "out").exists()


def test_read_only_out_is_one_line_and_leaves_nothing(base, tmp_path, monkeypatch):
    """As root a chmod cannot stop a write, so the refusal of the file system is injected at the lock file."""
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(SystemExit, match=r"^error: --out .*ro: cannot write there \(Permission denied\)$"):
        cft.main(argv(base, tmp_path / "ro"))
    assert not (tmp_path / "ro").exists()


def test_out_that_is_a_file(base, tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        cft.main(argv(base, tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "mine"
