"""icl_regression.py: task generators, the regression transformer, its curriculum and its checkpoints."""
import dataclasses

import pytest
import torch
from conftest import seeded

import icl_regression as R

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


@pytest.mark.parametrize("task", R.SAMPLER_TASKS)
def test_sample_tasks_shapes_and_seeding(task):
    batch = R.sample_tasks(task, 8, 5, 3, seeded(1))
    assert batch.xs.shape == (8, 5, 3) and batch.w.shape == (8, 3) and batch.v.shape == (8, 3)
    assert batch.values().shape == (8, 5)
    again, other = R.sample_tasks(task, 8, 5, 3, seeded(1)), R.sample_tasks(task, 8, 5, 3, seeded(2))
    assert torch.equal(batch.xs, again.xs) and torch.equal(batch.w, again.w)
    assert not torch.equal(batch.xs, other.xs)


def test_sample_tasks_distributions():
    batch = R.sample_tasks("linear", 4000, 10, 4, seeded())
    for name, t in (("x", batch.xs), ("w", batch.w), ("v", batch.v)):
        assert abs(t.mean().item()) < 0.03, name
        assert abs(t.var().item() - 1) < 0.05, name
    # f = w^T x has variance d; x's coordinates are uncorrelated
    assert abs(batch.values().var().item() - 4) < 0.3
    cov = torch.cov(batch.xs.reshape(-1, 4).T)
    assert torch.allclose(cov, torch.eye(4), atol=0.03)
    shifted = R.sample_tasks("shifted-linear", 4000, 2, 4, seeded(), w_shift=1.5)
    assert abs(shifted.w.mean().item() - 1.5) < 0.03 and abs(shifted.w.var().item() - 1) < 0.05


def test_task_values():
    batch = R.sample_tasks("polynomial", 6, 4, 3, seeded())
    f = (batch.xs * batch.w[:, None]).sum(-1)
    fv = (batch.xs * batch.v[:, None]).sum(-1)
    expected = {"linear": f, "shifted-linear": f, "polynomial": f + f * f, "relu": f.clamp(min=0), "sumdot": f + fv}
    for task, values in expected.items():
        assert torch.allclose(dataclasses.replace(batch, task=task).values(), values, atol=1e-6), task


@pytest.mark.parametrize("task", R.SAMPLER_TASKS)
def test_true_gradient_equals_autograd(task):
    batch = R.sample_tasks(task, 16, 1, 5, seeded(3))
    x = batch.xs[:, 0].clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(batch.values(x[:, None]).sum(), x)
    assert torch.allclose(batch.gradient(x.detach()), autograd, atol=1e-5)
    # the official code's formula is the polynomial gradient whatever the task
    poly = dataclasses.replace(batch, task="polynomial")
    assert torch.allclose(batch.official_gradient(x.detach()), poly.gradient(x.detach()))


def test_curriculum_zeroes_trailing_dims_and_grows():
    batch = R.sample_tasks("linear", 4, 6, 5, seeded(), active_dims=2)
    assert batch.xs[..., 2:].abs().sum() == 0 and batch.xs[..., :2].abs().min() > 0
    cfg = R.REGRESSION_PRESETS["full"]
    assert R.curriculum(cfg, 0) == (5, 11)
    assert R.curriculum(cfg, cfg.curriculum_every) == (6, 13)
    assert R.curriculum(cfg, 10 ** 9) == (20, 41)


# ----------------------------------------------------------------------------------------------------------------------
# The model


def test_interleave_layout():
    xs = torch.arange(12.0).reshape(1, 3, 4)
    ys = torch.tensor([[100.0, 200.0, 300.0]])
    tokens = R.interleave(xs, ys)
    assert tokens.shape == (1, 6, 4)
    assert torch.equal(tokens[0, 0::2], xs[0])
    assert torch.equal(tokens[0, 1::2], torch.tensor([[100.0, 0, 0, 0], [200.0, 0, 0, 0], [300.0, 0, 0, 0]]))


def tiny_model(seed=0):
    return R.build_regression_model(R.REGRESSION_PRESETS["test"], seed).eval()


