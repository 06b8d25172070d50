"""The ProMoT reproduction's results (promot_regression.py): per-arm statistics over seeds (results.json), a table
(results.md), learning curves (curves.csv always, curves.png when matplotlib is installed).

Every statistic is {"mean", "std" (sample), "ci95" (t-interval half-width), "n"} over seeds. icl_ratio is each seed's
held-out error after / before at each k (paired: the same held-out prompts before and after), so it shows a change
that the spread of the raw errors across seeds would hide.
"""
import dataclasses
import json
from pathlib import Path

from atomic import atomic_write, write_text
from metrics import mean_std_ci95

ARM_LABELS = {"ft": "FT (plain fine-tuning)", "pt": "PT (prompt tuning = ProMoT stage 1)",
              "promot": "ProMoT (prompt removed at held-out evaluation)", "lora": "LoRA (not in the paper)",
              "mix": "FT + regression mix (not in the paper)"}


def seed_stat(values) -> dict:
    values = list(values)
    mean, std, half = mean_std_ci95(values)
    return {"mean": mean, "std": std, "ci95": half if len(values) > 1 else 0.0, "n": len(values)}


def read_arm_results(out: Path, arm: str, job: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "jobs").glob(f"{job}-s*/{arm}.json"))]


def arm_summary(runs: list[dict]) -> dict:
    ks = list(runs[0]["icl_after"]["mse"])
    summary = {"seeds": len(runs),
               "target_mse": seed_stat(r["target"]["mse"] for r in runs),
               "target_accuracy": seed_stat(r["target"]["accuracy"] for r in runs),
               "target_format_rate": seed_stat(r["target"]["format_rate"] for r in runs),
               "target_range_rate": seed_stat(r["target"]["range_rate"] for r in runs),
               "icl_mse_before": {k: seed_stat(r["icl_before"]["mse"][k] for r in runs) for k in ks},
               "icl_mse_after": {k: seed_stat(r["icl_after"]["mse"][k] for r in runs) for k in ks},
               "icl_ratio": {k: seed_stat(r["icl_after"]["mse"][k] / r["icl_before"]["mse"][k] for r in runs)
                             for k in ks},
               "leak_rate": seed_stat(r["icl_after"]["leak_rate"] for r in runs),
               "leak_rate_before": seed_stat(r["icl_before"]["leak_rate"] for r in runs),
               "chance_leak": seed_stat(r["icl_after"]["chance_leak"] for r in runs),
               "range_rate": seed_stat(r["icl_after"]["range_rate"] for r in runs),
               "range_rate_before": seed_stat(r["icl_before"]["range_rate"] for r in runs),
               "chance_range": seed_stat(r["icl_after"]["chance_range"] for r in runs),
               "best_step": {name: seed_stat(r["stages"][name]["best_step"] for r in runs)
                             for name in runs[0]["stages"]}}
    if "icl_with_prompt" in runs[0]:  # diagnostic: the prompt left in for held-out tasks
        summary["icl_mse_with_prompt"] = {k: seed_stat(r["icl_with_prompt"]["mse"][k] for r in runs) for k in ks}
        summary["leak_rate_with_prompt"] = seed_stat(r["icl_with_prompt"]["leak_rate"] for r in runs)
        summary["range_rate_with_prompt"] = seed_stat(r["icl_with_prompt"]["range_rate"] for r in runs)
    return summary


def paired_with_ft(runs: list[dict], ft_runs: list[dict]) -> dict:
    """Per-seed differences arm - ft (the same seed shares every data split): target MSE, the held-out error ratio at
    each k, the leak and range rates. A CI excluding 0 is a difference the seeds agree on."""
    ft_by_seed = {r["seed"]: r for r in ft_runs}
    pairs = [(r, ft_by_seed[r["seed"]]) for r in runs if r["seed"] in ft_by_seed]
    if not pairs:
        return {}
    ratio = lambda r, k: r["icl_after"]["mse"][k] / r["icl_before"]["mse"][k]
    ks = list(pairs[0][0]["icl_after"]["mse"])
    return {"target_mse": seed_stat(a["target"]["mse"] - f["target"]["mse"] for a, f in pairs),
            "icl_ratio": {k: seed_stat(ratio(a, k) - ratio(f, k) for a, f in pairs) for k in ks},
            "leak_rate": seed_stat(a["icl_after"]["leak_rate"] - f["icl_after"]["leak_rate"] for a, f in pairs),
            "range_rate": seed_stat(a["icl_after"]["range_rate"] - f["icl_after"]["range_rate"] for a, f in pairs)}


