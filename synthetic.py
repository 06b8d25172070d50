"""The CFT paper's synthetic mechanism experiment (Choi et al., ICLR 2025, Sec. 5), end to end.

1. Pretrain a transformer to do linear regression in context (Garg et al. 2022): prompts
   (x_1, f(x_1), ..., x_k, f(x_k)) with f(x) = w^T x, x ~ N(0, I_d), w ~ N(0, I_d), a prediction at every x token,
   squared-error loss over all of them, curriculum on the dimension and the number of points.
2. Fine-tune it on a composite class G built on f, fresh tasks every step:
     polynomial g(x) = f(x) + f(x)^2    relu g(x) = max(0, f(x))    sumdot g(x) = w^T x + v^T x (v fresh per prompt)
   with three prompt constructions (the paper's "methods"):
     cpt      (the paper's UFT)  (x_i, g(x_i)) pairs only
     cft      k context pairs (x_i, f(x_i)) -- the same x's -- then the k pairs (x_i, g(x_i)); loss on the g half
     neg-cft  as cft, but the context labels are noise
3. Track, every `metric_every` steps, the cosine between the model's input gradient dy^/dx at the last query and the
   true gradient there ("inner product"), and finally the squared error at every in-context position.

The backbone is model.py's Llama Transformer fed through `hidden_states(embeds=...)`, with a linear read-in
(d -> width) and a linear read-out (width -> 1) as in Garg et al. Two differences from the official GPT-2 backbone:
rotary position embeddings replace GPT-2's learned absolute positions, and the MLP is SwiGLU (ffn width 2/3 of
GPT-2's 4x, so the parameter count matches). Rotary attention only sees relative positions, which makes one known
defect of the official code vanish: its UFT prompts sit on absolute positions 82..163 that pretraining never used;
here a prompt's absolute offset does not change the model's output (tests/test_synthetic.py checks this).

Known defects of the official code, kept as the default and fixable with flags:
  --fresh-context   the CFT context reuses the query x's, so the model can simply look f(x) up; draw fresh x's instead
  --matched-noise   NEG-CFT noise labels have variance 1 against d for real labels; use variance d
  the inner product always uses the polynomial gradient (1 + 2 w^T x) w, even for relu and sumdot: both that number
  ("inner_product", as the paper) and the cosine with each task's own gradient ("inner_product_true") are reported.
  Seeds: every sample here comes from a torch.Generator seeded by (seed, stream, step), so runs are reproducible and
  resume exactly.

Usage:
  python synthetic.py all --quick --out runs/quick             # CPU-sized grid, <= 5 minutes on 2 cores
  python synthetic.py all --out runs/synthetic --time-budget 540   # full scale on a GPU; re-run until "complete"
  python synthetic.py pretrain|finetune|evaluate|plot --out DIR ...   # the stages one by one
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cft import lr_at
from model import ModelConfig, create_model

TASKS = ("polynomial", "relu", "sumdot")  # the fine-tuning classes G
SAMPLER_TASKS = ("linear", "shifted-linear") + TASKS  # shifted-linear: w ~ N(w_shift, I), a task pretraining never saw
METHODS = ("cpt", "cft", "neg-cft")
# The paper's numbers (official code, d = 20, 41 points): raw squared error averaged over the 41 positions, and the
# polynomial inner product after 40k steps.
OFFICIAL_MSE = {"polynomial": {"cft": 0.33, "cpt": 850.0, "neg-cft": 888.0},
                "relu": {"cft": 1e-4, "cpt": 2.97, "neg-cft": 2.95},
                "sumdot": {"cft": 5.3, "cpt": 10.2, "neg-cft": 10.8}}
OFFICIAL_INNER_PRODUCT = {"polynomial": {"cft": 0.99, "cpt": 0.3, "neg-cft": 0.18}}


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    preset: str = "full"
    # problem (official: d = 20, 41 points = 2d + 1)
    n_dims: int = 20
    n_points: int = 41
    # backbone (official: GPT-2, 12 layers, 8 heads, width 256, MLP 1024 -> SwiGLU 688 has the same parameter count)
    dim: int = 256
    n_layers: int = 12
    n_heads: int = 8
    ffn_dim: int = 688
    # pretraining (official: 500k steps, batch 64, Adam 1e-4 constant, curriculum +1 dim and +2 points / 2000 steps)
    pretrain_steps: int = 16000
    pretrain_batch: int = 512
    pretrain_lr: float = 5e-4
    warmup_steps: int = 500
    curriculum_dims: int = 5  # first stage: 5 dims, 11 points, as the official schedule
    curriculum_points: int = 11
    curriculum_every: int = 250  # 250 steps x 512 prompts = the official 2000 x 64 prompts per stage
    quality_every: int = 500  # check the normalised error at 2d points (1280 prompts) every this many steps...
    stop_nmse: float = 0.05  # ...and stop pretraining early once it is this low (half the 0.1 target)
    # fine-tuning (official: 50k steps (relu 100k), batch 64, Adam 1e-4 constant)
    finetune_steps: int = 1500
    finetune_batch: int = 128
    finetune_lr: float = 2e-4
    finetune_warmup: int = 50
    seeds: int = 3
    metric_every: int = 100
    metric_prompts: int = 256
    eval_prompts: int = 1280
    # fixes of the official code's defects (off = faithful)
    fresh_context: bool = False
    matched_noise: bool = False

    def model_config(self) -> ModelConfig:
        # vocab_size=1: the backbone's token embedding and LM head are unused (read-in/read-out replace them).
        # max_seq_len only bounds the CFT prompt (2 x n_points pairs = 4 x n_points tokens); rotary needs no table.
        return ModelConfig(vocab_size=1, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_heads, ffn_dim=self.ffn_dim, max_seq_len=4 * self.n_points)


PRESETS = {
    "full": Config(),
    # CPU-sized: d = 5, 11 points, a 2-layer width-64 model; the whole grid in <= 5 minutes on 2 cores.
    "quick": Config(preset="quick", n_dims=5, n_points=11, dim=64, n_layers=2, n_heads=4, ffn_dim=176,
                    pretrain_steps=2500, pretrain_batch=64, pretrain_lr=3e-3, warmup_steps=100, curriculum_dims=2,
                    curriculum_points=5, curriculum_every=150, quality_every=500, finetune_steps=150,
                    finetune_batch=64, finetune_lr=2e-3, finetune_warmup=10, metric_every=25, metric_prompts=128,
                    eval_prompts=512),
    # smaller still, for tests/test_synthetic.py
    "test": Config(preset="test", n_dims=3, n_points=7, dim=32, n_layers=2, n_heads=2, ffn_dim=88,
                   pretrain_steps=600, pretrain_batch=64, pretrain_lr=2e-3, warmup_steps=50, curriculum_dims=3,
                   curriculum_points=7, curriculum_every=1000, quality_every=200, finetune_steps=150,
                   finetune_batch=64, finetune_lr=3e-3, finetune_warmup=10, seeds=1, metric_every=50,
                   metric_prompts=64, eval_prompts=256),
}


def stream_seed(seed: int, *stream) -> int:
    """A 63-bit seed for one named random stream (e.g. seed 0, "finetune/relu", step 17). Seeding per step makes
    resuming exact without saving generator state."""
    digest = hashlib.sha256("/".join(map(str, (seed,) + stream)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(device, seed: int, *stream) -> torch.Generator:
    return torch.Generator(device).manual_seed(stream_seed(seed, *stream))


# ----------------------------------------------------------------------------------------------------------------------
# Tasks: the function classes, their values and their true input gradients


@dataclass
class TaskBatch:
    task: str
    xs: torch.Tensor  # (B, k, d) query points
    w: torch.Tensor  # (B, d) base weights: f(x) = w^T x
    v: torch.Tensor  # (B, d) second weights (sumdot only; drawn for every task so the xs match across tasks)

    def base(self, xs=None) -> torch.Tensor:
        """f(x) = w^T x, (B, k)."""
        return torch.einsum("bkd,bd->bk", self.xs if xs is None else xs, self.w)

    def values(self, xs=None) -> torch.Tensor:
        """The task's labels g(x), (B, k)."""
        xs = self.xs if xs is None else xs
        f = self.base(xs)
        if self.task in ("linear", "shifted-linear"):
            return f
        if self.task == "polynomial":
            return f + f ** 2
        if self.task == "relu":
            return F.relu(f)
        return f + torch.einsum("bkd,bd->bk", xs, self.v)  # sumdot

    def gradient(self, x) -> torch.Tensor:
        """The true input gradient of g at x (B, d), per task."""
        f = torch.einsum("bd,bd->b", x, self.w)[:, None]
        if self.task in ("linear", "shifted-linear"):
            return self.w
        if self.task == "polynomial":
            return (1 + 2 * f) * self.w
        if self.task == "relu":
            return (f > 0) * self.w
        return self.w + self.v  # sumdot

    def official_gradient(self, x) -> torch.Tensor:
        """The official code's formula for every task: the polynomial gradient (1 + 2 w^T x) w."""
        return (1 + 2 * torch.einsum("bd,bd->b", x, self.w)[:, None]) * self.w


