"""Evaluate a Llama on the paper's benchmarks by log-likelihood, with published prompt conventions, fast.

  python evaluate.py --checkpoint DIR --tasks mmlu-medical,medqa --out base.json     # the paper's table
  python evaluate.py --checkpoint DIR --suite icl --tasks fiqa-sa,multifin --out icl.json  # k = 0, 1, 4, 8
  python evaluate.py --compare base.json cft.json                                    # side by side, with deltas
  torchrun --nproc_per_node 8 evaluate.py --checkpoint DIR ...                      # questions split across ranks

The tasks, their data files and prompts are in benchmark_data.py (tasks: mmlu-medical, medqa, fiqa-sa, causal20,
multifin; data read from --data-dir, laid out as ../shared/data). How a question is scored is in scoring.py (the
harness's `multiple_choice` convention): context = [BOS] + shared prefix (header + k demonstrations, each followed by
" " + its answer and a blank line) + the question ending in "Answer:"; an option's continuation (" A", " Positive")
is tokenized as encode(context + " " + option)[len(encode(context)):], and the prediction is the option with the
highest summed log-likelihood. BOS is always prepended, as Llama saw it in training (when comparing with harness
numbers: many harness versions add BOS only with add_bos_token=True). scoring.score_options shares each group's
prefix, batches rows by length and reads the vocabulary only where scored: the same numbers as one question at a
time (tests/test_scoring.py checks it); torchrun splits the rows across ranks.

This file: metrics (accuracy, sklearn's F1), the paper's tables and --compare, the model with its optional LoRA
adapter file or soft prompt, and the CLI (flags generated from EvalConfig).
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from atomic import write_text
from benchmark_data import (CLASSIFICATION, DATA_LAYOUT, DEFAULT_DATA_DIR, DEFAULT_SHOTS, ICL_SHOTS, ICL_TASKS,
                            MMLU_SUBJECTS, TASKS, DataError, build_questions)
from config_flags import add_config_flags, config_from_args, option
from data import Tokenizer
from distributed import Dist, setup_distributed, shutdown_distributed
from hf_checkpoint import load_pretrained
from lora import apply_lora, merge_lora
from model import MODEL_PRESETS, PRECISIONS, ModelConfig, create_model, default_precision
from scoring import EncodedQuestion, encode_questions, predict, score_options, sum_over_ranks


@dataclass
class EvalConfig:
    checkpoint: str | None = option(None, "Hugging Face Llama folder (config.json + safetensors); without it, a "
                                          "random --model preset (smoke tests)")
    model: str = option("tiny", f"preset when no --checkpoint: {', '.join(MODEL_PRESETS)}")
    tokenizer: str | None = option(None, "sentencepiece tokenizer.model (default: the checkpoint's tokenizer.model; "
                                         "for a random --model preset, <data-dir>/llama2-tokenizer/tokenizer.model)")
    data_dir: str = option(str(DEFAULT_DATA_DIR), "data folder, laid out as ../shared/data")
    tasks: str | None = option(None, "comma-separated, from: " + ", ".join(TASKS) + " (default: all; the icl "
                                     "suite: " + ", ".join(ICL_TASKS) + ")")
    suite: str = option("main", "main: each task at its default shots (mmlu-medical 5, medqa 0, classification "
                                "5); icl: in-context-learning retention, each task at k = "
                                + ", ".join(map(str, ICL_SHOTS)),
                        choices=["main", "icl"])
    shots: int | None = option(None, "demonstrations per prompt for every task (main suite)")
    seed: int = option(1234, "demonstration sampling (and random --model weights)")
    limit: int | None = option(None, "score only the first N questions of each task (of each MMLU subject)")
    lora: str | None = option(None, "LoRA adapter .safetensors to apply (merged) on top of the model")
    soft_prompt: str | None = option(None, "soft prompt .safetensors (tensor 'soft_prompt', (n, dim)) placed before "
                                           "BOS, as cft.py's ProMoT trains it (it writes "
                                           "<out>/final/soft_prompt.safetensors)")
    batch_tokens: int | None = option(None, "padded tokens per batch (default 16384 on GPU, 2048 on CPU)")
    precision: str | None = option(None, "the weights' dtype (default bf16 on GPU, fp32 on CPU)",
                                   choices=list(PRECISIONS))
    name: str | None = option(None, "row label in tables (default: the checkpoint folder name or the preset)")
    out: str | None = option(None, "write the results JSON here (refuses to overwrite an existing file)")
    compare: list[str] | None = option(None, "print the side-by-side table of result files, with deltas against "
                                             "the first, and exit", nargs="+", metavar="JSON")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (scikit-learn's definitions, hand-written; tests check them on worked examples)


def accuracy(golds, preds) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


def f1_scores(golds, preds) -> tuple[float, float]:
    """(weighted F1, macro F1) as sklearn.metrics.f1_score(average="weighted" / "macro"): per-class
    F1 = 2TP / (2TP + FP + FN) over the classes present in golds or preds (a class never predicted scores 0);
    macro = plain mean; weighted = mean weighted by each class's support in golds."""
    labels = sorted(set(golds) | set(preds))
    f1, support = [], []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        f1.append(2 * tp / (2 * tp + fp + fn))
        support.append(sum(g == label for g in golds))
    weighted = sum(f * s for f, s in zip(f1, support)) / sum(support)
    return weighted, sum(f1) / len(f1)