def collect_promot_results(out: Path, cfg, meta: dict, complete: bool, job_arms: dict) -> dict:
    job_of = {arm: job for job, arms in job_arms.items() for arm in arms}
    runs = {arm: read_arm_results(out, arm, job_of[arm]) for arm in cfg.arms}
    arms = {arm: arm_summary(r) for arm, r in runs.items() if r}
    for arm, summary in arms.items():
        if arm != "ft" and runs.get("ft"):
            summary["minus_ft"] = paired_with_ft(runs[arm], runs["ft"])
    any_runs = next((r for r in runs.values() if r), [])
    base = {} if not any_runs else {
        "target_mse": seed_stat(r["target_before"]["mse"] for r in any_runs),
        "target_accuracy": seed_stat(r["target_before"]["accuracy"] for r in any_runs),
        "target_format_rate": seed_stat(r["target_before"]["format_rate"] for r in any_runs),
        "target_range_rate": seed_stat(r["target_before"]["range_rate"] for r in any_runs)}
    quality = meta.get("quality", {})
    return {"complete": complete, "arms": arms, "base": base,
            "backbone": {"n_dims": meta["n_dims"], "n_points": meta["config"]["n_points"],
                         "nmse_at_2d": quality.get("nmse_at_2d"), "pretrain_steps": quality.get("steps")},
            "settings": dataclasses.asdict(cfg)}


def format_stat(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}g} ± {s['ci95']:.2g}"


def promot_table(results: dict) -> str:
    arms = results["arms"]
    if not arms:
        return "no finished runs yet\n"
    ks = list(next(iter(arms.values()))["icl_mse_after"])
    b = results["backbone"]
    lines = [f"Backbone: d = {b['n_dims']}, {b['n_points']} points, normalised error at 2d points "
             f"{b['nmse_at_2d']}. Mean ± 95% CI over seeds; held-out = fresh linear-regression tasks, squared error "
             f"after k examples; leak = share of held-out predictions within {results['settings']['leak_tolerance']}"
             f" of ±1.", "",
             "| arm | seeds | target MSE | target acc | " + " | ".join(f"ICL MSE k={k} before → after (ratio)"
                                                              for k in ks) +
             " | leak before → after | in range before → after | best step |",
             "|---|---|---|---|" + "---|" * len(ks) + "---|---|---|"]
    for arm, s in arms.items():
        icl_cells = [f"{s['icl_mse_before'][k]['mean']:.3g} → {format_stat(s['icl_mse_after'][k])} "
                     f"({format_stat(s['icl_ratio'][k])})" for k in ks]
        best = ", ".join(f"{name} {v['mean']:.0f}" for name, v in s["best_step"].items())
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | {s['seeds']} | {format_stat(s['target_mse'])} | "
                     f"{format_stat(s['target_accuracy'])} | " + " | ".join(icl_cells) +
                     f" | {s['leak_rate_before']['mean']:.3f} → {format_stat(s['leak_rate'])} | "
                     f"{s['range_rate_before']['mean']:.3f} → {format_stat(s['range_rate'])} | {best} |")
    base, first = results["base"], next(iter(arms.values()))
    tol = results["settings"]["leak_tolerance"]
    lines += ["", f"In range: share of held-out predictions with |y^| <= {1 + tol:g} (the target's output range). "
              f"Chance (true held-out labels): leak {first['chance_leak']['mean']:.3f}, in range "
              f"{first['chance_range']['mean']:.3f}.",
              f"Base model on the target task (in context, no training): MSE {format_stat(base['target_mse'])}, sign "
              f"accuracy {format_stat(base['target_accuracy'])}, predictions within {tol:g} of ±1 "
              f"{format_stat(base['target_format_rate'])}, with |y^| <= {1 + tol:g} "
              f"{format_stat(base['target_range_rate'])}."]
    for arm in ("pt", "promot"):
        if arm in arms and "leak_rate_with_prompt" in arms[arm]:
            s = arms[arm]
            lines.append(f"{ARM_LABELS[arm]} with the prompt left in on held-out tasks (diagnostic): ICL MSE " +
                         ", ".join(f"k={k} {format_stat(s['icl_mse_with_prompt'][k])}" for k in ks) +
                         f"; leak {format_stat(s['leak_rate_with_prompt'])}; in range "
                         f"{format_stat(s['range_rate_with_prompt'])}.")
    paired = [(arm, s["minus_ft"]) for arm, s in arms.items() if s.get("minus_ft")]
    if paired:
        lines += ["", "Paired with FT (arm − FT, same seed and data; mean ± 95% CI):", "",
                  "| arm | target MSE | " + " | ".join(f"ICL ratio k={k}" for k in ks) + " | leak | in range |",
                  "|---|---|" + "---|" * len(ks) + "---|---|"]
        for arm, d in paired:
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | {format_stat(d['target_mse'], 2)} | " +
                         " | ".join(format_stat(d["icl_ratio"][k], 2) for k in ks) +
                         f" | {format_stat(d['leak_rate'], 2)} | {format_stat(d['range_rate'], 2)} |")
    if not results["complete"]:
        lines.append("\nINCOMPLETE: some runs have not finished; re-run the same command.")
    return "\n".join(lines) + "\n"


