"""LoRA (Hu et al. 2021), hand-written: W x + (alpha / r) B A x, with B = 0 at the start so training starts at W.

apply_lora wraps named linear layers of any module (model.py's Transformer); merge_lora folds the adapters back into
the weights. Parameter names (`<layer>.base.weight`, `<layer>.lora_a`, `<layer>.lora_b`) are this project's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's default init, as PEFT uses for A
        nn.init.zeros_(self.lora_b)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def _lora_targets(model, targets):
    found = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    if not found:
        raise ValueError(f"apply_lora: no linear layer named any of {targets}")
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> nn.Module:
    """Wrap the named linear layers with LoRA adapters; afterwards only the adapters are trainable."""
    for parent, name in _lora_targets(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B A) and remove the wrappers."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += (child.lora_b.float() @ child.lora_a.float() * child.scale).to(child.base.weight.dtype)
                setattr(parent, name, child.base)
    return model

