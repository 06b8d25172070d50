"""Contextual fine-tuning on the in-context regression model: the CFT paper's synthetic experiment (Choi et al.,
ICLR 2025, Sec. 5) as settings, prompt constructions, fine-tuning and measurements.

A model pretrained on in-context linear regression (icl_regression.py) is fine-tuned on a composite class G built on
f(x) = w^T x, fresh tasks every step:
    polynomial g(x) = f(x) + f(x)^2    relu g(x) = max(0, f(x))    sumdot g(x) = w^T x + v^T x (v fresh per prompt)
in three prompt constructions (the paper's "methods"):
    cpt      (the paper's UFT)  (x_i, g(x_i)) pairs only
    cft      k context pairs (x_i, f(x_i)) -- the same x's as the queries -- then the k pairs (x_i, g(x_i));
             loss on the g half
    neg-cft  as cft, but the context labels are noise
What is measured (evaluate_run): the squared error at every query position, the cosine between the model's input
gradient at the last query and g's gradient there (two ways: `inner_products`), and, for cft / neg-cft, the error
when the context pairs are shuffled or put on fresh x's (whether the model regresses or copies f(x) from the context).
synthetic.py runs the grid and the command line; synthetic_results.py aggregates the runs.
"""
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from atomic import write_text
from config_flags import option
from icl_regression import (REGRESSION_PRESETS, RegressionConfig, TaskBatch, build_regression_model, finished_meta,
                            generator, read_json_object, read_meta, read_tensors, regression_checkpoint_folder,
                            sample_tasks, save_regression_checkpoint, train_regression)
from training import lr_at

FINETUNE_TASKS = ("polynomial", "relu", "sumdot")  # the fine-tuning classes G
FINETUNE_METHODS = ("cpt", "cft", "neg-cft")  # the prompt constructions
RECIPES = ("fast", "official")
# The official code's fine-tuning (conf/base.yaml, src/train.py): Adam 1e-4, constant, no warm-up, batch 64, fp32, no
# gradient clipping, 50k steps, and 100k for relu (its saved relu configs). The fp32 matmuls of its PyTorch 1.11 used
# TF32 on Ampere GPUs by default, as synthetic.py's CUDA runs do.
OFFICIAL_RECIPE = dict(recipe="official", finetune_steps=50_000, finetune_batch=64, finetune_lr=1e-4, finetune_warmup=0,
                       finetune_bf16=False, finetune_clip=0.0, relu_steps_factor=2)


# ----------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class SyntheticConfig(RegressionConfig):
    """A whole run: the problem, backbone and pretraining (RegressionConfig) plus fine-tuning and evaluation, stored
    flat in OUT/config.json. Fields made with option() are command-line flags; the others are set by the recipe."""
    # fine-tuning: "fast" is each preset's own schedule (full: 1500 steps x 128, AdamW 2e-4 after 50 warm-up steps,
    # bf16, clip 1.0); "official" is OFFICIAL_RECIPE
    recipe: str = option("fast", "fine-tuning recipe: fast (the preset's schedule) or official (Adam 1e-4 constant, "
                                 "batch 64, fp32, no clip, 50k steps, relu 100k)", choices=RECIPES)
    finetune_steps: int = option(1500, "fine-tuning steps per run (relu: twice that under --recipe official)")
    finetune_batch: int = option(128, "fine-tuning prompts per step")
    finetune_lr: float = option(2e-4, "fine-tuning learning rate (after warm-up; constant)")
    finetune_warmup: int = 50
    finetune_bf16: bool = True  # bf16 autocast on CUDA (fp32 weights and optimizer); False: fp32 throughout
    finetune_clip: float = 1.0  # gradient-norm clip; 0: none
    relu_steps_factor: int = 1  # relu trains this many times finetune_steps (official: 2)
    seeds: int = option(3, "fine-tuning seeds per (task, method)")
    metric_every: int = 100
    metric_prompts: int = 256
    # fixes of the official code's defects (off = faithful)
    fresh_context: bool = option(False, "fix the official code's defect: fresh x's in the CFT context")
    matched_noise: bool = option(False, "fix the official code's defect: NEG-CFT noise of the real labels' variance")

    def steps_for(self, task: str) -> int:
        return self.finetune_steps * (self.relu_steps_factor if task == "relu" else 1)

    def validate(self) -> "SyntheticConfig":
        """Raise ValueError naming the first setting that cannot work."""
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            kind = float if isinstance(default, float) else type(default)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                if not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
                    raise ValueError(f"{f.name} = {value!r}: expected {kind.__name__}")
        positive = ("n_dims", "n_points", "dim", "n_layers", "n_heads", "ffn_dim", "pretrain_steps", "pretrain_batch",
                    "finetune_steps", "finetune_batch", "seeds", "metric_every", "metric_prompts", "eval_prompts",
                    "quality_every", "curriculum_every", "relu_steps_factor")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be positive")
        for name in ("pretrain_lr", "finetune_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} = {getattr(self, name)}: must be a positive number")
        if self.dim % self.n_heads:
            raise ValueError(f"dim = {self.dim} is not divisible by n_heads = {self.n_heads}")
        if self.recipe not in RECIPES or self.position not in ("rope", "learned"):
            raise ValueError(f"recipe {self.recipe!r} / position {self.position!r}: expected one of {RECIPES} / "
                             f"('rope', 'learned')")
        return self