def sample_tasks(task: str, batch_size: int, n_points: int, n_dims: int, gen: torch.Generator, *,
                 active_dims: int | None = None, w_shift: float = 1.0) -> TaskBatch:
    """One fresh task per prompt: w, v ~ N(0, I_d) (w ~ N(w_shift, I_d) for shifted-linear), x ~ N(0, I_d).
    active_dims < n_dims zeroes the trailing coordinates of x (Garg et al.'s dimension curriculum)."""
    if task not in SAMPLER_TASKS:
        raise ValueError(f"task '{task}' is not one of {', '.join(SAMPLER_TASKS)}")
    device = gen.device
    w = torch.randn(batch_size, n_dims, generator=gen, device=device)
    if task == "shifted-linear":
        w = w + w_shift
    v = torch.randn(batch_size, n_dims, generator=gen, device=device)
    xs = torch.randn(batch_size, n_points, n_dims, generator=gen, device=device)
    if active_dims is not None and active_dims < n_dims:
        xs[..., active_dims:] = 0
    return TaskBatch(task, xs, w, v)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt constructions


@dataclass
class Prompt:
    xs: torch.Tensor  # (B, n_context + k, d)
    ys: torch.Tensor  # (B, n_context + k)
    n_context: int  # leading pairs that are context only: no loss, not evaluated