def task_result(task: str, questions: list[EncodedQuestion], scores, shots: int) -> dict:
    golds, preds = [q.gold for q in questions], predict(scores)
    result = {"accuracy": accuracy(golds, preds), "n": len(questions), "shots": shots}
    if task in CLASSIFICATION:
        result["weighted_f1"], result["macro_f1"] = f1_scores(golds, preds)
    if task == "mmlu-medical":  # per subject; the task accuracy above is the size-weighted mean
        result["subjects"] = {}
        for subject in MMLU_SUBJECTS:
            idx = [i for i, q in enumerate(questions) if q.group == subject]
            if idx:
                result["subjects"][subject] = {"accuracy": accuracy([golds[i] for i in idx], [preds[i] for i in idx]),
                                               "n": len(idx)}
    result["predictions"] = preds  # option index per question, in data-file order (for paired tests across models)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Tables: rows = models/methods, columns = tasks, average (as in the paper); --compare adds the deltas

SHORT_NAMES = {"anatomy": "Anatomy", "clinical_knowledge": "Clinical Knowledge", "college_biology": "College Bio",
               "college_medicine": "College Med", "medical_genetics": "Medical Genetics",
               "professional_medicine": "Prof. Medicine", "medqa": "MedQA", "fiqa-sa": "FiQA-SA (wF1)",
               "causal20": "Causal20 (wF1)", "multifin": "MultiFin (wF1)"}


def table_columns(result: dict) -> dict:
    """{column: score in %}: MMLU by subject, MedQA accuracy, weighted F1 (FinBen's metric) for classification.
    ICL entries ("fiqa-sa k=4") keep their k."""
    columns = {}
    for name, r in result["tasks"].items():
        task, _, k = name.partition(" ")
        suffix = f" {k}" if k else ""
        if task == "mmlu-medical":
            for subject, s in r["subjects"].items():
                columns[SHORT_NAMES[subject] + suffix] = 100 * s["accuracy"]
        else:
            columns[SHORT_NAMES.get(task, task) + suffix] = 100 * r.get("weighted_f1", r["accuracy"])
    if columns:
        columns["Average"] = sum(columns.values()) / len(columns)
    return columns


def format_score(value, sign="") -> str:
    return "-" if value is None else f"{value:{sign}.1f}"


def markdown_table(results: list[dict]) -> str:
    """The paper's layout: one row per model/method, one column per task, then the average (scores in %)."""
    rows = [(r.get("name", "model"), table_columns(r)) for r in results]
    header = [c for c in dict.fromkeys(c for _, cols in rows for c in cols) if c != "Average"] + ["Average"]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(format_score(cols.get(c)) for c in header) + " |" for name, cols in rows]
    return "\n".join(lines)


def comparison_table(results: list[dict]) -> str:
    """Side by side: one row per task column, one column per result, then each result's delta against the first."""
    names = [r.get("name", "model") for r in results]
    columns = [table_columns(r) for r in results]
    tasks = [c for c in dict.fromkeys(c for cols in columns for c in cols) if c != "Average"] + ["Average"]
    deltas = [f"Δ {name} − {names[0]}" for name in names[1:]]
    lines = ["| task | " + " | ".join(names + deltas) + " |", "|---" * (1 + len(names) + len(deltas)) + "|"]
    for task in tasks:
        values = [cols.get(task) for cols in columns]
        diffs = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
        cells = [format_score(v) for v in values] + [format_score(d, "+") for d in diffs]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_results(paths) -> str:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: no such file (expected a result JSON written by evaluate.py --out)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
            raise DataError(f"{path}: no 'tasks' object (expected a result JSON written by evaluate.py --out)")
        result.setdefault("name", Path(path).stem)
        results.append(result)
    return markdown_table(results) + "\n\n" + comparison_table(results)


