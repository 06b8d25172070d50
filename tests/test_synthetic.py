"""synthetic.py: prompt constructions, the inner-product metric, resume of pretraining and fine-tuning, the CLI's
errors, and the end-to-end claim at test scale (CFT beats CPT on the polynomial class)."""
import dataclasses
import json
import math

import pytest
import torch
from conftest import seeded

import icl_regression as R
import synthetic as S

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# Prompt constructions


def test_cpt_prompt_has_no_context():
    batch = R.sample_tasks("polynomial", 4, 6, 3, seeded())
    prompt = S.build_prompt("cpt", batch, seeded(1))
    assert prompt.n_context == 0
    assert torch.equal(prompt.xs, batch.xs) and torch.equal(prompt.ys, batch.values())


def test_cft_context_repeats_query_xs_with_base_labels():
    batch = R.sample_tasks("sumdot", 4, 6, 3, seeded())
    prompt = S.build_prompt("cft", batch, seeded(1))
    assert prompt.n_context == 6 and prompt.xs.shape == (4, 12, 3)
    assert torch.equal(prompt.xs[:, :6], prompt.xs[:, 6:]) and torch.equal(prompt.xs[:, 6:], batch.xs)
    assert torch.equal(prompt.ys[:, :6], batch.base()) and torch.equal(prompt.ys[:, 6:], batch.values())
    # --fresh-context: new x's, still labelled by the same f
    fresh = S.build_prompt("cft", batch, seeded(1), fresh_context=True)
    assert not torch.isclose(fresh.xs[:, :6], batch.xs).any()
    assert torch.allclose(fresh.ys[:, :6], batch.base(fresh.xs[:, :6]))
    assert torch.equal(fresh.ys[:, 6:], batch.values())


@pytest.mark.parametrize("matched", [False, True])
def test_neg_cft_context_labels_are_noise(matched):
    d = 16
    batch = R.sample_tasks("polynomial", 2000, 5, d, seeded())
    prompt = S.build_prompt("neg-cft", batch, seeded(1), matched_noise=matched)
    noise, f = prompt.ys[:, :5], batch.base()
    assert torch.equal(prompt.xs[:, :5], batch.xs) and torch.equal(prompt.ys[:, 5:], batch.values())
    assert abs(noise.std().item() - (math.sqrt(d) if matched else 1.0)) < 0.05 * (math.sqrt(d) if matched else 1.0)
    correlation = torch.corrcoef(torch.stack([noise.flatten(), f.flatten()]))[0, 1]
    assert abs(correlation) < 0.03  # independent of the task


# ----------------------------------------------------------------------------------------------------------------------
# The inner-product metric


class KnownGradientModel(torch.nn.Module):
    """pred_t = u^T x_t + (x_t . x_{t-1}) + s^T sum_{j<t} x_j: d pred_t / d x_t = u + x_{t-1} exactly, and the model
    also depends on earlier x's (which the metric must not differentiate)."""

    def __init__(self, u, s):
        super().__init__()
        self.u, self.s = u, s

    def forward(self, xs, ys):
        previous = torch.cat([torch.zeros_like(xs[:, :1]), xs[:, :-1]], dim=1)
        earlier = torch.cumsum(xs, dim=1) - xs
        return xs @ self.u + (xs * previous).sum(-1) + earlier @ self.s + 0 * ys


@pytest.mark.parametrize("task,method", [("polynomial", "cpt"), ("relu", "cft"), ("sumdot", "neg-cft")])
def test_inner_product_against_known_gradient(task, method):
    d = 4
    batch = R.sample_tasks(task, 64, 5, d, seeded())
    prompt = S.build_prompt(method, batch, seeded(1))
    u, s = torch.randn(d, generator=seeded(2)), torch.randn(d, generator=seeded(3))
    got = S.inner_products(KnownGradientModel(u, s), prompt, batch)
    x, previous = prompt.xs[:, -1], prompt.xs[:, -2]
    model_grad = u + previous
    f = (x * batch.w).sum(-1, keepdim=True)
    official = torch.nn.functional.cosine_similarity(model_grad, (1 + 2 * f) * batch.w, dim=-1).mean()
    true_grad = {"polynomial": (1 + 2 * f) * batch.w, "relu": (f > 0) * batch.w, "sumdot": batch.w + batch.v}[task]
    keep = true_grad.norm(dim=-1) > 0
    true = torch.nn.functional.cosine_similarity(model_grad[keep], true_grad[keep], dim=-1).mean()
    assert got["inner_product"] == pytest.approx(official.item(), abs=1e-5)
    assert got["inner_product_true"] == pytest.approx(true.item(), abs=1e-5)
    # a model that is the task itself scores 1 with the task's own gradient
    oracle = lambda xs, ys: dataclasses.replace(batch, xs=xs).values(xs)
    assert S.inner_products(oracle, prompt, batch)["inner_product_true"] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The model


