"""The in-context linear-regression transformer (Garg et al. 2022): its tasks, model, pretraining and checkpoints.

Prompts are (x_1, f(x_1), ..., x_k, f(x_k)) with f(x) = w^T x, x ~ N(0, I_d), w ~ N(0, I_d); the model predicts at
every x token and pretraining minimises the squared error over all of them, with a curriculum on the dimension and the
number of points. synthetic.py fine-tunes this model (the CFT paper's mechanism experiment) and context_tuning.py's
`--quick` reproduction adapts it at test time; both build on what is here.

The backbone is model.py's Llama Transformer fed through `hidden_states(embeds=...)`, with a linear read-in
(d -> width) and a linear read-out (width -> 1) as in Garg et al. Positions are a choice (`position`): "rope" (rotary,
relative: a prompt's absolute offset does not change the output; tests/test_icl_regression.py checks this) or
"learned" (GPT-2's absolute position embeddings added to the read-in, rotary off: the official backbone). The MLP is
SwiGLU either way (ffn width 2/3 of GPT-2's 4x, so the parameter count matches).

Seeds: every sample comes from a torch.Generator seeded by (seed, stream, step), so runs are reproducible and resume
exactly. Checkpoints are folders (model.safetensors, optimizer.safetensors while training, meta.json; no pickle)
written whole through atomic.py.
"""
import dataclasses
import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from atomic import atomic_folder, finished_folder, save_tensors
from config_flags import option
from model import ModelConfig, create_model
from training import lr_at

# The function classes sample_tasks draws: linear is pretraining's; shifted-linear (w ~ N(w_shift, I)) is a task
# pretraining never saw; polynomial, relu and sumdot are synthetic.py's fine-tuning classes.
SAMPLER_TASKS = ("linear", "shifted-linear", "polynomial", "relu", "sumdot")


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class RegressionConfig:
    """The problem, the backbone and its pretraining. synthetic.py's SyntheticConfig extends it with fine-tuning
    fields, so one flat config.json describes a whole run. Fields made with option() become command-line flags."""
    preset: str = "full"
    # problem (official: d = 20, 41 points = 2d + 1)
    n_dims: int = 20
    n_points: int = 41
    # backbone (official: GPT-2, 12 layers, 8 heads, width 256, MLP 1024 -> SwiGLU 688 has the same parameter count)
    dim: int = 256
    n_layers: int = 12
    n_heads: int = 8
    ffn_dim: int = 688
    position: str = option("rope", "position encoding: rope (rotary, relative) or learned (GPT-2's absolute "
                                   "embeddings added to the read-in, rotary off: the official backbone)",
                           choices=("rope", "learned"))
    # pretraining (official: 500k steps, batch 64, Adam 1e-4 constant, curriculum +1 dim and +2 points / 2000 steps)
    pretrain_steps: int = option(16000, "pretraining steps")
    pretrain_batch: int = option(512, "pretraining prompts per step")
    pretrain_lr: float = option(5e-4, "pretraining peak learning rate")
    warmup_steps: int = 500
    curriculum_dims: int = 5  # first stage: 5 dims, 11 points, as the official schedule
    curriculum_points: int = 11
    curriculum_every: int = 250  # 250 steps x 512 prompts = the official 2000 x 64 prompts per stage
    quality_every: int = 500  # check the normalised error at 2d points (eval_prompts prompts) every this many steps...
    stop_nmse: float = 0.05  # ...and stop pretraining early once it is this low (half the 0.1 target)
    eval_prompts: int = 1280  # prompts of each quality check (and, in synthetic.py, of each run's evaluation)

    def model_config(self) -> ModelConfig:
        # vocab_size=1: the backbone's token embedding and LM head are unused (read-in/read-out replace them).
        # max_seq_len bounds the CFT prompt (2 x n_points pairs = 4 x n_points tokens); rotary needs no table, learned
        # positions get one more than that (official: 2 x 101 = 202 >= 165 for 41 points), of which pretraining
        # trains only the first 2 x n_points.
        learned = self.position == "learned"
        return ModelConfig(vocab_size=1, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_heads, ffn_dim=self.ffn_dim, positions=self.position,
                           max_seq_len=4 * self.n_points + learned)


REGRESSION_PRESETS = {
    "full": RegressionConfig(),
    # CPU-sized: d = 5, 11 points, a 2-layer width-64 model.
    "quick": RegressionConfig(preset="quick", n_dims=5, n_points=11, dim=64, n_layers=2, n_heads=4, ffn_dim=176,
                              pretrain_steps=2500, pretrain_batch=64, pretrain_lr=3e-3, warmup_steps=100,
                              curriculum_dims=2, curriculum_points=5, curriculum_every=150, quality_every=500,
                              eval_prompts=512),
    # smaller still, for the tests
    "test": RegressionConfig(preset="test", n_dims=3, n_points=7, dim=32, n_layers=2, n_heads=2, ffn_dim=88,
                             pretrain_steps=600, pretrain_batch=64, pretrain_lr=2e-3, warmup_steps=50,
                             curriculum_dims=3, curriculum_points=7, curriculum_every=1000, quality_every=200,
                             eval_prompts=256),
}


