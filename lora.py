"""LoRA (Hu et al. 2021), hand-written: W x + scale · B A dropout(x), with B = 0 at the start so training starts at W.

scale is alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (Kalajdzievski 2023, PEFT's use_rslora).
apply_lora wraps named linear layers of any module (model.py's Transformer); merge_lora folds the adapters back into
the weights. In memory the parameter names are this project's (`<layer>.base.weight`, `<layer>.lora_a`,
`<layer>.lora_b`); on disk an adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors with PEFT's
key names), so adapters trained here load with `peft.PeftModel.from_pretrained` and adapters trained with PEFT load
here (save_peft_adapter / load_peft_adapter).
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import commit_folder, save_tensors, staging_folder

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM(base_model=LoraModel(model=LlamaForCausalLM))


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scale: float | None = None):
        """scale=None gives alpha / rank (PEFT's default); pass alpha / sqrt(rank) for rank-stabilised LoRA."""
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank if scale is None else scale
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the adapter's input only, as PEFT
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's default init, as PEFT uses for A
        nn.init.zeros_(self.lora_b)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _lora_targets(model, targets):
    found = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    if not found:
        raise ValueError(f"apply_lora: no linear layer named any of {targets}")
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj"), dropout: float = 0.0,
               rslora: bool = False) -> nn.Module:
    """Wrap the named linear layers with LoRA adapters; afterwards only the adapters are trainable."""
    scale = lora_scale(rank, alpha, rslora)
    for parent, name in _lora_targets(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout, scale))
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B A) and remove the wrappers."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                delta = child.lora_b.float() @ child.lora_a.float() * child.scale
                child.base.weight += delta.to(child.base.weight.dtype)
                setattr(parent, name, child.base)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# PEFT adapter folders. Key of the A matrix of layer 0's q_proj: base_model.model.model.layers.0.self_attn.q_proj
# .lora_A.weight (shape (r, in)); B is lora_B (out, r). Our module names are Hugging Face's minus the leading "model."
# (lm_head keeps its name), as in hf_checkpoint.py.


def peft_key(module_name: str, matrix: str) -> str:
    """PEFT's saved name of `module_name`'s lora_A or lora_B weight (matrix "A" or "B")."""
    hf_name = module_name if module_name.startswith("lm_head") else "model." + module_name
    return f"{PEFT_PREFIX}{hf_name}.lora_{matrix}.weight"


def _adapter_fields(layers: dict[str, LoRALinear]) -> dict:
    """r, lora_alpha and use_rslora that give every adapter's scale; adapters of different shapes are refused."""
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha, m.scale) != (first.rank, first.alpha, first.scale) for m in layers.values()):
        raise ValueError("save_peft_adapter: all adapters need the same rank, alpha and scale")
    rank, alpha, scale = first.rank, first.alpha, first.scale
    if math.isclose(scale, alpha / rank):
        return {"r": rank, "lora_alpha": alpha, "use_rslora": False}
    if math.isclose(scale, alpha / math.sqrt(rank)):
        return {"r": rank, "lora_alpha": alpha, "use_rslora": True}
    return {"r": rank, "lora_alpha": scale * rank, "use_rslora": False}  # any other scale: alpha chosen to give it


def peft_adapter_config(layers: dict[str, LoRALinear], base_model_name_or_path=None) -> dict:
    dropout = next(iter(layers.values())).dropout
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            **_adapter_fields(layers), "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
            "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
            "inference_mode": True}