def build_prompt(method: str, batch: TaskBatch, gen: torch.Generator, *, fresh_context: bool = False,
                 matched_noise: bool = False) -> Prompt:
    g = batch.values()
    if method == "cpt":
        return Prompt(batch.xs, g, 0)
    if method not in ("cft", "neg-cft"):
        raise ValueError(f"method '{method}' is not one of {', '.join(METHODS)}")
    B, k, d = batch.xs.shape
    context_xs = torch.randn(B, k, d, generator=gen, device=gen.device) if fresh_context else batch.xs
    if method == "cft":
        context_ys = batch.base(context_xs)
    else:  # noise labels: std 1 as the official code, or sqrt(d) = the std of real labels w^T x
        context_ys = torch.randn(B, k, generator=gen, device=gen.device) * (math.sqrt(d) if matched_noise else 1.0)
    return Prompt(torch.cat([context_xs, batch.xs], dim=1), torch.cat([context_ys, g], dim=1), k)


def sample_prompt(cfg: Config, task: str, method: str, batch_size: int, gen: torch.Generator):
    """(Prompt, TaskBatch): fresh tasks of the run's size, in the run's prompt construction."""
    batch = sample_tasks(task, batch_size, cfg.n_points, cfg.n_dims, gen)
    return build_prompt(method, batch, gen, fresh_context=cfg.fresh_context, matched_noise=cfg.matched_noise), batch