def test_regression_transformer_shapes_and_causality():
    model = tiny_model()
    assert set(vars(model)["_modules"]) == {"read_in", "backbone", "read_out"}
    batch = R.sample_tasks("linear", 2, 7, 3, seeded())
    ys = batch.values()
    with torch.no_grad():
        preds = model(batch.xs, ys)
        assert preds.shape == (2, 7)
        # prediction i sees x_1, y_1, ..., x_i: changing y_4 and x_5 leaves predictions 1..4 unchanged
        xs2, ys2 = batch.xs.clone(), ys.clone()
        ys2[:, 3] += 5
        xs2[:, 4] += 5
        preds2 = model(xs2, ys2)
    assert torch.equal(preds[:, :4], preds2[:, :4]) and not torch.allclose(preds[:, 4:], preds2[:, 4:])


def test_prompt_offset_does_not_change_predictions():
    """Rotary positions are relative: the official UFT defect (targets on absolute positions 82-163) cannot occur."""
    model = tiny_model()
    batch = R.sample_tasks("linear", 2, 7, 3, seeded())
    with torch.no_grad():
        plain = model(batch.xs, batch.values())
        shifted = model(batch.xs, batch.values(), positions=torch.arange(14) + 14)
    assert torch.allclose(plain, shifted, atol=1e-5)


def test_checkpoint_round_trip_and_interrupted_save(tmp_path):
    model = tiny_model(seed=5)
    meta = {"n_dims": 3, "model_config": dataclasses.asdict(R.REGRESSION_PRESETS["test"].model_config()), "step": 7}
    R.save_regression_checkpoint(tmp_path / "ckpt", model, meta)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["meta.json", "model.safetensors"]
    loaded, loaded_meta = R.load_regression_model(tmp_path / "ckpt")
    assert loaded_meta == meta
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # a save interrupted between its two renames leaves only CKPT.old: it is still found
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    assert R.load_regression_model(tmp_path / "ckpt")[1]["step"] == 7
    with pytest.raises(FileNotFoundError, match="not an icl_regression.py checkpoint"):
        R.load_regression_model(tmp_path / "missing")
    (tmp_path / "ckpt.old" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="ckpt.old/model.safetensors: not a readable safetensors file"):
        R.load_regression_model(tmp_path / "ckpt")


def test_learned_positions_pretraining_trains_only_the_pretraining_positions(tmp_path):
    """The official backbone: GPT-2's learned absolute positions, rotary off. Pretraining prompts fill 2 x n_points
    positions, so the rows of a CFT prompt's second half (as the official code's) stay at their initial values."""
    cfg = dataclasses.replace(R.REGRESSION_PRESETS["test"], position="learned", pretrain_steps=6, warmup_steps=2,
                              quality_every=3)
    assert cfg.model_config().max_seq_len == 4 * cfg.n_points + 1
    assert R.pretrain(cfg, tmp_path, "cpu")
    trained, meta = R.load_regression_model(tmp_path / "pretrain")
    assert meta["model_config"]["positions"] == "learned" and meta["quality"]["position"] == "learned"
    assert meta["quality"]["steps"] == 6 and meta["quality"]["seconds"] > 0
    initial = R.build_regression_model(cfg, 0).backbone.embed_positions.weight
    rows = trained.backbone.embed_positions.weight
    assert torch.equal(rows[2 * cfg.n_points:], initial[2 * cfg.n_points:])
    assert not torch.allclose(rows[:2 * cfg.n_points], initial[:2 * cfg.n_points])
    # absolute positions: unlike rotary, shifting the prompt changes the predictions
    batch = R.sample_tasks("linear", 2, 7, 3, seeded())
    with torch.no_grad():
        plain = trained(batch.xs, batch.values())
        shifted = trained(batch.xs, batch.values(), positions=torch.arange(14) + 14)
    assert not torch.allclose(plain, shifted, atol=1e-4)


@pytest.mark.parametrize("content,message", [(b"", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                                             (b"[1]", "expected a JSON object, found list")])
def test_damaged_meta_json_is_named(tmp_path, content, message):
    model = tiny_model()
    meta = {"n_dims": 3, "model_config": dataclasses.asdict(R.REGRESSION_PRESETS["test"].model_config())}
    R.save_regression_checkpoint(tmp_path / "ckpt", model, meta)
    (tmp_path / "ckpt" / "meta.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"ckpt/meta.json: {message}"):
        R.load_regression_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "meta.json").write_text('{"n_dims": 3}')
    with pytest.raises(ValueError, match="meta.json: not an icl_regression.py checkpoint description"):
        R.load_regression_model(tmp_path / "ckpt")
