"""The synthetic reproduction of context tuning (`context_tuning.py --quick`, `--reproduce full`): every method and the
leave-one-out x token-dropout ablation of CT-KV on the same regression tasks, with confidence intervals over tasks.

Run: family by family, k by k, every method on the seeds' tasks of a (family, k) cell, CTQuickConfig.task_batch
tasks folded into one batched optimisation (ct_methods.py; the full preset: a whole cell, every seed, at once), scored
on their queries. Each task trains with its own seed (seed x 1000 + its index), so the numbers do not depend on how
tasks are batched. Each (family, k, seed, batch, method) result is saved to OUT/records.json at once, so a re-run with
the same settings and backbone continues where the last one stopped (other settings, another backbone or records of an
older version of this script are refused). A budget cut stops between runs; a (seed, batch) block counts in the
statistics once every method has run on it. OUT/results.json, OUT/results.md and OUT/run.json summarise what is done,
also after a cut or a SIGTERM. The learning-rate sweep trains its candidate rates together too (each copy of the
held-out tasks at its own rate).

Statistics, per (family, k) cell and method, over all tasks of every seed (n = seeds x tasks): the mean squared error
with its 95% confidence interval (t distribution), the same for the paired difference against ICL and against CT-KV
(every method sees the same tasks), the share of tasks where the method beats ICL, and the mean per seed.
"""
import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from atomic import folder_lock, write_text
from ct_methods import METHODS, adapt_tasks, stack_episodes
from ct_regression import (CT_REPRODUCTIONS, SWEEP_LRS, SWEEP_LRS_DEFAULT, SWEPT, TASK_FAMILIES, CTQuickConfig,
                           RegressionIO, backbone_identity, check_pretrained, regression_backbone, regression_episode,
                           regression_errors, regression_tune_config, sample_family)
from metrics import mean_std, mean_std_ci95

ABLATION = {"ct-kv (leave-one-out + dropout)": (True, True), "ct-kv (leave-one-out only)": (True, False),
            "ct-kv (dropout only)": (False, True), "ct-kv (neither)": (False, False)}
FULL_ABLATION = "ct-kv (leave-one-out + dropout)"  # = "ct-kv" itself, reported under both names
TASK_SEED_STRIDE = 1000  # task t of seed s trains with seed s x TASK_SEED_STRIDE + t: at most this many tasks per seed
# records.json's layout and meaning; 2: each task's random streams per purpose (ct_methods.purpose_seed), the backbone
# recorded. Records of another format are refused (their numbers came from other streams).
RECORDS_FORMAT = 2


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
    task's training seed (seed x TASK_SEED_STRIDE + its index in the seed: a task trains the same in any batch)."""
    found = [(sample_family(family, q, reg.n_dims, seed, t, stream), seed * TASK_SEED_STRIDE + t)
             for seed, batch in blocks for t in block_tasks(q, batch)]
    device = reg.read_in.weight.device
    return (torch.stack([x for (x, _), _ in found]).to(device), torch.stack([y for (_, y), _ in found]).to(device),
            tuple(seed for _, seed in found))


def run_batch(reg, q: CTQuickConfig, k: int, xs, ys, seeds, runs: dict, done: set, save, lr_scales=None,
              deadline=math.inf) -> bool:
    """Every run of `runs` ({name: (method, TuneConfig)}) not in `done` on one batch of tasks (all trained together,
    task t with seed seeds[t] and learning rate x lr_scales[t]); save(name, record) after each. False when the deadline
    (time.time()) came before a run could start."""
    io, model = RegressionIO(reg), reg.backbone
    episodes = [regression_episode(io, x[:k], y[:k]) for x, y in zip(xs, ys)]
    stack_episodes(episodes)  # one layout, checked before any training
    queries_x, queries_y = xs[:, -q.queries_per_task:], ys[:, -q.queries_per_task:]
    label_power, ttt = queries_y.pow(2).mean(1).tolist(), None
    for name, (method, cfg) in runs.items():
        if name in done:
            continue
        if time.time() > deadline:
            return False
        adapted = adapt_tasks(method, model, io, episodes, replace(cfg, task_seeds=seeds, task_lr_scales=lr_scales),
                              ttt)
        if method == "ttt":
            ttt = adapted  # ttt+ct-kv continues from these adapters, as marc loads the saved TTT checkpoint
        mse = regression_errors(adapted, io, queries_x, queries_y)
        save(name, {"mse": mse, "nmse": [e / p for e, p in zip(mse, label_power)]})
    return True