# ----------------------------------------------------------------------------------------------------------------------
# The model


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(B, k, d), (B, k) -> (B, 2k, d) tokens x_1, y_1, x_2, y_2, ... with y embedded as [y, 0, ..., 0]."""
    B, k, d = xs.shape
    y_tokens = torch.cat([ys[..., None].to(xs.dtype), xs.new_zeros(B, k, d - 1)], dim=-1)
    return torch.stack([xs, y_tokens], dim=2).reshape(B, 2 * k, d)


class RegressionTransformer(nn.Module):
    """Garg et al.'s in-context regression model on model.py's Transformer: read_in (d -> width) on every token,
    the backbone's blocks (rotary positions instead of GPT-2's learned ones), read_out (width -> 1) at the x tokens."""

    def __init__(self, n_dims: int, cfg: ModelConfig):
        super().__init__()
        self.n_dims = n_dims
        self.read_in = nn.Linear(n_dims, cfg.dim)
        self.backbone = create_model(cfg)
        self.backbone.embed_tokens.requires_grad_(False)  # unused: inputs come in through `embeds`
        self.backbone.lm_head.requires_grad_(False)  # unused: read_out replaces it
        self.read_out = nn.Linear(cfg.dim, 1)

    def forward(self, xs, ys, **backbone_kwargs):
        """xs (B, k, d), ys (B, k) -> predictions (B, k); prediction i sees x_1, y_1, ..., x_i but not y_i.
        backbone_kwargs (prefix_kv, mask, positions) go to Transformer.hidden_states unchanged."""
        h = self.backbone.hidden_states(embeds=self.read_in(interleave(xs, ys)), **backbone_kwargs)
        # Read out in fp32 even under bf16 autocast: labels reach the hundreds (polynomial), where bf16's 8-bit
        # mantissa alone would cost a squared error of ~0.1, the size of the numbers being measured.
        with torch.autocast(h.device.type, enabled=False):
            return self.read_out(h[:, 0::2].float()).squeeze(-1)


def build_model(cfg: Config, seed: int) -> RegressionTransformer:
    torch.manual_seed(seed)
    return RegressionTransformer(cfg.n_dims, cfg.model_config())


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: a folder with model.safetensors, optimizer.safetensors (while training) and meta.json; no pickle.


def save_checkpoint(path: Path, model: nn.Module, meta: dict, optimizer=None) -> None:
    """Write to PATH.tmp, then swap it in: an interrupted save never damages the previous good checkpoint."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if optimizer is not None:
        state = optimizer.state_dict()["state"]
        save_file({f"{i}.{name}": t.detach().cpu().contiguous() for i, s in state.items() for name, t in s.items()},
                  tmp / "optimizer.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(path) -> Path | None:
    """The checkpoint folder to read, or None: PATH, or PATH.old if a save was interrupted between its two renames."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / "meta.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    return None


def read_tensors(path: Path, device="cpu") -> dict:
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_meta(path) -> dict | None:
    """A checkpoint folder's meta.json, also when its weights were not copied along (results travel without them)."""
    path = Path(path)
    found = checkpoint_dir(path)
    if found is None and (path / "meta.json").is_file():
        found = path
    return None if found is None else json.loads((found / "meta.json").read_text())


def load_model(path) -> tuple[RegressionTransformer, dict]:
    """(model on CPU in fp32, meta dict) from a checkpoint folder written by this file."""
    found = checkpoint_dir(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not a synthetic.py checkpoint (expected meta.json and model.safetensors)")
    meta = json.loads((found / "meta.json").read_text())
    model = RegressionTransformer(meta["n_dims"], ModelConfig(**meta["model_config"]))
    model.load_state_dict(read_tensors(found / "model.safetensors"))
    return model, meta


def load_optimizer(optimizer, path: Path) -> None:
    state = {}
    for key, t in read_tensors(path).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def squared_errors(model, prompt: Prompt) -> torch.Tensor:
    """(B, k) squared error at every evaluated position (the pairs after the context)."""
    preds = model(prompt.xs, prompt.ys).float()
    return (preds[:, prompt.n_context:] - prompt.ys[:, prompt.n_context:].float()) ** 2


def cosine(a, b) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def inner_products(model, prompt: Prompt, batch: TaskBatch) -> dict:
    """Cosine between d(prediction at the last query)/d(that query's x) and the true gradient there, batch mean.

    Only the query token's own x is differentiated: in a CFT prompt the same x also sits in the context, and the
    paper's quantity is the gradient of the function the model applies to its query. Rows where the true gradient is
    zero (relu with w^T x < 0) have no direction and are left out of "inner_product_true"."""
    xs = prompt.xs.detach().clone().requires_grad_(True)  # a fresh leaf: each token position is its own input
    with torch.enable_grad():
        preds = model(xs, prompt.ys)
        (grad,) = torch.autograd.grad(preds[:, -1].float().sum(), xs)
    model_grad, x = grad[:, -1], batch.xs[:, -1]
    true_grad = batch.gradient(x)
    nonzero = true_grad.norm(dim=-1) > 0
    return {"inner_product": cosine(model_grad, batch.official_gradient(x)).mean().item(),
            "inner_product_true": cosine(model_grad[nonzero], true_grad[nonzero]).mean().item()}


@torch.no_grad()
def nmse_curve(model, cfg: Config, device, seed: int = 0, n_prompts: int = 1280) -> list[float]:
    """Pretraining quality: squared error / d at every position on fresh linear tasks (Garg et al.'s y-axis;
    predicting 0 scores 1)."""
    gen = generator(device, seed, "quality")
    errors = []
    for start in range(0, n_prompts, 256):
        batch = sample_tasks("linear", min(256, n_prompts - start), cfg.n_points, cfg.n_dims, gen)
        errors.append(squared_errors(model, Prompt(batch.xs, batch.values(), 0)))
    return (torch.cat(errors).mean(0) / cfg.n_dims).tolist()


@torch.no_grad()
def evaluate_run(model, cfg: Config, task: str, method: str, seed: int, device) -> dict:
    """Squared error at every in-context position over cfg.eval_prompts fresh prompts (the same prompts for every
    method of a seed), and the inner products on the first 256 of them."""
    gen = generator(device, seed, "eval", task)
    errors, first = [], None
    for start in range(0, cfg.eval_prompts, 256):
        prompt, batch = sample_prompt(cfg, task, method, min(256, cfg.eval_prompts - start), gen)
        errors.append(squared_errors(model, prompt))
        first = first or (prompt, batch)
    curve = torch.cat(errors).mean(0)
    return {"mse": curve.mean().item(), "mse_by_position": curve.tolist(), **inner_products(model, *first)}


# ----------------------------------------------------------------------------------------------------------------------
# Training: one loop for pretraining and fine-tuning


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); plain fp32 on CPU."""
    device = torch.device(device)
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def train(model, run_dir: Path, meta: dict, batch_loss, lr_of_step, *, total_steps: int, device, deadline: float,
          compiled=None, metric=None, metric_every: int = 100, finished_early=None, save_every_s: float = 120.0,
          stop_at: int | None = None, desc: str = "") -> bool:
    """Train from meta["step"] to total_steps, or until the deadline (time.monotonic()) or stop_at; checkpoint into
    run_dir. Every metric_every steps, meta["history"] gets the loss and metric(model); finished_early(record) may end
    training there. Returns True when finished. batch_loss(model, step) samples step's batch from its own seed, so a
    resumed run sees exactly the batches an uninterrupted one would have."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr_of_step(0), weight_decay=0.0, fused=torch.device(device).type == "cuda")
    found = checkpoint_dir(run_dir)
    if found is not None and (found / "optimizer.safetensors").is_file():
        load_optimizer(optimizer, found / "optimizer.safetensors")
    forward = model if compiled is None else compiled
    step, finished = meta["step"], meta.get("finished_early", False)
    start = last_save = time.monotonic()
    seconds_before = meta.get("seconds", 0.0)  # training time of earlier calls (compile included): the speed target
    stop = total_steps if stop_at is None else min(stop_at, total_steps)
    bar = tqdm(total=total_steps, initial=step, desc=desc, leave=False, dynamic_ncols=True)
    model.train()
    while not finished and step < stop and time.monotonic() < deadline:
        for group in optimizer.param_groups:
            group["lr"] = lr_of_step(step)
        with autocast(device):
            loss = batch_loss(forward, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % metric_every == 0 or step == total_steps:
            record = {"step": step, "loss": loss.item()}
            if metric is not None:
                model.eval()
                record.update(metric(model))
                model.train()
            meta["history"].append(record)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
            finished = meta["finished_early"] = finished_early is not None and finished_early(record)
        if time.monotonic() - last_save > save_every_s:
            meta["step"], meta["seconds"] = step, seconds_before + time.monotonic() - start
            save_checkpoint(run_dir, model, meta, optimizer)
            last_save = time.monotonic()
    bar.close()
    model.eval()
    meta["step"], meta["seconds"] = step, seconds_before + time.monotonic() - start
    save_checkpoint(run_dir, model, meta, optimizer)
    return finished or step >= total_steps


def curriculum(cfg: Config, step: int) -> tuple[int, int]:
    """(active dims, points in the loss) at this step: +1 dim and +2 points every cfg.curriculum_every steps."""
    stage = step // cfg.curriculum_every
    return min(cfg.n_dims, cfg.curriculum_dims + stage), min(cfg.n_points, cfg.curriculum_points + 2 * stage)


def pretrain(cfg: Config, out: Path, device, deadline: float = math.inf, *, seed: int = 0, compile: bool = False,
             stop_at: int | None = None) -> bool:
    """Pretrain (or resume) out/pretrain; returns True once finished (its meta.json then holds the quality check)."""
    run_dir = out / "pretrain"
    meta = read_meta(run_dir)
    if meta is not None and meta["done"]:
        return True
    model = build_model(cfg, seed)
    found = checkpoint_dir(run_dir)
    if found is None:  # a new run (or only its meta.json survived a copy: start over)
        meta = {"kind": "pretrain", "n_dims": cfg.n_dims, "model_config": dataclasses.asdict(cfg.model_config()),
                "config": dataclasses.asdict(cfg), "seed": seed, "step": 0, "done": False, "history": []}
    else:
        model.load_state_dict(read_tensors(found / "model.safetensors"))
    model.to(device)

    def batch_loss(forward, step):
        # Constant shapes (all n_points, all dims) so a compiled model never recompiles: the curriculum zeroes the
        # inactive dims and restricts the loss to the first `points` predictions, which causal attention keeps
        # independent of the later pairs.
        dims, points = curriculum(cfg, step)
        batch = sample_tasks("linear", cfg.pretrain_batch, cfg.n_points, cfg.n_dims,
                             generator(device, seed, "pretrain", step), active_dims=dims)
        ys = batch.values()
        return F.mse_loss(forward(batch.xs, ys)[:, :points].float(), ys[:, :points])

    def quality(model):
        return {"nmse_at_2d": nmse_curve(model, cfg, device, n_prompts=cfg.eval_prompts)[2 * cfg.n_dims]}

    def good_enough(record):  # only once the curriculum has reached the full problem
        full = curriculum(cfg, record["step"] - 1) == (cfg.n_dims, cfg.n_points)
        return full and record["nmse_at_2d"] <= cfg.stop_nmse

    lr = lambda step: lr_at(step, cfg.pretrain_lr, cfg.warmup_steps, cfg.pretrain_steps, 0.1)
    done = train(model, run_dir, meta, batch_loss, lr, total_steps=cfg.pretrain_steps, device=device,
                 deadline=deadline, compiled=torch.compile(model) if compile else None, metric=quality,
                 metric_every=cfg.quality_every, finished_early=good_enough, stop_at=stop_at, desc="pretrain")
    if done:
        curve = nmse_curve(model, cfg, device)
        meta["quality"] = {"nmse_by_position": curve, "nmse_at_2d": curve[2 * cfg.n_dims], "target": 0.1,
                           "steps": meta["step"]}
        meta["done"] = True
        save_checkpoint(run_dir, model, meta)  # without the optimizer state: finished
        print(f"pretrain: normalised squared error with {2 * cfg.n_dims} in-context points = "
              f"{curve[2 * cfg.n_dims]:.4f} (target <= 0.1: {'met' if curve[2 * cfg.n_dims] <= 0.1 else 'NOT met'})")
    return done


def run_name(task: str, method: str, seed: int) -> str:
    return f"{task}-{method}-s{seed}"


def finetune(cfg: Config, out: Path, task: str, method: str, seeds, device, deadline: float = math.inf, *,
             compile: bool = False, stop_at: int | None = None) -> bool:
    """Fine-tune the pretrained model on (task, method) for each seed (resuming), then evaluate each finished run into
    out/finetune/RUN/eval.json. One model object is reused across seeds so a compiled graph is built once."""
    seeds = [seed for seed in seeds if not (out / "finetune" / run_name(task, method, seed) / "eval.json").is_file()]
    if not seeds:
        return True
    pretrained = checkpoint_dir(out / "pretrain")
    if pretrained is None or not read_meta(pretrained)["done"]:
        raise FileNotFoundError(f"{out / 'pretrain'}: no finished pretraining checkpoint (run `pretrain` first)")
    model = build_model(cfg, 0).to(device)
    compiled = torch.compile(model) if compile else None
    all_done = True
    for seed in seeds:
        run_dir = out / "finetune" / run_name(task, method, seed)
        found = checkpoint_dir(run_dir)
        if found is None:  # a new run (or only its meta.json survived a copy: start over)
            meta = {"kind": "finetune", "task": task, "method": method, "seed": seed, "n_dims": cfg.n_dims,
                    "model_config": dataclasses.asdict(cfg.model_config()), "config": dataclasses.asdict(cfg),
                    "step": 0, "done": False, "history": []}
            weights = pretrained / "model.safetensors"
        else:
            meta, weights = read_meta(run_dir), found / "model.safetensors"
        model.load_state_dict(read_tensors(weights, device))
        metric_prompt = sample_prompt(cfg, task, method, cfg.metric_prompts, generator(device, seed, "metric", task))

        def batch_loss(forward, step):
            prompt, _ = sample_prompt(cfg, task, method, cfg.finetune_batch,
                                      generator(device, seed, "finetune", task, step))
            return squared_errors(forward, prompt).mean()

        lr = lambda step: lr_at(step, cfg.finetune_lr, cfg.finetune_warmup, cfg.finetune_steps, 1.0)
        done = train(model, run_dir, meta, batch_loss, lr, total_steps=cfg.finetune_steps, device=device,
                     deadline=deadline, compiled=compiled, metric=lambda m: inner_products(m, *metric_prompt),
                     metric_every=cfg.metric_every, stop_at=stop_at, desc=run_name(task, method, seed))
        if not done:
            all_done = False
            break
        meta["done"] = True
        save_checkpoint(run_dir, model, meta)  # without the optimizer state: finished
        result = evaluate_run(model, cfg, task, method, seed, device)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        print(f"{run_name(task, method, seed)}: mse {result['mse']:.4g}, inner product {result['inner_product']:.3f}")
    return all_done


# ----------------------------------------------------------------------------------------------------------------------
# Results: aggregate over seeds, table beside the official numbers, plots


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def collect(out: Path) -> dict:
    """{task: {method: {"mse", "mse_std", "inner_product", "inner_product_std", "inner_product_true", "seeds"}}} over
    the finished runs in out/finetune (mean and sample std over seeds)."""
    results = {}
    for task in TASKS:
        for method in METHODS:
            paths = sorted((out / "finetune").glob(f"{task}-{method}-s*/eval.json"))
            evals = [json.loads(p.read_text()) for p in paths]
            if not evals:
                continue
            entry = {"seeds": len(evals)}
            for key in ("mse", "inner_product", "inner_product_true"):
                entry[key], entry[key + "_std"] = mean_std([e[key] for e in evals])
            results.setdefault(task, {})[method] = entry
    return results


def results_table(results: dict, pretrain_meta: dict | None) -> str:
    lines = ["| task | method | squared error (mean ± std) | official | inner product (official formula) | "
             "official | inner product (task's gradient) | seeds |", "|---|---|---|---|---|---|---|---|"]
    for task, by_method in results.items():
        for method, r in by_method.items():
            lines.append(f"| {task} | {method} | {r['mse']:.4g} ± {r['mse_std']:.2g} | "
                         f"{OFFICIAL_MSE[task][method]:g} | {r['inner_product']:.3f} ± {r['inner_product_std']:.3f} | "
                         f"{OFFICIAL_INNER_PRODUCT.get(task, {}).get(method, '–')} | "
                         f"{r['inner_product_true']:.3f} ± {r['inner_product_true_std']:.3f} | {r['seeds']} |")
    if pretrain_meta and "quality" in pretrain_meta:
        q = pretrain_meta["quality"]
        lines.append(f"\nPretraining: normalised squared error at {2 * pretrain_meta['n_dims']} in-context points = "
                     f"{q['nmse_at_2d']:.4f} (target <= {q['target']}).")
    return "\n".join(lines) + "\n"


def evaluate(out: Path, device) -> dict:
    """Evaluate finished runs that lack eval.json, then write out/results.json and out/results.md."""
    cfg = load_config(out)
    for run_dir in sorted((out / "finetune").glob("*-s*")):
        meta = read_meta(run_dir)
        if meta is None or not meta["done"] or (run_dir / "eval.json").is_file() or checkpoint_dir(run_dir) is None:
            continue
        model, meta = load_model(run_dir)
        result = evaluate_run(model.to(device).eval(), cfg, meta["task"], meta["method"], meta["seed"], device)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    results = collect(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results, read_meta(out / "pretrain")))
    return results


def plot(out: Path) -> list[Path]:
    """Inner product against fine-tuning step and squared error against position, per task: CSV always, PNG when
    matplotlib is installed. Returns the files written."""
    curves, errors = ["task,method,seed,step,loss,inner_product,inner_product_true"], ["task,method,seed,position,mse"]
    runs = []
    for run_dir in sorted((out / "finetune").glob("*-s*")):
        meta = read_meta(run_dir)
        if meta is None or not (run_dir / "eval.json").is_file():
            continue
        result = json.loads((run_dir / "eval.json").read_text())
        runs.append((meta, result))
        for h in meta["history"]:
            curves.append(f"{meta['task']},{meta['method']},{meta['seed']},{h['step']},{h['loss']},"
                          f"{h['inner_product']},{h['inner_product_true']}")
        for i, e in enumerate(result["mse_by_position"]):
            errors.append(f"{meta['task']},{meta['method']},{meta['seed']},{i + 1},{e}")
    written = [out / "inner_product.csv", out / "mse_by_position.csv"]
    written[0].write_text("\n".join(curves) + "\n")
    written[1].write_text("\n".join(errors) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; wrote CSV files only (pip install matplotlib for PNGs)")
        return written
    for name, ylabel, series in (("inner_product", "cosine(model gradient, true gradient)",
                                  lambda m, r: ([h["step"] for h in m["history"]],
                                                [h["inner_product"] for h in m["history"]])),
                                 ("mse_by_position", "squared error",
                                  lambda m, r: (list(range(1, len(r["mse_by_position"]) + 1)), r["mse_by_position"]))):
        fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4))
        for ax, task in zip(axes, TASKS):
            for color, method in zip(("C0", "C1", "C2"), METHODS):
                chosen = [(m, r) for m, r in runs if m["task"] == task and m["method"] == method]
                for i, (meta, result) in enumerate(chosen):
                    ax.plot(*series(meta, result), color=color, alpha=0.7, label=method if i == 0 else None)
            ax.set_title(task)
            ax.set_xlabel("fine-tuning step" if name == "inner_product" else "in-context examples + 1")
            ax.set_ylabel(ylabel)
            if name == "mse_by_position":
                ax.set_yscale("log")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