# ----------------------------------------------------------------------------------------------------------------------
# Seeds and tasks: the function classes, their values and their true input gradients


def stream_seed(seed: int, *stream) -> int:
    """A 63-bit seed for one named random stream (e.g. seed 0, "finetune/relu", step 17). Seeding per step makes
    resuming exact without saving generator state."""
    digest = hashlib.sha256("/".join(map(str, (seed,) + stream)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(device, seed: int, *stream) -> torch.Generator:
    return torch.Generator(device).manual_seed(stream_seed(seed, *stream))


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
        """The official CFT code's formula for every task: the polynomial gradient (1 + 2 w^T x) w."""
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
# The model


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(B, k, d), (B, k) -> (B, 2k, d) tokens x_1, y_1, x_2, y_2, ... with y embedded as [y, 0, ..., 0]."""
    B, k, d = xs.shape
    y_tokens = torch.cat([ys[..., None].to(xs.dtype), xs.new_zeros(B, k, d - 1)], dim=-1)
    return torch.stack([xs, y_tokens], dim=2).reshape(B, 2 * k, d)


class RegressionTransformer(nn.Module):
    """Garg et al.'s in-context regression model on model.py's Transformer: read_in (d -> width) on every token,
    the backbone's blocks (rotary or learned absolute positions, as its ModelConfig says), read_out (width -> 1) at
    the x tokens."""

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


def build_regression_model(cfg: RegressionConfig, seed: int) -> RegressionTransformer:
    torch.manual_seed(seed)
    return RegressionTransformer(cfg.n_dims, cfg.model_config())


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: a folder with model.safetensors, optimizer.safetensors (while training) and meta.json; no pickle.


def save_regression_checkpoint(path: Path, model: nn.Module, meta: dict, optimizer=None) -> None:
    """Write the folder whole (atomic.atomic_folder): an interrupted save never damages the previous checkpoint."""
    with atomic_folder(path, replace=True) as tmp:
        save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                     tmp / "model.safetensors")
        if optimizer is not None:
            state = optimizer.state_dict()["state"]
            save_tensors({f"{i}.{name}": t.detach().cpu().contiguous() for i, s in state.items()
                          for name, t in s.items()}, tmp / "optimizer.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def regression_checkpoint_folder(path) -> Path | None:
    """The checkpoint folder to read, or None: PATH, or PATH.old if a replacing save was interrupted."""
    found = finished_folder(path, "model.safetensors")
    return found if found is not None and (found / "meta.json").is_file() else None


def read_tensors(path: Path, device="cpu") -> dict:
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_json_object(path) -> dict:
    """A JSON file holding one object; anything else (empty, truncated, not UTF-8, a list) is a ValueError naming the
    file, so that a damaged result file stops a run with one line instead of a traceback."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to have it rebuilt") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_meta(path) -> dict | None:
    """A checkpoint folder's meta.json, also when its weights were not copied along (results travel without them)."""
    path = Path(path)
    found = regression_checkpoint_folder(path)
    if found is None and (path / "meta.json").is_file():
        found = path
    return None if found is None else read_json_object(found / "meta.json")


def finished_meta(path) -> dict | None:
    """The meta of a finished checkpoint (read_meta with "done": true): a pretraining other runs may start from."""
    meta = read_meta(path)
    return meta if meta is not None and meta.get("done") else None


def load_regression_model(path) -> tuple[RegressionTransformer, dict]:
    """(model on CPU in fp32, meta dict) from a checkpoint folder written by save_regression_checkpoint."""
    found = regression_checkpoint_folder(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not an icl_regression.py checkpoint (expected meta.json and "
                                f"model.safetensors)")
    meta = read_json_object(found / "meta.json")
    try:
        model = RegressionTransformer(meta["n_dims"], ModelConfig(**meta["model_config"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{found / 'meta.json'}: not an icl_regression.py checkpoint description ({e!r})") from None
    model.load_state_dict(read_tensors(found / "model.safetensors"))
    return model, meta


def load_optimizer_state(optimizer, path: Path) -> None:
    state = {}
    for key, t in read_tensors(path).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


@torch.no_grad()
def nmse_curve(model, cfg: RegressionConfig, device, seed: int = 0, n_prompts: int = 1280) -> list[float]:
    """Pretraining quality: squared error / d at every position on fresh linear tasks (Garg et al.'s y-axis;
    predicting 0 scores 1)."""
    gen = generator(device, seed, "quality")
    errors = []
    for start in range(0, n_prompts, 256):
        batch = sample_tasks("linear", min(256, n_prompts - start), cfg.n_points, cfg.n_dims, gen)
        ys = batch.values()
        errors.append((model(batch.xs, ys).float() - ys.float()) ** 2)
    return (torch.cat(errors).mean(0) / cfg.n_dims).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Training: one loop for pretraining (here) and fine-tuning (synthetic.py)


def bf16_autocast(device):
    """bf16 autocast on CUDA (fp32 master weights and optimizer state); plain fp32 on CPU."""
    device = torch.device(device)
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def record_progress(model, meta: dict, step: int, loss, metric, finished_early) -> dict:
    """Append {step, loss, metric(model)...} to meta["history"]; meta["finished_early"] says whether to stop here."""
    record = {"step": step, "loss": loss.item()}
    if metric is not None:
        model.eval()
        record.update(metric(model))
        model.train()
    meta["history"].append(record)
    meta["finished_early"] = finished_early is not None and finished_early(record)
    return record


def train_regression(model, run_dir: Path, meta: dict, batch_loss, lr_of_step, *, total_steps: int, device,
                     deadline: float, compiled=None, metric=None, metric_every: int = 100, finished_early=None,
                     save_every_s: float = 120.0, stop_at: int | None = None, desc: str = "", bf16: bool = True,
                     clip_norm: float | None = 1.0) -> bool:
    """Train from meta["step"] to total_steps, or until the deadline (time.monotonic()) or stop_at; checkpoint into
    run_dir. Every metric_every steps, meta["history"] gets the loss and metric(model); finished_early(record) may end
    training there. Returns True when finished. batch_loss(model, step) samples step's batch from its own seed, so a
    resumed run sees exactly the batches an uninterrupted one would have. The optimiser is Adam (AdamW without weight
    decay); bf16=False computes in fp32 (the official recipe), clip_norm=None skips gradient clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr_of_step(0), weight_decay=0.0, fused=torch.device(device).type == "cuda")
    found = regression_checkpoint_folder(run_dir)
    if found is not None and (found / "optimizer.safetensors").is_file():
        load_optimizer_state(optimizer, found / "optimizer.safetensors")
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
        with bf16_autocast(device) if bf16 else nullcontext():
            loss = batch_loss(forward, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % metric_every == 0 or step == total_steps:
            record = record_progress(model, meta, step, loss, metric, finished_early)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
            finished = meta["finished_early"]
        if time.monotonic() - last_save > save_every_s:
            meta["step"], meta["seconds"] = step, seconds_before + time.monotonic() - start
            save_regression_checkpoint(run_dir, model, meta, optimizer)
            last_save = time.monotonic()
    bar.close()
    model.eval()
    meta["step"], meta["seconds"] = step, seconds_before + time.monotonic() - start
    save_regression_checkpoint(run_dir, model, meta, optimizer)
    return finished or step >= total_steps


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining


def curriculum(cfg: RegressionConfig, step: int) -> tuple[int, int]:
    """(active dims, points in the loss) at this step: +1 dim and +2 points every cfg.curriculum_every steps."""
    stage = step // cfg.curriculum_every
    return min(cfg.n_dims, cfg.curriculum_dims + stage), min(cfg.n_points, cfg.curriculum_points + 2 * stage)


def start_pretraining(cfg: RegressionConfig, run_dir: Path, seed: int) -> tuple[RegressionTransformer, dict]:
    """(model, meta): resumed from run_dir's checkpoint, or freshly initialised."""
    model = build_regression_model(cfg, seed)
    found = regression_checkpoint_folder(run_dir)
    if found is None:  # a new run (or only its meta.json survived a copy: start over)
        meta = {"kind": "pretrain", "n_dims": cfg.n_dims, "model_config": dataclasses.asdict(cfg.model_config()),
                "config": dataclasses.asdict(cfg), "seed": seed, "step": 0, "done": False, "history": []}
    else:
        meta = read_meta(run_dir)
        model.load_state_dict(read_tensors(found / "model.safetensors"))
    return model, meta


def pretrain(cfg: RegressionConfig, out: Path, device, deadline: float = math.inf, *, seed: int = 0,
             compile: bool = False, stop_at: int | None = None) -> bool:
    """Pretrain (or resume) out/pretrain; returns True once finished (its meta.json then holds the quality check)."""
    run_dir = Path(out) / "pretrain"
    if finished_meta(run_dir) is not None:
        return True
    model, meta = start_pretraining(cfg, run_dir, seed)
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
    done = train_regression(model, run_dir, meta, batch_loss, lr, total_steps=cfg.pretrain_steps, device=device,
                            deadline=deadline, compiled=torch.compile(model) if compile else None, metric=quality,
                            metric_every=cfg.quality_every, finished_early=good_enough, stop_at=stop_at,
                            desc="pretrain")
    if done:
        curve = nmse_curve(model, cfg, device)
        meta["quality"] = {"nmse_by_position": curve, "nmse_at_2d": curve[2 * cfg.n_dims], "target": 0.1,
                           "steps": meta["step"], "seconds": round(meta["seconds"], 1), "position": cfg.position}
        meta["done"] = True
        save_regression_checkpoint(run_dir, model, meta)  # without the optimizer state: finished
        met = "met" if curve[2 * cfg.n_dims] <= 0.1 else "NOT met"
        print(f"pretrain ({cfg.position} positions): normalised squared error with {2 * cfg.n_dims} in-context "
              f"points = {curve[2 * cfg.n_dims]:.4f} (target <= 0.1: {met}) after {meta['step']} steps, "
              f"{meta['seconds']:.0f} s")
    return done
