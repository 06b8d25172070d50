"""cft.py: loss masking, distributed equivalence (torchrun, FSDP2 on gloo), exact resume, ProMoT, auto-CFT, bad input."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cft
import data
import method_data
from conftest import ROOT, _generated_sentences, tiny_cfg, torchrun
from distributed import Dist
from hf_checkpoint import load_pretrained, save_pretrained
from model import create_model
from training import read_training_meta

# Small enough for seconds on 2 cores; micro-batches of 2 so that one process accumulates two of them.
TRAIN = ["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--lr", "1e-3",
         "--device", "cpu", "--no-progress", "--heldout-fraction", "0.2", "--eval-every", "2"]
# Generation before training (auto-CFT) is the case where FSDP2 must be told to shard the root again.
AUTO = ["--method", "auto-cft", "--auto-prompt-tokens", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    """A tiny random HF checkpoint with its tokenizer, a JSONL corpus, and a cache folder."""
    root = tmp_path_factory.mktemp("cft")
    ckpt = root / "ckpt"
    save_pretrained(create_model(tiny_cfg(512), seed=0), ckpt)
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(_generated_sentences(3 + i % 7, seed=i))}) + "\n")
    return root


def args(setup, out, *extra):
    return ["--checkpoint", str(setup / "ckpt"), "--data", str(setup / "corpus.jsonl"), "--out", str(out),
            "--cache-dir", str(setup / "cache"), *TRAIN, *extra]


def losses(out) -> list[float]:
    return [r["loss"] for r in cft.read_metrics(Path(out))]


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted single-process run."""
    out = setup / "reference"
    cft.main(args(setup, out, *AUTO))
    return out


def test_prompt_tokens_get_no_gradient(setup):
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    prompts = method_data.method_prompts("cft", tok, None)
    docs = [np.array(tok.encode(" ".join(_generated_sentences(4, seed=s))), np.int32) for s in range(3)]
    rows = data.domain_rows(docs, prompts, 160, tok.bos_id, tok.eos_id, tok.pad_id, seed=0, pack=True)
    batch = data.to_batch(rows, np.arange(len(rows)), "cpu")
    lm = cft.LanguageModel(load_pretrained(setup / "ckpt"))
    hidden = []

    def keep_hidden(h, targets):  # the final hidden state of position t feeds only the prediction of t + 1
        h.retain_grad()
        hidden.append(h)
        return lm.model.loss(h, targets)
    lm.token_loss = keep_hidden
    cft.loss_sum(lm, batch).backward()
    grad_norm = hidden[0].grad.norm(dim=-1)  # (B, T): gradient reaching each position's prediction
    next_tokens = torch.from_numpy(rows.tokens[:, 1:]).long()
    # Positions whose next token is a BOS or a prompt token (not a trained token, not padding).
    is_prompt_or_bos = torch.from_numpy(~rows.loss[:, 1:]) & (next_tokens != tok.pad_id)
    assert (grad_norm[is_prompt_or_bos] == 0).all()
    assert (grad_norm[batch["targets"] != -100] > 0).all()
    assert is_prompt_or_bos.sum() > 100