def synthetic_preset(name: str, **overrides) -> SyntheticConfig:
    return dataclasses.replace(SyntheticConfig(**dataclasses.asdict(REGRESSION_PRESETS[name])), **overrides)


SYNTHETIC_PRESETS = {
    "full": synthetic_preset("full"),
    # CPU-sized: the whole grid in ~7-8 minutes on 2 idle cores (405-489 s measured; README).
    "quick": synthetic_preset("quick", finetune_steps=150, finetune_batch=64, finetune_lr=2e-3, finetune_warmup=10,
                              metric_every=25, metric_prompts=128),
    # smaller still, for tests/test_synthetic.py: d = 3, 7 points; width 64, as quick, and 1000 pretraining steps
    # give a backbone that regresses in context well enough (normalised error ~0.28) for CFT to use a fresh context
    # (with icl_regression's width-32 test backbone it cannot, and the inner products do not separate)
    "test": synthetic_preset("test", dim=64, n_heads=4, ffn_dim=176, pretrain_steps=1000, pretrain_lr=3e-3,
                             finetune_steps=150, finetune_batch=64, finetune_lr=2e-3, finetune_warmup=10, seeds=1,
                             metric_every=50, metric_prompts=64),
}


def with_recipe(cfg: SyntheticConfig, recipe: str) -> SyntheticConfig:
    """The preset's own schedule for "fast", OFFICIAL_RECIPE's for "official"."""
    return dataclasses.replace(cfg, **OFFICIAL_RECIPE) if recipe == "official" else dataclasses.replace(cfg,
                                                                                                         recipe=recipe)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt constructions


@dataclass
class Prompt:
    xs: torch.Tensor  # (B, n_context + k, d)
    ys: torch.Tensor  # (B, n_context + k)
    n_context: int  # leading pairs that are context only: no loss, not evaluated
    # the context pairs sit on the query x's, in the same order (the faithful cft / neg-cft context): the official
    # inner product differentiates through both copies of each x
    context_is_query: bool = False
    # position of the first token. The official CPT (UFT) prompt is a zeroed, masked context half followed by the
    # query pairs, so with learned absolute positions its queries sit at positions 2k..4k-1
    first_position: int = 0


def prompt_predictions(model, prompt: Prompt, xs=None) -> torch.Tensor:
    """The model's predictions (B, n_context + k) at every x token of the prompt (xs: a replacement of prompt.xs)."""
    xs = prompt.xs if xs is None else xs
    if prompt.first_position == 0:
        return model(xs, prompt.ys)
    return model(xs, prompt.ys, positions=torch.arange(2 * xs.shape[1], device=xs.device) + prompt.first_position)


def build_prompt(method: str, batch: TaskBatch, gen: torch.Generator, *, fresh_context: bool = False,
                 matched_noise: bool = False, official_cpt_positions: bool = False) -> Prompt:
    g = batch.values()
    if method == "cpt":
        return Prompt(batch.xs, g, 0, first_position=2 * g.shape[1] if official_cpt_positions else 0)
    if method not in ("cft", "neg-cft"):
        raise ValueError(f"method '{method}' is not one of {', '.join(FINETUNE_METHODS)}")
    B, k, d = batch.xs.shape
    context_xs = torch.randn(B, k, d, generator=gen, device=gen.device) if fresh_context else batch.xs
    if method == "cft":
        context_ys = batch.base(context_xs)
    else:  # noise labels: std 1 as the official code, or sqrt(d) = the std of real labels w^T x
        context_ys = torch.randn(B, k, generator=gen, device=gen.device) * (math.sqrt(d) if matched_noise else 1.0)
    return Prompt(torch.cat([context_xs, batch.xs], dim=1), torch.cat([context_ys, g], dim=1), k,
                  context_is_query=not fresh_context)


