"""Context tuning (Lu, Teehan, Yang, Ren 2025) on text tasks: CT-KV and CT-Prompt against zero-shot, ICL, prompt and
prefix tuning, TTT and TTT + CT-KV, with a Llama checkpoint; and the entry to the synthetic reproduction and timing.

The methods live in ct_methods.py (as the first author's research code, Jacklu0831/marc, runs them; --recipe nlp,
mmlu or bbh takes that benchmark's settings); here: tasks (JSONL, or k-shot tasks cut from benchmark_data.py's data
sets) -> token episodes ([BOS] x_1 y_1 \\n x_2 y_2 \\n ...; --no-bos: marc's layout without BOS) -> evaluation
(scoring.py's option log-likelihood, mean per token, or greedy exact match) -> CLI. `--quick` / `--reproduce` run
ct_reproduction.py on icl_regression.py's regression transformer; `--time` runs ct_timing.py.

  python context_tuning.py --model llama2-7b --tasks multifin-en --k 16 --method ct-kv
  python context_tuning.py --checkpoint DIR --tasks mmlu-medical --k 5 --recipe mmlu --method all
  python context_tuning.py --tasks fiqa-sa --k 16 --write-tasks fiqa16.jsonl      # convert only, no model
  python context_tuning.py --quick --out runs/ct                                 # CPU reproduction, <= 5 minutes
  python context_tuning.py --reproduce full --out runs/ct-full --budget 1500     # GPU reproduction (gpu/ct.sh)
"""
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import benchmark_data as bd
import scoring
from atomic import FolderInUse, write_text
from config_flags import OneLineParser, add_config_flags, config_from_args, option
from ct_methods import METHODS, RECIPES, TTT_TARGETS, TuneConfig, adapt_tasks
from ct_regression import CT_REPRODUCTIONS, CTQuickConfig
from ct_reproduction import reproduction_config, run_reproduction
from ct_timing import TIMING_SHAPES, run_timing
from ct_tokens import TokenIO, newline_ids, token_episode
from data import Tokenizer, read_jsonl, require_field
from hf_checkpoint import check_memory, inference_bytes, load_pretrained, resolve_model
from lora import load_peft_adapter
from model import MODEL_PRESETS, PRECISIONS, ModelConfig, create_model, default_precision, generate

# ----------------------------------------------------------------------------------------------------------------------
# Tasks: one JSON object per line, {"demos": [{"input", "output"}...], "queries": [{"input", "output", "options"?}...]}


@dataclass
class Query:
    input: str
    output: str
    options: list[str] | None = None  # scored by mean per-token log-likelihood; None: greedy generation, exact match


@dataclass
class Task:
    name: str
    demos: list[tuple[str, str]]  # (input, output)
    queries: list[Query]

    def to_json(self) -> dict:
        queries = [{k: v for k, v in asdict(q).items() if v is not None} for q in self.queries]
        return {"name": self.name, "demos": [{"input": x, "output": y} for x, y in self.demos], "queries": queries}


def parse_query(q, where: str) -> Query:
    query = Query(require_field(q, "input", where), require_field(q, "output", where))
    if "options" in q:
        options = q["options"]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"{where}: \"options\" must be a list of at least two non-empty strings")
        if query.output not in options:
            raise ValueError(f"{where}: options {options} do not contain the gold output {query.output!r}")
        query.options = options
    return query


def parse_task(obj, where: str) -> Task:
    """Validate one task object; every error names `where` (`path:line`) and the offending field."""
    demos = obj.get("demos") if isinstance(obj, dict) else None
    if not isinstance(demos, list) or not demos:
        raise ValueError(f"{where}: task has no demonstrations (\"demos\" must be a non-empty list)")
    queries = require_field(obj, "queries", where, list)
    if not queries:
        raise ValueError(f"{where}: task has no queries (\"queries\" must be a non-empty list)")
    parsed_demos = [(require_field(d, "input", f"{where}: demos[{i}]"),
                     require_field(d, "output", f"{where}: demos[{i}]")) for i, d in enumerate(demos)]
    parsed_queries = [parse_query(q, f"{where}: queries[{i}]") for i, q in enumerate(queries)]
    return Task(obj.get("name") or where, parsed_demos, parsed_queries)


