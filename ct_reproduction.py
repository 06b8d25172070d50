"""The synthetic reproduction of context tuning (`context_tuning.py --quick`, `--reproduce full`): every method and the
leave-one-out x token-dropout ablation of CT-KV on the same regression tasks, with confidence intervals over tasks.

Run: family by family, k by k, every method on all seeds' tasks of the (family, k) cell at once
(CTQuickConfig.task_batch tasks folded into one batched optimisation each; ct_methods.py), scored on their queries.
Each task trains with its own seed (seed x 1000 + its index), so the numbers do not depend on how tasks are batched.
Each (family, k, seed, batch, method) result is saved to OUT/records.json at once, so a re-run with the same settings
continues where the last one stopped (a run with other settings is refused), and a budget cut leaves whole cells
(every method, every seed). OUT/results.json and OUT/results.md summarise what is done. The learning-rate sweep
trains its candidate rates together too (each copy of the held-out tasks at its own rate).

Statistics, per (family, k) cell and method, over all tasks of every seed (n = seeds x tasks): the mean squared error
with its 95% confidence interval (t distribution), the same for the paired difference against ICL and against CT-KV
(every method sees the same tasks), the share of tasks where the method beats ICL, and the mean per seed.
"""
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

import icl_regression as icl
from atomic import folder_lock, write_text
from ct_methods import METHODS, adapt_tasks, stack_episodes
from ct_regression import (CT_REPRODUCTIONS, SWEEP_LRS, SWEEP_LRS_DEFAULT, SWEPT, TASK_FAMILIES, CTQuickConfig,
                           RegressionIO, check_pretrained, regression_backbone, regression_episode, regression_errors,
                           regression_tune_config, sample_family)
from metrics import mean_std_ci95

ABLATION = {"ct-kv (leave-one-out + dropout)": (True, True), "ct-kv (leave-one-out only)": (True, False),
            "ct-kv (dropout only)": (False, True), "ct-kv (neither)": (False, False)}
FULL_ABLATION = "ct-kv (leave-one-out + dropout)"  # = "ct-kv" itself, reported under both names


def reproduction_runs(q: CTQuickConfig, k: int, lrs: dict | None = None) -> dict:
    """{run name: (method, TuneConfig)}: every method, and CT-KV without leave-one-out and/or dropout."""
    base = regression_tune_config(q, k, lrs)
    runs = {m: (m, base) for m in METHODS}
    runs.update({name: ("ct-kv", replace(base, leave_one_out=loo, dropout=q.dropout * drop))
                 for name, (loo, drop) in ABLATION.items() if name != FULL_ABLATION})
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Running the grid


def task_blocks(q: CTQuickConfig) -> list[tuple[int, int]]:
    """(seed, batch): each seed's tasks in batches of at most q.task_batch; a block's results are one record."""
    size = min(q.task_batch, q.tasks_per_seed)
    return [(seed, b) for seed in range(q.seeds) for b in range(math.ceil(q.tasks_per_seed / size))]


def block_tasks(q: CTQuickConfig, batch: int) -> range:
    size = min(q.task_batch, q.tasks_per_seed)
    return range(batch * size, min((batch + 1) * size, q.tasks_per_seed))


def unit_tasks(q: CTQuickConfig, reg, family: str, blocks, stream: str = "context-tuning"):
    """(xs, ys, seeds) of the blocks' tasks: (T, max(ks) + queries, d), (T, ...) on the backbone's device, and each
    task's training seed (seed x 1000 + its index in the seed: a task trains the same in any batch)."""
    found = [(sample_family(family, q, reg.n_dims, seed, t, stream), seed * 1000 + t)
             for seed, batch in blocks for t in block_tasks(q, batch)]
    device = reg.read_in.weight.device
    return (torch.stack([x for (x, _), _ in found]).to(device), torch.stack([y for (_, y), _ in found]).to(device),
            tuple(seed for _, seed in found))


