"""The CFT paper's synthetic mechanism experiment (Choi et al., ICLR 2025, Sec. 5), end to end.

1. Pretrain a transformer to do linear regression in context (Garg et al. 2022; icl_regression.py): prompts
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

The model, its tasks, pretraining, checkpoints and the training loop live in icl_regression.py. Its backbone uses
rotary positions, which makes one known defect of the official code vanish: its UFT prompts sit on absolute positions
82..163 that pretraining never used; here a prompt's absolute offset does not change the model's output.

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
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from atomic import atomic_write, write_text
from config_flags import add_config_flags, config_from_args, option
from icl_regression import (REGRESSION_PRESETS, RegressionConfig, TaskBatch, build_regression_model, generator,
                            load_regression_model, mean_std, pretrain, read_meta, read_tensors,
                            regression_checkpoint_folder, sample_tasks, save_regression_checkpoint, train_regression)
from training import lr_at

FINETUNE_TASKS = ("polynomial", "relu", "sumdot")  # the fine-tuning classes G
FINETUNE_METHODS = ("cpt", "cft", "neg-cft")  # the prompt constructions
# The paper's numbers (official code, d = 20, 41 points): raw squared error averaged over the 41 positions, and the
# polynomial inner product after 40k steps.
OFFICIAL_MSE = {"polynomial": {"cft": 0.33, "cpt": 850.0, "neg-cft": 888.0},
                "relu": {"cft": 1e-4, "cpt": 2.97, "neg-cft": 2.95},
                "sumdot": {"cft": 5.3, "cpt": 10.2, "neg-cft": 10.8}}
OFFICIAL_INNER_PRODUCT = {"polynomial": {"cft": 0.99, "cpt": 0.3, "neg-cft": 0.18}}


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class SyntheticConfig(RegressionConfig):
    """A whole run: the problem, backbone and pretraining (RegressionConfig) plus fine-tuning and evaluation, stored
    flat in OUT/config.json. Fields made with option() are command-line flags."""
    # fine-tuning (official: 50k steps (relu 100k), batch 64, Adam 1e-4 constant)
    finetune_steps: int = option(1500, "fine-tuning steps per run")
    finetune_batch: int = option(128, "fine-tuning prompts per step")
    finetune_lr: float = option(2e-4, "fine-tuning peak learning rate")
    finetune_warmup: int = 50
    seeds: int = option(3, "fine-tuning seeds per (task, method)")
    metric_every: int = 100
    metric_prompts: int = 256
    # fixes of the official code's defects (off = faithful)
    fresh_context: bool = option(False, "fix the official code's defect: fresh x's in the CFT context")
    matched_noise: bool = option(False, "fix the official code's defect: NEG-CFT noise of the real labels' variance")


def synthetic_preset(name: str, **finetuning) -> SyntheticConfig:
    return SyntheticConfig(**dataclasses.asdict(REGRESSION_PRESETS[name]), **finetuning)


SYNTHETIC_PRESETS = {
    "full": synthetic_preset("full"),
    # CPU-sized: the whole grid in <= 5 minutes on 2 cores.
    "quick": synthetic_preset("quick", finetune_steps=150, finetune_batch=64, finetune_lr=2e-3, finetune_warmup=10,
                              metric_every=25, metric_prompts=128),
    # smaller still, for tests/test_synthetic.py
    "test": synthetic_preset("test", finetune_steps=150, finetune_batch=64, finetune_lr=3e-3, finetune_warmup=10,
                             seeds=1, metric_every=50, metric_prompts=64),
}


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
        raise ValueError(f"method '{method}' is not one of {', '.join(FINETUNE_METHODS)}")
    B, k, d = batch.xs.shape
    context_xs = torch.randn(B, k, d, generator=gen, device=gen.device) if fresh_context else batch.xs
    if method == "cft":
        context_ys = batch.base(context_xs)
    else:  # noise labels: std 1 as the official code, or sqrt(d) = the std of real labels w^T x
        context_ys = torch.randn(B, k, generator=gen, device=gen.device) * (math.sqrt(d) if matched_noise else 1.0)
    return Prompt(torch.cat([context_xs, batch.xs], dim=1), torch.cat([context_ys, g], dim=1), k)


def sample_prompt(cfg: SyntheticConfig, task: str, method: str, batch_size: int, gen: torch.Generator):
    """(Prompt, TaskBatch): fresh tasks of the run's size, in the run's prompt construction."""
    batch = sample_tasks(task, batch_size, cfg.n_points, cfg.n_dims, gen)
    return build_prompt(method, batch, gen, fresh_context=cfg.fresh_context, matched_noise=cfg.matched_noise), batch


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
def evaluate_run(model, cfg: SyntheticConfig, task: str, method: str, seed: int, device) -> dict:
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
# Fine-tuning


def run_name(task: str, method: str, seed: int) -> str:
    return f"{task}-{method}-s{seed}"


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
    seeds = [seed for seed in seeds if not (out / "finetune" / run_name(task, method, seed) / "eval.json").is_file()]
    if not seeds:
        return True
    pretrained = regression_checkpoint_folder(out / "pretrain")
    if pretrained is None or not read_meta(pretrained)["done"]:
        raise FileNotFoundError(f"{out / 'pretrain'}: no finished pretraining checkpoint (run `pretrain` first)")
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

        lr = lambda step: lr_at(step, cfg.finetune_lr, cfg.finetune_warmup, cfg.finetune_steps, 1.0)
        if not train_regression(model, run_dir, meta, batch_loss, lr, total_steps=cfg.finetune_steps, device=device,
                                deadline=deadline, compiled=compiled,
                                metric=lambda m: inner_products(m, *metric_prompt), metric_every=cfg.metric_every,
                                stop_at=stop_at, desc=run_name(task, method, seed)):
            return False
        meta["done"] = True
        save_regression_checkpoint(run_dir, model, meta)  # without the optimizer state: finished
        result = evaluate_run(model, cfg, task, method, seed, device)
        write_text(run_dir / "eval.json", json.dumps(result, indent=1))
        print(f"{run_name(task, method, seed)}: mse {result['mse']:.4g}, inner product {result['inner_product']:.3f}")
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Results: aggregate over seeds, table beside the official numbers, plots


def collect_results(out: Path) -> dict:
    """{task: {method: {"mse", "mse_std", "inner_product", "inner_product_std", "inner_product_true", "seeds"}}} over
    the finished runs in out/finetune (mean and sample std over seeds)."""
    results = {}
    for task in FINETUNE_TASKS:
        for method in FINETUNE_METHODS:
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


def evaluate_finished_runs(out: Path, device) -> dict:
    """Evaluate finished runs that lack eval.json, then write out/results.json and out/results.md."""
    cfg = load_config(out)
    for run_dir in sorted((out / "finetune").glob("*-s*")):
        meta = read_meta(run_dir)
        if (meta is None or not meta["done"] or (run_dir / "eval.json").is_file()
                or regression_checkpoint_folder(run_dir) is None):
            continue
        model, meta = load_regression_model(run_dir)
        result = evaluate_run(model.to(device).eval(), cfg, meta["task"], meta["method"], meta["seed"], device)
        write_text(run_dir / "eval.json", json.dumps(result, indent=1))
    results = collect_results(out)
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "results.md", results_table(results, read_meta(out / "pretrain")))
    return results


def write_curves_csv(out: Path) -> tuple[list, list[Path]]:
    """out/inner_product.csv (per metric record) and out/mse_by_position.csv (per evaluated position) over the
    evaluated runs. Returns ([(meta, eval result) per run], the files written)."""
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
    write_text(written[0], "\n".join(curves) + "\n")
    write_text(written[1], "\n".join(errors) + "\n")
    return runs, written


def plot_results(out: Path) -> list[Path]:
    """Inner product against fine-tuning step and squared error against position, per task: CSV always, PNG when
    matplotlib is installed. Returns the files written."""
    runs, written = write_curves_csv(out)
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
        fig, axes = plt.subplots(1, len(FINETUNE_TASKS), figsize=(5 * len(FINETUNE_TASKS), 4))
        for ax, task in zip(axes, FINETUNE_TASKS):
            for color, method in zip(("C0", "C1", "C2"), FINETUNE_METHODS):
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
        atomic_write(out / f"{name}.png", lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


# ----------------------------------------------------------------------------------------------------------------------
# The whole grid, resumable within a time budget


def run_all(cfg: SyntheticConfig, out: Path, device, deadline: float = math.inf, *, compile_pretrain: bool = False,
            compile_finetune: bool = False, jobs: int = 1) -> bool:
    """Pretrain, fine-tune every (task, method, seed), evaluate, plot. Returns True when everything is finished;
    False when the deadline came first (re-run the same command to continue)."""
    if not pretrain(cfg, out, device, deadline, compile=compile_pretrain):
        return False
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # hand pretraining's cached activation memory to the fine-tuning processes
    seeds = list(range(cfg.seeds))
    pairs = [(task, method) for task in FINETUNE_TASKS for method in FINETUNE_METHODS]
    if jobs <= 1:
        for task, method in pairs:
            if not finetune(cfg, out, task, method, seeds, device, deadline, compile=compile_finetune):
                return False
    elif not finetune_in_parallel(out, pairs, seeds, device, deadline, compile_finetune, jobs):
        return False
    results = evaluate_finished_runs(out, device)
    plot_results(out)
    return all(results.get(t, {}).get(m, {}).get("seeds") == cfg.seeds for t, m in pairs)


def finetune_command(out: Path, task: str, method: str, seeds, device, deadline: float, compile: bool) -> list[str]:
    """The `synthetic.py finetune` command line of one (task, method), with the parent's remaining time budget."""
    budget = f"{deadline - time.monotonic() - 15:.0f}"  # 15 s for the child's start-up; "inf" if unbounded
    return [sys.executable, str(Path(__file__).resolve()), "finetune", "--out", str(out), "--task", task,
            "--method", method, "--seed", *map(str, seeds), "--device", str(device), "--time-budget", budget,
            "--compile" if compile else "--no-compile"]


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
            log_path = out / "logs" / f"{task}-{method}.log"
            log = open(log_path, "a")
            command = finetune_command(out, task, method, seeds, device, deadline, compile)
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


