"""promot_regression.py: the prompt is absent from held-out evaluation, best-checkpoint selection, resume, the quick
reproduction's results.json (icl_regression's "test" backbone: the whole run in well under a minute)."""
import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import seeded

import icl_regression as icl
import promot_regression as P

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole reproduction at the test preset, pretraining included: (run folder, results.json)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("promot") / "run"
    assert P.main(["--preset", "test", "--out", str(out), "--device", "cpu"])
    yield out, json.loads((out / "results.json").read_text())
    torch.set_num_threads(threads)


def test_quick_reproduction_writes_results_json(tiny_run):
    out, results = tiny_run
    assert results["complete"] and set(results["arms"]) == set(P.ARMS)
    ks = [str(k) for k in P.PROMOT_PRESETS["test"].icl_k]
    for arm, summary in results["arms"].items():
        assert summary["seeds"] == P.PROMOT_PRESETS["test"].seeds, arm
        for key in ("target_mse", "leak_rate"):
            assert {"mean", "std"} <= set(summary[key]) and math.isfinite(summary[key]["mean"]), (arm, key)
        for key in ("icl_mse_before", "icl_mse_after"):
            assert list(summary[key]) == ks, (arm, key)
            assert all({"mean", "std"} <= set(summary[key][k]) for k in ks), (arm, key)
        assert summary["icl_mse_before"] == results["arms"]["ft"]["icl_mse_before"]  # one base model, same prompts
    # pt does not change the model and its prompt is removed: held-out numbers are the base model's
    assert results["arms"]["pt"]["icl_mse_after"] == results["arms"]["pt"]["icl_mse_before"]
    header = (out / "curves.csv").read_text().splitlines()[0]
    assert header.startswith("arm,seed,stage,step,fraction,target_val_mse") and (out / "results.md").is_file()
    # a second call finds everything done and changes nothing
    before = (out / "jobs" / "ft-s0" / "ft.json").read_text()
    assert P.main(["--out", str(out), "--device", "cpu"])
    assert (out / "jobs" / "ft-s0" / "ft.json").read_text() == before


def job_context(out, seed=0, **overrides):
    cfg = P.PromotConfig(**{**json.loads((out / "config.json").read_text()), **overrides})
    base, meta = P.load_base(cfg, out, "cpu")
    cfg = P.with_learning_rates(cfg, meta)
    shape = (meta["config"]["n_points"], meta["n_dims"])
    return P.JobContext(cfg, base.requires_grad_(False), P.seed_data(cfg, *shape, seed, "cpu"), seed,
                        torch.device("cpu"), math.inf, shape)


def test_prompt_is_absent_from_heldout_evaluation(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    ctx = job_context(out)
    n_tokens = 2 * ctx.shape[0]
    seen = {"heldout": [], "target": []}

    def recording(kind, function):
        def call(model, *args, **kwargs):
            hook = model.backbone.layers[0].register_forward_pre_hook(lambda m, a: seen[kind].append(a[0].shape[1]))
            try:
                return function(model, *args, **kwargs)
            finally:
                hook.remove()
        return call

    monkeypatch.setattr(P, "heldout_icl", recording("heldout", P.heldout_icl))
    monkeypatch.setattr(P, "target_metrics", recording("target", P.target_metrics))
    results = P.run_promot_job(ctx, tmp_path, ["pt", "promot"])
    # every held-out evaluation (curves of both stages, before and after) saw the bare prompt...
    assert seen["heldout"] and set(seen["heldout"]) == {n_tokens}
    # ...while the target task was evaluated with the soft prompt in front (the base model's "before" without)
    assert set(seen["target"]) == {n_tokens, n_tokens + ctx.cfg.prompt_len}
    promot = results["promot"]
    assert promot["icl_after"] != promot["icl_with_prompt"]  # leaving the prompt in would change the numbers


def test_predict_without_prompt_is_the_model_itself(tiny_run):
    out, _ = tiny_run
    ctx = job_context(out)
    prompts = ctx.data.val.subset(slice(0, 4))
    soft_prompt = P.init_regression_prompt(ctx.base, 3, seeded(0))
    with torch.no_grad():
        plain = P.predict_with_prompt(ctx.base, prompts.xs, prompts.ys)
        assert torch.equal(plain, ctx.base(prompts.xs, prompts.ys))
        prompted = P.predict_with_prompt(ctx.base, prompts.xs, prompts.ys, soft_prompt)
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain)