def sample_prompt(cfg: SyntheticConfig, task: str, method: str, batch_size: int, gen: torch.Generator):
    """(Prompt, TaskBatch): fresh tasks of the run's size, in the run's prompt construction."""
    batch = sample_tasks(task, batch_size, cfg.n_points, cfg.n_dims, gen)
    prompt = build_prompt(method, batch, gen, fresh_context=cfg.fresh_context, matched_noise=cfg.matched_noise,
                          official_cpt_positions=cfg.position == "learned")
    return prompt, batch


def permute_context(prompt: Prompt, gen: torch.Generator) -> Prompt:
    """The same prompt with its context pairs (x_i, label_i) shuffled, each row by its own permutation: a model that
    regresses on the context does not care; one that copies f(x) from a fixed offset does."""
    B, n = prompt.xs.shape[0], prompt.n_context
    order = torch.argsort(torch.rand(B, n, generator=gen, device=gen.device), dim=1)
    xs, ys = prompt.xs.clone(), prompt.ys.clone()
    xs[:, :n] = torch.gather(prompt.xs[:, :n], 1, order[..., None].expand(-1, -1, xs.shape[-1]))
    ys[:, :n] = torch.gather(prompt.ys[:, :n], 1, order)
    return dataclasses.replace(prompt, xs=xs, ys=ys, context_is_query=False)


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def squared_errors(model, prompt: Prompt) -> torch.Tensor:
    """(B, k) squared error at every evaluated position (the pairs after the context)."""
    preds = prompt_predictions(model, prompt).float()
    return (preds[:, prompt.n_context:] - prompt.ys[:, prompt.n_context:].float()) ** 2


def cosine(a, b) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def inner_products(model, prompt: Prompt, batch: TaskBatch, chunk: int = 64) -> dict:
    """Cosine between the gradient of the prediction at the last query with respect to that query's x and a target
    direction, mean over the prompts (ys held fixed, as the official code does).

    Two gradients: "query" differentiates the query token's own x only (the function the model applies to its
    query); "tied" differentiates the shared x (the official computation: in a faithful cft / neg-cft prompt the same
    x also sits in the context, and the gradient flows through both copies; elsewhere tied = query). Two directions:
    the official code's (1 + 2 w^T x) w for every task (the polynomial gradient; no suffix), and the task's own
    gradient ("_true"; rows where it is zero, relu with w^T x < 0, have no direction and are left out). Prompts go
    through the model `chunk` at a time (a full-size backward over 256 prompts in fp32 would hold ~9 GB)."""
    query, tied = [], []
    for start in range(0, len(prompt.xs), chunk):  # bounded memory
        rows = slice(start, start + chunk)
        part = dataclasses.replace(prompt, xs=prompt.xs[rows], ys=prompt.ys[rows])
        xs = part.xs.detach().clone().requires_grad_(True)  # a fresh leaf: each token position is its own input
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(prompt_predictions(model, part, xs)[:, -1].float().sum(), xs)
        query.append(grad[:, -1])
        tied.append(grad[:, -1] + grad[:, part.n_context - 1] if part.context_is_query else grad[:, -1])
    query, tied, x = torch.cat(query), torch.cat(tied), batch.xs[:, -1]
    official, true = batch.official_gradient(x), batch.gradient(x)
    nonzero = true.norm(dim=-1) > 0
    result = {}
    for name, model_grad in (("query", query), ("tied", tied)):
        result[f"inner_product_{name}"] = cosine(model_grad, official).mean().item()
        result[f"inner_product_{name}_true"] = cosine(model_grad[nonzero], true[nonzero]).mean().item()
    return result


@torch.no_grad()
def evaluate_run(model, cfg: SyntheticConfig, task: str, method: str, seed: int, device) -> dict:
    """Squared error at every in-context position over cfg.eval_prompts fresh prompts (the same prompts for every
    method of a seed), the inner products on the first 256 of them, and for cft / neg-cft the two context probes:
    the same prompts with the context pairs shuffled (mse_permuted_context) and with the context on fresh x's of the
    same w (mse_fresh_context)."""
    gen, probe_gen = generator(device, seed, "eval", task), generator(device, seed, "probe", task)
    errors, permuted, fresh, first = [], [], [], None
    for start in range(0, cfg.eval_prompts, 256):
        prompt, batch = sample_prompt(cfg, task, method, min(256, cfg.eval_prompts - start), gen)
        errors.append(squared_errors(model, prompt))
        first = first or (prompt, batch)
        if method != "cpt":
            permuted.append(squared_errors(model, permute_context(prompt, probe_gen)))
            fresh.append(squared_errors(model, build_prompt(method, batch, probe_gen, fresh_context=True,
                                                            matched_noise=cfg.matched_noise)))
    curve = torch.cat(errors).mean(0)
    result = {"mse": curve.mean().item(), "mse_by_position": curve.tolist(), **inner_products(model, *first)}
    if method != "cpt":
        result["mse_permuted_context"] = torch.cat(permuted).mean().item()
        result["mse_fresh_context"] = torch.cat(fresh).mean().item()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning


def run_name(task: str, method: str, seed: int) -> str:
    return f"{task}-{method}-s{seed}"


def read_eval(run_dir: Path) -> dict | None:
    """A run's eval.json, or None when it has none. A damaged one (an interrupted copy) is removed, so the run is
    evaluated again, when the run's weights are there; otherwise it is a ValueError naming the file."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except ValueError as e:
        if regression_checkpoint_folder(run_dir) is None:
            raise ValueError(f"{e}; the run's weights are not here to evaluate it again: delete {run_dir} to redo "
                             f"the run") from None
        print(f"{path}: damaged, evaluating the run again")
        path.unlink()
        return None


def pretrained_checkpoint(cfg: SyntheticConfig, out: Path) -> Path:
    """OUT/pretrain's finished checkpoint folder, checked to be the backbone this run's settings describe."""
    found = regression_checkpoint_folder(out / "pretrain")
    meta = None if found is None else finished_meta(found)
    if meta is None:
        raise FileNotFoundError(f"{out / 'pretrain'}: no finished pretraining checkpoint (run `pretrain` first)")
    stored, wanted = meta.get("model_config", {}), dataclasses.asdict(cfg.model_config())
    if stored != wanted:
        differ = [f"{k}={stored.get(k)!r} (run: {v!r})" for k, v in wanted.items() if stored.get(k) != v]
        raise ValueError(f"{found}: pretrained backbone differs from this run's settings: {', '.join(differ)}")
    return found


def finetuning_start(cfg: SyntheticConfig, run_dir: Path, pretrained: Path, task: str, method: str, seed: int):
    """(meta, weights file): the run's own checkpoint when resuming, else a new run from the pretrained weights."""
    found = regression_checkpoint_folder(run_dir)
    if found is not None:
        return read_meta(run_dir), found / "model.safetensors"
    # a new run (or only its meta.json survived a copy: start over)
    meta = {"kind": "finetune", "task": task, "method": method, "seed": seed, "n_dims": cfg.n_dims,
            "model_config": dataclasses.asdict(cfg.model_config()), "config": dataclasses.asdict(cfg),
            "step": 0, "done": False, "history": []}
    return meta, pretrained / "model.safetensors"


def finetune(cfg: SyntheticConfig, out: Path, task: str, method: str, seeds, device, deadline: float = math.inf, *,
             compile: bool = False, stop_at: int | None = None) -> bool:
    """Fine-tune the pretrained model on (task, method) for each seed (resuming), then evaluate each finished run into
    out/finetune/RUN/eval.json. One model object is reused across seeds so a compiled graph is built once."""
    seeds = [seed for seed in seeds if read_eval(out / "finetune" / run_name(task, method, seed)) is None]
    if not seeds:
        return True
    pretrained = pretrained_checkpoint(cfg, out)
    model = build_regression_model(cfg, 0).to(device)
    compiled = torch.compile(model) if compile else None
    for seed in seeds:
        run_dir = out / "finetune" / run_name(task, method, seed)
        meta, weights = finetuning_start(cfg, run_dir, pretrained, task, method, seed)
        model.load_state_dict(read_tensors(weights, device))
        metric_prompt = sample_prompt(cfg, task, method, cfg.metric_prompts, generator(device, seed, "metric", task))

        def batch_loss(forward, step):
            prompt, _ = sample_prompt(cfg, task, method, cfg.finetune_batch,
                                      generator(device, seed, "finetune", task, step))
            return squared_errors(forward, prompt).mean()

        lr = lambda step: lr_at(step, cfg.finetune_lr, cfg.finetune_warmup, cfg.steps_for(task), 1.0)
        if not train_regression(model, run_dir, meta, batch_loss, lr, total_steps=cfg.steps_for(task), device=device,
                                deadline=deadline, compiled=compiled,
                                metric=lambda m: inner_products(m, *metric_prompt), metric_every=cfg.metric_every,
                                stop_at=stop_at, desc=run_name(task, method, seed), bf16=cfg.finetune_bf16,
                                clip_norm=cfg.finetune_clip or None):
            return False
        meta["done"] = True
        save_regression_checkpoint(run_dir, model, meta)  # without the optimizer state: finished
        result = evaluate_run(model, cfg, task, method, seed, device)
        write_text(run_dir / "eval.json", json.dumps(result | {"step": meta["step"]}, indent=1))
        print(f"{run_name(task, method, seed)}: mse {result['mse']:.4g}, inner product (tied, official "
              f"computation) {result['inner_product_tied']:.3f}, query only {result['inner_product_query']:.3f}")
    return True