def run_batch(reg, q: CTQuickConfig, k: int, xs, ys, seeds, runs: dict, done: set, save, lr_scales=None):
    """Every run of `runs` ({name: (method, TuneConfig)}) not in `done` on one batch of tasks (all trained together,
    task t with seed seeds[t] and learning rate x lr_scales[t]); save(name, record) after each."""
    io, model = RegressionIO(reg), reg.backbone
    episodes = [regression_episode(io, x[:k], y[:k]) for x, y in zip(xs, ys)]
    stack_episodes(episodes)  # one layout, checked before any training
    queries_x, queries_y = xs[:, -q.queries_per_task:], ys[:, -q.queries_per_task:]
    label_power, ttt = queries_y.pow(2).mean(1).tolist(), None
    for name, (method, cfg) in runs.items():
        if name in done:
            continue
        adapted = adapt_tasks(method, model, io, episodes, replace(cfg, task_seeds=seeds, task_lr_scales=lr_scales),
                              ttt)
        if method == "ttt":
            ttt = adapted  # ttt+ct-kv continues from these adapters, as marc loads the saved TTT checkpoint
        mse = regression_errors(adapted, io, queries_x, queries_y)
        save(name, {"mse": mse, "nmse": [e / p for e, p in zip(mse, label_power)]})


