"""Evaluate a Llama on the paper's benchmarks, with published prompts, results a user can diff against
lm-evaluation-harness and FinBen, fast.

  python evaluate.py --model llama2-7b --out base.json                                # the paper's tables
  python evaluate.py --checkpoint runs/cft/final --out cft.json --log-samples         # + samples_<task>.jsonl
  python evaluate.py --model llama2-7b --adapter runs/lora/final --out lora.json      # a PEFT LoRA adapter
  python evaluate.py --model llama2-7b --suite icl --tasks fiqa-sa,multifin           # k = 0, 1, 4, 8 (log-lik.)
  python evaluate.py --model llama2-7b --suite icl-gen --leak-labels "True,False"     # k = 1, 4 generated
  python evaluate.py --compare base.json cft.json --compare-out delta.csv             # deltas ± standard errors
  torchrun --nproc_per_node 8 evaluate.py --model llama2-7b ...                       # rows split across ranks

The tasks, their data files and prompts are in benchmark_data.py (mmlu-medical, medqa, fiqa-sa, causal20, multifin;
read from --data-dir, laid out as ../shared/data). Two ways to answer:
- log-likelihood (scoring.py, the harness's `multiple_choice`): context = [BOS] + shared prefix (header + k
  demonstrations) + the question ending in "Answer:"; each option's continuation is scored by its summed
  log-likelihood and the highest wins. MMLU and MedQA always; the finance tasks with --scoring loglik.
- generation (answer_generation.py, FinBen's way; the finance tasks' default, --scoring generate): greedy answers of
  up to --gen-tokens tokens, the label found in them as FinBen finds it, "missing" counted wrong, weighted F1 over
  the gold labels. The icl-gen suite generates too and reads answers by exact match (metrics.answer_line).
metrics.py holds the metrics and their standard errors; eval_report.py the result files, tables and --compare.
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from answer_generation import MISSING, finben_label, gather_answers, generate_answers
from benchmark_data import (CLASSIFICATION, DATA_LAYOUT, DEFAULT_DATA_DIR, DEFAULT_SHOTS, HARNESS_NAMES, ICL_SHOTS,
                            ICL_TASKS, LIMIT_MODES, MMLU_SUBJECTS, PROMPT_TEMPLATES, TASKS, TEST_FILES, DataError,
                            build_questions, describe_subset, select_questions, task_labels)
from config_flags import OneLineParser, add_config_flags, config_from_args, option
from data import Tokenizer
from distributed import Dist, setup_distributed, shutdown_distributed
from eval_report import (claimed_output, check_new_path, compare_results, comparison_csv, generated_sample,
                         git_commit, loglik_sample, markdown_table, result_document, write_samples)
from hf_checkpoint import check_inference_memory, load_pretrained, resolve_model
from lora import load_peft_adapter, read_peft_config
from metrics import BOOTSTRAP_SAMPLES, accuracy, exact_match, f1_scores, f1_with_stderr, leaked, rate_with_stderr
from model import MODEL_PRESETS, PRECISIONS, ModelConfig, create_model, default_precision
from scoring import encode_questions, predict, score_options, sum_over_ranks

__all__ = ["accuracy", "f1_scores", "main"]  # accuracy and f1_scores (metrics.py) are read from here by bench.py
ICL_GEN_SHOTS = (1, 4)  # ProMoT's held-out few-shot evaluations


@dataclass
class EvalConfig:
    checkpoint: str | None = option(None, "a Hugging Face Llama folder (config.json + safetensors), e.g. cft.py's "
                                          "<out>/final")
    model: str | None = option(None, "a model by name: a preset (" + ", ".join(p for p in MODEL_PRESETS if p != "tiny")
                                     + "), a Hugging Face repository id or a path, looked up in --model-dir, then "
                                       "the Hugging Face cache; with --random-init, the preset whose shape to build "
                                       "(default tiny)")
    model_dir: str | None = option(None, "a folder of model folders, searched first for --model")
    random_init: bool = option(False, "random weights of the --model preset's shape (benchmarks, smoke tests); "
                                      "needs --tokenizer")
    tokenizer: str | None = option(None, "tokenizer.model / tokenizer.json (default: the model folder's)")
    adapter: str | None = option(None, "a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), "
                                       "merged into the weights before evaluating")
    soft_prompt: str | None = option(None, "soft prompt .safetensors (tensor 'soft_prompt', (n, dim)) placed before "
                                           "BOS, as cft.py's ProMoT trains it (<out>/final/soft_prompt.safetensors)")
    data_dir: str = option(str(DEFAULT_DATA_DIR), "data folder, laid out as ../shared/data")
    tasks: str | None = option(None, "comma-separated, from: " + ", ".join(TASKS) + " (default: all; the icl suites: "
                                     + ", ".join(ICL_TASKS) + ")")
    suite: str = option("main", "main: each task at its default shots (mmlu-medical 5, medqa 0, finance 5); icl: "
                                "retention by log-likelihood at k = " + ", ".join(map(str, ICL_SHOTS)) + "; icl-gen: "
                                "retention by greedy generation (exact match) at k = "
                                + ", ".join(map(str, ICL_GEN_SHOTS)), choices=["main", "icl", "icl-gen"])
    shots: int | None = option(None, "demonstrations per prompt for every task (main suite)")
    seed: int = option(1234, "demonstrations, --limit subsets, bootstrap standard errors (and random weights)")
    limit: int | None = option(None, "score only N questions of each task (of each MMLU subject)")
    limit_mode: str = option("random", "how --limit picks: random (seeded; class-stratified for the finance tasks) "
                                       "or first (the first N in the file)", choices=list(LIMIT_MODES))
    scoring: str = option("generate", "the finance tasks in the main suite: generate (FinBen: greedy answer, label "
                                      "match, missing = wrong) or loglik (the likeliest label)",
                          choices=["generate", "loglik"])
    gen_tokens: int = option(8, "most tokens generated per answer (generate scoring, icl-gen)")
    leak_labels: str | None = option(None, "icl-gen: comma-separated labels of the fine-tuning task (e.g. "
                                           "\"True,False\"); the leak rate is the share of answers that are one "
                                           "of them")
    batch_tokens: int | None = option(None, "padded tokens per batch (default 16384 on GPU, 2048 on CPU)")
    precision: str | None = option(None, "the weights' dtype (default bf16 on GPU, fp32 on CPU)",
                                   choices=list(PRECISIONS))
    device: str | None = option(None, "cpu or cuda (default: cuda when available)", choices=["cpu", "cuda"])
    memory_check: bool = option(True, "refuse, before loading, a model that does not fit the device's memory")
    progress: bool = option(True, "progress bars on stderr")
    name: str | None = option(None, "row label in tables (default: the model folder or preset name)")
    out: str | None = option(None, "write the results JSON here (a new file; claimed at start)")
    log_samples: bool = option(False, "with --out: one samples_<task>.jsonl per task in <out>_samples/ (each "
                                      "question's prompt, options, log-likelihoods or generation, prediction)")
    compare: list[str] | None = option(None, "print the paper's tables of result files and each one's deltas against "
                                             "the first, with standard errors, and exit", nargs="+", metavar="JSON")
    compare_out: str | None = option(None, "with --compare: also write the comparison as CSV here")


# ----------------------------------------------------------------------------------------------------------------------
# The model: real weights by name or folder (or random ones), a PEFT adapter, a soft prompt


def eval_model_folder(cfg: EvalConfig, verbose: bool) -> Path | None:
    """The Hugging Face folder to load (None for --random-init); prints which one a --model name resolved to."""
    if cfg.random_init:
        return None
    if cfg.checkpoint:
        return Path(cfg.checkpoint)
    folder = resolve_model(cfg.model, cfg.model_dir)
    if verbose:
        print(f"model {cfg.model}: using {folder}", file=sys.stderr)
    return folder


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


def load_eval_model(cfg: EvalConfig, folder: Path | None, model_cfg: ModelConfig, env: Dist) -> torch.nn.Module:
    """The model (memory checked before allocating), with the --adapter merged in, frozen, in eval mode."""
    dtype = PRECISIONS[cfg.precision]
    if cfg.memory_check:
        on_cpu = env.device.type != "cuda"
        check_inference_memory(model_cfg, env.device, dtype, cfg.batch_tokens,
                               processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if on_cpu else 1)
    if folder is None:
        model = create_model(model_cfg, env.device, dtype, seed=cfg.seed)
    else:
        model = load_pretrained(folder, env.device, dtype)
    if cfg.adapter:
        load_peft_adapter(model, cfg.adapter, merge=True)
    return model.eval().requires_grad_(False)


def load_eval_tokenizer(cfg: EvalConfig, folder: Path | None) -> Tokenizer:
    """data.Tokenizer.resolve: --tokenizer, else the model folder's (a random model has none: --tokenizer needed)."""
    return Tokenizer.resolve(cfg.tokenizer, folder)