def sweep_learning_rates(reg, q: CTQuickConfig, family: str, save=lambda: None, records=None,
                         deadline=math.inf) -> dict | None:
    """{method: {lr: mean MSE}} of each method with a learning rate of its own (SWEPT) at every lr of SWEEP_LRS, on
    q.sweep_tasks held-out tasks of `family` (stream "sweep", seed 0) at the middle k. A method's rates train together,
    q.task_batch (rate, task) pairs per optimisation (the held-out tasks once per rate, each copy at its rate: the same
    numbers as one run per rate). records["sweep"] keeps every finished rate (resumable); None when the deadline came
    first."""
    records = {} if records is None else records
    k = sorted(q.ks)[len(q.ks) // 2]
    held_out = replace(q, tasks_per_seed=q.sweep_tasks, task_batch=q.sweep_tasks)
    xs, ys, seeds = unit_tasks(held_out, reg, family, [(0, 0)], "sweep")
    table = records.setdefault("sweep", {}).setdefault(family, {})
    for method in SWEPT:
        todo = [lr for lr in SWEEP_LRS.get(method, SWEEP_LRS_DEFAULT) if str(lr) not in table.get(method, {})]
        pairs = [(lr, task) for lr in todo for task in range(len(seeds))]
        errors = {lr: [] for lr in todo}
        run = {method: reproduction_runs(q, k, {**q.lrs, method: 1.0})[method]}  # lr = 1 x each task's scale
        for start in range(0, len(pairs), q.task_batch):
            chunk = pairs[start:start + q.task_batch]
            index = torch.tensor([task for _, task in chunk], device=xs.device)

            def keep(_name, record, chunk=chunk):
                for (lr, _), error in zip(chunk, record["mse"]):
                    errors[lr].append(error)
            if not run_batch(reg, q, k, xs[index], ys[index], tuple(seeds[t] for _, t in chunk), run, set(), keep,
                             tuple(lr for lr, _ in chunk), deadline):
                return None
            for lr in todo:  # rates whose every task is done
                if len(errors[lr]) == len(seeds) and str(lr) not in table.get(method, {}):
                    table.setdefault(method, {})[str(lr)] = sum(errors[lr]) / len(seeds)
            save()
    return table


def chosen_lrs(table: dict) -> dict:
    """{method: the lr with the lowest mean MSE in the sweep}."""
    return {method: float(min(by_lr, key=by_lr.get)) for method, by_lr in table.items()}


def grid_units(q: CTQuickConfig):
    """(family, k, blocks) in run order: family by family, k by k, seed by seed; one unit = the (seed, batch) blocks
    trained together (q.task_batch tasks at most). With task_batch >= seeds x tasks_per_seed (the full preset) a unit
    is a whole cell, every seed; smaller (the quick preset: one seed per unit), a cell takes several units and a
    budget cut may leave a cell with only its first seeds done."""
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
    """Fill records["runs"] (key -> per-task errors of one (seed, batch) block) unit by unit, run by run; True when
    every unit is done, False when the deadline (time.time()) came first (checked between runs)."""
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
        if not run_batch(reg, q, k, xs, ys, seeds, reproduction_runs(q, k, lrs), done, save, deadline=deadline):
            bar.close()
            return False
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
    per_seed = [mean_std([m for m, s in zip(e["mse"], e["seed"]) if s == seed])[0] for seed in seeds]
    stats = {}
    for metric in ("mse", "nmse"):
        stats[metric], stats[f"{metric}_ci95"] = mean_ci95(e[metric])
    stats["mse_std"] = mean_std(per_seed)[1]  # over seeds' means
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


def same_backbone(a: dict | None, b: dict | None) -> bool:
    """Two backbone_identity records name one backbone (the path may differ: a copy is the same backbone)."""
    strip = lambda identity: identity and {key: value for key, value in identity.items() if key != "path"}
    return a is not None and b is not None and strip(a) == strip(b)


def check_resumable(out: Path, q: CTQuickConfig, backbone: dict | None) -> dict:
    """The records of an earlier run in OUT with the same settings (more seeds allowed), records format and backbone,
    or new empty records. backbone: backbone_identity of the backbone this run uses (None: OUT/pretrain, not finished
    yet). Anything else in OUT's way is refused: records of other settings, of an older format or of another backbone,
    results.json without records."""
    records_file, settings = out / "records.json", {**asdict(q), "seeds": None}
    if records_file.is_file():
        try:
            records = json.loads(records_file.read_text())
            earlier = records["config"]
            if not isinstance(earlier, dict) or not isinstance(records["runs"], dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{records_file}: not a records file of context tuning's reproduction; "
                             f"pass another --out") from None
        if earlier.get("format", 1) != RECORDS_FORMAT:
            raise ValueError(f"{records_file}: records format {earlier.get('format', 1)} of an earlier version of this "
                             f"script (now {RECORDS_FORMAT}: other random streams); pass another --out")
        changed = sorted(key for key in settings if key != "seeds" and earlier.get(key) != settings[key])
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); pass another --out")
        if not same_backbone(earlier.get("backbone"), backbone):
            made_on = (earlier.get("backbone") or {}).get("path")
            now = backbone["path"] if backbone else f"{out / 'pretrain'} (to be pretrained)"
            raise ValueError(f"{out} holds a run on the backbone {made_on}, not on {now}; pass --pretrained with that "
                             f"backbone, or another --out")
        return records
    if (out / "results.json").exists():
        raise ValueError(f"{out}/results.json exists and {records_file} does not (not a resumable run of this "
                         f"script): refusing to replace it; pass another --out")
    return {"config": {**settings, "format": RECORDS_FORMAT, "backbone": backbone}, "runs": {}}


