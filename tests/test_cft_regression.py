"""cft_regression.py: the settings and recipes, the prompt constructions and the context probes, the two inner
products (query copy; tied x, against the official code's computation done literally), and the learned-position
prompt layout. No pretraining here (tests/test_synthetic.py trains)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded

import cft_regression as C
import icl_regression as R

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# Settings and recipes


def test_official_recipe_and_relu_steps():
    fast = C.SYNTHETIC_PRESETS["full"]
    assert (fast.recipe, fast.finetune_steps, fast.finetune_batch, fast.finetune_lr, fast.finetune_warmup) == (
        "fast", 1500, 128, 2e-4, 50)
    assert fast.finetune_bf16 and fast.finetune_clip == 1.0 and fast.steps_for("relu") == 1500
    official = C.with_recipe(fast, "official")
    assert (official.recipe, official.finetune_steps, official.finetune_batch, official.finetune_lr,
            official.finetune_warmup, official.finetune_bf16, official.finetune_clip) == (
        "official", 50_000, 64, 1e-4, 0, False, 0.0)
    assert official.steps_for("polynomial") == 50_000 and official.steps_for("relu") == 100_000
    # the backbone and pretraining are untouched by the recipe
    assert {k: v for k, v in dataclasses.asdict(official).items() if k in dataclasses.asdict(R.REGRESSION_PRESETS[
        "full"])} == dataclasses.asdict(R.REGRESSION_PRESETS["full"])
    assert C.with_recipe(C.SYNTHETIC_PRESETS["quick"], "fast") == C.SYNTHETIC_PRESETS["quick"]


@pytest.mark.parametrize("change,message", [
    ({"finetune_steps": 0}, "finetune_steps = 0: must be positive"),
    ({"seeds": -1}, "seeds = -1: must be positive"),
    ({"finetune_lr": float("nan")}, "finetune_lr = nan: must be a positive number"),
    ({"dim": 65}, "dim = 65 is not divisible by n_heads = 4"),
    ({"position": "alibi"}, "position 'alibi'"),
    ({"n_points": "7"}, "n_points = '7': expected int"),
    ({"fresh_context": 1}, "fresh_context = 1: expected bool"),
])
def test_validate_names_the_bad_setting(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(C.SYNTHETIC_PRESETS["test"], **change).validate()


def test_learned_backbone_config():
    cfg = dataclasses.replace(C.SYNTHETIC_PRESETS["full"], position="learned")
    model_cfg = cfg.model_config()
    assert model_cfg.positions == "learned" and model_cfg.max_seq_len >= 2 * 41 * 2 + 1
    model = R.build_regression_model(dataclasses.replace(C.SYNTHETIC_PRESETS["test"], position="learned"), 0)
    assert model.backbone.embed_positions.weight.requires_grad  # trained, unlike the unused token embedding


# ----------------------------------------------------------------------------------------------------------------------
# Prompt constructions and probes


def test_cpt_prompt_has_no_context():
    batch = R.sample_tasks("polynomial", 4, 6, 3, seeded())
    prompt = C.build_prompt("cpt", batch, seeded(1))
    assert prompt.n_context == 0 and prompt.first_position == 0 and not prompt.context_is_query
    assert torch.equal(prompt.xs, batch.xs) and torch.equal(prompt.ys, batch.values())
    # on learned positions the queries sit where the official code's masked context half puts them
    assert C.build_prompt("cpt", batch, seeded(1), official_cpt_positions=True).first_position == 12


def test_cft_context_repeats_query_xs_with_base_labels():
    batch = R.sample_tasks("sumdot", 4, 6, 3, seeded())
    prompt = C.build_prompt("cft", batch, seeded(1))
    assert prompt.n_context == 6 and prompt.xs.shape == (4, 12, 3) and prompt.context_is_query
    assert torch.equal(prompt.xs[:, :6], prompt.xs[:, 6:]) and torch.equal(prompt.xs[:, 6:], batch.xs)
    assert torch.equal(prompt.ys[:, :6], batch.base()) and torch.equal(prompt.ys[:, 6:], batch.values())
    # --fresh-context: new x's, still labelled by the same f
    fresh = C.build_prompt("cft", batch, seeded(1), fresh_context=True)
    assert not fresh.context_is_query and not torch.isclose(fresh.xs[:, :6], batch.xs).any()
    assert torch.allclose(fresh.ys[:, :6], batch.base(fresh.xs[:, :6]))
    assert torch.equal(fresh.ys[:, 6:], batch.values())


@pytest.mark.parametrize("matched", [False, True])
def test_neg_cft_context_labels_are_noise(matched):
    d = 16
    batch = R.sample_tasks("polynomial", 2000, 5, d, seeded())
    prompt = C.build_prompt("neg-cft", batch, seeded(1), matched_noise=matched)
    noise, f = prompt.ys[:, :5], batch.base()
    assert torch.equal(prompt.xs[:, :5], batch.xs) and torch.equal(prompt.ys[:, 5:], batch.values())
    assert abs(noise.std().item() - (math.sqrt(d) if matched else 1.0)) < 0.05 * (math.sqrt(d) if matched else 1.0)
    correlation = torch.corrcoef(torch.stack([noise.flatten(), f.flatten()]))[0, 1]
    assert abs(correlation) < 0.03  # independent of the task


def test_permuted_context_keeps_pairs_and_queries():
    batch = R.sample_tasks("polynomial", 64, 6, 3, seeded())
    prompt = C.build_prompt("cft", batch, seeded(1))
    permuted = C.permute_context(prompt, seeded(2))
    assert torch.equal(permuted.xs[:, 6:], prompt.xs[:, 6:]) and torch.equal(permuted.ys[:, 6:], prompt.ys[:, 6:])
    # every context pair is intact (label = f(its x)) and each row holds the same pairs in another order
    assert torch.allclose(permuted.ys[:, :6], batch.base(permuted.xs[:, :6]), atol=1e-6)
    assert torch.equal(permuted.ys[:, :6].sort(dim=1).values, prompt.ys[:, :6].sort(dim=1).values)
    moved = (permuted.xs[:, :6] != prompt.xs[:, :6]).any(-1).float().mean()
    assert moved > 0.6  # a random permutation of 6 leaves 1/6 in place on average
    assert not permuted.context_is_query


# ----------------------------------------------------------------------------------------------------------------------
# The inner products


class KnownGradientModel(torch.nn.Module):
    """pred_t = u^T x_t + (x_t . x_{t-1}) + s^T sum_{j<t} x_j: d pred_t / d x_t = u + x_{t-1} exactly, and the model
    also depends on earlier x's (through which the tied computation also differentiates)."""

    def __init__(self, u, s):
        super().__init__()
        self.u, self.s = u, s

    def forward(self, xs, ys):
        previous = torch.cat([torch.zeros_like(xs[:, :1]), xs[:, :-1]], dim=1)
        earlier = torch.cumsum(xs, dim=1) - xs
        return xs @ self.u + (xs * previous).sum(-1) + earlier @ self.s + 0 * ys