# ----------------------------------------------------------------------------------------------------------------------
# Resume and the end-to-end run


def small_cfg(**overrides):
    return dataclasses.replace(S.SYNTHETIC_PRESETS["test"], pretrain_steps=12, warmup_steps=3, curriculum_dims=1,
                               curriculum_points=3, curriculum_every=4, finetune_steps=6, metric_every=2, **overrides)


def state(path):
    return R.load_regression_model(path)[0].state_dict()


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small_cfg()
    assert R.pretrain(cfg, tmp_path / "a", "cpu")
    assert not R.pretrain(cfg, tmp_path / "b", "cpu", stop_at=5)  # paused mid-curriculum, optimizer state saved
    assert R.read_meta(tmp_path / "b" / "pretrain")["step"] == 5
    assert R.pretrain(cfg, tmp_path / "b", "cpu")
    for name, tensor in state(tmp_path / "a" / "pretrain").items():
        assert torch.equal(tensor, state(tmp_path / "b" / "pretrain")[name]), name
    # fine-tuning: the same, including the recorded inner-product history and the evaluation
    assert S.finetune(cfg, tmp_path / "a", "relu", "cft", [0], "cpu")
    assert not S.finetune(cfg, tmp_path / "b", "relu", "cft", [0], "cpu", stop_at=3)
    assert S.finetune(cfg, tmp_path / "b", "relu", "cft", [0], "cpu")
    run_a, run_b = (tmp_path / x / "finetune" / "relu-cft-s0" for x in "ab")
    for name, tensor in state(run_a).items():
        assert torch.equal(tensor, state(run_b)[name]), name
    assert R.read_meta(run_a)["history"] == R.read_meta(run_b)["history"]
    assert (run_a / "eval.json").read_text() == (run_b / "eval.json").read_text()


def test_config_clash_and_missing_pretrain_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no finished pretraining checkpoint"):
        S.main(["finetune", "--out", str(tmp_path), "--preset", "test", "--task", "relu", "--method", "cft"])
    with pytest.raises(SystemExit, match=r"other settings: preset='quick' \(stored 'test'\)"):
        S.main(["all", "--quick", "--out", str(tmp_path)])


def test_quick_run_cft_beats_cpt_on_polynomial(tmp_path):
    """The paper's headline at test scale, through the CLI: pretrain, the whole grid, results.json."""
    S.main(["all", "--preset", "test", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(S.FINETUNE_TASKS) and all(set(r) == set(S.FINETUNE_METHODS) for r in results.values())
    for by_method in results.values():
        for r in by_method.values():
            assert math.isfinite(r["mse"]) and -1 <= r["inner_product"] <= 1
    poly = results["polynomial"]
    assert poly["cft"]["mse"] < 0.7 * poly["cpt"]["mse"], poly
    assert poly["cft"]["mse"] < 0.7 * poly["neg-cft"]["mse"], poly
    assert (tmp_path / "results.md").read_text().count("| polynomial |") == 3
    assert (tmp_path / "inner_product.csv").is_file()
    # re-running a finished run does no work and changes nothing, also when the weights were not copied along
    before = (tmp_path / "results.json").read_text()
    for weights in tmp_path.glob("finetune/*/model.safetensors"):
        weights.unlink()
    S.main(["all", "--preset", "test", "--out", str(tmp_path)])
    assert (tmp_path / "results.json").read_text() == before
    assert "| polynomial | cft |" in (tmp_path / "results.md").read_text()
    assert len((tmp_path / "inner_product.csv").read_text().splitlines()) == 1 + 9 * 3  # 3 records per run