def sweep_learning_rates(reg, q: CTQuickConfig, family: str, save=lambda: None, records=None,
                         deadline=math.inf) -> dict | None:
    """{method: {lr: mean MSE}} of each method with a learning rate of its own (SWEPT) at every lr of SWEEP_LRS, on
    q.sweep_tasks held-out tasks of `family` (stream "sweep", seed 0) at the middle k. Several rates train together
    (max(1, task_batch // sweep_tasks) at a time: the same tasks once per rate, each copy at its rate; the same
    numbers as one run per rate). records["sweep"] keeps every finished point (resumable); None when the deadline
    came first."""
    records = {} if records is None else records
    k = sorted(q.ks)[len(q.ks) // 2]
    blocks = [(0, b) for b in range(math.ceil(q.sweep_tasks / min(q.task_batch, q.sweep_tasks)))]
    xs, ys, seeds = unit_tasks(replace(q, tasks_per_seed=q.sweep_tasks), reg, family, blocks, "sweep")
    table = records.setdefault("sweep", {}).setdefault(family, {})
    for method in SWEPT:
        todo = [lr for lr in SWEEP_LRS.get(method, SWEEP_LRS_DEFAULT) if str(lr) not in table.get(method, {})]
        per_batch = max(1, q.task_batch // q.sweep_tasks)
        for group in [todo[i:i + per_batch] for i in range(0, len(todo), per_batch)]:
            if time.time() > deadline:
                return None
            run = {method: reproduction_runs(q, k, {**q.lrs, method: 1.0})[method]}  # lr = 1 x each task's scale
            errors = []
            run_batch(reg, q, k, xs.repeat(len(group), 1, 1), ys.repeat(len(group), 1), seeds * len(group), run,
                      set(), lambda _name, record: errors.extend(record["mse"]),
                      tuple(lr for lr in group for _ in seeds))
            for i, lr in enumerate(group):
                part = errors[i * len(seeds):(i + 1) * len(seeds)]
                table.setdefault(method, {})[str(lr)] = sum(part) / len(part)
            save()
    return table


def chosen_lrs(table: dict) -> dict:
    """{method: the lr with the lowest mean MSE in the sweep}."""
    return {method: float(min(by_lr, key=by_lr.get)) for method, by_lr in table.items()}


def grid_units(q: CTQuickConfig):
    """(family, k, blocks) in run order: family by family, k by k, every seed's tasks of a cell trained together
    (q.task_batch at a time), so a budget cut leaves whole (family, k) cells done, each with every seed."""
    blocks = task_blocks(q)
    per_unit = max(1, q.task_batch // min(q.task_batch, q.tasks_per_seed))
    return [(family, k, blocks[i:i + per_unit]) for family in q.families for k in q.ks
            for i in range(0, len(blocks), per_unit)]


def unit_key(seed, k, family, batch, name) -> str:
    return f"{family}/k{k}/seed{seed}/batch{batch}/{name}"


def family_lrs(reg, q: CTQuickConfig, records: dict, family: str, save, deadline=math.inf) -> dict | None:
    """The learning rates of `family`'s runs: q.lrs, or (q.sweep_tasks > 0) the sweep's choice, recorded; None when
    the deadline came during the sweep."""
    if not q.sweep_tasks:
        return q.lrs
    if family not in records.setdefault("lrs", {}):
        table = sweep_learning_rates(reg, q, family, save, records, deadline)
        if table is None:
            return None
        records["lrs"][family] = {**q.lrs, **chosen_lrs(table)}
        save()
        print(f"{family}: learning rates from the sweep on held-out tasks: {records['lrs'][family]}")
    return records["lrs"][family]


def run_grid(reg, q: CTQuickConfig, records: dict, save_records, deadline=math.inf, progress=True) -> bool:
    """Fill records["runs"] (key -> per-task errors of one (seed, batch) block) unit by unit; True when every unit is
    done."""
    names = list(reproduction_runs(q, q.ks[0]))
    todo = [u for u in grid_units(q) if any(unit_key(s, u[1], u[0], b, n) not in records["runs"]
                                            for s, b in u[2] for n in names)]
    bar = tqdm(total=len(todo) * len(names), desc="context tuning", disable=not progress)
    for family, k, blocks in todo:
        lrs = None if time.time() > deadline else family_lrs(reg, q, records, family, save_records, deadline)
        if lrs is None:
            bar.close()
            return False
        done = {n for n in names if all(unit_key(s, k, family, b, n) in records["runs"] for s, b in blocks)}
        bar.update(len(done))
        xs, ys, seeds = unit_tasks(q, reg, family, blocks)

        def save(name, record, k=k, family=family, blocks=blocks):
            at = 0
            for seed, batch in blocks:  # one record per block, as if each block had run alone
                n = len(block_tasks(q, batch))
                records["runs"][unit_key(seed, k, family, batch, name)] = {
                    key: values[at:at + n] for key, values in record.items()}
                at += n
            save_records()
            bar.update(1)
        run_batch(reg, q, k, xs, ys, seeds, reproduction_runs(q, k, lrs), done, save)
    bar.close()
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def mean_ci95(values) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval); the half-width is nan for fewer than two values."""
    mean, _, half = mean_std_ci95(values)
    return mean, half


def cell_errors(q: CTQuickConfig, records: dict, family: str, k: int) -> dict:
    """{run name: {"mse": [...], "nmse": [...], "seed": [...]}} over the cell's finished units, tasks in one order."""
    names = list(reproduction_runs(q, k))
    errors = {n: {"mse": [], "nmse": [], "seed": []} for n in names}
    for seed, batch in task_blocks(q):
        keys = [unit_key(seed, k, family, batch, n) for n in names]
        if not all(key in records["runs"] for key in keys):
            continue  # a unit counts once all its runs are done: every method is compared on the same tasks
        for name, key in zip(names, keys):
            run = records["runs"][key]
            errors[name]["mse"] += run["mse"]
            errors[name]["nmse"] += run["nmse"]
            errors[name]["seed"] += [seed] * len(run["mse"])
    errors[FULL_ABLATION] = errors["ct-kv"]
    return errors


def method_stats(errors: dict, name: str) -> dict:
    e, icl_e, kv_e = errors[name], errors["icl"], errors["ct-kv"]
    seeds = sorted(set(e["seed"]))
    per_seed = [icl.mean_std([m for m, s in zip(e["mse"], e["seed"]) if s == seed])[0] for seed in seeds]
    stats = {}
    for metric in ("mse", "nmse"):
        stats[metric], stats[f"{metric}_ci95"] = mean_ci95(e[metric])
    stats["mse_std"] = icl.mean_std(per_seed)[1]  # over seeds' means
    stats["mse_per_seed"], stats["seeds"], stats["tasks"] = per_seed, len(seeds), len(e["mse"])
    for other, label in ((icl_e, "icl"), (kv_e, "ct_kv")):
        stats[f"mse_minus_{label}"], stats[f"mse_minus_{label}_ci95"] = mean_ci95(
            [a - b for a, b in zip(e["mse"], other["mse"])])
    stats["tasks_better_than_icl"] = sum(a < b for a, b in zip(e["mse"], icl_e["mse"])) / max(1, len(e["mse"]))
    return stats


def summarise(q: CTQuickConfig, records: dict) -> dict:
    """{"<family>/k<k>": {run name: stats}} for every cell with finished tasks."""
    cells = {}
    for family in q.families:
        for k in q.ks:
            errors = cell_errors(q, records, family, k)
            if errors["icl"]["mse"]:
                cells[f"{family}/k{k}"] = {name: method_stats(errors, name) for name in errors}
    return cells


# The paper's claims, as paired comparisons of MSE (lower is better): (better, worse).
CLAIMS = [("ct-kv", "icl"), ("ct-kv", "ct-prompt"), ("ct-kv", "prompt-tuning"), ("ct-kv", "prefix-tuning"),
          ("ttt+ct-kv", "ttt"), ("ttt+ct-kv", "ct-kv"), (FULL_ABLATION, "ct-kv (leave-one-out only)"),
          ("ct-kv (leave-one-out only)", "ct-kv (dropout only)"), ("ct-kv (dropout only)", "ct-kv (neither)")]


def claim_verdict(errors: dict, better: str, worse: str) -> tuple[str, float, float]:
    """'reproduced' when the 95% CI of mse(better) - mse(worse) lies below 0, 'reversed' above 0, else 'not
    separated'; with the mean difference and the CI's half-width."""
    diff, half = mean_ci95([a - b for a, b in zip(errors[better]["mse"], errors[worse]["mse"])])
    if math.isnan(half) or abs(diff) <= half:
        return "not separated", diff, half
    return ("reproduced" if diff < 0 else "reversed"), diff, half


# ----------------------------------------------------------------------------------------------------------------------
# Output


def _pm(mean, half, digits=3) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def results_markdown(q: CTQuickConfig, records: dict, cells: dict) -> str:
    lines = [f"# Context tuning on the in-context regression transformer ({q.preset} backbone)", "",
             f"{q.seeds} seeds x {q.tasks_per_seed} tasks per (family, k), {q.queries_per_task} queries per task; "
             "mean over tasks ± 95% CI (t); Δ = paired difference of MSE per task (negative: better).", ""]
    for family in q.families:
        lrs = records.get("lrs", {}).get(family, q.lrs)
        lines.append(f"- {family}: {TASK_FAMILIES[family]}; learning rates " +
                     ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()))
    for family, table in records.get("sweep", {}).items():
        lines += ["", f"Learning-rate sweep ({family}, {q.sweep_tasks} held-out tasks, k = "
                      f"{sorted(q.ks)[len(q.ks) // 2]}): mean MSE per lr", "", "| method | lr: MSE | chosen |",
                  "|---|---|---|"]
        for method, by_lr in table.items():
            lines.append(f"| {method} | " + ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in by_lr.items()) +
                         f" | {float(min(by_lr, key=by_lr.get)):g} |")
    for cell, stats in cells.items():
        lines += ["", f"## {cell} ({stats['icl']['tasks']} tasks, {stats['icl']['seeds']} seeds)", "",
                  "| method | MSE | nMSE | Δ vs ICL | Δ vs CT-KV | beats ICL |", "|---|---|---|---|---|---|"]
        for name, s in stats.items():
            lines.append(f"| {name} | {_pm(s['mse'], s['mse_ci95'])} | {_pm(s['nmse'], s['nmse_ci95'], 4)} | "
                         f"{_pm(s['mse_minus_icl'], s['mse_minus_icl_ci95'])} | "
                         f"{_pm(s['mse_minus_ct_kv'], s['mse_minus_ct_kv_ci95'])} | {s['tasks_better_than_icl']:.0%} |")
        family, k = cell.split("/k")
        errors = cell_errors(q, records, family, int(k))
        lines += ["", "| paper's claim (MSE) | Δ | verdict |", "|---|---|---|"]
        for better, worse in CLAIMS:
            verdict, diff, half = claim_verdict(errors, better, worse)
            lines.append(f"| {better} < {worse} | {_pm(diff, half)} | {verdict} |")
    return "\n".join(lines) + "\n"


