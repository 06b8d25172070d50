"""The CFT paper's synthetic mechanism experiment (Choi et al., ICLR 2025, Sec. 5), end to end.

1. Pretrain a transformer to do linear regression in context (Garg et al. 2022; icl_regression.py): prompts
   (x_1, f(x_1), ..., x_k, f(x_k)) with f(x) = w^T x, x ~ N(0, I_d), w ~ N(0, I_d), a prediction at every x token,
   squared-error loss over all of them, curriculum on the dimension and the number of points.
2. Fine-tune it on a composite class G built on f (polynomial f + f^2, relu(f), sumdot w^T x + v^T x) with three
   prompt constructions: cpt (the paper's UFT: (x, g(x)) pairs only), cft (k context pairs (x, f(x)) on the same x's,
   then the k (x, g(x)) pairs) and neg-cft (noise context labels); cft_regression.py.
3. Track every `metric_every` steps the cosine between the model's input gradient at the last query and g's gradient
   there, two ways: through the tied x (context copy and query copy together: the official computation,
   "inner_product_tied") and through the query copy only ("inner_product_query"). Finally measure the squared error
   at every position, and for cft / neg-cft the error with the context pairs shuffled and with the context on fresh
   x's: a model that copies f(x) from the context fails both.

Backbone (`--position`): rope (rotary, relative) or learned (GPT-2's absolute embeddings: the official backbone).
Fine-tuning recipe (`--recipe`): fast (1500 steps x 128, AdamW 2e-4, bf16, clip 1) or official (Adam 1e-4 constant,
batch 64, fp32, no clip, 50k steps, relu 100k; resumable across time-limited calls, `evaluate --partial` measures
the runs where they stand). Fixes of the official code's defects, off by default (faithful):
  --fresh-context   the CFT context reuses the query x's, so the model can simply look f(x) up; draw fresh x's instead
  --matched-noise   NEG-CFT noise labels have variance 1 against d for real labels; use variance d
Seeds: every sample comes from a torch.Generator seeded by (seed, stream, step), so runs resume exactly.

Usage:
  python synthetic.py all --quick --out runs/quick             # CPU-sized grid, ~7-8 minutes on 2 cores
  python synthetic.py all --out runs/synthetic --time-budget 540   # full scale on a GPU; re-run until "complete"
  python synthetic.py all --out runs/learned --position learned --recipe official --time-budget 540
  python synthetic.py all ... --tasks polynomial                   # one fine-tuning class (the mechanism figure's)
  python synthetic.py evaluate --out runs/learned --partial        # results of unfinished runs at their last step
  python synthetic.py summary --out runs                           # every run folder under runs/, with verdicts
  python synthetic.py pretrain|finetune|evaluate|plot --out DIR ...   # the stages one by one
  python synthetic.py promot ...                                   # ProMoT on the same model (promot_regression.py)
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from atomic import write_text
from cft_regression import (FINETUNE_METHODS, FINETUNE_TASKS, SYNTHETIC_PRESETS, SyntheticConfig, finetune,
                            pretrained_checkpoint, read_eval, run_name, with_recipe)
from config_flags import add_config_flags, config_from_args
from icl_regression import pretrain, read_json_object, read_meta
from synthetic_results import (collect_results, evaluate_runs, plot_mechanism, plot_results, results_table,
                               summarise_settings)


# ----------------------------------------------------------------------------------------------------------------------
# The whole grid, resumable within a time budget


def run_all(cfg: SyntheticConfig, out: Path, device, deadline: float = math.inf, *, compile_pretrain: bool = False,
            compile_finetune: bool = False, jobs: int = 1, tasks=FINETUNE_TASKS) -> bool:
    """Pretrain, fine-tune every (task, method, seed) of `tasks`, evaluate, plot. Returns True when everything is
    finished; False when the deadline came first (re-run the same command to continue)."""
    if not pretrain(cfg, out, device, deadline, compile=compile_pretrain):
        return False
    if torch.device(device).type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # hand pretraining's cached activation memory to the fine-tuning processes
    runs = [(task, method, seed) for task in tasks for method in FINETUNE_METHODS for seed in range(cfg.seeds)]
    if jobs <= 1:
        for task, method, seed in runs:
            if not finetune(cfg, out, task, method, [seed], device, deadline, compile=compile_finetune):
                return False
    elif not finetune_in_parallel(out, runs, device, deadline, compile_finetune, jobs):
        return False
    results = evaluate_runs(out, cfg, device)
    plot_results(out)
    return all(results.get(t, {}).get(m, {}).get("seeds") == cfg.seeds for t, m, _ in runs)


def finetune_command(out: Path, run: tuple, device, deadline: float, compile: bool) -> list[str]:
    """The `synthetic.py finetune` command line of one run, with the parent's remaining time budget."""
    task, method, seed = run
    budget = f"{deadline - time.monotonic() - 15:.0f}"  # 15 s for the child's start-up; "inf" if unbounded
    return [sys.executable, str(Path(__file__).resolve()), "finetune", "--out", str(out), "--task", task,
            "--method", method, "--seed", str(seed), "--device", str(device), "--time-budget", budget,
            "--compile" if compile else "--no-compile"]