def load_tasks(path) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file (expected JSONL, one task per line)")
    tasks = [parse_task(obj, f"{path}:{line_no}") for line_no, obj in read_jsonl(path)]
    if not tasks:
        raise ValueError(f"{path}: no tasks in the file")
    return tasks


# Shared data sets, read by benchmark_data.py's loaders (one reader and one prompt format per data set, the
# FLARE/lm-evaluation-harness prompts) and cut into k-shot tasks: demonstrations from train/dev, queries from test.
TEXT_TASKS = {"multifin-en": "multifin", "fiqa-sa": "fiqa-sa", "causal20": "causal20", "mmlu-medical": "mmlu-medical"}


def _pools(name: str, root: Path):
    """[(task name, demonstration pool, test items)] as benchmark_data.BenchmarkItem lists."""
    if name == "mmlu-medical":  # one task per subject; the pool is the subject's 5 dev questions
        folder = root / "mmlu-medical"
        return [(f"mmlu-{s}", bd.load_mmlu(folder / "dev" / f"{s}_dev.csv"),
                 bd.load_mmlu(folder / "test" / f"{s}_test.csv")) for s in bd.MMLU_SUBJECTS]
    test_file, pool_file, load = bd.CLASSIFICATION[TEXT_TASKS[name]]
    return [(name, load(root / pool_file), load(root / test_file))]


def make_tasks(name: str, data_dir, k: int, seed: int = 0, max_queries: int = 0) -> list[Task]:
    """k-shot tasks from a shared data set (see TEXT_TASKS)."""
    if name not in TEXT_TASKS:
        raise ValueError(f"--tasks {name}: neither a .jsonl task file nor one of {', '.join(TEXT_TASKS)}")
    tasks = []
    for sub, pool, test in _pools(name, Path(data_dir)):
        # A demonstration must never be a test item: FinCausal's practice release repeats trial sentences and MultiFin
        # repeats headlines ("Careers") across splits under different ids.
        test_texts = {e.text for e in test}
        pool = [e for e in pool if e.text not in test_texts]
        if len(pool) < k:
            raise ValueError(f"{sub}: only {len(pool)} demonstrations available (train/dev split), --k {k} asked")
        demos = bd.sample_demos(pool, k, seed)
        if 0 < max_queries < len(test):
            test = random.Random(seed).sample(test, max_queries)
        tasks.append(Task(f"{sub}/k{k}/seed{seed}", [(e.text, e.choices[e.gold]) for e in demos],
                          [Query(e.text, e.choices[e.gold], list(e.choices)) for e in test]))
    return tasks


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation on text tasks: options scored by scoring.py (mean per-token log-likelihood after the prefix, as the paper)
# or greedy generation, exact match.


@torch.no_grad()
def choose_options(model, tok, prefix_kv, task_name: str, queries: list[Query]) -> list[str]:
    """The option with the highest mean per-token log-likelihood after prefix_kv, for each query. A query's context is
    its input alone (the prefix holds BOS and the demonstrations); options are tokenized by scoring.option_tokens."""
    questions = [bd.Question(task_name, "", q.input, q.options, q.options.index(q.output)) for q in queries]
    encoded = scoring.encode_questions(tok, questions, bos=False)
    scores = scoring.score_options(model, encoded, prefix_kv=prefix_kv, reduction="mean", progress=False)
    return [q.options[i] for q, i in zip(queries, scoring.predict(scores))]


