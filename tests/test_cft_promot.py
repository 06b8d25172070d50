"""ProMoT as the paper has it: prompt length 100 by default, the soft prompt initialised from sampled vocabulary
embeddings, each stage with its own steps and learning rate, best-checkpoint selection per stage on held-out target
data (--promot-select), the 1-shot variant, and the prompt removed for every held-out evaluation."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cft
import data
import promot
from conftest import _generated_sentences, cft_argv, printed_by, tiny_run_inputs
from distributed import Dist
from hf_checkpoint import load_pretrained
from pharmacology import make_world, world_questions

TRAIN = ["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--device", "cpu",
         "--no-progress", "--heldout-fraction", "0.2", "--promot-prompt-len", "4", "--promot-lr", "3e-2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    return tiny_run_inputs(tmp_path_factory.mktemp("cft-promot"), tokenizer_path, 40)


def args(setup: Path, out: Path, *extra) -> list[str]:
    return cft_argv(setup, out, TRAIN, *extra)


def quietly(argv) -> str:
    return printed_by(cft.main, argv)


def test_the_papers_defaults():
    cfg = cft.parse_cft_args(["--data", "x.jsonl"])
    assert (cfg.promot_prompt_len, cfg.promot_init, cfg.promot_select, cfg.promot_one_shot) == (100, "vocab", False,
                                                                                                False)
    assert promot.select_every("prompt", 5000, 0, 0) == 1000 and promot.select_every("model", 1000, 0, 0) == 100


def test_vocabulary_initialisation_samples_the_commonest_tokens(setup):
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    docs = [np.array(tok.encode(" ".join(_generated_sentences(5, seed=s))), np.int32) for s in range(20)]
    counts = np.bincount(np.concatenate(docs))
    common = promot.frequent_tokens(docs, limit=10)
    assert counts[common[0]] == counts.max() and all(counts[common[:-1]] >= counts[common[1:]])
    ids = promot.vocab_init_ids(docs, 12, seed=0)
    assert set(ids) <= set(promot.frequent_tokens(docs)) and len(set(ids)) == 12
    assert np.array_equal(ids, promot.vocab_init_ids(docs, 12, seed=0))  # seeded
    lm = cft.LanguageModel(load_pretrained(setup / "ckpt"), 12)
    promot.set_soft_prompt(lm, ids)
    torch.testing.assert_close(lm.soft_prompt.data, lm.model.embed_tokens.weight.data[torch.as_tensor(ids)])


def scores_of(lm, tokenizer, questions, monkeypatch) -> list[list[float]]:
    """The option scores cft.mcq_accuracy computes (captured where it turns them into predictions)."""
    captured = []
    real_predict = cft.predict
    monkeypatch.setattr(cft, "predict", lambda scores: captured.append(scores) or real_predict(scores))
    cft.mcq_accuracy(lm, tokenizer, questions, cft.parse_cft_args(["--precision", "fp32"]), Dist())
    return captured[0]


def test_the_soft_prompt_is_absent_from_held_out_evaluation(setup, monkeypatch):
    """A NaN soft prompt changes nothing in the closed-book scores (a held-out task), while the target-format loss,
    which keeps the prompt, turns NaN."""
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    questions = world_questions(make_world(0), 0)[:8]
    plain = cft.LanguageModel(load_pretrained(setup / "ckpt"))
    prompted = cft.LanguageModel(load_pretrained(setup / "ckpt"), 4)
    with torch.no_grad():
        prompted.soft_prompt.fill_(float("nan"))
    expected = scores_of(plain, tok, questions, monkeypatch)
    assert np.isfinite(expected).all() and scores_of(prompted, tok, questions, monkeypatch) == expected
    doc = np.array(tok.encode(" ".join(_generated_sentences(4))), np.int32)
    rows = data.domain_rows([doc], [[]], 48, tok.bos_id, tok.eos_id, tok.pad_id, seed=0, pack=False, n_soft=4)
    cfg = cft.parse_cft_args(["--precision", "fp32"])
    assert np.isnan(cft.heldout_loss(prompted, rows, cfg, Dist())) and np.isfinite(cft.heldout_loss(
        plain, data.domain_rows([doc], [[]], 48, tok.bos_id, tok.eos_id, tok.pad_id, seed=0, pack=False), cfg, Dist()))


def test_selection_keeps_the_best_of_planted_states(setup, tmp_path):
    """States with planted held-out losses: each stage ends with its best one loaded, whatever came after it; the
    snapshot named by the last checkpoint stays on disk until a checkpoint names a newer one."""
    lm = cft.LanguageModel(load_pretrained(setup / "ckpt"), 4)
    env = Dist()
    cft.make_optimizer(lm, "prompt", cft.parse_cft_args([]), env)
    selection = promot.Selection(tmp_path)
    planted = {1: 3.0, 2: 1.0, 3: 2.0, 4: 1.5}
    for step, loss in planted.items():
        with torch.no_grad():
            lm.soft_prompt.fill_(step)
        kept = selection.consider(lm, "prompt", step, loss, env)
        assert kept == (step in (1, 2))
        if step == 2:
            selection.checkpointed(env)
    assert sorted(p.name for p in (tmp_path / "selected").iterdir()) == ["prompt-step-2"]
    with torch.no_grad():
        lm.soft_prompt.fill_(99)
    assert selection.restore(lm, "prompt", env) == {"stage": "prompt", "step": 2, "loss": 1.0}
    assert torch.all(lm.soft_prompt == 2)
    cft.make_optimizer(lm, "model", cft.parse_cft_args([]), env)  # stage 2: the model's parameters, prompt frozen
    for step, loss in {5: 2.0, 6: 0.5, 7: 0.7}.items():
        with torch.no_grad():
            lm.model.norm.weight.fill_(step)
        selection.consider(lm, "model", step, loss, env)
    selection.checkpointed(env)  # a checkpoint names step 6: the prompt stage's snapshot may go
    assert sorted(p.name for p in (tmp_path / "selected").iterdir()) == ["model-step-6"]
    rng = torch.get_rng_state()
    assert selection.restore(lm, "model", env)["step"] == 6
    assert torch.all(lm.model.norm.weight == 6) and torch.all(lm.soft_prompt == 2)  # the frozen prompt untouched
    assert torch.equal(torch.get_rng_state(), rng)


def soft_prompt_at(checkpoint: Path) -> torch.Tensor:
    return load_file(checkpoint / "rank-0-of-1.safetensors")["model/soft_prompt"]


def test_select_keeps_each_stages_best_in_a_run(setup, tmp_path):
    select = ["--promot-prompt-steps", "3", "--max-steps", "2", "--promot-select", "--promot-select-prompt-every", "1",
              "--promot-select-model-every", "1"]
    printed = quietly(args(setup, tmp_path / "run", *select))
    records = cft.read_metrics(tmp_path / "run")
    for stage in ("prompt", "model"):
        evaluated = [r for r in records if r["stage"] == stage]
        assert all("heldout_loss" in r for r in evaluated)
        best = min(evaluated, key=lambda r: r["heldout_loss"])
        assert f"{stage} stage: keeping the state of step {best['step']} (held-out loss" in printed
    best_prompt = min((r for r in records if r["stage"] == "prompt"), key=lambda r: r["heldout_loss"])["step"]
    quietly(args(setup, tmp_path / "upto", *select, "--stop-after", str(best_prompt)))
    final = load_file(tmp_path / "run" / "final" / "soft_prompt.safetensors")["soft_prompt"]
    assert torch.equal(final, soft_prompt_at(tmp_path / "upto" / "checkpoints" / f"step-{best_prompt}"))
    assert not (tmp_path / "run" / "selected").exists()


def test_one_shot_puts_an_example_between_soft_prompt_and_input(setup, tmp_path):
    tok = data.Tokenizer(setup / "ckpt" / "tokenizer.model")
    texts, _ = data.read_corpus(setup / "corpus.jsonl")
    cfg = cft.parse_cft_args(args(setup, tmp_path / "o", "--promot-one-shot", "--no-pack", "--method", "cpt"))
    cfg.cache_dir = str(setup / "cache")
    train = cft.prepare_data(cfg, "cpt", texts, tok, None, Dist(), 4)
    shots = promot.document_shots(train.docs, tok, cfg.seed)
    assert len(shots) == 8
    for tokens, loss in zip(train.rows.tokens, train.rows.loss):
        assert list(tokens[:5]) == [data.SOFT] * 4 + [tok.bos_id]
        shot = next(s for s in shots if list(tokens[5:5 + len(s)]) == s)  # CPT: the example, then the text
        assert not loss[:5 + len(shot)].any() and loss[5 + len(shot)]


def test_prompt_tuning_alone_leaves_the_model_unchanged(setup, tmp_path):
    quietly(args(setup, tmp_path / "pt", "--promot-prompt-steps", "2", "--max-steps", "0", "--promot-init",
                 "cft-prompt"))
    assert [r["stage"] for r in cft.read_metrics(tmp_path / "pt")] == ["prompt", "prompt"]
    a, b = load_file(setup / "ckpt" / "model.safetensors"), load_file(tmp_path / "pt" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(tmp_path / "pt" / "final" / "soft_prompt.safetensors")["soft_prompt"].shape == (4, 64)
