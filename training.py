"""What the training loops here share: the learning-rate schedule, and the training-state checkpoint.

The checkpoint is safetensors + JSON, never pickle (torch.distributed.checkpoint's `.metadata` is a pickle, so a
received run folder could execute code on --resume). A checkpoint folder holds:
  state.json                       step, stage, anything the loop adds (data position, fingerprints), the world size,
                                   every tensor's global shape and the optimiser's param_groups (names, not ids)
  rank-R-of-W.safetensors          process R's rows of every model tensor ("model/<name>") and optimiser state
                                   ("optim/<name>/<key>"), and its RNG states ("rng/cpu", "rng/cuda")
FSDP2 shards dim 0 as torch.chunk does, so any process count can read any other's files: a resumed run takes the rows
it owns from whichever files hold them (same count: exactly its own file). The folder is written through a staging
folder and renamed once (atomic.py); a non-finite tensor is never written.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from atomic import commit_folder, save_tensors, staging_folder, staging_path, write_text


def lr_at(step: int, peak: float, warmup: int, total: int, final_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to final_fraction * peak (1: constant after warm-up).
    cft.py, synthetic.py and context_tuning.py all use it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------------------
# Training-state checkpoints


class NonFiniteState(ValueError):
    """A model or optimiser tensor holds NaN/inf: such a state is never written as a checkpoint."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _row_range(t: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of the global dim-0 rows this process holds of `t` (FSDP2: torch.chunk over the mesh)."""
    if not hasattr(t, "device_mesh") or t.dim() == 0:
        return 0, (t.shape[0] if t.dim() else 1)
    per_rank = math.ceil(t.shape[0] / t.device_mesh.size())
    start = min(t.device_mesh.get_local_rank() * per_rank, t.shape[0])
    return start, start + _local(t).shape[0]