# ----------------------------------------------------------------------------------------------------------------------
# One run: a task at k shots, answered by log-likelihood ("loglik"), FinBen generation ("generate") or generation
# read by exact match ("exact")


@dataclass
class Run:
    task: str
    shots: int
    name: str       # the result's key: the task, or "<task> k=<k>" in the icl suites
    mode: str       # loglik | generate | exact


def suite_runs(cfg: EvalConfig, tasks: list[str]) -> list[Run]:
    if cfg.suite == "icl":
        return [Run(task, k, f"{task} k={k}", "loglik") for task in tasks for k in ICL_SHOTS]
    if cfg.suite == "icl-gen":
        return [Run(task, k, f"{task} k={k}", "exact") for task in tasks for k in ICL_GEN_SHOTS]
    return [Run(task, DEFAULT_SHOTS[task] if cfg.shots is None else cfg.shots, task,
                "generate" if task in CLASSIFICATION and cfg.scoring == "generate" else "loglik") for task in tasks]


def loglik_summary(run: Run, questions, encoded, scores, seed: int) -> tuple[dict, list]:
    """(summary, samples) of log-likelihood scores: accuracy (+ F1 over the gold labels for the finance tasks)."""
    golds, preds = [q.gold for q in questions], predict(scores)
    summary = rate_with_stderr([g == p for g, p in zip(golds, preds)], "accuracy")
    if run.task in CLASSIFICATION:
        summary |= f1_with_stderr(golds, preds, sorted(set(golds)), seed)
    if run.task == "mmlu-medical":  # per subject; the task accuracy above is the size-weighted mean
        summary["subjects"] = {}
        for subject in MMLU_SUBJECTS:
            idx = [i for i, q in enumerate(questions) if q.group == subject]
            if idx:
                summary["subjects"][subject] = rate_with_stderr([golds[i] == preds[i] for i in idx], "accuracy") | \
                    {"n": len(idx)}
    samples = [loglik_sample(q, e, s, p) for q, e, s, p in zip(questions, encoded, scores, preds)]
    return summary | {"predictions": preds}, samples


