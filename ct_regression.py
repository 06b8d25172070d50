"""icl_regression.py's in-context regression transformer as context tuning's model, for the synthetic reproduction
(`context_tuning.py --quick`): its inputs and outputs in context tuning's terms (RegressionIO), the CPU-sized backbone,
the squared error of queries answered after a prefix, and the experiment's settings.

Context tuning's methods see a model through an IO object: `embed` (inputs -> the backbone's embedding space),
`position_loss` (hidden states, targets -> one loss per position) and `random_context` (prompt/prefix tuning's
initialisation). context_tuning.TokenIO is the same for Llama (token embeddings, next-token cross-entropy).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import icl_regression as icl
from config_flags import option


@dataclass
class CTQuickConfig:
    k: int = 8                # demonstrations per task (the backbone was pretrained on prompts of up to 11 pairs)
    w_shift: float = 2.0      # task distribution w ~ N(w_shift, I): out of the pretraining distribution
    tasks_per_seed: int = 8
    queries_per_task: int = 128
    seeds: int = option(3, "--quick: seeds to average over")
    steps: int = 100          # lr and steps: from a small sweep on other tasks (generator stream "diag")
    lr: float = 1e-2
    lora_lr: float = 1e-2
    dropout: float = 0.1


class RegressionIO:
    """The regression transformer's inputs and outputs: x and y tokens in through read_in, the x_i position's
    read_out predicts y_i (squared error)."""

    def __init__(self, reg):
        self.reg = reg

    def embed(self, xs, ys):
        """(B, n, d), (B, n) -> (B, 2n, dim): the tokens x_1, y_1, ... through the read-in."""
        return self.reg.read_in(icl.interleave(xs, ys))

    def position_loss(self, hidden, targets):
        return (self.reg.read_out(hidden).squeeze(-1).float() - targets) ** 2

    @torch.no_grad()
    def random_context(self, m: int, generator) -> torch.Tensor:
        """m embeddings of random (x, y) tokens, y on the labels' scale: not the task's demonstrations."""
        d = self.reg.n_dims
        xs = torch.randn(1, (m + 1) // 2, d, generator=generator)
        ys = torch.randn(1, (m + 1) // 2, generator=generator) * math.sqrt(d)
        return self.embed(xs, ys)[0, :m]


@torch.no_grad()
def regression_mse(model, io: RegressionIO, prefix_kv, xs, ys) -> float:
    """Mean squared error of queries xs (Q, d) answered after prefix_kv (one batch-1 prefix shared by all Q)."""
    x_tokens = io.embed(xs[:, None], torch.zeros_like(ys)[:, None])[:, :1]  # the y token is cut off: any value does
    hidden = model.hidden_states(embeds=x_tokens, prefix_kv=prefix_kv)
    return io.position_loss(hidden[:, 0], ys).mean().item()


def quick_backbone(out: Path):
    """icl_regression.py's CPU-sized regression transformer, pretrained into OUT/pretrain (or reused from there)."""
    cfg = icl.REGRESSION_PRESETS["quick"]
    if not icl.pretrain(cfg, out, "cpu"):
        raise ValueError(f"{out}/pretrain: pretraining did not finish")
    reg, meta = icl.load_regression_model(out / "pretrain")
    return reg.eval().requires_grad_(False), meta