# ----------------------------------------------------------------------------------------------------------------------
# Models: a HF checkpoint or a random preset, plus the LoRA adapters / soft prompts that training scripts save


def load_lora(model, path) -> None:
    """Apply and merge a LoRA adapter file: safetensors holding `<module>.lora_a` (rank, in) and `<module>.lora_b`
    (out, rank) for each adapted linear layer (names as the model's parameters, e.g.
    layers.0.self_attn.q_proj.lora_a), with metadata {"rank", "alpha"}. Merged (W += alpha/rank * B A) for speed."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a LoRA adapter .safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise DataError(f"{path}: not a safetensors file ({e})") from None
    if "rank" not in meta or "alpha" not in meta:
        raise DataError(f"{path}: metadata needs 'rank' and 'alpha' (found {sorted(meta)})")
    targets = sorted({key.rsplit(".", 2)[-2] for key in tensors if key.endswith((".lora_a", ".lora_b"))})
    if not targets:
        raise DataError(f"{path}: no '<module>.lora_a' / '<module>.lora_b' tensors")
    apply_lora(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(targets))
    params = dict(model.named_parameters())
    expected = {name for name in params if ".lora_" in name}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise DataError(f"{path}: tensor {odd} does not match the model's adapters ({len(expected)} expected)")
    with torch.no_grad():
        for name, value in tensors.items():
            if value.shape != params[name].shape:
                raise DataError(f"{path}: {name} has shape {tuple(value.shape)}, the model needs "
                                f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    merge_lora(model)
    model.requires_grad_(False)


def load_soft_prompt(path, dim: int) -> torch.Tensor:
    """A soft prompt file, as cft.py's ProMoT writes it: safetensors with one tensor "soft_prompt" (n_virtual_tokens,
    dim). Its vectors come first, at positions 0..n-1, then BOS and the text (cft.py's [SOFT]*n + BOS + ... rows)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a soft prompt .safetensors)")
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise DataError(f"{path}: not a safetensors file ({e})") from None
    if "soft_prompt" not in tensors or tensors["soft_prompt"].dim() != 2 or tensors["soft_prompt"].shape[1] != dim:
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(tensors.items())[:3])
        raise DataError(f"{path}: expected a tensor 'soft_prompt' of shape (n_tokens, {dim}); found "
                        f"{len(tensors)} tensor(s): {found}{', ...' if len(tensors) > 3 else ''}")
    return tensors["soft_prompt"]


def load_eval_model(cfg: EvalConfig, device, dtype) -> torch.nn.Module:
    """The checkpoint (or a random preset), with the --lora adapter file merged in, frozen, in eval mode."""
    if cfg.checkpoint:
        model = load_pretrained(cfg.checkpoint, device, dtype)
    else:
        model = create_model(ModelConfig.from_name(cfg.model), device, dtype, seed=cfg.seed)
    if cfg.lora:
        load_lora(model, cfg.lora)
    return model.eval().requires_grad_(False)


def load_eval_tokenizer(cfg: EvalConfig) -> Tokenizer:
    """data.Tokenizer.resolve: --tokenizer, else the checkpoint's tokenizer.model. A random preset has no folder:
    it borrows Llama-2's tokenizer from the data folder (smoke tests and the README's example run)."""
    tokenizer = cfg.tokenizer
    if not tokenizer and not cfg.checkpoint:
        tokenizer = Path(cfg.data_dir) / "llama2-tokenizer" / "tokenizer.model"
    return Tokenizer.resolve(tokenizer, cfg.checkpoint)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def suite_runs(cfg: EvalConfig, tasks: list[str]) -> list[tuple[str, int, str]]:
    """(task, shots, result name) of every run; the ICL suite names its entries "<task> k=<k>"."""
    if cfg.suite == "icl":
        return [(task, k, f"{task} k={k}") for task in tasks for k in ICL_SHOTS]
    return [(task, DEFAULT_SHOTS[task] if cfg.shots is None else cfg.shots, task) for task in tasks]