def _optimizer_tensors(model: nn.Module, optimizer) -> tuple[dict, list]:
    """{"optim/<param name>/<key>": tensor} and param_groups with parameter names instead of ids."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [name_of[id(p)]
                                                                                   for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim/{name_of[id(p)]}/{key}"] = value
    return tensors, groups


def save_training_state(folder, model: nn.Module, optimizer, meta: dict, env) -> Path:
    """Every process calls this; writes FOLDER whole (see the module docstring) and returns it."""
    folder = Path(folder)
    tensors = {f"model/{name}": t for name, t in model.state_dict().items()}
    optim_tensors, groups = _optimizer_tensors(model, optimizer)
    tensors |= optim_tensors
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(_local(t)).all())
    if env.sum([float(len(bad))])[0]:  # summed so that every process refuses together
        raise NonFiniteState(f"{bad[0] if bad else 'a tensor on another process'} is not finite")
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    local = {name: _local(t).detach().cpu().contiguous() for name, t in tensors.items()}
    local["rng/cpu"] = torch.get_rng_state()
    if env.device.type == "cuda":
        local["rng/cuda"] = torch.cuda.get_rng_state(env.device)
    if env.is_main:
        staging_folder(folder)
    env.barrier()
    tmp = staging_path(folder)
    save_tensors(local, tmp / f"rank-{env.rank}-of-{env.world}.safetensors", metadata={"format": "pt"})
    env.barrier()
    if env.is_main:
        state = dict(meta, world_size=env.world, shapes=shapes, param_groups=groups)
        write_text(tmp / "state.json", json.dumps(state, indent=1))
        commit_folder(folder)
    env.barrier()
    return folder


def read_training_meta(folder) -> dict:
    """state.json of a checkpoint folder; one clear error when it is missing or not JSON."""
    path = Path(folder) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a training checkpoint, or an unfinished one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int) or "shapes" not in state:
        raise ValueError(f"{path}: not a training-state file of this project")
    return state


class _RowReader:
    """Rows of a checkpoint tensor, read lazily from whichever process files hold them."""

    def __init__(self, folder: Path, world: int):
        from safetensors import safe_open
        self.world = world
        self.files = []
        for rank in range(world):
            path = folder / f"rank-{rank}-of-{world}.safetensors"
            if not path.is_file():
                raise ValueError(f"{path}: missing (the checkpoint was written by {world} processes)")
            self.files.append(safe_open(path, framework="pt", device="cpu"))

    def rows(self, name: str, shape: list, start: int, stop: int) -> torch.Tensor:
        if not shape:  # a 0-dim tensor is held whole by every process
            return self.files[0].get_tensor(name)
        per_rank = math.ceil(shape[0] / self.world)
        parts = []
        for rank in range(self.world):
            lo, hi = max(start, rank * per_rank), min(stop, (rank + 1) * per_rank, shape[0])
            if lo < hi:
                parts.append(self.files[rank].get_slice(name)[lo - rank * per_rank:hi - rank * per_rank])
        return torch.cat(parts) if parts else torch.empty(0, *shape[1:])


def load_training_state(folder, model: nn.Module, optimizer, env) -> dict:
    """Load a checkpoint written by save_training_state (any process count) into `model` and `optimizer` (built the
    same way, with their final sharding); restore this process's RNG when the process count is unchanged.
    Returns the meta dict (state.json)."""
    from safetensors import SafetensorError
    folder = Path(folder)
    state = read_training_meta(folder)
    try:
        reader = _RowReader(folder, state["world_size"])
        with torch.no_grad():
            _load_model_rows(reader, state, model)
        _load_optimizer_rows(reader, state, model, optimizer)
        if state["world_size"] == env.world:
            own = reader.files[env.rank]
            torch.set_rng_state(own.get_tensor("rng/cpu"))
            if env.device.type == "cuda" and "rng/cuda" in own.keys():
                torch.cuda.set_rng_state(own.get_tensor("rng/cuda"), env.device)
    except (SafetensorError, KeyError) as e:
        raise ValueError(f"{folder}: damaged checkpoint ({type(e).__name__}: {e})") from None
    return state


def _load_model_rows(reader: _RowReader, state: dict, model: nn.Module) -> None:
    for name, target in model.state_dict().items():
        key = f"model/{name}"
        if state["shapes"].get(key) != list(target.shape):
            raise ValueError(f"checkpoint tensor {key}: shape {state['shapes'].get(key)}, the model needs "
                             f"{list(target.shape)}")
        _local(target).copy_(reader.rows(key, state["shapes"][key], *_row_range(target)))


def _load_optimizer_rows(reader: _RowReader, state: dict, model: nn.Module, optimizer) -> None:
    params = dict(model.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    saved_groups = state["param_groups"]
    if [g["params"] for g in saved_groups] != [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise ValueError("checkpoint: the optimiser's parameter groups differ from this run's (another method, "
                         "stage or --lora-rank?)")
    full = {"state": {}, "param_groups": []}
    index = 0
    for saved, group in zip(saved_groups, optimizer.param_groups):
        full["param_groups"].append(dict(saved, params=list(range(index, index + len(group["params"])))))
        for name in saved["params"]:
            keys = [k.rsplit("/", 1)[1] for k in state["shapes"] if k.startswith(f"optim/{name}/")]
            if keys:
                full["state"][index] = {key: _as_target(reader, state, f"optim/{name}/{key}", params[name])
                                        for key in keys}
            index += 1
    optimizer.load_state_dict(full)


def _as_target(reader: _RowReader, state: dict, key: str, param: torch.Tensor) -> torch.Tensor:
    """A saved optimiser tensor shaped like `param` (a DTensor with its rows, under FSDP2), or a scalar."""
    shape = state["shapes"][key]
    if shape != list(param.shape):  # a scalar (AdamW's step), held whole by every process
        return reader.files[0].get_tensor(key)
    rows = reader.rows(key, shape, *_row_range(param))
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(rows.to(_local(param).device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())
    return rows