def check_resumable(out: Path, q: CTQuickConfig) -> dict:
    """The records of an earlier run in OUT with the same settings (more seeds allowed), or new empty records.
    Anything else in OUT's way is refused: results of other settings, or results.json without records."""
    records_file, settings = out / "records.json", {**asdict(q), "seeds": None}
    if records_file.is_file():
        try:
            records = json.loads(records_file.read_text())
            earlier = records["config"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{records_file}: not a records file of context tuning's reproduction; "
                             f"pass another --out") from None
        changed = sorted(key for key in settings if key != "seeds" and earlier.get(key) != settings[key])
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); pass another --out")
        return records
    if (out / "results.json").exists():
        raise ValueError(f"{out}/results.json exists and {records_file} does not (not a resumable run of this "
                         f"script): refusing to replace it; pass another --out")
    return {"config": settings, "runs": {}}


def quick_experiment(reg, q: CTQuickConfig, progress: bool = True) -> dict:
    """{run name: stats} of the first (family, k) cell, computed in memory (no files)."""
    records = {"config": asdict(q), "runs": {}}
    run_grid(reg, q, records, lambda: None, progress=progress)
    return summarise(q, records)[f"{q.families[0]}/k{q.ks[0]}"]


def run_reproduction(out, q: CTQuickConfig, device="cpu", budget: float = math.inf, compile: bool = False,
                     pretrained: str | None = None):
    """Pretrain (or reuse) the backbone in OUT/pretrain, run the grid within `budget` seconds, resumably, and write
    OUT/results.json (one (family, k) cell: {run name: stats}; several: {cell: {run name: stats}}) and results.md.
    Returns the results, or None when the budget ended before the backbone was ready."""
    out, start = Path(out), time.time()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the reproduction writes a folder")
    records = check_resumable(out, q)
    if pretrained is not None:
        check_pretrained(pretrained, q.preset)  # before anything is written
    with folder_lock(out, "context tuning reproduction"):
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)  # tiny matrices: one thread beats two (and shares a busy machine better)
        found = regression_backbone(out, q.preset, device, start + budget, compile, pretrained)
        if found is None:
            print(f"budget of {budget:.0f}s reached while pretraining {out}/pretrain; run again to continue")
            return None
        reg, meta = found
        print(f"backbone ready ({time.time() - start:.0f}s); {q.seeds} seeds x {q.tasks_per_seed} tasks, "
              f"k in {q.ks}, families {q.families}, d = {reg.n_dims}")
        finished = run_grid(reg, q, records, lambda: write_text(out / "records.json", json.dumps(records)),
                            start + budget, progress=sys.stderr.isatty())
        write_text(out / "records.json", json.dumps(records))
        cells = summarise(q, records)
        results = next(iter(cells.values())) if len(q.ks) == len(q.families) == 1 and cells else cells
        write_text(out / "results.json", json.dumps(results, indent=1))
        write_text(out / "results.md", results_markdown(q, records, cells))
        write_text(out / "run.json", json.dumps({**asdict(q), "seconds": round(time.time() - start, 1),
                                                  "finished": finished, "device": str(device),
                                                  "lrs": records.get("lrs"), "backbone": meta["config"],
                                                  "pretrained": str(pretrained or out / "pretrain"),
                                                  "quality": meta.get("quality")}))
        print(results_markdown(q, records, cells))
        print(f"wrote {out / 'results.json'} and results.md ({time.time() - start:.0f}s)" +
              ("" if finished else "; budget reached: run the same command again to continue"))
    return results


def reproduction_config(name: str, seeds: int | None = None) -> CTQuickConfig:
    if name not in CT_REPRODUCTIONS:
        raise ValueError(f"--reproduce {name}: not one of {', '.join(CT_REPRODUCTIONS)}")
    q = CT_REPRODUCTIONS[name]
    return q if seeds is None else replace(q, seeds=seeds)