def curve_rows(out: Path, cfg, job_arms: dict) -> list[dict]:
    """One row per learning-curve point: arm, seed, stage, step, fraction of the stage's budget, metrics.
    ProMoT's rows are its stage 2 (its stage 1 is the pt arm's curve)."""
    rows = []
    job_of = {arm: job for job, arms in job_arms.items() for arm in arms}
    for arm in cfg.arms:
        for run in read_arm_results(out, arm, job_of[arm]):
            for name, stage in run["stages"].items():
                if arm == "promot" and name == "stage1":
                    continue
                for record in stage["history"]:
                    rows.append({"arm": arm, "seed": run["seed"], "stage": name,
                                 "fraction": record["step"] / stage["steps"], **record})
    return rows


def write_curves(out: Path, rows: list[dict], ks) -> list[Path]:
    columns = ["arm", "seed", "stage", "step", "fraction", "target_val_mse", "target_val_accuracy",
               *[f"icl_mse_k{k}" for k in ks], "leak_rate", "range_rate"]
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    write_text(out / "curves.csv", "\n".join(lines) + "\n")
    written = [out / "curves.csv"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("promot: matplotlib is not installed; wrote curves.csv only")
        return written
    panels = [("target_val_mse", "target validation MSE", False), (f"icl_ratio_k{ks[-1]}",
              f"held-out ICL MSE / base model's, k = {ks[-1]}", True), ("leak_rate", "held-out leak rate (near ±1)",
              False), ("range_rate", "held-out predictions in the target range", False)]
    for row in rows:  # step 0 of every stage is the base model on the same curve prompts
        start = next(r for r in rows if (r["arm"], r["seed"], r["stage"], r["step"]) == (row["arm"], row["seed"],
                                                                                          row["stage"], 0))
        row[f"icl_ratio_k{ks[-1]}"] = row[f"icl_mse_k{ks[-1]}"] / start[f"icl_mse_k{ks[-1]}"]
    fig, axes = plt.subplots(1, 5, figsize=(26, 4.5))
    for ax, (key, label, log) in zip(axes, panels):
        for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
            for j, seed in enumerate(sorted({r["seed"] for r in rows if r["arm"] == arm})):
                points = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
                ax.plot([p["fraction"] for p in points], [p[key] for p in points], color=f"C{i}", alpha=0.8,
                        marker=".", label=ARM_LABELS.get(arm, arm) if j == 0 else None)
        ax.set_xlabel("fraction of the stage's steps (PT: pt_steps; others: ft_steps)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
    # the trade-off: held-out damage against target gain, every curve point (an arm that only moves slower along
    # FT's path lies on FT's curve; a better trade-off lies below it)
    ratio = f"icl_ratio_k{ks[-1]}"
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        points = [r for r in rows if r["arm"] == arm and r["step"] > 0]  # step 0: every stage's untrained start
        axes[4].scatter([p["target_val_mse"] for p in points], [p[ratio] for p in points], color=f"C{i}", s=10)
    axes[4].set_xlabel("target validation MSE")
    axes[4].set_ylabel(f"held-out ICL MSE / base model's, k = {ks[-1]}")
    axes[4].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return written + [out / "curves.png"]


def write_report(out: Path, cfg, meta: dict, complete: bool, job_arms: dict) -> dict:
    """results.json, results.md, curves.csv (+ curves.png); prints the table."""
    results = collect_promot_results(out, cfg, meta, complete, job_arms)
    write_text(out / "results.json", json.dumps(results, indent=1))
    table = promot_table(results)
    write_text(out / "results.md", table)
    write_curves(out, curve_rows(out, cfg, job_arms), cfg.icl_k)
    print(table)
    return results