def generated_summary(run: Run, questions, outputs: list[str], seed: int, leak_labels) -> tuple[dict, list]:
    """(summary, samples) of generated answers: FinBen's label match ("generate") or exact match ("exact")."""
    golds = [q.gold for q in questions]
    if run.mode == "generate":
        preds = [finben_label(o, q.choices) for o, q in zip(outputs, questions)]
        correct = [p == g for p, g in zip(preds, golds)]
        summary = rate_with_stderr(correct, "accuracy") | rate_with_stderr([p == MISSING for p in preds], "missing")
        summary |= f1_with_stderr(golds, preds, sorted(set(golds)), seed)
        samples = [generated_sample(q, o, p, c) for q, o, p, c in zip(questions, outputs, preds, correct)]
        return summary | {"predictions": preds}, samples
    correct = [exact_match(o, q.choices[q.gold]) for o, q in zip(outputs, questions)]
    preds = [next((i for i, c in enumerate(q.choices) if exact_match(o, c)), MISSING)
             for o, q in zip(outputs, questions)]
    summary = rate_with_stderr(correct, "exact_match")
    leaks = [leaked(o, leak_labels) for o in outputs] if leak_labels else None
    if leaks is not None:
        summary |= rate_with_stderr(leaks, "leak_rate")
    samples = [generated_sample(q, o, p, c, {"exact_match": c} | ({"leaked": leaks[i]} if leaks else {}))
               for i, (q, o, p, c) in enumerate(zip(questions, outputs, preds, correct))]
    return summary | {"predictions": preds}, samples


