"""The synthetic experiment's results: per-run evaluation files gathered over seeds, tables beside the official
numbers, curves (CSV, PNG) and a summary over several run folders ("settings") with a verdict line per paper claim.

Files of one run folder OUT (synthetic.py writes them):
  OUT/finetune/RUN/eval.json          a finished run's evaluation (cft_regression.evaluate_run)
  OUT/finetune/RUN/eval_partial.json  `evaluate --partial`: an unfinished run evaluated at its last checkpoint
  OUT/results.json, OUT/results.md    {task: {method: {metric, metric_std, "seeds", "steps"}}} and its table
  OUT/inner_product.csv, OUT/mse_by_position.csv, and their PNGs when matplotlib is installed
"""
import json
import math
from pathlib import Path

from atomic import atomic_write, write_text
from cft_regression import FINETUNE_METHODS, FINETUNE_TASKS, SyntheticConfig, evaluate_run, read_eval
from icl_regression import load_regression_model, read_json_object, read_meta, regression_checkpoint_folder
from metrics import mean_std

# The paper's numbers (official code, d = 20, 41 points): raw squared error averaged over the 41 positions, and the
# polynomial inner product after 40k steps (its tied computation).
OFFICIAL_MSE = {"polynomial": {"cft": 0.33, "cpt": 850.0, "neg-cft": 888.0},
                "relu": {"cft": 1e-4, "cpt": 2.97, "neg-cft": 2.95},
                "sumdot": {"cft": 5.3, "cpt": 10.2, "neg-cft": 10.8}}
OFFICIAL_INNER_PRODUCT = {"polynomial": {"cft": 0.99, "cpt": 0.3, "neg-cft": 0.18}}
# What each number is (cft_regression.inner_products and evaluate_run); the table's column titles.
METRICS = {"mse": "squared error",
           "mse_permuted_context": "error, context pairs shuffled",
           "mse_fresh_context": "error, context on fresh x's",
           "inner_product_tied": "inner product, tied x (official computation)",
           "inner_product_query": "inner product, query copy only",
           "inner_product_tied_true": "tied, task's own gradient",
           "inner_product_query_true": "query copy, task's own gradient"}
CURVE_METRICS = ("inner_product_query", "inner_product_tied", "inner_product_query_true", "inner_product_tied_true")
# Acceptance of the gradient-alignment claim (polynomial, mean over seeds, tied computation).
ALIGNMENT_BARS = {"cft": (">=", 0.9), "cpt": ("<=", 0.35), "neg-cft": ("<=", 0.25)}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation of the runs of one folder


def run_folders(out: Path) -> list[Path]:
    return sorted(p for p in (Path(out) / "finetune").glob("*-s*") if p.is_dir())


def run_evaluation(run_dir: Path, partial: bool) -> dict | None:
    """eval.json, else (partial) eval_partial.json, else None."""
    found = read_eval(run_dir)
    if found is None and partial and (run_dir / "eval_partial.json").is_file():
        found = read_json_object(run_dir / "eval_partial.json")
    return found


def evaluate_runs(out: Path, cfg: SyntheticConfig, device, partial: bool = False) -> dict:
    """Evaluate finished runs that lack eval.json (and with `partial`, unfinished runs at their last checkpoint, into
    eval_partial.json with its step), then write out/results.json and out/results.md."""
    for run_dir in run_folders(out):
        meta = read_meta(run_dir)
        if meta is None or regression_checkpoint_folder(run_dir) is None or read_eval(run_dir) is not None:
            continue
        if not meta["done"]:
            current = (run_dir / "eval_partial.json").is_file() and \
                read_json_object(run_dir / "eval_partial.json").get("step") == meta["step"]
            if not partial or meta["step"] == 0 or current:
                continue
        model, meta = load_regression_model(run_dir)
        result = evaluate_run(model.to(device).eval(), cfg, meta["task"], meta["method"], meta["seed"], device)
        name = "eval.json" if meta["done"] else "eval_partial.json"
        write_text(run_dir / name, json.dumps(result | {"step": meta["step"]}, indent=1))
    results = collect_results(out, partial)
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "results.md", results_table(results, read_meta(out / "pretrain")))
    return results


