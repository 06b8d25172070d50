"""Hugging Face checkpoint folders in and out: config.json + model.safetensors, or 5 GB shards + an index.

load_weights streams one tensor at a time into a model.py Transformer (under FSDP2 each rank reads only its own rows);
save_pretrained writes the same layout through a staging folder (atomic.py), so transformers and vLLM load it unchanged
and an interrupted save never leaves a broken checkpoint. Parameter names equal Hugging Face's minus the leading
"model.", so loading and saving is a rename, not a remap.
"""
import json
import math
import os
from pathlib import Path

import torch

from atomic import commit_folder, staging_folder
from lora import LoRALinear
from model import ModelConfig, Transformer

SHARD_BYTES = 5 * 1000**3  # the 5 GB shard size that transformers writes by default


def hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a HF folder; a missing shard is an error naming it."""
    path = Path(path)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        for name in names:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: shard listed in {index.name} is missing")
        return [path / name for name in names]
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _copy_into(target: torch.Tensor, sliced) -> None:
    """Copy one checkpoint tensor (a safetensors slice, read lazily) into a parameter, plain or FSDP2-sharded."""
    from torch.distributed.tensor import DTensor, Shard
    if isinstance(target, DTensor):
        # FSDP2 shards dim 0 as torch.chunk does: rank r holds rows [r*ceil(n/W), ...). Read only those rows.
        if list(target.placements) != [Shard(0)]:
            raise ValueError(f"load: unsupported placements {target.placements}")
        local = target.to_local()
        rows_per_rank = math.ceil(target.shape[0] / target.device_mesh.size())
        start = target.device_mesh.get_local_rank() * rows_per_rank
        if local.shape[0]:
            local.copy_(sliced[start:start + local.shape[0]])
    else:
        target.copy_(sliced[:])


@torch.no_grad()
def load_weights(model: Transformer, path) -> None:
    """Stream a HF checkpoint into `model`, one tensor at a time (peak host memory ~ one tensor)."""
    from safetensors import SafetensorError, safe_open
    params = model.state_dict(keep_vars=True)
    if any(".base." in name for name in params):
        raise ValueError("load: apply LoRA after loading the base weights")
    expected = {hf_key(name): name for name in params}
    seen = set()
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):  # older checkpoints store the rotary table; we compute it
                        continue
                    if key not in expected:
                        raise ValueError(f"{file}: unexpected tensor {key} (not part of a Llama with this config.json)")
                    target, sliced = params[expected[key]], f.get_slice(key)
                    if tuple(sliced.get_shape()) != tuple(target.shape):
                        raise ValueError(f"{file}: tensor {key} has shape {tuple(sliced.get_shape())}, "
                                         f"config.json implies {tuple(target.shape)}")
                    _copy_into(target, sliced)
                    seen.add(key)
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: checkpoint has no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                            if len(missing) > 1 else ""))


def load_pretrained(path, device="cpu", dtype=torch.float32) -> Transformer:
    """A Transformer with the weights of a Hugging Face Llama folder."""
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    load_weights(model, path)
    return model


@torch.no_grad()
def save_pretrained(model: Transformer, path, dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES):
    """Write a HF Llama folder that transformers and vLLM load unchanged. Works on FSDP2-sharded models when called
    on every rank (each tensor is gathered in turn; rank 0 writes). Written into a temporary folder first and renamed,
    so an interrupted save never leaves a half-written checkpoint at `path`; an existing non-empty `path` is refused."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_pretrained: merge_lora(model) first (the HF layout has no adapters)")
    is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    dtype = dtype or next(model.parameters()).dtype
    tmp = staging_folder(path) if is_writer else None
    shards, current, current_bytes = [], {}, 0

    def flush():
        nonlocal current, current_bytes
        if current:
            shards.append(current)
            if is_writer:
                save_file(current, tmp / f"shard-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, current_bytes = {}, 0

    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > shard_bytes:
            flush()
        current[hf_key(name)] = tensor if is_writer else None
        current_bytes += nbytes
    flush()
    if not is_writer:
        return
    (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(dtype), indent=2))
    if len(shards) == 1:
        os.rename(tmp / "shard-1.safetensors", tmp / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            os.rename(tmp / f"shard-{i}.safetensors", tmp / name)
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if path.exists():
        path.rmdir()  # empty (checked above)
    commit_folder(path)