def run_suite(cfg: EvalConfig, tasks: list[str], model, tok: Tokenizer, env: Dist) -> dict:
    """{"tasks": {name: result}}, one entry per suite_runs entry."""
    soft = load_soft_prompt(cfg.soft_prompt, model.cfg.dim) if cfg.soft_prompt else None
    results = {}
    for task, shots, name in suite_runs(cfg, tasks):
        start = time.time()
        questions = encode_questions(tok, build_questions(task, cfg.data_dir, shots, cfg.seed, cfg.limit,
                                                          same_questions_at_every_k=cfg.suite == "icl"))
        if not questions:
            raise DataError(f"{task}: the test file has no questions (see --data-dir)")
        scores = score_options(model, questions, batch_tokens=cfg.batch_tokens, soft_prompt=soft, rank=env.rank,
                               world=env.world, desc=name)
        scores = sum_over_ranks(scores, env.world)
        results[name] = task_result(task, questions, scores, shots) | {"seconds": round(time.time() - start, 2)}
        if env.is_main:
            r = results[name]
            extra = f", weighted F1 {r['weighted_f1']:.4f}, macro F1 {r['macro_f1']:.4f}" if "macro_f1" in r else ""
            print(f"{name}: accuracy {r['accuracy']:.4f} (n={r['n']}, {shots}-shot){extra}", file=sys.stderr)
    return {"tasks": results}


def default_name(cfg: EvalConfig) -> str:
    """The table label: the checkpoint folder (its parent for cft.py's <out>/final), else the preset."""
    if not cfg.checkpoint:
        return cfg.model
    path = Path(cfg.checkpoint).resolve()
    return path.parent.name if path.name == "final" else path.name


def requested_tasks(cfg: EvalConfig) -> list[str]:
    """--tasks as a list (default: every task of the suite); also checks the numeric flags and --out."""
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] if cfg.tasks else \
        list(ICL_TASKS if cfg.suite == "icl" else TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"--tasks: unknown task '{unknown[0]}'; choose from {', '.join(TASKS)}")
    for flag, value, least in (("--limit", cfg.limit, 1), ("--shots", cfg.shots, 0),
                               ("--batch-tokens", cfg.batch_tokens, 1)):
        if value is not None and value < least:
            raise DataError(f"{flag} {value}: expected an integer >= {least}")
    if cfg.out and Path(cfg.out).exists():
        raise DataError(f"--out {cfg.out} exists; refusing to overwrite it")
    return tasks


def evaluate_model(cfg: EvalConfig, tasks: list[str], env: Dist) -> dict:
    """The result JSON of one model: settings, then every run of the suite."""
    on_gpu = env.device.type == "cuda"
    cfg = replace(cfg, precision=cfg.precision or default_precision(env.device),
                  batch_tokens=cfg.batch_tokens or (16384 if on_gpu else 2048))
    tok = load_eval_tokenizer(cfg)
    model = load_eval_model(cfg, env.device, PRECISIONS[cfg.precision])
    tok.check_vocab(model.cfg.vocab_size)
    start = time.time()
    result = {"name": cfg.name or default_name(cfg),
              "checkpoint": cfg.checkpoint, "lora": cfg.lora, "soft_prompt": cfg.soft_prompt,
              "suite": cfg.suite, "seed": cfg.seed, "limit": cfg.limit, "precision": cfg.precision, "world": env.world}
    result |= run_suite(cfg, tasks, model, tok, env)
    result["seconds"] = round(time.time() - start, 2)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=DATA_LAYOUT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = config_from_args(EvalConfig, add_config_flags(parser, EvalConfig).parse_args(argv))
    env, finished = None, False
    try:
        if cfg.compare:
            print(compare_results(cfg.compare))
            return
        tasks = requested_tasks(cfg)
        env = setup_distributed(None)  # each rank holds the whole model and scores its share of the rows
        result = evaluate_model(cfg, tasks, env)
        if env.is_main:
            print(markdown_table([result]))
            if cfg.out:  # written whole and renamed into place: never a half-written result file
                write_text(cfg.out, json.dumps(result, indent=2) + "\n")
                print(f"wrote {cfg.out}", file=sys.stderr)
        finished = True
    except (DataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        if env is not None:
            shutdown_distributed(env, finished)


if __name__ == "__main__":
    main()