def load_config(out: Path) -> SyntheticConfig:
    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (start the run with `all` or `pretrain`)")
    return SyntheticConfig(**json.loads(path.read_text()))


def resolve_config(args) -> SyntheticConfig:
    """The run's config: stored in OUT/config.json on first use; later calls must not contradict it."""
    preset = "quick" if getattr(args, "quick", False) else args.preset_name
    wanted = config_from_args(SyntheticConfig, args, base=SYNTHETIC_PRESETS[preset or "full"])
    given = {"preset": preset, **{f.name: getattr(wanted, f.name) for f in dataclasses.fields(SyntheticConfig)
                                  if hasattr(args, f.name)}}  # the flags given on the command line
    path = args.out / "config.json"
    if not path.is_file():
        write_text(path, json.dumps(dataclasses.asdict(wanted), indent=1))
        return wanted
    stored = load_config(args.out)
    clashes = [f"{k}={v!r} (stored {getattr(stored, k)!r})" for k, v in given.items()
               if v is not None and getattr(stored, k) != v]
    if clashes:
        raise SystemExit(f"error: {path}: this run was started with other settings: {', '.join(clashes)}; "
                         f"use a new --out")
    return stored


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="run folder (resumed if it exists)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--preset", dest="preset_name", choices=list(SYNTHETIC_PRESETS),
                          help="size and schedule (default full; stored in OUT)")
    training.add_argument("--time-budget", type=float, default=math.inf,
                          help="seconds; checkpoint and exit 0 before they run out (re-run to continue)")
    training.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                          help="torch.compile the training forward (default: pretraining on CUDA yes; fine-tuning no, "
                               "its --jobs processes run side by side and would each compile)")
    add_config_flags(training.add_argument_group("settings (override the preset's; the defaults shown are full's)"),
                     SyntheticConfig)
    sub.add_parser("pretrain", parents=[common, training], help="pretrain on in-context linear regression")
    p = sub.add_parser("finetune", parents=[common, training], help="fine-tune one (task, method) for some seeds")
    p.add_argument("--task", required=True, choices=FINETUNE_TASKS)
    p.add_argument("--method", required=True, choices=FINETUNE_METHODS)
    p.add_argument("--seed", type=int, nargs="+", help="seeds to run (default: 0 .. seeds-1)")
    sub.add_parser("evaluate", parents=[common], help="evaluate finished runs; write results.json and results.md")
    sub.add_parser("plot", parents=[common], help="inner-product and error curves (PNG with matplotlib, CSV always)")
    p = sub.add_parser("all", parents=[common, training], help="the whole grid, resumable")
    p.add_argument("--quick", action="store_true", help="the CPU-sized preset (same as --preset quick)")
    p.add_argument("--jobs", type=int, help="concurrent fine-tuning processes (default: 9 on CUDA, 1 on CPU)")
    return parser