def answer_run(cfg: EvalConfig, run: Run, questions, model, tok: Tokenizer, soft, env: Dist) -> tuple[dict, list]:
    """Score or generate every question of one run (rank-split), then its summary and samples."""
    encoded = encode_questions(tok, questions)
    if run.mode == "loglik":
        scores = score_options(model, encoded, batch_tokens=cfg.batch_tokens, soft_prompt=soft, rank=env.rank,
                               world=env.world, desc=run.name, progress=cfg.progress,
                               too_long_advice="fewer --shots would fit" if run.shots else "")
        return loglik_summary(run, questions, encoded, sum_over_ranks(scores, env.world), cfg.seed)
    answers = generate_answers(model, [e.context for e in encoded], [q.group for q in questions],
                               max_new_tokens=cfg.gen_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                               batch_tokens=cfg.batch_tokens, soft_prompt=soft, rank=env.rank, world=env.world,
                               desc=run.name, progress=cfg.progress)
    outputs = [tok.decode(ids) for ids in gather_answers(answers, env.world)]
    leak_labels = [x.strip() for x in cfg.leak_labels.split(",") if x.strip()] if cfg.leak_labels else None
    return generated_summary(run, questions, outputs, cfg.seed, leak_labels)


def run_config(cfg: EvalConfig, run: Run, subset: str) -> dict:
    """The `configs` entry of a run: what lm-evaluation-harness records of a task, in this project's terms."""
    generated = run.mode != "loglik"
    metrics = {"loglik": ["acc"] + (["f1", "macro_f1"] if run.task in CLASSIFICATION else []),
               "generate": ["acc", "missing", "f1", "macro_f1"],
               "exact": ["exact_match"] + (["leak_rate"] if cfg.leak_labels else [])}[run.mode]
    rule = {"loglik": "the option with the highest summed log-likelihood of ' ' + option after the prompt",
            "generate": "FinBen: the first label (in doc_to_choice order) found in the lower-cased, stripped output; "
                        "none = 'missing' (wrong); F1 over the gold labels",
            "exact": "exact match of the answer's first line (stripped, final period dropped, lower-cased)"}[run.mode]
    return {"task": run.name, "harness_task": HARNESS_NAMES[run.task], "dataset_path": cfg.data_dir,
            "test_file": TEST_FILES[run.task], "description": PROMPT_TEMPLATES[run.task],
            "doc_to_choice": list(task_labels(run.task)),
            "target_delimiter": " ", "fewshot_delimiter": "\n\n", "num_fewshot": run.shots, "fewshot_seed": cfg.seed,
            "add_bos": True, "output_type": "generate_until" if generated else "multiple_choice",
            "answer_rule": rule, "subset": subset,
            "generation_kwargs": {"until": [], "max_gen_toks": cfg.gen_tokens, "do_sample": False,
                                  "eos": "the tokenizer's"} if generated else None,
            "metric_list": [{"metric": m, "aggregation": "weighted f1" if m == "f1" else "macro f1" if m == "macro_f1"
                             else "mean"} for m in metrics]}


def prepare_runs(cfg: EvalConfig, tasks: list[str]) -> list[tuple[Run, int, list]]:
    """[(run, test set size, the questions --limit keeps)]: every data file read (and checked) before any work."""
    prepared = []
    for run in suite_runs(cfg, tasks):
        every = build_questions(run.task, cfg.data_dir, run.shots, cfg.seed,
                                same_questions_at_every_k=cfg.suite != "main")
        if not every:
            raise DataError(f"{run.task}: the test file has no questions (see --data-dir)")
        prepared.append((run, len(every), select_questions(every, cfg.limit, cfg.seed, cfg.limit_mode)))
    return prepared


def run_suite(cfg: EvalConfig, prepared, model, tok: Tokenizer, soft, env: Dist) -> tuple[dict, dict, dict, dict]:
    """(summaries, samples, configs, test set sizes) of every run of the suite."""
    summaries, samples, configs, sizes = {}, {}, {}, {}
    for run, original, questions in prepared:
        start = time.time()
        subset = describe_subset(run.task, cfg.limit if len(questions) < original else None, cfg.limit_mode)
        summary, samples[run.name] = answer_run(cfg, run, questions, model, tok, soft, env)
        summaries[run.name] = {"task": run.task, "shots": run.shots, "n": len(questions), "subset": subset,
                               "scoring": run.mode} | summary | {"seconds": round(time.time() - start, 2)}
        configs[run.name], sizes[run.name] = run_config(cfg, run, subset), original
        if env.is_main:
            print_run(run, summaries[run.name], original)
    return summaries, samples, configs, sizes