@torch.no_grad()
def save_peft_adapter(model: nn.Module, path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT folder at `path` (absent or an empty folder; it appears whole).
    Under FSDP2 call it on every rank (each tensor is gathered in turn); rank 0 writes. Tensors are saved in fp32."""
    from torch.distributed.tensor import DTensor
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora first)")
    tensors = {}
    for name, layer in layers.items():
        for matrix, value in (("A", layer.lora_a), ("B", layer.lora_b)):
            value = value.full_tensor() if isinstance(value, DTensor) else value
            tensors[peft_key(name, matrix)] = value.detach().to("cpu", torch.float32).contiguous()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return path
    config = peft_adapter_config(layers, base_model_name_or_path)
    tmp = staging_folder(path)
    save_tensors(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
    (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if path.exists():
        path.rmdir()  # empty (checked above)
    return commit_folder(path)


# Settings of adapter_config.json that change what the adapter computes beyond W + scale·B A: refused, naming the field
# (value -> whether it is the plain-LoRA default; an absent field is the default).
_UNSUPPORTED_PEFT = {
    "use_dora": lambda v: not v, "bias": lambda v: v in (None, "none"), "modules_to_save": lambda v: not v,
    "layers_to_transform": lambda v: v is None, "layers_pattern": lambda v: not v, "rank_pattern": lambda v: not v,
    "alpha_pattern": lambda v: not v, "fan_in_fan_out": lambda v: not v, "lora_bias": lambda v: not v,
    "target_parameters": lambda v: not v, "use_qalora": lambda v: not v, "trainable_token_indices": lambda v: not v,
}


def read_peft_config(path) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked: one line naming the field for anything unsupported."""
    file = Path(path) / PEFT_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (expected a PEFT adapter folder)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type={config.get('peft_type')!r} is not supported (expected 'LORA')")
    for key, is_default in _UNSUPPORTED_PEFT.items():
        if not is_default(config.get(key)):
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported (plain LoRA only)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{file}: r is {r!r}, expected a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{file}: lora_alpha is {alpha!r}, expected a positive number")
    return config


def _read_peft_tensors(path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A": tensor, "B": tensor}} from adapter_model.safetensors; an unexpected key is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file = Path(path) / PEFT_WEIGHTS
    if not file.is_file():
        other = " (adapter_model.bin is a pickle, which this project does not read)" \
            if (Path(path) / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{file}: no such file{other}")
    try:
        tensors = load_file(file)
    except SafetensorError as e:
        raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None
    modules = {}
    for key, value in tensors.items():
        name, dot, matrix = key.removesuffix(".weight").rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight") or not dot or matrix not in ("A", "B"):
            raise ValueError(f"{file}: unexpected tensor {key} (expected {PEFT_PREFIX}...<module>.lora_A.weight)")
        name = name.removeprefix(PEFT_PREFIX)
        name = name if name.startswith("lm_head") else name.removeprefix("model.")
        modules.setdefault(name, {})[matrix] = value
    return modules


def _peft_targets(model: nn.Module, modules: dict, rank: int, file: Path) -> dict[str, nn.Linear]:
    """The model's linear layer for each adapted module name, every shape checked before anything is changed."""
    named = dict(model.named_modules())
    linears = {}
    for name, pair in modules.items():
        linear = named.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{file}: {peft_key(name, 'A')} names no linear layer of this model")
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{file}: {peft_key(name, 'B' if 'A' in pair else 'A')} is missing")
        for matrix, shape in (("A", (rank, linear.in_features)), ("B", (linear.out_features, rank))):
            if tuple(pair[matrix].shape) != shape:
                raise ValueError(f"{file}: {peft_key(name, matrix)} has shape {tuple(pair[matrix].shape)}, "
                                 f"expected {shape} (r={rank} in {PEFT_CONFIG})")
        linears[name] = linear
    return linears


@torch.no_grad()
def load_peft_adapter(model: nn.Module, path, merge: bool = True, dropout: float = 0.0) -> nn.Module:
    """Load a PEFT LoRA adapter folder onto `model` (LoRA on any of its linear layers, e.g. q/k/v/o/gate/up/down):
    merged into the weights (merge=True, for inference) or as trainable LoRALinear wrappers (only they train)."""
    config, modules = read_peft_config(path), _read_peft_tensors(path)
    file = Path(path) / PEFT_WEIGHTS
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{path}: the model already has LoRA adapters; load a PEFT adapter onto the base model")
    if not modules:
        raise ValueError(f"{file}: no LoRA tensors")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = lora_scale(rank, alpha, bool(config.get("use_rslora")))
    linears = _peft_targets(model, modules, rank, file)
    for name, linear in linears.items():
        a, b = modules[name]["A"], modules[name]["B"]
        if merge:  # in fp32 from the file's tensors: a bf16 model gets one rounding, not two
            linear.weight.copy_(linear.weight.float() + b.float() @ a.float() * scale)
            continue
        layer = LoRALinear(linear, rank, alpha, dropout, scale)
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if not merge:
        for name, p in model.named_parameters():
            p.requires_grad = ".lora_" in name
    return model