def test_best_checkpoint_selection_picks_the_planted_best():
    """Scores planted per step: the best checkpoint step wins; a better score at step 0 (the untrained start) or at a
    learning-curve step that is not a checkpoint is never selected."""
    layer = nn.Linear(1, 1, bias=False)
    steps, checkpoints, curve_points = 20, 4, 10  # checkpoints at 5, 10, 15, 20; curve every 2 steps
    planted = {0: -5.0, 5: 3.0, 10: 1.0, 15: 2.0, 20: 4.0, 4: -1.0, 12: -2.0}
    saves, curve = P.evaluation_steps(steps, checkpoints, curve_points)
    assert saves == {5, 10, 15, 20} and curve == {0, 2, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18, 20}
    order, weights = iter(sorted(curve)), {}

    def evaluate():
        step = next(order)
        weights[step] = layer.weight.item()
        return {"target_val_mse": planted.get(step, 10.0)}

    result = P.train_stage([layer.weight], lambda step: (layer.weight - 100.0).pow(2).sum(), evaluate, layer,
                           steps=steps, lr=0.1, checkpoints=checkpoints, curve_points=curve_points,
                           warmup_fraction=0.0, deadline=math.inf, device="cpu")
    assert sorted(weights) == sorted(curve) and len(set(weights.values())) == len(weights)
    assert result.best_step == 10 and result.best_score == 1.0
    assert result.best_state["weight"].item() == weights[10]
    assert [r["step"] for r in result.history] == sorted(weights)


def test_stage_one_is_saved_and_a_stopped_job_resumes_at_stage_two(tiny_run, tmp_path):
    out, _ = tiny_run
    uninterrupted = P.run_promot_job(job_context(out), tmp_path / "a", ["pt", "promot"])
    ctx = job_context(out)
    assert set(P.run_promot_job(ctx, tmp_path / "b", ["pt"])) == {"pt"}  # what a job stopped in stage 2 leaves
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"pt.json", "prompt.safetensors"}
    resumed = P.run_promot_job(job_context(out), tmp_path / "b", ["pt", "promot"])
    assert json.dumps(resumed["promot"]) == json.dumps(uninterrupted["promot"])


def test_budget_exhausted_inside_a_stage_writes_nothing(tiny_run, tmp_path):
    out, _ = tiny_run
    ctx = job_context(out)
    ctx.deadline = 0.0
    with pytest.raises(P.BudgetExhausted):
        P.run_promot_job(ctx, tmp_path, ["pt", "promot"])
    assert not any(tmp_path.iterdir())


def test_bad_settings_are_one_line_errors_and_write_nothing(tmp_path):
    with pytest.raises(SystemExit, match=r"error: --icl-k \[7\]: the backbone's prompts hold 7 points"):
        P.main(["--preset", "test", "--out", str(tmp_path / "a"), "--icl-k", "2", "7", "--device", "cpu"])
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit, match="error: .*no finished icl_regression pretraining checkpoint"):
        P.main(["--preset", "test", "--out", str(tmp_path / "b"), "--pretrained", str(tmp_path / "none")])
    assert not (tmp_path / "b").exists()


def test_config_clash_is_a_clear_error(tiny_run):
    out, _ = tiny_run
    with pytest.raises(SystemExit, match=r"other settings: ft_steps=11 \(stored 10\)"):
        P.main(["--out", str(out), "--ft-steps", "11", "--device", "cpu"])


def test_format_measures():
    values = torch.tensor([-1.3, -1.0, -0.85, 0.0, 0.79, 1.2, 2.0])
    assert torch.allclose(P.format_distance(values), torch.tensor([0.3, 0.0, 0.15, 1.0, 0.21, 0.2, 1.0]), atol=1e-6)
    prompts = P.PromptSet(torch.zeros(1, 7, 2), values[None])
    identity = lambda xs, ys: ys  # a "model" that answers with the label itself: it scores the chance rates
    identity.eval = lambda: None
    got = P.icl_metrics(identity, prompts, [1, 4, 6], 0.2)
    assert got["leak_rate"] == pytest.approx(1 / 3) and got["chance_leak"] == pytest.approx(1 / 3)
    assert got["range_rate"] == pytest.approx(2 / 3) and got["chance_range"] == pytest.approx(2 / 3)
    assert got["mse"] == {"1": 0.0, "4": 0.0, "6": 0.0}
    batch = P.sign_prompts(64, 5, 3, icl.generator("cpu", 0, "t"))
    assert set(batch.ys.unique().tolist()) == {-1.0, 1.0}


def test_lora_runs_do_not_depend_on_the_global_generator(tiny_run):
    out, _ = tiny_run
    torch.manual_seed(1)
    first = P.run_finetune_arm(job_context(out), "lora")
    torch.manual_seed(2)
    assert P.run_finetune_arm(job_context(out), "lora") == first