def child_devices(device) -> list[str]:
    """Where the fine-tuning processes go: every visible GPU in turn for plain "cuda", else `device` itself."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(device)]


def finetune_in_parallel(out: Path, runs: list, device, deadline: float, compile: bool, jobs: int) -> bool:
    """One `finetune` process per run, `jobs` at a time, spread over the visible GPUs: a small model leaves a GPU
    mostly idle, and separate processes overlap their kernel launches. Each process logs to out/logs/RUN.log."""
    (out / "logs").mkdir(exist_ok=True)
    evaluated = lambda run: read_eval(out / "finetune" / run_name(*run)) is not None
    waiting, running, failed = [r for r in runs if not evaluated(r)], [], []
    devices, started = child_devices(device), 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    bar = tqdm(total=len(runs), initial=len(runs) - len(waiting), desc="fine-tuning runs")
    while waiting or running:
        while waiting and len(running) < jobs and deadline - time.monotonic() > 60:
            run = waiting.pop(0)
            log_path = out / "logs" / f"{run_name(*run)}.log"
            log = open(log_path, "a")
            command = finetune_command(out, run, devices[started % len(devices)], deadline, compile)
            running.append((log_path, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            started += 1
        if not running:
            break  # the deadline came before every run could start
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            log_path, process, log = item
            log.close()
            running.remove(item)
            if process.returncode != 0:
                tail = log_path.read_text(errors="replace")[-2000:]
                print(f"\n{log_path} (exit {process.returncode}), last lines:\n{tail}")
                failed.append(log_path.stem)
        bar.update(sum(map(evaluated, runs)) - bar.n)
    bar.close()
    if failed:
        raise SystemExit(f"error: fine-tuning failed for {', '.join(failed)} (logs in {out / 'logs'})")
    return all(map(evaluated, runs))


# ----------------------------------------------------------------------------------------------------------------------
# Run folders and their settings


def load_config(out: Path) -> SyntheticConfig:
    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (start the run with `all` or `pretrain`)")
    stored = read_json_object(path)
    try:
        return SyntheticConfig(**stored).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a synthetic.py run's settings ({e})") from None


def resolve_config(args) -> SyntheticConfig:
    """The run's config: the preset, then the recipe, then the flags given; OUT/config.json once stored (see
    store_config), which later calls must not contradict."""
    preset = "quick" if args.quick else args.preset_name
    base = SYNTHETIC_PRESETS[preset or "full"]
    if hasattr(args, "recipe"):
        base = with_recipe(base, args.recipe)
    try:
        wanted = config_from_args(SyntheticConfig, args, base=base).validate()
    except ValueError as e:
        raise ValueError(f"settings: {e}") from None
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    if not (args.out / "config.json").is_file():
        return wanted
    given = {"preset": preset, **{f.name: getattr(wanted, f.name) for f in dataclasses.fields(SyntheticConfig)
                                  if hasattr(args, f.name)}}  # the flags given on the command line
    stored = load_config(args.out)
    clashes = [f"{k}={v!r} (stored {getattr(stored, k)!r})" for k, v in given.items()
               if v is not None and getattr(stored, k) != v]
    if clashes:
        raise SystemExit(f"error: {args.out / 'config.json'}: this run was started with other settings: "
                         f"{', '.join(clashes)}; use a new --out")
    return stored


def store_config(out: Path, cfg: SyntheticConfig) -> None:
    if not (out / "config.json").is_file():
        write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))


def setting_names(root: Path, given) -> list[str]:
    """The run folders a summary covers: those named, else every folder under root with a config.json."""
    if given:
        missing = [n for n in given if not (root / n / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{root / missing[0] / 'config.json'}: missing (not a synthetic.py run folder)")
        return list(given)
    names = sorted(p.parent.name for p in root.glob("*/config.json"))
    if not names:
        raise FileNotFoundError(f"{root}: no run folders (*/config.json) to summarise")
    return names


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="run folder (resumed if it exists)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    training = argparse.ArgumentParser(add_help=False)
    preset = training.add_mutually_exclusive_group()
    preset.add_argument("--preset", dest="preset_name", choices=list(SYNTHETIC_PRESETS),
                        help="size and schedule (default full; stored in OUT)")
    preset.add_argument("--quick", action="store_true", help="the CPU-sized preset (same as --preset quick)")
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
    p = sub.add_parser("evaluate", parents=[common], help="evaluate finished runs; write results.json and results.md")
    p.add_argument("--partial", action="store_true", help="also unfinished runs, at their last checkpoint")
    sub.add_parser("plot", parents=[common], help="inner-product and error curves (PNG with matplotlib, CSV always)")
    p = sub.add_parser("all", parents=[common, training], help="the whole grid, resumable")
    p.add_argument("--jobs", type=int, help="concurrent fine-tuning processes (default: every run at once on CUDA, "
                                            "1 on CPU)")
    p.add_argument("--tasks", nargs="+", choices=FINETUNE_TASKS, default=list(FINETUNE_TASKS),
                   help="fine-tuning classes to run (default: all three; e.g. polynomial alone, which the mechanism "
                        "figure needs, when device time is short)")
    p = sub.add_parser("summary", help="tables, verdicts and the mechanism figure over several run folders")
    p.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="the folder holding the run folders")
    p.add_argument("--settings", nargs="+", help="run folders under --out (default: all)")
    sub.add_parser("promot", help="ProMoT on the regression model: arguments go to promot_regression.py")
    return parser


def run_command(args, device) -> bool:
    """Run the pretrain, finetune or all command; True when its work is complete."""
    cfg = resolve_config(args)
    if args.command == "all" and args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be at least 1")
    if args.command == "finetune":
        pretrained_checkpoint(cfg, args.out)  # refused before anything is written
    store_config(args.out, cfg)
    deadline = time.monotonic() + args.time_budget
    compile_pretrain = device.type == "cuda" if args.compile is None else args.compile
    compile_finetune = bool(args.compile)
    if args.command == "pretrain":
        return pretrain(cfg, args.out, device, deadline, compile=compile_pretrain)
    if args.command == "finetune":
        return finetune(cfg, args.out, args.task, args.method, args.seed or range(cfg.seeds), device, deadline,
                        compile=compile_finetune)
    tasks = tuple(dict.fromkeys(args.tasks))
    jobs = args.jobs or (len(tasks) * len(FINETUNE_METHODS) * cfg.seeds if device.type == "cuda" else 1)
    done = run_all(cfg, args.out, device, deadline, compile_pretrain=compile_pretrain,
                   compile_finetune=compile_finetune, jobs=jobs, tasks=tasks)
    if done:
        print(results_table(collect_results(args.out), read_meta(args.out / "pretrain")))
    return done


def report_command(args, device) -> None:
    """evaluate, plot and summary: they read run folders and write only result files."""
    if args.command == "summary":
        names = setting_names(args.out, args.settings)
        text, data = summarise_settings(args.out, names)
        write_text(args.out / "summary.md", text)
        write_text(args.out / "summary.json", json.dumps(data, indent=1))
        figure = plot_mechanism(args.out, names, args.out / "mechanism.png")
        written = [args.out / "summary.md", args.out / "summary.json"] + ([figure] if figure else [])
        print(text + "\nwrote " + ", ".join(map(str, written)))
    elif args.command == "evaluate":
        results = evaluate_runs(args.out, load_config(args.out), device, partial=args.partial)
        print(results_table(results, read_meta(args.out / "pretrain")))
    else:
        load_config(args.out)
        print("wrote", ", ".join(str(p) for p in plot_results(args.out)))


def forward_to_promot(argv: list[str]):
    """`synthetic.py promot ARGS`: promot_regression.main(ARGS), imported only here."""
    try:
        import promot_regression
    except ModuleNotFoundError as e:
        if e.name != "promot_regression":
            raise
        raise SystemExit("error: promot: promot_regression.py is not in this checkout") from None
    return promot_regression.main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["promot"]:
        return forward_to_promot(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(getattr(args, "device", "cpu"))
    except RuntimeError as e:
        raise SystemExit(f"error: --device {args.device}: {e}") from None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU-sized models are all per-op overhead: a second intra-op thread only adds synchronisation (measured on
        # 2 busy cores: the test grid took 21 s with 1 thread, 272 s with 2).
        torch.set_num_threads(1)
    try:
        if args.command in ("evaluate", "plot", "summary"):
            return report_command(args, device)
        done = run_command(args, device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.command}: " + ("complete" if done else "stopped at the time budget; re-run the same command"))


if __name__ == "__main__":
    main()