# ----------------------------------------------------------------------------------------------------------------------
# The whole grid, resumable within a time budget


def run_all(cfg: Config, out: Path, device, deadline: float = math.inf, *, compile_pretrain: bool = False,
            compile_finetune: bool = False, jobs: int = 1) -> bool:
    """Pretrain, fine-tune every (task, method, seed), evaluate, plot. Returns True when everything is finished;
    False when the deadline came first (re-run the same command to continue)."""
    if not pretrain(cfg, out, device, deadline, compile=compile_pretrain):
        return False
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # hand pretraining's cached activation memory to the fine-tuning processes
    seeds = list(range(cfg.seeds))
    pairs = [(task, method) for task in TASKS for method in METHODS]
    if jobs <= 1:
        for task, method in pairs:
            if not finetune(cfg, out, task, method, seeds, device, deadline, compile=compile_finetune):
                return False
    elif not finetune_in_parallel(out, pairs, seeds, device, deadline, compile_finetune, jobs):
        return False
    results = evaluate(out, device)
    plot(out)
    return all(results.get(t, {}).get(m, {}).get("seeds") == cfg.seeds for t, m in pairs)


def finetune_in_parallel(out: Path, pairs, seeds, device, deadline: float, compile: bool, jobs: int) -> bool:
    """One `finetune` process per (task, method), `jobs` at a time: a small model leaves a GPU mostly idle, and
    separate processes overlap their kernel launches. Each process writes its log to out/logs/."""
    (out / "logs").mkdir(exist_ok=True)
    evaluated = lambda t, m: sum((out / "finetune" / run_name(t, m, s) / "eval.json").is_file() for s in seeds)
    waiting, running, failed = [(t, m) for t, m in pairs if evaluated(t, m) < len(seeds)], [], []
    bar = tqdm(total=len(pairs) * len(seeds), initial=sum(evaluated(t, m) for t, m in pairs), desc="fine-tuning runs")
    while waiting or running:
        while waiting and len(running) < jobs and deadline - time.monotonic() > 60:
            task, method = waiting.pop(0)
            budget = f"{deadline - time.monotonic() - 15:.0f}"  # 15 s for the child's start-up; "inf" if unbounded
            command = [sys.executable, str(Path(__file__).resolve()), "finetune", "--out", str(out), "--task", task,
                       "--method", method, "--seed", *map(str, seeds), "--device", str(device),
                       "--time-budget", budget, "--compile" if compile else "--no-compile"]
            log_path = out / "logs" / f"{task}-{method}.log"
            log = open(log_path, "a")
            running.append((log_path, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        if not running:
            break  # the deadline came before every pair could start
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            log_path, process, log = item
            log.close()
            running.remove(item)
            if process.returncode != 0:
                tail = log_path.read_text(errors="replace")[-2000:]
                print(f"\n{log_path} (exit {process.returncode}), last lines:\n{tail}")
                failed.append(log_path.stem)
        bar.update(sum(evaluated(t, m) for t, m in pairs) - bar.n)
    bar.close()
    if failed:
        raise SystemExit(f"error: fine-tuning failed for {', '.join(failed)} (logs in {out / 'logs'})")
    return all(evaluated(t, m) == len(seeds) for t, m in pairs)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


CONFIG_FLAGS = ("pretrain_steps", "pretrain_batch", "pretrain_lr", "finetune_steps", "finetune_batch", "finetune_lr",
                "seeds", "fresh_context", "matched_noise")


def load_config(out: Path) -> Config:
    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (start the run with `all` or `pretrain`)")
    return Config(**json.loads(path.read_text()))


def resolve_config(args) -> Config:
    """The run's config: stored in OUT/config.json on first use; later calls must not contradict it."""
    preset = "quick" if getattr(args, "quick", False) else args.preset
    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}
    wanted = dataclasses.replace(PRESETS[preset or "full"], **overrides)
    path = args.out / "config.json"
    if not path.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(wanted), indent=1))
        return wanted
    stored = load_config(args.out)
    clashes = [f"{k}={v!r} (stored {getattr(stored, k)!r})" for k, v in
               (("preset", preset), *overrides.items()) if v is not None and getattr(stored, k) != v]
    if clashes:
        raise SystemExit(f"error: {path}: this run was started with other settings: {', '.join(clashes)}; "
                         f"use a new --out")
    return stored


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="run folder (resumed if it exists)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--preset", choices=list(PRESETS), help="size and schedule (default full; stored in OUT)")
    training.add_argument("--time-budget", type=float, default=math.inf,
                          help="seconds; checkpoint and exit 0 before they run out (re-run to continue)")
    training.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                          help="torch.compile the training forward (default: pretraining on CUDA yes; fine-tuning no, "
                               "its --jobs processes run side by side and would each compile)")
    for flag in CONFIG_FLAGS:
        kind = type(getattr(Config, flag))
        name = "--" + flag.replace("_", "-")
        if kind is bool:
            training.add_argument(name, action="store_const", const=True, help="fix the official code's defect")
        else:
            training.add_argument(name, type=kind)
    sub.add_parser("pretrain", parents=[common, training], help="pretrain on in-context linear regression")
    p = sub.add_parser("finetune", parents=[common, training], help="fine-tune one (task, method) for some seeds")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--seed", type=int, nargs="+", help="seeds to run (default: 0 .. seeds-1)")
    sub.add_parser("evaluate", parents=[common], help="evaluate finished runs; write results.json and results.md")
    sub.add_parser("plot", parents=[common], help="inner-product and error curves (PNG with matplotlib, CSV always)")
    p = sub.add_parser("all", parents=[common, training], help="the whole grid, resumable")
    p.add_argument("--quick", action="store_true", help="the CPU-sized preset (same as --preset quick)")
    p.add_argument("--jobs", type=int, help="concurrent fine-tuning processes (default: 9 on CUDA, 1 on CPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU-sized models are all per-op overhead: a second intra-op thread only adds synchronisation (measured on
        # 2 busy cores: the test grid took 21 s with 1 thread, 272 s with 2).
        torch.set_num_threads(1)
    try:
        if args.command in ("evaluate", "plot"):
            if args.command == "evaluate":
                print(results_table(evaluate(args.out, device), read_meta(args.out / "pretrain")))
            else:
                print("wrote", ", ".join(str(p) for p in plot(args.out)))
            return
        cfg = resolve_config(args)
        deadline = time.monotonic() + args.time_budget
        compile_pretrain = device.type == "cuda" if args.compile is None else args.compile
        compile_finetune = bool(args.compile)
        if args.command == "pretrain":
            done = pretrain(cfg, args.out, device, deadline, compile=compile_pretrain)
        elif args.command == "finetune":
            done = finetune(cfg, args.out, args.task, args.method, args.seed or range(cfg.seeds), device, deadline,
                            compile=compile_finetune)
        else:
            jobs = args.jobs or (9 if device.type == "cuda" else 1)
            done = run_all(cfg, args.out, device, deadline, compile_pretrain=compile_pretrain,
                           compile_finetune=compile_finetune, jobs=jobs)
            if done:
                print(results_table(collect(args.out), read_meta(args.out / "pretrain")))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.command}: " + ("complete" if done else "stopped at the time budget; re-run the same command"))


if __name__ == "__main__":
    main()