def collect_results(out: Path, partial: bool = False) -> dict:
    """{task: {method: {metric: mean, metric + "_std": sample std, "seeds": n, "steps": [step of each seed]}}} over
    the evaluated runs in out/finetune (with `partial`, also the runs evaluated at their last checkpoint)."""
    results = {}
    for task in FINETUNE_TASKS:
        for method in FINETUNE_METHODS:
            evals, steps = [], []
            for run_dir in run_folders(out):
                if run_dir.name.rsplit("-s", 1)[0] != f"{task}-{method}":
                    continue
                found = run_evaluation(run_dir, partial)
                if found is not None:
                    evals.append(found)
                    steps.append(found.get("step", (read_meta(run_dir) or {}).get("step")))
            if not evals:
                continue
            entry = {"seeds": len(evals), "steps": steps}
            for key in METRICS:
                if all(key in e for e in evals):
                    entry[key], entry[key + "_std"] = mean_std([e[key] for e in evals])
            results.setdefault(task, {})[method] = entry
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def mean_std_text(entry: dict, key: str, digits: str = ".4g") -> str:
    if key not in entry:
        return "–"
    return f"{entry[key]:{digits}} ± {entry[key + '_std']:.2g}"


def results_table(results: dict, pretrain_meta: dict | None) -> str:
    """The final table beside the official numbers (markdown)."""
    if not results:
        return "No evaluated runs yet.\n"
    columns = ["task", "method", METRICS["mse"], "official", METRICS["mse_permuted_context"],
               METRICS["mse_fresh_context"], METRICS["inner_product_tied"], "official", METRICS["inner_product_query"],
               METRICS["inner_product_tied_true"], METRICS["inner_product_query_true"], "seeds", "steps"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for task, by_method in results.items():
        for method, r in by_method.items():
            steps = sorted(set(s for s in r["steps"] if s is not None))
            cells = [task, method, mean_std_text(r, "mse"), f"{OFFICIAL_MSE[task][method]:g}",
                     mean_std_text(r, "mse_permuted_context"), mean_std_text(r, "mse_fresh_context"),
                     mean_std_text(r, "inner_product_tied", ".3f"),
                     str(OFFICIAL_INNER_PRODUCT.get(task, {}).get(method, "–")),
                     mean_std_text(r, "inner_product_query", ".3f"), mean_std_text(r, "inner_product_tied_true", ".3f"),
                     mean_std_text(r, "inner_product_query_true", ".3f"), str(r["seeds"]),
                     "–".join(f"{s:,}" for s in (steps[0], steps[-1]) if steps) if len(steps) > 1 else
                     (f"{steps[0]:,}" if steps else "–")]
            lines.append("| " + " | ".join(cells) + " |")
    if pretrain_meta and "quality" in pretrain_meta:
        q = pretrain_meta["quality"]
        seconds = f", {q['seconds']:.0f} s" if "seconds" in q else ""
        lines.append(f"\nPretraining ({pretrain_meta['model_config'].get('positions', 'rope')} positions): normalised "
                     f"squared error at {2 * pretrain_meta['n_dims']} in-context points = {q['nmse_at_2d']:.4f} "
                     f"(target <= {q['target']}) after {q['steps']:,} steps{seconds}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Curves


def evaluated_runs(out: Path) -> list[tuple[dict, dict | None]]:
    """[(meta, evaluation or None)] of every run with a meta.json (curves need only the history)."""
    runs = []
    for run_dir in run_folders(out):
        meta = read_meta(run_dir)
        if meta is not None:
            runs.append((meta, run_evaluation(run_dir, partial=True)))
    return runs


def write_curves_csv(out: Path) -> tuple[list, list[Path]]:
    """out/inner_product.csv (per metric record) and out/mse_by_position.csv (per evaluated position). Returns
    ([(meta, evaluation)], the files written)."""
    curves, errors = [",".join(("task", "method", "seed", "step", "loss") + CURVE_METRICS)], \
        ["task,method,seed,position,mse"]
    runs = evaluated_runs(out)
    for meta, result in runs:
        for h in meta["history"]:
            values = [h.get(key, math.nan) for key in ("step", "loss") + CURVE_METRICS]
            curves.append(",".join(map(str, [meta["task"], meta["method"], meta["seed"], *values])))
        for i, e in enumerate((result or {}).get("mse_by_position", [])):
            errors.append(f"{meta['task']},{meta['method']},{meta['seed']},{i + 1},{e}")
    written = [out / "inner_product.csv", out / "mse_by_position.csv"]
    write_text(written[0], "\n".join(curves) + "\n")
    write_text(written[1], "\n".join(errors) + "\n")
    return runs, written


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_results(out: Path) -> list[Path]:
    """Inner products (tied, official computation; query copy only) against fine-tuning step, and squared error
    against position, per task: CSV always, PNG when matplotlib is installed. Returns the files written."""
    runs, written = write_curves_csv(out)
    plt = pyplot()
    if plt is None:
        print("plot: matplotlib is not installed; wrote CSV files only (pip install matplotlib for PNGs)")
        return written
    tasks = [t for t in FINETUNE_TASKS if any(m["task"] == t for m, _ in runs)]  # `synthetic.py all --tasks`
    if not tasks:
        return written
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.5), squeeze=False)
    for row, key in enumerate(("inner_product_tied", "inner_product_query")):
        for ax, task in zip(axes[row], tasks):
            for color, method in zip(("C0", "C1", "C2"), FINETUNE_METHODS):
                chosen = [m for m, _ in runs if m["task"] == task and m["method"] == method]
                for i, meta in enumerate(chosen):
                    ax.plot([h["step"] for h in meta["history"]], [h.get(key, math.nan) for h in meta["history"]],
                            color=color, alpha=0.7, marker=".", ms=3, label=method if i == 0 else None)
            ax.set(title=f"{task}\n{METRICS[key]}", xlabel="fine-tuning step", ylabel="cosine with (1 + 2wᵀx)w")
            ax.legend()
    written.append(save_figure(plt, fig, out / "inner_product.png"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for color, method in zip(("C0", "C1", "C2"), FINETUNE_METHODS):
            chosen = [r for m, r in runs if m["task"] == task and m["method"] == method and r]
            for i, result in enumerate(chosen):
                curve = result["mse_by_position"]
                ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.7, label=method if i == 0 else None)
        ax.set(title=task, xlabel="in-context examples + 1", ylabel="squared error", yscale="log")
        ax.legend()
    written.append(save_figure(plt, fig, out / "mse_by_position.png"))
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Summary over settings


def verdicts(results: dict) -> dict:
    """Per claim, (holds in this setting?, the numbers that decide it). error: CFT's error is the lowest on every
    class. alignment: CFT's polynomial inner product (tied) beats CPT's and NEG-CFT's by >= 0.1, the paper's ordering
    (whether its level is reached, ALIGNMENT_BARS, is stated beside). copying: a context probe (pairs shuffled, or
    on fresh x's) raises CFT's error more than 2x on some class."""
    found = {}
    if all(m in results.get(t, {}) for t in FINETUNE_TASKS for m in FINETUNE_METHODS):
        wins = {t: results[t]["cft"]["mse"] < min(results[t]["cpt"]["mse"], results[t]["neg-cft"]["mse"])
                for t in FINETUNE_TASKS}
        won, lost = [t for t, w in wins.items() if w], [t for t, w in wins.items() if not w]
        found["error"] = (not lost, "CFT's error below CPT's and NEG-CFT's on " + (", ".join(won) or "no class") +
                          (f" (not on {', '.join(lost)})" if lost else ""))
    poly = results.get("polynomial", {})
    if all("inner_product_tied" in poly.get(m, {}) for m in FINETUNE_METHODS):
        v = {m: poly[m]["inner_product_tied"] for m in FINETUNE_METHODS}
        level = all(v[m] >= bar if op == ">=" else v[m] <= bar for m, (op, bar) in ALIGNMENT_BARS.items())
        found["alignment"] = (v["cft"] >= max(v["cpt"], v["neg-cft"]) + 0.1, "polynomial inner product (tied): " +
                              ", ".join(f"{m} {v[m]:.3f}" for m in FINETUNE_METHODS) + "; the paper's level (" +
                              ", ".join(f"{m} {op} {bar}" for m, (op, bar) in ALIGNMENT_BARS.items()) +
                              (") met" if level else ") not met"))
    probed = {t: r["cft"] for t, r in results.items() if "mse_permuted_context" in r.get("cft", {})}
    ratios = {t: [r[f"mse_{probe}_context"] / max(r["mse"], 1e-12) for probe in ("permuted", "fresh")]
              for t, r in probed.items()}
    if ratios:
        found["copying"] = (max(max(v) for v in ratios.values()) > 2, "CFT's error with the context shuffled / on "
                            "fresh x's, over its error as trained: " +
                            ", ".join(f"{t} x{a:.3g} / x{b:.3g}" for t, (a, b) in ratios.items()))
    return found


def claim_line(claim: str, per_setting: dict, faithful: dict) -> str:
    """A paper claim: reproduced / reproduced only with fresh context / not reproduced, from the settings where it
    holds. copying (no paper claim): found / not found."""
    holds = [s for s, v in per_setting.items() if claim in v and v[claim][0]]
    tested = [s for s, v in per_setting.items() if claim in v]
    if not tested:
        return f"- {claim}: not measured"
    if claim == "copying":
        verdict = "found" if holds else "not found"
    elif any(faithful[s] for s in holds):
        verdict = "reproduced"
    elif holds:
        verdict = "reproduced only with fresh context"
    else:
        verdict = "not reproduced"
    copies = lambda name: claim != "copying" and per_setting[name].get("copying", (False,))[0]
    where = ", ".join(name + (" (copies f(x) there)" if copies(name) else "") for name in holds) or "none"
    return f"- {claim}: **{verdict}** (holds in: {where}; tested: {', '.join(tested)})"


def summarise_settings(root: Path, names: list[str]) -> tuple[str, dict]:
    """(markdown, json) over the run folders root/NAME: each setting's table, pretraining and verdicts."""
    text, data, per_setting, faithful = [], {}, {}, {}
    for name in names:
        out = root / name
        if not (out / "results.json").is_file():
            text.append(f"## {name}\n\nno results yet\n")
            continue
        results, config = read_json_object(out / "results.json"), read_json_object(out / "config.json")
        pretrain = read_meta(out / "pretrain") or {}
        per_setting[name], faithful[name] = verdicts(results), not config.get("fresh_context")
        data[name] = {"config": config, "results": results, "pretrain_quality": pretrain.get("quality"),
                      "verdicts": {k: {"holds": v[0], "numbers": v[1]} for k, v in per_setting[name].items()}}
        settings = (f"{config.get('position', 'rope')} positions, {config.get('recipe', 'fast')} recipe "
                    f"({config['finetune_steps']:,} steps x {config['finetune_batch']}), " +
                    ("CFT context on fresh x's" if config.get("fresh_context") else "faithful context (the query x's)"))
        text += [f"## {name}: {settings}\n", results_table(results, pretrain),
                 *[f"- {claim}: {'holds' if ok else 'does not hold'} — {numbers}"
                   for claim, (ok, numbers) in per_setting[name].items()], ""]
    claims = ["## Paper claims", "",
              claim_line("error", per_setting, faithful) + " — CFT has the lowest error on every class",
              claim_line("alignment", per_setting, faithful) + " — CFT's input gradient aligns with g's (polynomial)",
              claim_line("copying", per_setting, faithful) + " — (no paper claim) the CFT model reads f(x) off the "
                                                              "context instead of computing g", ""]
    return "\n".join(claims + text), data


def plot_mechanism(root: Path, names: list[str], path: Path) -> Path | None:
    """The mechanism figure: polynomial inner product (tied, official computation) against step, one panel per
    setting, mean over seeds per method with the seeds' range shaded."""
    plt = pyplot()
    names = [n for n in names if (root / n / "finetune").is_dir()]
    if plt is None or not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = evaluated_runs(root / name)
        for color, method in zip(("C0", "C1", "C2"), FINETUNE_METHODS):
            curves = [{h["step"]: h.get("inner_product_tied", math.nan) for h in m["history"]} for m, _ in runs
                      if m["task"] == "polynomial" and m["method"] == method]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            values = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in values], color=color, marker=".", ms=3, label=method)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
        for method, value in OFFICIAL_INNER_PRODUCT["polynomial"].items():
            ax.axhline(value, color=("C0", "C1", "C2")[FINETUNE_METHODS.index(method)], ls=":", lw=1)
        ax.plot([], [], color="gray", ls=":", lw=1, label="paper, step 40k")
        ax.set(title=name, xlabel="fine-tuning step", ylabel="polynomial inner product (tied)", ylim=(-0.2, 1.05))
        ax.legend()
    return save_figure(plt, fig, path)