def print_run(run: Run, s: dict, original: int) -> None:
    parts = [f"{name} {s[key]:.4f}" + ("" if s.get(f"{key}_stderr") is None else f" ± {s[f'{key}_stderr']:.4f}")
             for key, name in (("accuracy", "accuracy"), ("weighted_f1", "weighted F1"), ("macro_f1", "macro F1"),
                               ("missing", "missing"), ("exact_match", "exact match"), ("leak_rate", "leak rate"))
             if key in s]
    subset = "" if s["subset"] == "all" else f" of {original}: {s['subset']}"
    print(f"{run.name}: {', '.join(parts)} (n={s['n']}{subset}; {run.shots}-shot, {run.mode})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def default_name(cfg: EvalConfig) -> str:
    """The table label: the checkpoint folder (its parent for cft.py's <out>/final), else the model name."""
    if not cfg.checkpoint:
        return (cfg.model or "tiny") + (" (random)" if cfg.random_init else "")
    path = Path(cfg.checkpoint).resolve()
    return path.parent.name if path.name == "final" else path.name


def samples_folder(out) -> Path:
    return Path(out).with_name(Path(out).stem + "_samples")


def check_model_flags(cfg: EvalConfig) -> None:
    if cfg.checkpoint and (cfg.model or cfg.random_init):
        raise DataError("--checkpoint names the model folder; leave out --model and --random-init")
    if not (cfg.checkpoint or cfg.model or cfg.random_init):
        raise DataError("no model: pass --model NAME (e.g. llama2-7b), --checkpoint DIR, or --random-init "
                        "--model PRESET --tokenizer FILE for random weights")
    if cfg.random_init and cfg.model and cfg.model not in MODEL_PRESETS:
        raise DataError(f"--random-init --model {cfg.model}: not a preset; choose from {', '.join(MODEL_PRESETS)}")
    if cfg.random_init and not cfg.tokenizer:
        raise DataError("--random-init needs --tokenizer FILE (random weights come without a tokenizer)")


def requested_tasks(cfg: EvalConfig) -> list[str]:
    """--tasks as a list (default: every task of the suite), after checking every flag (nothing has run yet)."""
    check_model_flags(cfg)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] if cfg.tasks else \
        list(ICL_TASKS if cfg.suite != "main" else TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DataError(f"--tasks: unknown task '{unknown[0] if unknown else cfg.tasks}'; choose from "
                        f"{', '.join(TASKS)}")
    for flag, value, least in (("--limit", cfg.limit, 1), ("--shots", cfg.shots, 0),
                               ("--batch-tokens", cfg.batch_tokens, 1), ("--gen-tokens", cfg.gen_tokens, 1)):
        if value is not None and value < least:
            raise DataError(f"{flag} {value}: expected an integer >= {least}")
    if cfg.leak_labels is not None and (cfg.suite != "icl-gen" or not cfg.leak_labels.strip(", ")):
        raise DataError("--leak-labels: a comma-separated list of labels, with --suite icl-gen")
    if cfg.shots is not None and cfg.suite != "main":
        raise DataError(f"--shots: the {cfg.suite} suite sets its own k; leave --shots out")
    if cfg.compare_out:
        raise DataError("--compare-out goes with --compare")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    if cfg.log_samples and not cfg.out:
        raise DataError("--log-samples writes beside the results: pass --out FILE.json too")
    if int(os.environ.get("RANK", 0)) == 0:  # the main rank claims --out; the others would see its placeholder
        if cfg.out and Path(cfg.out).exists():
            raise DataError(f"--out {cfg.out} exists; refusing to overwrite it")
        if cfg.log_samples:
            check_new_path(samples_folder(cfg.out), "--log-samples")
    return tasks


def result_config(cfg: EvalConfig, folder: Path | None, tok: Tokenizer, env: Dist) -> dict:
    """The `config` block of the result file: everything needed to rerun and to compare like with like."""
    return {"checkpoint": str(folder) if folder else None, "model": cfg.model, "random_init": cfg.random_init,
            "adapter": cfg.adapter, "soft_prompt": cfg.soft_prompt, "tokenizer": tok.path,
            "precision": cfg.precision, "device": str(env.device), "world": env.world, "batch_tokens": cfg.batch_tokens,
            "batch_size": "auto (length-sorted batches of --batch-tokens)", "max_gen_toks": cfg.gen_tokens,
            "seed": cfg.seed, "data_dir": str(Path(cfg.data_dir).resolve()), "suite": cfg.suite,
            "scoring": cfg.scoring, "limit": cfg.limit, "limit_mode": cfg.limit_mode,
            "bootstrap_iters": BOOTSTRAP_SAMPLES, "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "flags": asdict(cfg)}


@dataclass
class Prepared:
    """Everything checked before the run claims --out: settings, model folder and config, tokenizer, questions."""
    cfg: EvalConfig
    folder: Path | None
    model_cfg: ModelConfig
    tok: Tokenizer
    soft_prompt: torch.Tensor | None
    runs: list


def prepare(cfg: EvalConfig, tasks: list[str]) -> Prepared:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = replace(cfg, precision=cfg.precision or default_precision(device),
                  model=cfg.model or ("tiny" if cfg.random_init else None),
                  batch_tokens=cfg.batch_tokens or (16384 if device == "cuda" else 2048))
    folder = eval_model_folder(cfg, int(os.environ.get("RANK", 0)) == 0)
    model_cfg = ModelConfig.from_name(cfg.model or "tiny") if folder is None else ModelConfig.from_hf(folder)
    tok = load_eval_tokenizer(cfg, folder)
    tok.check_vocab(model_cfg.vocab_size)
    if cfg.adapter:
        read_peft_config(cfg.adapter)
    soft = load_soft_prompt(cfg.soft_prompt, model_cfg.dim) if cfg.soft_prompt else None
    return Prepared(cfg, folder, model_cfg, tok, soft, prepare_runs(cfg, tasks))


def evaluate_model(prep: Prepared, env: Dist) -> tuple[dict, dict]:
    """(result document, samples per run) of one model."""
    cfg, tok = prep.cfg, prep.tok
    model = load_eval_model(cfg, prep.folder, prep.model_cfg, env)
    if env.is_main and cfg.random_init:
        print(f"model: {cfg.model or 'tiny'} shape, random weights (seed {cfg.seed}); tokenizer {tok.path}",
              file=sys.stderr)
    start = time.time()
    summaries, samples, configs, sizes = run_suite(cfg, prep.runs, model, tok, prep.soft_prompt, env)
    document = result_document(cfg.name or default_name(cfg), summaries, configs,
                               result_config(cfg, prep.folder, tok, env), sizes)
    document["seconds"] = round(time.time() - start, 2)
    return document, samples


def write_outputs(cfg: EvalConfig, claim, document: dict, samples: dict) -> None:
    """The samples folder, then the result file (the result file last: it appears only when everything is there)."""
    if cfg.log_samples:
        write_samples(samples_folder(cfg.out), samples)
    if claim:
        try:
            claim.write(json.dumps(document, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(samples_folder(cfg.out), ignore_errors=True)
            raise
    for path in ([f"{samples_folder(cfg.out)}/"] if cfg.log_samples else []) + ([cfg.out] if claim else []):
        print(f"wrote {path}", file=sys.stderr)


def run_compare(cfg: EvalConfig) -> None:
    if cfg.compare_out:
        check_new_path(Path(cfg.compare_out), "--compare-out")
    table, results = compare_results(cfg.compare)
    if cfg.compare_out:
        with claimed_output(cfg.compare_out, "--compare-out") as claim:
            claim.write(comparison_csv(results))
    print(table)
    if cfg.compare_out:
        print(f"wrote {cfg.compare_out}", file=sys.stderr)


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n")[0], epilog=DATA_LAYOUT,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = config_from_args(EvalConfig, add_config_flags(parser, EvalConfig).parse_args(argv))
    env, finished = None, False
    try:
        if cfg.compare:
            run_compare(cfg)
            return
        prep = prepare(cfg, requested_tasks(cfg))
        main_rank = int(os.environ.get("RANK", 0)) == 0
        with claimed_output(cfg.out if main_rank else None) as claim:  # fails now, not after the scoring
            env = setup_distributed(cfg.device)  # each rank holds the whole model and answers its share of rows
            document, samples = evaluate_model(prep, env)
            if env.is_main:
                print(markdown_table([document]))
                write_outputs(prep.cfg, claim, document, samples)
        finished = True
    except (DataError, ValueError, OSError) as e:  # one line; a data file's message adds the layout: see --help
        first, *more = str(e).splitlines() or [type(e).__name__]
        raise SystemExit(f"error: {first}" + (" (expected data layout: evaluate.py --help)" if more else ""))
    finally:
        if env is not None:
            shutdown_distributed(env, finished)


if __name__ == "__main__":
    main()