def test_torchrun_two_processes_equal_one(setup, reference):
    out = setup / "two"
    torchrun(ROOT / "cft.py", args(setup, out, *AUTO, "--micro-batch-size", "1", "--cache-dir", str(setup / "cache2")),
             cwd=ROOT)
    one, two = losses(reference), losses(out)
    assert len(one) == len(two) == 4
    prompts = [json.loads(p.read_text()) for c in ("cache", "cache2") for p in (setup / c).glob("auto-prompts-*.json")]
    assert len(prompts) == 2 and prompts[0] == prompts[1]  # the two processes generated what one did
    np.testing.assert_allclose(two, one, rtol=1e-5)
    heldout = lambda run: [r["heldout_loss"] for r in cft.read_metrics(run) if "heldout_loss" in r]
    assert len(heldout(reference)) == 2  # every 2 steps
    np.testing.assert_allclose(heldout(out), heldout(reference), rtol=1e-5)
    # The final HF folders agree too: FSDP gathered the shards correctly.
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_stop_and_resume_reproduce_the_uninterrupted_run_exactly(setup, reference):
    out = setup / "resumed"
    cft.main(args(setup, out, *AUTO, "--save-every", "1", "--stop-after", "3"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]  # older ones rotated out after step 3
    assert losses(out) == losses(reference)[:3]
    with pytest.raises(SystemExit, match="--lr is 0.01 but the run in"):
        cft.main(args(setup, out, *AUTO, "--resume", "--lr", "1e-2"))
    cft.main(args(setup, out, *AUTO, "--resume"))
    assert losses(out) == losses(reference)  # bit-identical, step 4 included
    final = out / "final"
    assert (final / "tokenizer.model").is_file() and load_pretrained(final).cfg == tiny_cfg(512)


def test_activation_checkpointing_changes_no_loss(setup, reference):
    out = setup / "checkpointed"
    cft.main(args(setup, out, *AUTO, "--activation-checkpointing"))
    np.testing.assert_allclose(losses(out), losses(reference), rtol=1e-6)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The built-in demo, 2 steps: (its folder, what it printed)."""
    root = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cft.main(["--out", str(root / "one"), "--max-steps", "2", "--no-progress", "--cache-dir", str(root / "cache")])
    return root, printed.getvalue()


def test_builtin_demo_runs_cft_beside_cpt(demo):
    printed = demo[1]
    assert "closed-book accuracy on 96 fictional-fact questions" in printed
    assert "\ncft " in printed and "\ncpt " in printed


PROMOT = ["--promot-prompt-steps", "2", "--promot-prompt-len", "4", "--max-steps", "2"]


@pytest.fixture(scope="module")
def promot_run(setup):
    out = setup / "promot"
    cft.main(args(setup, out, *PROMOT))
    return out


def test_torchrun_demo_with_activation_checkpointing_equals_one_process(demo):
    """FSDP2 with activation checkpointing (applied before sharding) trains as one process without it, and the
    closed-book scorer, which calls the blocks directly, runs under FSDP before and after training."""
    root, printed = demo
    torchrun(ROOT / "cft.py", ["--out", str(root / "two"), "--method", "cft", "--max-steps", "2", "--no-progress",
                               "--cache-dir", str(root / "cache"), "--activation-checkpointing"], cwd=ROOT)
    one, two = losses(root / "one" / "cft"), losses(root / "two")
    assert len(one) == len(two) == 2
    np.testing.assert_allclose(two, one, rtol=1e-5)
    a, b = (load_file(root / run / "final" / "model.safetensors") for run in ("one/cft", "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_promot_trains_the_soft_prompt_then_freezes_it(setup, promot_run):
    out = promot_run
    records = cft.read_metrics(out)
    assert [r["stage"] for r in records] == ["prompt", "prompt", "model", "model"]
    soft = load_file(out / "final" / "soft_prompt.safetensors")["soft_prompt"]
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    lm = cft.LanguageModel(load_pretrained(setup / "ckpt"), 4)
    cft.init_soft_prompt(lm, tok, data.CONTEXTUAL_PROMPTS["Focus on Key Concepts"])
    assert soft.shape == (4, 64) and not torch.allclose(soft, lm.soft_prompt)
    optimizer, params = cft.make_optimizer(lm, "prompt", cft.parse_cft_args([]), Dist())
    assert [p is lm.soft_prompt for p in params] == [True]
    optimizer, params = cft.make_optimizer(lm, "model", cft.parse_cft_args([]), Dist())
    assert all(p is not lm.soft_prompt for p in params) and not lm.soft_prompt.requires_grad


def test_promot_resumed_at_the_stage_boundary_reproduces_the_uninterrupted_run(setup, promot_run):
    out = setup / "promot-resumed"
    cft.main(args(setup, out, *PROMOT, "--stop-after", "2"))  # the last soft-prompt step
    saved = read_training_meta(out / "checkpoints" / "step-2")
    assert (saved["step"], saved["stage"]) == (2, "prompt")
    cft.main(args(setup, out, *PROMOT, "--resume"))
    assert [r["stage"] for r in cft.read_metrics(out)] == ["prompt", "prompt", "model", "model"]
    assert losses(out) == losses(promot_run)


def test_auto_cft_generates_one_cached_prompt_per_document(setup):
    cft.main(args(setup, setup / "auto", "--method", "auto-cft", "--max-steps", "1", "--auto-prompt-tokens", "6",
                  "--lora-rank", "4", "--merge-lora", "--cache-dir", str(setup / "cache3")))
    cached = list((setup / "cache3").glob("auto-prompts-*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == 40
    assert (setup / "auto" / "final" / "model.safetensors").is_file()  # LoRA merged into the HF folder


def test_instruction_data_mixed_or_as_a_second_stage(setup, tmp_path):
    instruct = tmp_path / "instruct.jsonl"
    instruct.write_text("".join(json.dumps({"prompt": f"Question {i}: what was reduced?", "response": " The dose."})
                                + "\n" for i in range(10)))
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    texts, _ = data.read_corpus(setup / "corpus.jsonl")
    base = cft.parse_cft_args(args(setup, tmp_path / "o", "--instruct-data", str(instruct), "--no-pack"))
    base.cache_dir = str(setup / "cache")
    stage = cft.prepare_data(base, "cft", texts, tok, None, Dist(), 0)
    domain_rows = stage.segments[0]
    assert stage.segments == [domain_rows, 10]  # second stage: the instruction rows come after all domain rows
    base.instruct_ratio = 0.5
    mixed = cft.prepare_data(base, "cft", texts, tok, None, Dist(), 0)
    assert mixed.segments == [2 * domain_rows] and len(mixed.rows) == 2 * domain_rows
    response = tok.encode(" The dose.") + [tok.eos_id]
    trained = [row[1:][loss[1:]].tolist() for row, loss in zip(mixed.rows.tokens[domain_rows:],
                                                                   mixed.rows.loss[domain_rows:])]
    assert all(t == response for t in trained)  # loss on the response only


@pytest.mark.parametrize("case", ["empty", "field", "out-exists", "vocab", "fp16", "long-prompt", "nan"])
def test_bad_input_stops_with_one_clear_line(setup, tmp_path, case):
    corpus = setup / "corpus.jsonl"
    extra = []
    if case == "empty":
        corpus = tmp_path / "empty.jsonl"
        corpus.write_text("\n")
        expected = "empty corpus"
    elif case == "field":
        extra = ["--text-field", "body"]
        expected = "corpus.jsonl:1: no field 'body'"
    elif case == "out-exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "precious.txt").write_text("user data")
        expected = "exists and is not empty"
    elif case == "vocab":
        other = tmp_path / "other.model"
        data.train_tokenizer(list(_generated_sentences(2000)), other, 600)
        extra = ["--tokenizer", str(other)]
        expected = "has 600 tokens but the model's vocabulary has 512"
    elif case == "fp16":
        extra = ["--precision", "fp16"]
        expected = "--precision fp16: training in fp16 needs loss scaling"
    elif case == "long-prompt":
        (tmp_path / "prompts.txt").write_text("Read this. " * 100 + "\n")
        extra = ["--prompts", str(tmp_path / "prompts.txt")]
        expected = "leaves no room for text in a row of 129 tokens"
    else:
        extra = ["--lr", "1e12", "--save-every", "1", "--max-steps", "6"]
        expected = "loss is nan"
    argv = args(setup, tmp_path / "out", *extra)
    argv[argv.index("--data") + 1] = str(corpus)
    with pytest.raises(SystemExit) as e:
        cft.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and expected in message
    if case == "out-exists":
        assert (tmp_path / "out" / "precious.txt").read_text() == "user data"
    if case == "nan":
        assert "last good checkpoint" in message and (tmp_path / "out" / "checkpoints").is_dir()


def test_flags_are_the_config_fields_and_the_demo_fills_only_flags_not_given():
    defaults = cft.CFTConfig()
    given = cft.parse_cft_args(["--data", "corpus.jsonl", "--seq-len", "64", "--no-pack", "--no-progress"])
    assert (given.seq_len, given.pack, given.progress, given.lr) == (64, False, False, defaults.lr)
    assert given.batch_size == 128 and given.max_steps is None  # the paper's settings with --data
    demo = cft.parse_cft_args(["--lr", "1e-3"])
    assert (demo.lr, demo.seq_len, demo.max_steps) == (1e-3, 256, 150)  # the demo's values where no flag was given
    assert cft.parse_cft_args(["--epochs", "2"]).max_steps is None  # epochs asked for: counted, not the demo's steps
    with pytest.raises(SystemExit):
        cft.parse_cft_args(["--precision", "float32"])


class OneRankOfTwo(Dist):
    """A rank of a two-process run without a process group: sum() hands back (and keeps) this rank's own part."""
    def sum(self, values):
        self.part = values
        return values


def test_heldout_loss_pads_a_rank_with_rows_that_add_no_loss(setup):
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    docs = [np.array(tok.encode(" ".join(_generated_sentences(4, seed=s))), np.int32) for s in range(3)]
    rows = data.domain_rows(docs, [[]], 48, tok.bos_id, tok.eos_id, tok.pad_id, seed=0, pack=False)
    rows = rows.take(np.arange(3))  # 3 rows over 2 ranks: rank 1 runs one real row and one padding row
    lm = cft.LanguageModel(load_pretrained(setup / "ckpt"))
    cfg = cft.parse_cft_args(["--micro-batch-size", "2", "--precision", "fp32"])
    whole = cft.heldout_loss(lm, rows, cfg, Dist())
    ranks = [OneRankOfTwo(rank=r, world=2) for r in (0, 1)]
    for env in ranks:
        cft.heldout_loss(lm, rows, cfg, env)
    (total0, count0), (total1, count1) = ranks[0].part, ranks[1].part
    assert count1 == int(rows.loss[1, 1:].sum())  # only row 1's targets: the padding row counted nothing
    assert count0 + count1 == int(rows.loss[:, 1:].sum())
    np.testing.assert_allclose((total0 + total1) / (count0 + count1), whole, rtol=1e-6)