@torch.no_grad()
def generate_answer(model, tok, prefix_kv, query: Query, max_new_tokens: int) -> str:
    """Greedy generation after prefix_kv, up to the first newline."""
    sep = newline_ids(tok)
    out = generate(model, [tok.encode(query.input)], max_new_tokens, prefix_kv=prefix_kv,
                   eos_id=sep[-1] if len(sep) == 1 else None)[0]
    return tok.decode(out).split("\n")[0].strip()


def evaluate_task(model, tok, prefix_kv, task: Task, max_new_tokens: int, progress=True) -> float:
    with_options = [q for q in task.queries if q.options]
    correct = sum(c == q.output for c, q in zip(choose_options(model, tok, prefix_kv, task.name, with_options),
                                                 with_options)) if with_options else 0
    open_ended = [q for q in task.queries if not q.options]
    for q in tqdm(open_ended, desc="queries", disable=not progress, leave=False):
        correct += generate_answer(model, tok, prefix_kv, q, max_new_tokens) == q.output.strip()
    return correct / len(task.queries)


# ----------------------------------------------------------------------------------------------------------------------
# CLI: flags generated from CTRunConfig, TuneConfig (--recipe picks its base values) and CTQuickConfig
# (config_flags.py), so each default lives in one dataclass field.


@dataclass
class CTRunConfig:
    checkpoint: str | None = option(None, "Hugging Face Llama folder (config.json + safetensors)")
    model: str | None = option(None, "a model by name (llama2-7b, llama3.2-1b, ... or a Hugging Face repository id), "
                                     "found in --model-dir, the Hugging Face cache or as a path (never downloaded)")
    model_dir: str | None = option(None, "folder of model folders searched first for --model")
    random_init: bool = option(False, "--model PRESET with random weights (benchmarks; needs --tokenizer)")
    adapter: str | None = option(None, "PEFT LoRA adapter folder, merged into the model before anything runs")
    tokenizer: str | None = option(None, "tokenizer.model / tokenizer.json (default: the model folder's)")
    memory_check: bool = option(True, "refuse a model that does not fit in the device's memory, before loading it")
    bos: bool = option(True, "start every context with BOS, never dropped or trained (--no-bos: marc's layout, which "
                             "has no BOS anywhere)")
    recipe: str = option("nlp", "marc's settings of a benchmark, the base of every method flag", choices=list(RECIPES))
    tasks: str = option("multifin-en", f"a task JSONL file, or a shared data set: {', '.join(TEXT_TASKS)}")
    data_dir: str = option(str(bd.DEFAULT_DATA_DIR), "folder of the shared data sets")
    k: int = option(16, "demonstrations per task (shared data sets)")
    max_queries: int = option(0, "random subset of test queries per task (0: all)")
    write_tasks: str | None = option(None, "write the k-shot tasks as JSONL to this new file and stop")
    method: str = option("ct-kv", "the method to run", choices=[*METHODS, "all"])
    max_new_tokens: int = option(32, "greedy answers to queries without options")
    truncate_demos: bool = option(False, "drop the earliest demonstrations (with a warning) when the context is too "
                                         "long")
    out: str | None = option(None, "results: a JSONL file (resumed when it exists); with --quick / --reproduce a "
                                   "folder (resumed with the same settings, refused with others)")
    quick: bool = option(False, "synthetic reproduction on the in-context regression transformer (CPU, minutes)")
    reproduce: str | None = option(None, "the synthetic reproduction at another scale (full: the GPU run)",
                                   choices=list(CT_REPRODUCTIONS))
    budget: float | None = option(None, "--reproduce: stop starting new work after this many seconds (resumable)")
    compile: bool = option(False, "--reproduce: torch.compile the backbone's pretraining")
    pretrained: str | None = option(None, "--quick / --reproduce: reuse this finished icl_regression checkpoint "
                                          "folder of the preset's settings (e.g. synthetic.py's rotary full run's "
                                          "pretrain/)")
    time: str | None = option(None, "per-task wall time of every method on random-weight Llama shapes (comma list of "
                                    f"{', '.join(TIMING_SHAPES)}), a markdown table")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    precision: str | None = option(None, "compute precision (default: bf16 on CUDA, fp32 on CPU)",
                                   choices=list(PRECISIONS))


