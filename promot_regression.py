"""ProMoT (Wang et al., arXiv 2211.00635) at small scale: does fine-tuning icl_regression.py's in-context regression
transformer on a narrow task with one output format destroy its in-context learning, and does prompt-then-model tuning
keep it?

Target task "sign": in-context binary classification. Prompts (x_1, sign(w^T x_1), ..., x_n, sign(w^T x_n)) with a
fresh w per prompt, squared error against the +-1 labels at every position (the pretraining loss, new labels). Its
outputs have one homogeneous format, {-1, +1}, as RTE's True/False in the paper, and the right label still depends on
the input (through w, known only from the context), as RTE's depends on premise and hypothesis. The alternative, a
single fixed function, would teach the model to ignore its context: that measures forgetting of in-context learning
in general, not the leak of an output format. The base model answers sign prompts by regressing on the +-1 labels in
context: the sign is right as often as a fine-tuned model's, but the values are not the squared-error optimum (a
hedged value in [-1, 1]); what fine-tuning can gain here is the output mapping, i.e. the format.

Held-out evaluation: fresh linear tasks (the pretraining distribution, as the paper's held-out few-shot tasks), the
squared error of the prediction after k in-context examples for k in icl_k (every k from one forward pass: the model
is causal). Format leak, over those predictions: leak_rate = the share within leak_tolerance of -1 or +1 (the paper:
the share of held-out outputs that are True/False); range_rate = the share with |y^| <= 1 + leak_tolerance, inside
the target's output range, where a squared-error model of +-1 labels puts its hedged answers. A perfect regressor
also lands there sometimes: chance_leak and chance_range are the same shares of the true held-out labels.

Arms, budget-matched as the paper (FT 1000 steps, PT 5000, ProMoT 5000 + 1000), each stage keeping its best
checkpoint on a held-out split of the target data (checkpoints every 1/10 of a fine-tuning stage, every 1/5 of a
prompt-tuning stage, as the paper's every 100 of 1000 and every 1000 of 5000):
  ft      plain fine-tuning of every weight
  pt      prompt tuning: a soft prompt of prompt_len read-in embeddings (initialised as the read-in embeddings of
          sampled x and y tokens: the analogue of sampled vocabulary embeddings) before every prompt, model frozen
  promot  stage 1 = pt; stage 2 fine-tunes every weight with that prompt attached and frozen. The prompt is used for
          the target task and REMOVED for every held-out evaluation (the paper's inference rule)
  lora    LoRA on every linear layer of the backbone (not in the paper: a comparison arm)
  mix     plain fine-tuning with mix_fraction of every batch drawn from the pretraining regression data (not in the
          paper: a comparison arm)
pt's held-out numbers are the base model's by construction (the model is unchanged and the prompt is removed).
Different from the paper: squared error instead of cross-entropy, AdamW instead of Adafactor, no dropout or label
smoothing; learning rates: see PromotConfig.

Usage:
  python promot_regression.py --quick --out runs/promot-quick        # CPU, <= 5 minutes on 2 cores
  python promot_regression.py --out runs/promot --time-budget 540    # full size on the GPU(s); re-run to continue
  (also `python synthetic.py promot ...`, which calls main())
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

import icl_regression as icl
from atomic import FolderInUse, atomic_write, folder_lock, write_text
from config_flags import add_config_flags, config_from_args, option
from lora import apply_lora
from promot_report import write_report
from training import lr_at

ARMS = ("ft", "pt", "promot", "lora", "mix")
# One process per job; the promot job also yields pt (its stage 1).
JOB_ARMS = {"promot": ("pt", "promot"), "ft": ("ft",), "lora": ("lora",), "mix": ("mix",)}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_CHUNK = 256  # prompts per evaluation forward


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PromotConfig:
    """One ProMoT reproduction, stored in OUT/config.json. Fields made with option() are command-line flags."""
    preset: str = "full"
    backbone: str = option("full", "icl_regression preset pretrained into OUT/pretrain (unless --pretrained)",
                           choices=list(icl.REGRESSION_PRESETS))
    pretrained: str | None = option(None, "reuse this finished icl_regression checkpoint folder instead")
    seeds: int = option(3, "seeds per arm")
    arms: list[str] = option(list(ARMS), "arms to run", choices=ARMS)
    # the target task: a fixed training set (RTE has 2,490 training examples), a selection split and a test split
    target_train_prompts: int = option(2490, "target training prompts (0: fresh prompts every step)")
    val_prompts: int = option(256, "held-out target prompts for best-checkpoint selection")
    test_prompts: int = option(1024, "target test prompts (the reported target_mse)")
    # the held-out in-context regression evaluation
    icl_k: list[int] = option([5, 10, 20, 40], "in-context examples before the evaluated held-out prediction")
    icl_prompts: int = option(1280, "held-out regression prompts of the final evaluation")
    curve_prompts: int = option(256, "held-out regression prompts at each learning-curve point")
    leak_tolerance: float = option(0.2, "a held-out prediction leaks when it is within this of -1 or +1")
    # budgets (the paper: batch 64, FT 1000 steps, PT 5000, ProMoT 5000 + 1000)
    batch: int = option(64, "prompts per step")
    ft_steps: int = option(1000, "steps of ft, lora, mix and ProMoT's stage 2")
    pt_steps: int | None = option(None, "steps of pt = ProMoT's stage 1 (default: 5 x ft-steps, as the paper)")
    ft_lr: float | None = option(None, "fine-tuning learning rate of ft, mix and ProMoT's stage 2 (default: the "
                                       "backbone's final pretraining rate, 0.1 x its peak)")
    pt_lr: float = option(1e-2, "prompt-tuning learning rate (context_tuning.py's for this model)")
    lora_lr: float | None = option(None, "LoRA learning rate (default: 5 x the fine-tuning rate)")
    lora_rank: int = option(8, "LoRA rank (alpha = 2 x rank)")
    prompt_len: int = option(100, "soft prompt length in read-in embeddings (the paper's 100)")
    mix_fraction: float = option(0.1, "mix: share of every batch drawn from the pretraining regression data")
    warmup_fraction: float = 0.05  # linear warm-up, then constant (the paper's constant rates)
    ft_checkpoints: int = 10  # checkpoints per fine-tuning stage considered for selection (every 100 of 1000)
    pt_checkpoints: int = 5  # per prompt-tuning stage (every 1000 of 5000)
    curve_points: int = 20  # learning-curve evaluations per stage (plus step 0 and the checkpoints)

    def stage_steps(self, stage: str) -> int:
        return (self.pt_steps or 5 * self.ft_steps) if stage == "pt" else self.ft_steps


PROMOT_PRESETS = {
    "full": PromotConfig(),
    # CPU-sized: icl_regression's quick backbone (d = 5, 11 points); the whole grid in <= 5 minutes on 2 cores.
    "quick": PromotConfig(preset="quick", backbone="quick", icl_k=[2, 5, 10], val_prompts=128, test_prompts=512,
                          icl_prompts=512, curve_prompts=128, batch=32, ft_steps=100, prompt_len=10, curve_points=10),
    # smaller still, for tests/test_promot_regression.py
    "test": PromotConfig(preset="test", backbone="test", seeds=2, target_train_prompts=256, icl_k=[2, 4],
                         val_prompts=32, test_prompts=64, icl_prompts=64, curve_prompts=32, batch=16, ft_steps=10,
                         pt_steps=20, ft_lr=2e-3, prompt_len=4, ft_checkpoints=5, curve_points=5),
}


def with_learning_rates(cfg: PromotConfig, meta: dict) -> PromotConfig:
    """The config with its default learning rates filled in. Fine-tuning runs at the backbone's final pretraining
    rate, as the paper's T5 fine-tuning rate 1e-3 is T5 pretraining's final inverse-square-root rate; LoRA at 5x that
    (adapters start at zero and usually want a higher rate than full fine-tuning)."""
    ft_lr = cfg.ft_lr if cfg.ft_lr is not None else 0.1 * meta["config"]["pretrain_lr"]
    return dataclasses.replace(cfg, ft_lr=ft_lr, lora_lr=cfg.lora_lr if cfg.lora_lr is not None else 5 * ft_lr)


def check_promot_config(cfg: PromotConfig, n_points: int) -> None:
    """One ValueError naming the flag for a setting the run cannot use."""
    if bad := [k for k in cfg.icl_k if not 0 <= k < n_points]:
        raise ValueError(f"--icl-k {bad}: the backbone's prompts hold {n_points} points, so k must be in "
                         f"0..{n_points - 1}")
    if not 0 <= cfg.mix_fraction < 1:
        raise ValueError(f"--mix-fraction {cfg.mix_fraction}: must be in [0, 1)")
    for name in ("seeds", "batch", "ft_steps", "prompt_len", "val_prompts", "test_prompts", "icl_prompts",
                 "curve_prompts", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.stage_steps("pt") < 1 or cfg.leak_tolerance <= 0:
        raise ValueError("--pt-steps and --leak-tolerance must be positive")


# ----------------------------------------------------------------------------------------------------------------------
# Data: the target task's splits and the held-out regression prompts, fixed per seed


@dataclass
class PromptSet:
    xs: torch.Tensor  # (N, n, d)
    ys: torch.Tensor  # (N, n)

    def subset(self, index) -> "PromptSet":
        return PromptSet(self.xs[index], self.ys[index])


def sign_prompts(n: int, n_points: int, n_dims: int, gen: torch.Generator) -> PromptSet:
    """The target task: (x_i, sign(w^T x_i)) with fresh w per prompt."""
    batch = icl.sample_tasks("linear", n, n_points, n_dims, gen)
    return PromptSet(batch.xs, torch.sign(batch.values()))


def regression_prompts(n: int, n_points: int, n_dims: int, gen: torch.Generator) -> PromptSet:
    """The pretraining distribution: (x_i, w^T x_i) with fresh w per prompt."""
    batch = icl.sample_tasks("linear", n, n_points, n_dims, gen)
    return PromptSet(batch.xs, batch.values())


@dataclass
class SeedData:
    train: PromptSet | None  # None: fresh target prompts every step
    val: PromptSet
    test: PromptSet
    icl_curve: PromptSet
    icl_final: PromptSet


def seed_data(cfg: PromotConfig, n_points: int, n_dims: int, seed: int, device) -> SeedData:
    """Every split from its own seeded stream: the same for every arm of a seed."""
    gen = lambda name: icl.generator(device, seed, "promot", name)
    train = (sign_prompts(cfg.target_train_prompts, n_points, n_dims, gen("target-train"))
             if cfg.target_train_prompts else None)
    return SeedData(train, sign_prompts(cfg.val_prompts, n_points, n_dims, gen("target-val")),
                    sign_prompts(cfg.test_prompts, n_points, n_dims, gen("target-test")),
                    regression_prompts(cfg.curve_prompts, n_points, n_dims, gen("icl-curve")),
                    regression_prompts(cfg.icl_prompts, n_points, n_dims, gen("icl-final")))


def target_batch(cfg: PromotConfig, data: SeedData, shape: tuple[int, int], seed: int, stream: str,
                 step: int, size: int, device) -> PromptSet:
    """`size` target training prompts for this step, from step's own seed (reproducible)."""
    gen = icl.generator(device, seed, "promot", stream, step)
    if data.train is None:
        return sign_prompts(size, *shape, gen)
    return data.train.subset(torch.randint(len(data.train.xs), (size,), generator=gen, device=device))