@pytest.mark.parametrize("task,method", [("polynomial", "cpt"), ("relu", "cft"), ("sumdot", "neg-cft")])
def test_query_inner_product_against_known_gradient(task, method):
    d = 4
    batch = R.sample_tasks(task, 64, 5, d, seeded())
    prompt = C.build_prompt(method, batch, seeded(1))
    u, s = torch.randn(d, generator=seeded(2)), torch.randn(d, generator=seeded(3))
    got = C.inner_products(KnownGradientModel(u, s), prompt, batch, chunk=16)
    x, previous = prompt.xs[:, -1], prompt.xs[:, -2]
    model_grad = u + previous
    f = (x * batch.w).sum(-1, keepdim=True)
    official = F.cosine_similarity(model_grad, (1 + 2 * f) * batch.w, dim=-1).mean()
    true_grad = {"polynomial": (1 + 2 * f) * batch.w, "relu": (f > 0) * batch.w, "sumdot": batch.w + batch.v}[task]
    keep = true_grad.norm(dim=-1) > 0
    true = F.cosine_similarity(model_grad[keep], true_grad[keep], dim=-1).mean()
    assert got["inner_product_query"] == pytest.approx(official.item(), abs=1e-5)
    assert got["inner_product_query_true"] == pytest.approx(true.item(), abs=1e-5)
    # the tied x adds the context copy's gradient, s (it enters the last prediction through the running sum)
    tied = model_grad + (s if method != "cpt" else 0)
    assert got["inner_product_tied"] == pytest.approx(
        F.cosine_similarity(tied, (1 + 2 * f) * batch.w, dim=-1).mean().item(), abs=1e-5)
    # a model that is the task itself scores 1 with the task's own gradient
    oracle = lambda xs, ys: dataclasses.replace(batch, xs=xs).values(xs)
    assert C.inner_products(oracle, prompt, batch)["inner_product_query_true"] == pytest.approx(1.0, abs=1e-5)