def read_results(path: Path) -> dict:
    """Finished (task, method) results of an earlier run of the same --out file: a rerun resumes after them. A last
    line cut short by a killed run is dropped."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; text tasks write a JSONL file")
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.splitlines()
    done = {}
    for lineno, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            done[(r["task"], r["method"])] = r
        except (json.JSONDecodeError, KeyError, TypeError):
            if lineno == len(lines) and not text.endswith("\n"):  # interrupted while appending
                print(f"note: {path}:{lineno}: dropping an incomplete last line", file=sys.stderr)
                write_text(path, "".join(f"{x}\n" for x in lines[:-1]))
                break
            raise ValueError(f"{path}:{lineno}: not a results line of this script; pass another --out") from None
    return done


def write_task_file(path, tasks: list[Task]):
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    write_text(path, "".join(json.dumps(t.to_json()) + "\n" for t in tasks))
    print(f"wrote {len(tasks)} task(s), {sum(len(t.queries) for t in tasks)} queries, to {path}")


def model_folder(run: CTRunConfig) -> Path | None:
    """The checkpoint folder to load (None: random weights), from --checkpoint or --model."""
    if run.checkpoint and run.model:
        raise ValueError("pass one of --checkpoint and --model, not both")
    if not (run.checkpoint or run.model):
        raise ValueError("--checkpoint is required to run a method, or --model NAME (or use --write-tasks / --quick)")
    if run.random_init:
        if run.model not in MODEL_PRESETS:
            raise ValueError(f"--random-init needs --model with a preset shape: {', '.join(MODEL_PRESETS)}")
        if not run.tokenizer:
            raise ValueError("--random-init: pass --tokenizer FILE (random weights come with no tokenizer)")
        return None
    folder = Path(run.checkpoint) if run.checkpoint else resolve_model(run.model, run.model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {folder}: no config.json (expected a Hugging Face Llama folder)")
    return folder


def load_text_model(run: CTRunConfig, methods):
    """(model in eval mode, tokenizer): memory checked before anything is allocated, the --adapter merged in."""
    folder = model_folder(run)
    cfg = ModelConfig.from_name(run.model) if folder is None else ModelConfig.from_hf(folder)
    print(f"model: {run.model} with random weights (--random-init)" if folder is None else f"model: {folder}")
    tok = Tokenizer.resolve(run.tokenizer, folder)
    dtype = PRECISIONS[run.precision or default_precision(run.device)]
    if run.memory_check:  # the weights and scoring's activations; TTT adapts a copy of the weights, with LoRA states
        ttt = any(m.startswith("ttt") for m in methods)
        copy_bytes = cfg.num_params() * torch.empty(0, dtype=dtype).element_size() if ttt else 0
        check_memory(inference_bytes(cfg, dtype) + copy_bytes, run.device,
                     "would fit: --precision bf16, a device with more memory" + (", or a method without TTT" * ttt))
    model = create_model(cfg, run.device, dtype, seed=0) if folder is None else load_pretrained(folder, run.device,
                                                                                               dtype)
    if run.adapter:
        load_peft_adapter(model, run.adapter, merge=True)
        print(f"adapter: {run.adapter} merged")
    tok.check_vocab(model.cfg.vocab_size)
    return model.eval().requires_grad_(False), tok


def run_text_tasks(run: CTRunConfig, cfg: TuneConfig):
    tasks = (load_tasks(run.tasks) if run.tasks.endswith(".jsonl")
             else make_tasks(run.tasks, run.data_dir, run.k, cfg.seed, run.max_queries))
    if run.write_tasks:
        return write_task_file(run.write_tasks, tasks)
    methods = METHODS if run.method == "all" else (run.method,)
    out = Path(run.out or "context_tuning_results.jsonl")
    done = read_results(out)
    model, tok = load_text_model(run, methods)
    io = TokenIO(model)
    for task in tasks:
        ep, ttt = token_episode(model, tok, task, run.truncate_demos, run.bos), None
        for method in methods:
            if (task.name, method) in done:
                print(f"{task.name} {method}: done in {out}, skipping")
                continue
            start = time.time()
            adapted = adapt_tasks(method, model, io, [ep], cfg, ttt if method == "ttt+ct-kv" else None)
            tuned = time.time() - start
            accuracy = evaluate_task(adapted.model, tok, adapted.prefix_kv, task, run.max_new_tokens)
            result = {"task": task.name, "method": method, "k": len(ep.demos), "accuracy": accuracy,
                      "n_queries": len(task.queries), "tune_seconds": round(tuned, 2), "recipe": run.recipe,
                      "bos": run.bos, "config": asdict(cfg)}
            with open(out, "a") as f:  # one line per finished (task, method): a killed run resumes after it
                f.write(json.dumps(result) + "\n")
            print(f"{task.name} {method}: accuracy {accuracy:.4f} ({len(task.queries)} queries, tuned {tuned:.1f}s)")
            ttt = adapted if method == "ttt" else None  # ttt+ct-kv continues from TTT's model (marc: saved adapters)
            del adapted


POSITIVE = ("k", "prompt_len", "ttt_rank", "ttt_permutations", "batch_size", "prompt_batch_size", "ttt_batch_size",
            "seeds", "max_new_tokens")
NON_NEGATIVE = ("steps", "ct_prompt_steps", "prompt_tuning_steps", "prefix_tuning_steps", "ttt_steps", "ttt_kv_steps",
                "max_queries", "micro_batch")
RATES = ("dropout", "ct_prompt_dropout", "prompt_tuning_dropout", "prefix_tuning_dropout", "ttt_dropout")
POSITIVE_REALS = ("lr", "ct_prompt_lr", "prompt_tuning_lr", "prefix_tuning_lr", "ttt_lr", "ttt_alpha", "budget")
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_ranges(args):
    """Every numeric flag in its range, in one line naming it."""
    flag = lambda name: "--" + name.replace("_", "-")
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and value < (1 if name in POSITIVE else 0):
            raise ValueError(f"{flag(name)} must be {'positive' if name in POSITIVE else '>= 0'}, got {value}")
    for name in RATES:
        if not 0 <= getattr(args, name, 0.0) < 1:
            raise ValueError(f"{flag(name)} must be in [0, 1), got {getattr(args, name)}")
    for name in POSITIVE_REALS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag(name)} must be a positive number, got {value}")
    unknown = [t for t in getattr(args, "ttt_targets", TTT_TARGETS).split(",") if t not in LORA_PROJECTIONS]
    if unknown:
        raise ValueError(f"--ttt-targets: {', '.join(map(repr, unknown))} not among {', '.join(LORA_PROJECTIONS)}")
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n")[0])
    add_config_flags(parser, CTRunConfig)
    add_config_flags(parser, TuneConfig)
    add_config_flags(parser, CTQuickConfig)
    args = parser.parse_args(argv)
    try:
        check_ranges(args)
        run = config_from_args(CTRunConfig, args)
        if run.pretrained and not (run.quick or run.reproduce):
            raise ValueError("--pretrained: only with --quick or --reproduce (the synthetic reproduction's backbone)")
        if run.time:
            return run_timing(run.time, run.device, run.out)
        if run.quick or run.reproduce:  # reads only --seeds: the rest is the preset's (CTQuickConfig), not text flags
            q = reproduction_config("quick" if run.quick else run.reproduce, args.seeds if "seeds" in args else None)
            return run_reproduction(run.out or "runs/context_tuning", q, "cpu" if run.quick else run.device,
                                    run.budget or math.inf, run.compile, run.pretrained)
        run_text_tasks(run, config_from_args(TuneConfig, args, base=RECIPES[run.recipe]))
    except (ValueError, OSError, FolderInUse) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