def check_task_count(q: CTQuickConfig):
    if q.tasks_per_seed > TASK_SEED_STRIDE:
        raise ValueError(f"tasks_per_seed {q.tasks_per_seed}: at most {TASK_SEED_STRIDE} (task seeds would collide)")


def quick_experiment(reg, q: CTQuickConfig, progress: bool = True) -> dict:
    """{run name: stats} of the first (family, k) cell, computed in memory (no files)."""
    check_task_count(q)
    records = {"config": asdict(q), "runs": {}}
    run_grid(reg, q, records, lambda: None, progress=progress)
    return summarise(q, records)[f"{q.families[0]}/k{q.ks[0]}"]


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside (main thread only): SIGTERM (timeout's) raises KeyboardInterrupt, so finally blocks still write the
    results."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_results(out: Path, q: CTQuickConfig, records: dict, run_info: dict) -> dict:
    """records.json, results.json (one (family, k) cell: {run name: stats}; several: {cell: {run name: stats}}),
    results.md and run.json (q, run_info) for what is finished; returns the results."""
    write_text(out / "records.json", json.dumps(records))
    cells = summarise(q, records)
    results = next(iter(cells.values())) if len(q.ks) == len(q.families) == 1 and cells else cells
    write_text(out / "results.json", json.dumps(results, indent=1))
    markdown = results_markdown(q, records, cells)
    write_text(out / "results.md", markdown)
    write_text(out / "run.json", json.dumps({**asdict(q), **run_info, "lrs": records.get("lrs")}))
    print(markdown)
    return results


def run_reproduction(out, q: CTQuickConfig, device="cpu", budget: float = math.inf, compile: bool = False,
                     pretrained: str | None = None):
    """Pretrain (or reuse) the backbone in OUT/pretrain, run the grid within `budget` seconds, resumably, and write
    OUT/results.json, results.md and run.json (write_results) for what is finished, also when the budget, an error or
    SIGTERM ends the grid. Returns the results, or None when the budget ended before the backbone was ready."""
    out, start = Path(out), time.time()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the reproduction writes a folder")
    check_task_count(q)
    if pretrained is not None:
        check_pretrained(pretrained, q.preset)  # before anything is written
    folder = Path(pretrained) if pretrained is not None else out / "pretrain"
    records = check_resumable(out, q, backbone_identity(folder))
    with folder_lock(out, "context tuning reproduction"):
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)  # tiny matrices: one thread beats two (and shares a busy machine better)
        found = regression_backbone(out, q.preset, device, start + budget, compile, pretrained)
        if found is None:
            print(f"budget of {budget:.0f}s reached while pretraining {out}/pretrain; run again to continue")
            return None
        reg, meta = found
        records["config"]["backbone"] = records["config"]["backbone"] or backbone_identity(folder)
        print(f"backbone ready ({time.time() - start:.0f}s); {q.seeds} seeds x {q.tasks_per_seed} tasks, "
              f"k in {q.ks}, families {q.families}, d = {reg.n_dims}")
        finished, interrupted = False, True
        try:
            with sigterm_as_interrupt():
                finished = run_grid(reg, q, records, lambda: write_text(out / "records.json", json.dumps(records)),
                                    start + budget, progress=sys.stderr.isatty())
            interrupted = False
        finally:
            results = write_results(out, q, records, {
                "seconds": round(time.time() - start, 1), "finished": finished, "device": str(device),
                "backbone": meta["config"], "pretrained": str(folder), "quality": meta.get("quality")})
            print(f"wrote {out / 'results.json'} and results.md ({time.time() - start:.0f}s)" +
                  ("" if finished else f"; {'interrupted' if interrupted else 'budget reached'}: run the same "
                                       "command again to continue"))
    return results


def reproduction_config(name: str, seeds: int | None = None) -> CTQuickConfig:
    if name not in CT_REPRODUCTIONS:
        raise ValueError(f"--reproduce {name}: not one of {', '.join(CT_REPRODUCTIONS)}")
    q = CT_REPRODUCTIONS[name]
    return q if seeds is None else replace(q, seeds=seeds)