def official_inner_product(model, prompt: C.Prompt, batch) -> float:
    """The official code's computation (src/train.py), literally: per sample, the Jacobian of the last query's
    prediction with respect to the tied x's (both copies when the context repeats them), rows L2-normalised, the
    last row against the normalised (1 + 2 w^T x_last) w, averaged over the samples."""
    k = batch.xs.shape[1]
    total = 0.0
    for b in range(len(batch.xs)):
        def last_prediction(x):
            xs = torch.cat([x, x], dim=1) if prompt.context_is_query else torch.cat([prompt.xs[b:b + 1, :-k], x], 1)
            return C.prompt_predictions(model, dataclasses.replace(prompt, xs=xs, ys=prompt.ys[b:b + 1]))[:, -1]
        jacobian = torch.autograd.functional.jacobian(last_prediction, batch.xs[b:b + 1].clone())
        rows = F.normalize(jacobian[0, 0], p=2, dim=1)
        w = batch.w[b]  # official: intermediate = 2 (xs @ w_b); projection = w_b + intermediate[:, -1] w_b
        projection = F.normalize(w + 2 * (batch.xs[b, -1] @ w) * w, dim=0)
        total += (rows @ projection)[-1].item()
    return total / len(batch.xs)


@pytest.mark.parametrize("method,fresh", [("cft", False), ("neg-cft", False), ("cft", True), ("cpt", False)])
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_tied_inner_product_is_the_official_computation(method, fresh, position):
    cfg = dataclasses.replace(C.SYNTHETIC_PRESETS["test"], position=position, fresh_context=fresh)
    model = R.build_regression_model(cfg, 3).eval()
    prompt, batch = C.sample_prompt(cfg, "polynomial", method, 6, seeded(4))
    ours = C.inner_products(model, prompt, batch, chunk=4)
    assert ours["inner_product_tied"] == pytest.approx(official_inner_product(model, prompt, batch), abs=1e-5)
    if not prompt.context_is_query:
        assert ours["inner_product_tied"] == ours["inner_product_query"]
    else:
        assert ours["inner_product_tied"] != pytest.approx(ours["inner_product_query"], abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Learned positions and the evaluation


def test_learned_positions_see_absolute_offsets_and_cpt_sits_after_the_context():
    cfg = dataclasses.replace(C.SYNTHETIC_PRESETS["test"], position="learned")
    model = R.build_regression_model(cfg, 0).eval()
    with torch.no_grad():
        model.backbone.embed_positions.weight.normal_(0, 1.0, generator=seeded(5))
        prompt, batch = C.sample_prompt(cfg, "polynomial", "cpt", 4, seeded(6))
        assert prompt.first_position == 2 * cfg.n_points
        at_zero = model(prompt.xs, prompt.ys)
        official = C.prompt_predictions(model, prompt)
        explicit = model(prompt.xs, prompt.ys, positions=torch.arange(2 * cfg.n_points) + 2 * cfg.n_points)
    assert torch.equal(official, explicit) and not torch.allclose(official, at_zero, atol=1e-3)


def test_evaluate_run_reports_probes_for_context_methods():
    cfg = dataclasses.replace(C.SYNTHETIC_PRESETS["test"], eval_prompts=300)
    model = R.build_regression_model(cfg, 0).eval()
    for method in C.FINETUNE_METHODS:
        result = C.evaluate_run(model, cfg, "relu", method, 0, "cpu")
        assert len(result["mse_by_position"]) == cfg.n_points and math.isfinite(result["mse"])
        for key in ("inner_product_query", "inner_product_tied", "inner_product_query_true",
                    "inner_product_tied_true"):
            assert -1 <= result[key] <= 1, (method, key)
        assert ("mse_permuted_context" in result) == ("mse_fresh_context" in result) == (method != "cpt")
    # the probes draw from their own stream: the main measurement is that of the prompts alone
    gen, errors = R.generator("cpu", 0, "eval", "relu"), []
    with torch.no_grad():
        for size in (256, 44):
            errors.append(C.squared_errors(model, C.sample_prompt(cfg, "relu", "cft", size, gen)[0]))
    result = C.evaluate_run(model, cfg, "relu", "cft", 0, "cpu")
    assert result["mse"] == pytest.approx(torch.cat(errors).mean().item(), rel=1e-6)