def run_command(args, device) -> bool:
    """Run the pretrain, finetune or all command; True when its work is complete."""
    cfg = resolve_config(args)
    deadline = time.monotonic() + args.time_budget
    compile_pretrain = device.type == "cuda" if args.compile is None else args.compile
    compile_finetune = bool(args.compile)
    if args.command == "pretrain":
        return pretrain(cfg, args.out, device, deadline, compile=compile_pretrain)
    if args.command == "finetune":
        return finetune(cfg, args.out, args.task, args.method, args.seed or range(cfg.seeds), device, deadline,
                        compile=compile_finetune)
    jobs = args.jobs or (9 if device.type == "cuda" else 1)
    done = run_all(cfg, args.out, device, deadline, compile_pretrain=compile_pretrain,
                   compile_finetune=compile_finetune, jobs=jobs)
    if done:
        print(results_table(collect_results(args.out), read_meta(args.out / "pretrain")))
    return done


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU-sized models are all per-op overhead: a second intra-op thread only adds synchronisation (measured on
        # 2 busy cores: the test grid took 21 s with 1 thread, 272 s with 2).
        torch.set_num_threads(1)
    try:
        if args.command == "evaluate":
            print(results_table(evaluate_finished_runs(args.out, device), read_meta(args.out / "pretrain")))
            return
        if args.command == "plot":
            print("wrote", ", ".join(str(p) for p in plot_results(args.out)))
            return
        done = run_command(args, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.command}: " + ("complete" if done else "stopped at the time budget; re-run the same command"))


if __name__ == "__main__":
    main()
