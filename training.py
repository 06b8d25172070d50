"""What every training loop here shares: the learning-rate schedule.

cft.py (language-model training), synthetic.py (the regression transformer) and context_tuning.py (K/V, prompts,
LoRA at test time) all use `lr_at`.
"""
import math


def lr_at(step: int, peak: float, warmup: int, total: int, final_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to final_fraction * peak (1: constant after warm-up)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
