"""training.py: the schedule, and the pickle-free training-state checkpoint (exact resume, refusals)."""
import json
import pickle

import pytest
import torch
from conftest import tiny_cfg

from distributed import Dist
from model import create_model
from training import NonFiniteState, load_training_state, lr_at, save_training_state


def test_schedule_warms_up_then_decays_by_cosine():
    assert lr_at(0, 1.0, 4, 20) == 0.25 and lr_at(3, 1.0, 4, 20) == 1.0
    assert lr_at(12, 1.0, 4, 20) == pytest.approx(0.5) and lr_at(20, 1.0, 4, 20) == pytest.approx(0.0)
    assert lr_at(20, 1.0, 4, 20, final_fraction=0.1) == pytest.approx(0.1)
    assert all(lr_at(s, 2.0, 0, 9, final_fraction=1.0) == 2.0 for s in range(9))


def model_and_optimizer(seed=0):
    model = create_model(tiny_cfg(), seed=seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    return model, torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}])


def step(model, optimizer, seed):
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(seed))
    model.loss(model.hidden_states(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_resume_from_the_checkpoint_equals_the_uninterrupted_run(tmp_path):
    env = Dist()
    model, optimizer = model_and_optimizer()
    for s in range(3):
        step(model, optimizer, s)
    torch.manual_seed(123)
    save_training_state(tmp_path / "step-3", model, optimizer, {"step": 3, "stage": "model"}, env)
    noise = torch.rand(3)
    step(model, optimizer, 3)
    resumed, resumed_optimizer = model_and_optimizer(seed=1)  # other weights: everything must come from the file
    torch.manual_seed(999)
    meta = load_training_state(tmp_path / "step-3", resumed, resumed_optimizer, env)
    assert meta["step"] == 3 and meta["world_size"] == 1
    assert torch.equal(torch.rand(3), noise)  # the RNG continues where it was saved
    step(resumed, resumed_optimizer, 3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "step-3").iterdir()) == ["rank-0-of-1.safetensors", "state.json"]


def test_checkpoint_holds_no_pickle_and_refuses_a_non_finite_state(tmp_path):
    env = Dist()
    model, optimizer = model_and_optimizer()
    step(model, optimizer, 0)
    folder = save_training_state(tmp_path / "ok", model, optimizer, {"step": 1}, env)
    for path in folder.iterdir():
        data = path.read_bytes()
        assert not data.startswith(pickle.PROTO) and not data.startswith(b"PK")  # neither pickle nor torch.save
    json.loads((folder / "state.json").read_text())
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteState, match="is not finite"):
        save_training_state(tmp_path / "bad", model, optimizer, {"step": 2}, env)
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.tmp").exists()


def test_a_changed_model_or_optimizer_is_refused(tmp_path):
    env = Dist()
    model, optimizer = model_and_optimizer()
    step(model, optimizer, 0)
    save_training_state(tmp_path / "c", model, optimizer, {"step": 1}, env)
    other = create_model(tiny_cfg(ffn_dim=96), seed=0)
    with pytest.raises(ValueError, match="shape"):
        load_training_state(tmp_path / "c", other, torch.optim.AdamW(other.parameters()), env)
    fresh = create_model(tiny_cfg(), seed=0)
    with pytest.raises(ValueError, match="parameter groups differ"):
        load_training_state(tmp_path / "c", fresh, torch.optim.AdamW(fresh.parameters()), env)