# ----------------------------------------------------------------------------------------------------------------------
# The model with an optional soft prompt


class SoftPrompt(nn.Module):
    """prompt_len vectors in the backbone's input space, placed before the read-in embeddings of every prompt."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone())


@torch.no_grad()
def init_regression_prompt(model, length: int, gen: torch.Generator) -> SoftPrompt:
    """The read-in embeddings of sampled tokens from the pretraining distribution: x ~ N(0, I) and y ~ N(0, d)
    alternating, as pretraining prompts (the analogue of prompt tuning's sampled vocabulary embeddings)."""
    d = model.n_dims
    pairs = (length + 1) // 2
    xs = torch.randn(1, pairs, d, generator=gen, device=gen.device)
    ys = torch.randn(1, pairs, generator=gen, device=gen.device) * math.sqrt(d)
    return SoftPrompt(model.read_in(icl.interleave(xs, ys))[0, :length].float())


def predict_with_prompt(model, xs, ys, soft_prompt: SoftPrompt | None = None) -> torch.Tensor:
    """Predictions (B, n) at every x token, after the soft prompt when one is given (else the model unchanged)."""
    if soft_prompt is None:
        return model(xs, ys)
    tokens = model.read_in(icl.interleave(xs, ys))
    prefix = soft_prompt.embeddings.to(tokens.dtype).expand(len(xs), -1, -1)
    hidden = model.backbone.hidden_states(embeds=torch.cat([prefix, tokens], dim=1))[:, prefix.shape[1]:]
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 read-out, as RegressionTransformer.forward
        return model.read_out(hidden[:, 0::2].float()).squeeze(-1)


def check_prompt_fits(model, cfg: PromotConfig, n_points: int) -> None:
    """Learned absolute positions have a table of max_seq_len; rotary positions have no limit."""
    table = model.backbone.embed_positions
    if table is not None and cfg.prompt_len + 2 * n_points > table.num_embeddings:
        raise ValueError(f"--prompt-len {cfg.prompt_len}: with {n_points} points the input needs "
                         f"{cfg.prompt_len + 2 * n_points} positions; the backbone has {table.num_embeddings}")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def format_distance(values: torch.Tensor) -> torch.Tensor:
    """Distance of each value to the nearer of the target format's values -1 and +1."""
    return (values.abs() - 1).abs()


@torch.no_grad()
def prompt_predictions(model, prompts: PromptSet, soft_prompt: SoftPrompt | None = None) -> torch.Tensor:
    """(N, n) predictions in chunks, fp32."""
    model.eval()
    out = []
    for start in range(0, len(prompts.xs), EVAL_CHUNK):
        chunk = prompts.subset(slice(start, start + EVAL_CHUNK))
        with icl.bf16_autocast(chunk.xs.device):
            out.append(predict_with_prompt(model, chunk.xs, chunk.ys, soft_prompt).float())
    return torch.cat(out)


def target_metrics(model, prompts: PromptSet, tolerance: float, soft_prompt: SoftPrompt | None = None) -> dict:
    """Squared error against the +-1 labels and sign accuracy over every position; format_rate = the share of
    predictions within `tolerance` of -1 or +1, range_rate = the share with |y^| <= 1 + tolerance."""
    preds = prompt_predictions(model, prompts, soft_prompt)
    return {"mse": ((preds - prompts.ys) ** 2).mean().item(),
            "accuracy": (torch.sign(preds) == prompts.ys).float().mean().item(),
            "format_rate": (format_distance(preds) <= tolerance).float().mean().item(),
            "range_rate": (preds.abs() <= 1 + tolerance).float().mean().item()}


def icl_metrics(model, prompts: PromptSet, ks, tolerance: float, soft_prompt: SoftPrompt | None = None) -> dict:
    """Held-out in-context regression: squared error of the prediction after k examples for each k; over those
    predictions the leak rate (within `tolerance` of -1 or +1), the range rate (|y^| <= 1 + tolerance: inside the
    target task's output range, where a squared-error model of +-1 labels puts its hedged answers) and both rates of
    the true labels (chance: what a perfect regressor scores)."""
    preds = prompt_predictions(model, prompts, soft_prompt)[:, ks]
    ys = prompts.ys[:, ks]
    return {"mse": {str(k): ((preds[:, i] - ys[:, i]) ** 2).mean().item() for i, k in enumerate(ks)},
            "leak_rate": (format_distance(preds) <= tolerance).float().mean().item(),
            "chance_leak": (format_distance(ys) <= tolerance).float().mean().item(),
            "range_rate": (preds.abs() <= 1 + tolerance).float().mean().item(),
            "chance_range": (ys.abs() <= 1 + tolerance).float().mean().item()}


def heldout_icl(model, prompts: PromptSet, cfg: PromotConfig) -> dict:
    """THE held-out evaluation of every arm: the model alone, never with a soft prompt (the paper removes it)."""
    return icl_metrics(model, prompts, cfg.icl_k, cfg.leak_tolerance)


def curve_record(model, data: SeedData, cfg: PromotConfig, soft_prompt: SoftPrompt | None) -> dict:
    """One learning-curve point: the target validation split (with the prompt, if any) and the held-out tasks."""
    target = target_metrics(model, data.val, cfg.leak_tolerance, soft_prompt)
    icl_part = heldout_icl(model, data.icl_curve, cfg)
    return {"target_val_mse": target["mse"], "target_val_accuracy": target["accuracy"],
            **{f"icl_mse_k{k}": v for k, v in icl_part["mse"].items()}, "leak_rate": icl_part["leak_rate"],
            "range_rate": icl_part["range_rate"]}


# ----------------------------------------------------------------------------------------------------------------------
# One training stage with best-checkpoint selection


class BudgetExhausted(Exception):
    """The time budget ran out inside a stage: the stage's work is dropped (the job starts it again)."""


@dataclass
class StageResult:
    best_step: int
    best_score: float
    best_state: dict  # the state_dict of `keep` at best_step
    history: list


def evaluation_steps(steps: int, checkpoints: int, curve_points: int) -> tuple[set, set]:
    """(checkpoint steps considered for selection, learning-curve steps incl. 0 and the checkpoints)."""
    saves = {steps * i // checkpoints for i in range(1, checkpoints + 1)} - {0}
    return saves, {0} | saves | {steps * i // curve_points for i in range(1, curve_points + 1)}


def train_stage(params, batch_loss, evaluate, keep: nn.Module, *, steps: int, lr: float, checkpoints: int,
                curve_points: int, warmup_fraction: float, deadline: float, device) -> StageResult:
    """AdamW on `params` for `steps` steps (linear warm-up, then constant). At each learning-curve step, evaluate()
    gives a record with "target_val_mse"; at each checkpoint step the state of `keep` is kept if that score is the
    best so far (lower is better; step 0, the untrained start, is never selected)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=torch.device(device).type == "cuda")
    saves, curve = evaluation_steps(steps, checkpoints, curve_points)
    warmup = max(1, round(warmup_fraction * steps))
    best = StageResult(-1, math.inf, {}, [])
    for step in range(steps + 1):
        if step in curve:
            record = {"step": step, **evaluate()}
            best.history.append(record)
            if step in saves and record["target_val_mse"] < best.best_score:
                best.best_step, best.best_score = step, record["target_val_mse"]
                best.best_state = {k: v.detach().clone() for k, v in keep.state_dict().items()}
        if step == steps:
            break
        if time.monotonic() > deadline:
            raise BudgetExhausted()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps, 1.0)
        keep.train()
        with icl.bf16_autocast(device):
            loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    if best.best_step < 0:  # no finite score at any checkpoint: keep the last state, say so in the history
        best.best_step, best.best_state = steps, {k: v.detach().clone() for k, v in keep.state_dict().items()}
    return best


# ----------------------------------------------------------------------------------------------------------------------
# The arms


@dataclass
class JobContext:
    cfg: PromotConfig
    base: nn.Module  # the pretrained model (never trained in place)
    data: SeedData
    seed: int
    device: torch.device
    deadline: float
    shape: tuple[int, int]  # (n_points, n_dims)


def target_loss(model, prompts: PromptSet, soft_prompt: SoftPrompt | None = None) -> torch.Tensor:
    return ((predict_with_prompt(model, prompts.xs, prompts.ys, soft_prompt).float() - prompts.ys) ** 2).mean()


def finetune_stage(ctx: JobContext, arm: str, model, soft_prompt: SoftPrompt | None = None) -> StageResult:
    """Train the model's trainable weights (all for ft/mix/promot's stage 2; adapters for lora) on the target task,
    with a frozen soft prompt attached when given (ProMoT's stage 2), keeping the best checkpoint."""
    cfg = ctx.cfg
    n_mix = round(cfg.mix_fraction * cfg.batch) if arm == "mix" else 0

    def batch_loss(step):
        batch = target_batch(cfg, ctx.data, ctx.shape, ctx.seed, arm, step, cfg.batch - n_mix, ctx.device)
        errors = (predict_with_prompt(model, batch.xs, batch.ys, soft_prompt).float() - batch.ys) ** 2
        if n_mix:  # every prompt weighs the same, whichever task it comes from
            general = regression_prompts(n_mix, *ctx.shape, icl.generator(ctx.device, ctx.seed, "promot", "mix", step))
            errors = torch.cat([errors, (model(general.xs, general.ys).float() - general.ys) ** 2])
        return errors.mean()

    params = [p for p in model.parameters() if p.requires_grad]
    return train_stage(params, batch_loss, lambda: curve_record(model, ctx.data, cfg, soft_prompt), model,
                       steps=cfg.ft_steps, lr=cfg.lora_lr if arm == "lora" else cfg.ft_lr,
                       checkpoints=cfg.ft_checkpoints, curve_points=cfg.curve_points,
                       warmup_fraction=cfg.warmup_fraction, deadline=ctx.deadline, device=ctx.device)


def prompt_stage(ctx: JobContext) -> tuple[SoftPrompt, StageResult]:
    """ProMoT's stage 1 = the pt arm: a soft prompt trained with the model frozen; the best prompt is returned."""
    cfg, model = ctx.cfg, ctx.base
    soft_prompt = init_regression_prompt(model, cfg.prompt_len,
                                         icl.generator(ctx.device, ctx.seed, "promot", "prompt-init"))
    model.requires_grad_(False)

    def batch_loss(step):
        return target_loss(model, target_batch(cfg, ctx.data, ctx.shape, ctx.seed, "pt", step, cfg.batch,
                                                 ctx.device), soft_prompt)

    result = train_stage([soft_prompt.embeddings], batch_loss, lambda: curve_record(model, ctx.data, cfg, soft_prompt),
                         soft_prompt, steps=cfg.stage_steps("pt"), lr=cfg.pt_lr, checkpoints=cfg.pt_checkpoints,
                         curve_points=cfg.curve_points, warmup_fraction=cfg.warmup_fraction, deadline=ctx.deadline,
                         device=ctx.device)
    soft_prompt.load_state_dict(result.best_state)
    return soft_prompt.requires_grad_(False), result


def trainable_copy(ctx: JobContext, arm: str) -> nn.Module:
    model = copy.deepcopy(ctx.base)
    model.requires_grad_(True)
    model.backbone.embed_tokens.requires_grad_(False)  # unused by the regression model (read-in replaces them)
    model.backbone.lm_head.requires_grad_(False)
    if arm == "lora":  # LoRALinear draws its A matrices from the global generator: seed it per run
        torch.manual_seed(icl.stream_seed(ctx.seed, "promot", "lora-init"))
        apply_lora(model, rank=ctx.cfg.lora_rank, alpha=2.0 * ctx.cfg.lora_rank, targets=LORA_TARGETS)
    return model


def arm_result(ctx: JobContext, arm: str, model, soft_prompt: SoftPrompt | None, stages: dict) -> dict:
    """The arm's numbers on the test splits: target (with the prompt, if the arm has one), held-out before (the base
    model) and after (the trained model, never with the prompt)."""
    cfg = ctx.cfg
    result = {"arm": arm, "seed": ctx.seed,
              "target": target_metrics(model, ctx.data.test, cfg.leak_tolerance, soft_prompt),
              "target_before": target_metrics(ctx.base, ctx.data.test, cfg.leak_tolerance),
              "icl_before": heldout_icl(ctx.base, ctx.data.icl_final, cfg),
              "icl_after": heldout_icl(model, ctx.data.icl_final, cfg),
              "stages": {name: {"best_step": s.best_step, "best_val_mse": s.best_score, "steps": steps,
                                "history": s.history} for name, (s, steps) in stages.items()}}
    if soft_prompt is not None:  # diagnostic only: what the prompt does to held-out tasks if it were left in
        result["icl_with_prompt"] = icl_metrics(model, ctx.data.icl_final, cfg.icl_k, cfg.leak_tolerance, soft_prompt)
    return result


def run_finetune_arm(ctx: JobContext, arm: str) -> dict:
    model = trainable_copy(ctx, arm)
    stage = finetune_stage(ctx, arm, model)
    model.load_state_dict(stage.best_state)
    return arm_result(ctx, arm, model, None, {"ft": (stage, ctx.cfg.ft_steps)})


def run_promot_job(ctx: JobContext, folder: Path, arms) -> dict:
    """pt (stage 1, saved so that an interrupted job resumes at stage 2) and, if asked, promot (stage 2)."""
    cfg, results = ctx.cfg, {}
    pt_file = folder / "pt.json"
    if pt_file.is_file():
        results["pt"] = json.loads(pt_file.read_text())
        soft_prompt = SoftPrompt(icl.read_tensors(folder / "prompt.safetensors", ctx.device)["embeddings"])
        soft_prompt.requires_grad_(False)
    else:
        soft_prompt, stage1 = prompt_stage(ctx)
        results["pt"] = arm_result(ctx, "pt", ctx.base, soft_prompt, {"pt": (stage1, cfg.stage_steps("pt"))})
        atomic_write(folder / "prompt.safetensors",
                     lambda f: f.write(safetensors_bytes({"embeddings": soft_prompt.embeddings.detach().cpu()})))
        write_text(pt_file, json.dumps(results["pt"], indent=1))
    if "promot" in arms:
        model = trainable_copy(ctx, "promot")
        stage2 = finetune_stage(ctx, "promot", model, soft_prompt)
        model.load_state_dict(stage2.best_state)
        stage1 = results["pt"]["stages"]["pt"]
        results["promot"] = arm_result(ctx, "promot", model, soft_prompt, {"stage2": (stage2, cfg.ft_steps)})
        results["promot"]["stages"] = {"stage1": stage1, **results["promot"]["stages"]}
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Jobs: one (job, seed) per process, results in OUT/jobs/JOB-sSEED/ARM.json


def job_folder(out: Path, job: str, seed: int) -> Path:
    return out / "jobs" / f"{job}-s{seed}"


def pending_jobs(cfg: PromotConfig, out: Path) -> list[tuple[str, int]]:
    """(job, seed) pairs with an asked-for arm whose result file is missing, largest jobs first."""
    return [(job, seed) for job, arms in JOB_ARMS.items() for seed in range(cfg.seeds)
            if any(arm in cfg.arms and not (job_folder(out, job, seed) / f"{arm}.json").is_file() for arm in arms)]


def pretrained_folder(cfg: PromotConfig, out: Path) -> Path:
    return Path(cfg.pretrained) if cfg.pretrained else out / "pretrain"


def load_base(cfg: PromotConfig, out: Path, device) -> tuple[nn.Module, dict]:
    folder = pretrained_folder(cfg, out)
    if icl.finished_meta(folder) is None:
        raise FileNotFoundError(f"{folder}: no finished icl_regression pretraining checkpoint")
    model, meta = icl.load_regression_model(folder)
    return model.to(device).eval(), meta


def run_job(cfg: PromotConfig, out: Path, job: str, seed: int, device, deadline: float) -> bool:
    """Run one job (resuming at its saved stage); True when its arms' result files are written."""
    folder = job_folder(out, job, seed)
    arms = [arm for arm in JOB_ARMS[job] if arm in cfg.arms]
    with folder_lock(folder, "promot job"):
        base, meta = load_base(cfg, out, device)
        cfg = with_learning_rates(cfg, meta)
        shape = (meta["config"]["n_points"], meta["n_dims"])
        check_promot_config(cfg, shape[0])
        check_prompt_fits(base, cfg, shape[0])
        base.requires_grad_(False)
        ctx = JobContext(cfg, base, seed_data(cfg, *shape, seed, device), seed, torch.device(device), deadline, shape)
        try:
            results = run_promot_job(ctx, folder, arms) if job == "promot" else {job: run_finetune_arm(ctx, job)}
        except BudgetExhausted:
            print(f"{job} seed {seed}: stopped at the time budget (re-run to continue)")
            return False
        for arm, result in results.items():
            if arm in arms:
                write_text(folder / f"{arm}.json", json.dumps(result, indent=1))
        print(f"{job} seed {seed}: " + ", ".join(f"{a} target mse {r['target']['mse']:.3g}, leak "
                                                 f"{r['icl_after']['leak_rate']:.3f}" for a, r in results.items()))
    return True


def job_command(out: Path, job: str, seed: int, device: str, deadline: float) -> list[str]:
    budget = f"{deadline - time.monotonic() - 10:.0f}"  # 10 s for the child's start-up; "inf" if unbounded
    return [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--job", f"{job}:{seed}",
            "--device", device, "--time-budget", budget]


def run_jobs_in_parallel(out: Path, todo, devices: list[str], deadline: float, jobs: int) -> None:
    """Up to `jobs` job processes at once, spread round-robin over `devices` (a small model leaves a GPU mostly
    idle; separate processes overlap their kernel launches). Logs in OUT/logs/."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    waiting, running, failed, started = list(todo), [], [], 0
    while waiting or running:
        while waiting and len(running) < jobs and deadline - time.monotonic() > 30:
            job, seed = waiting.pop(0)
            log_path = out / "logs" / f"{job}-s{seed}.log"
            log = open(log_path, "a")
            command = job_command(out, job, seed, devices[started % len(devices)], deadline)
            running.append((log_path, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
            started += 1
        if not running:
            break
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            item[2].close()
            running.remove(item)
            if item[1].returncode != 0:
                print(f"{item[0]} (exit {item[1].returncode}), last lines:\n{item[0].read_text()[-2000:]}")
                failed.append(item[0].stem)
    if failed:
        raise SystemExit(f"error: promot jobs failed: {', '.join(failed)} (logs in {out / 'logs'})")


def run_promot(cfg: PromotConfig, out: Path, device, deadline: float, jobs: int) -> bool:
    """Pretrain (unless reusing a checkpoint), run every pending job, then write the report. True when complete."""
    if not cfg.pretrained:
        backbone_cfg = icl.REGRESSION_PRESETS[cfg.backbone]
        if not icl.pretrain(backbone_cfg, out, device, deadline, compile=torch.device(device).type == "cuda"):
            return False
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # hand pretraining's cached memory to the job processes
    _, meta = load_base(cfg, out, "cpu")
    check_promot_config(cfg, meta["config"]["n_points"])
    rates = with_learning_rates(cfg, meta)
    print(f"promot: learning rates ft {rates.ft_lr:g}, lora {rates.lora_lr:g}, prompt {rates.pt_lr:g}")
    todo = pending_jobs(cfg, out)
    if jobs <= 1:
        for job, seed in todo:
            if not run_job(cfg, out, job, seed, device, deadline):
                break
    else:
        count = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
        devices = [f"cuda:{i}" for i in range(count)] if count and torch.device(device).index is None else [str(device)]
        run_jobs_in_parallel(out, todo, devices, deadline, jobs)
    complete = not pending_jobs(cfg, out)
    write_report(out, rates, meta, complete, JOB_ARMS)
    return complete


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def backbone_points(cfg: PromotConfig) -> int:
    """Points per prompt of the backbone the run will use (checked before anything is written)."""
    if not cfg.pretrained:
        return icl.REGRESSION_PRESETS[cfg.backbone].n_points
    meta = icl.finished_meta(cfg.pretrained)
    if meta is None:
        raise FileNotFoundError(f"{cfg.pretrained}: no finished icl_regression pretraining checkpoint")
    return meta["config"]["n_points"]


def resolve_promot_config(args) -> PromotConfig:
    """The run's config: written to OUT/config.json on first use; later calls must not contradict it."""
    preset = "quick" if args.quick else args.preset_name
    wanted = config_from_args(PromotConfig, args, base=PROMOT_PRESETS[preset or "full"])
    given = {f.name: getattr(wanted, f.name) for f in dataclasses.fields(PromotConfig) if hasattr(args, f.name)}
    if preset:
        given["preset"] = preset
    path = args.out / "config.json"
    if not path.is_file():
        if args.job:
            raise FileNotFoundError(f"{path}: missing (start the run without --job)")
        check_promot_config(wanted, backbone_points(wanted))
        write_text(path, json.dumps(dataclasses.asdict(wanted), indent=1))
        return wanted
    stored = PromotConfig(**json.loads(path.read_text()))
    clashes = [f"{k}={v!r} (stored {getattr(stored, k)!r})" for k, v in given.items() if getattr(stored, k) != v]
    if clashes:
        raise ValueError(f"{path}: this run was started with other settings: {', '.join(clashes)}; use a new --out")
    return stored


def build_promot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promot", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/promot"), help="run folder (resumed if it exists)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda spreads the jobs over every visible GPU; cuda:N keeps them on one")
    parser.add_argument("--quick", action="store_true", help="the CPU-sized preset (same as --preset quick)")
    parser.add_argument("--preset", dest="preset_name", choices=list(PROMOT_PRESETS),
                        help="size and budgets (default full; stored in OUT)")
    parser.add_argument("--time-budget", type=float, default=math.inf,
                        help="seconds; stop before they run out (re-run the same command to continue)")
    parser.add_argument("--jobs", type=int, help="job processes side by side (default: 12 per GPU on CUDA, 1 on CPU)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # JOB:SEED, one job in this process (run_jobs_in_parallel)
    add_config_flags(parser.add_argument_group("settings (override the preset's; the defaults shown are full's)"),
                     PromotConfig)
    return parser


def main(argv=None):
    args = build_promot_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a CPU-sized model is per-op overhead: a second thread only adds synchronisation
    deadline = time.monotonic() + args.time_budget
    try:
        cfg = resolve_promot_config(args)
        if args.job:
            job, _, seed = args.job.partition(":")
            done = run_job(cfg, args.out, job, int(seed), device, deadline)
        else:
            with folder_lock(args.out, "promot run"):
                per_device = max(1, torch.cuda.device_count()) if device.type == "cuda" and device.index is None else 1
                jobs = args.jobs or (12 * per_device if device.type == "cuda" else 1)
                done = run_promot(cfg, args.out, device, deadline, jobs)
    except (ValueError, FileNotFoundError, FolderInUse) as e:
        raise SystemExit(f"error: {e}")
    print("promot: " + ("complete" if done else "stopped at the time budget; re-run the same command"))
    return done


if __name__ == "__main__":
    main()
