"""Context tuning (Lu, Teehan, Yang, Ren 2025): CT-KV and CT-Prompt, against ICL, prompt/prefix tuning and TTT.

Given k demonstrations (x_i, y_i) of a new task and a frozen model:
- CT-KV: one no-grad pass over the concatenated demonstrations gives every layer's keys/values over the P prefix
  positions (keys already rotated). Those K/V tensors are the only trainable parameters. Demonstration i is re-posed as
  a training pair placed after the prefix (positions start at P), loss on y_i only, attending to the prefix with
  demonstration i's span hidden (leave-one-out) and each prefix position dropped with probability p (token dropout).
  The prefix is never recomputed, so a step costs time linear in k.
- CT-Prompt: a soft prompt initialised from the demonstrations' embeddings, trained the same way but passed through
  the whole model every step (strict leave-one-out: demonstration i's embeddings are hidden from pair i): quadratic
  in k.
- Baselines: zero-shot, ICL, prompt tuning and prefix tuning (m = 32 positions, initialised from random tokens, not
  from the demonstrations), TTT (LoRA on leave-one-out permutations of the demonstrations), TTT+CT-KV.
All masking goes through model.py's AttentionMask; every method ends as (model, prefix_kv) and is evaluated the same
way.

Read top to bottom: tasks (JSONL format, k-shot tasks cut from benchmark_data.py's data sets) -> episodes (a task's
demonstrations as tensors) -> the methods -> evaluation (scoring.py's option log-likelihood, mean per token, or greedy
exact match) -> the synthetic reproduction (`--quick`, on icl_regression.py's regression transformer: regression MSE)
-> CLI.

  python context_tuning.py --checkpoint DIR --tasks multifin-en --k 16 --method ct-kv
  python context_tuning.py --tasks fiqa-sa --k 16 --write-tasks fiqa16.jsonl      # convert only, no model
  python context_tuning.py --quick --out runs/ct                                 # CPU reproduction, <= 5 minutes
"""
import argparse
import copy
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import benchmark_data as bd
import icl_regression as icl
import scoring
from atomic import write_text
from config_flags import add_config_flags, config_from_args, option
from ct_regression import CTQuickConfig, RegressionIO, quick_backbone, regression_mse
from data import Tokenizer, read_jsonl, require_field
from hf_checkpoint import load_pretrained
from lora import apply_lora, merge_lora
from model import PRECISIONS, AttentionMask, default_precision, generate, prefill
from training import lr_at

METHODS = ("zero-shot", "icl", "prompt-tuning", "prefix-tuning", "ct-prompt", "ct-kv", "ttt", "ttt+ct-kv")


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
# Episodes: a task's demonstrations as model inputs. Everything is in embedding space, so the same methods run on
# model.py's Llama (TokenIO: token embeddings in, next-token loss out) and on icl_regression.py's regression
# transformer (RegressionIO: read-in vectors in, squared error out).

NO_TARGET = -100  # the target of a position outside the loss (Transformer.loss's ignore index)


@dataclass
class Demo:
    embeds: torch.Tensor   # (L, dim) model inputs of this demonstration
    targets: torch.Tensor  # (L,) what each position predicts: the next token id, or the regression target
    in_loss: torch.Tensor  # (L,) bool: positions in the loss (those that predict y_i)


@dataclass
class Episode:
    lead: Demo          # context start that belongs to no demonstration (Llama's BOS); empty for regression
    demos: list[Demo]

    def context(self) -> torch.Tensor:
        """(1, P, dim): the lead and every demonstration, concatenated (ICL's context, CT-Prompt's initialisation)."""
        return torch.cat([self.lead.embeds] + [d.embeds for d in self.demos])[None]

    def spans(self) -> torch.Tensor:
        """(k, 2) long: [start, end) of demonstration i inside the context = the key span hidden from pair i."""
        ends = torch.tensor([len(self.lead.embeds)] + [len(d.embeds) for d in self.demos]).cumsum(0)
        return torch.stack([ends[:-1], ends[1:]], dim=1).to(self.lead.embeds.device)

    def pairs(self):
        """Demonstration i re-posed as training pair i (row i), right-padded: embeds (k, T, dim), targets, in_loss
        (k, T). Padding sits after every real position, so causal attention keeps it out of the loss positions."""
        T = max(len(d.embeds) for d in self.demos)
        pad = lambda t: F.pad(t, (0, 0) * (t.dim() - 1) + (0, T - len(t)))
        return tuple(torch.stack([pad(getattr(d, f)) for d in self.demos]) for f in ("embeds", "targets", "in_loss"))


class TokenIO:
    """Llama's inputs and outputs: token ids in through the embedding table, next-token cross-entropy out
    (Transformer.loss). TTT's LoRA adapters touch neither, so one TokenIO serves the adapted copies too."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, device=self.model.embed_tokens.weight.device))

    def position_loss(self, hidden, targets):
        """hidden (N, dim), targets (N,) -> (N,) fp32 cross-entropy of each position."""
        return self.model.loss(hidden[None], targets[None], reduction="none")[0]

    @torch.no_grad()
    def random_context(self, m: int, generator) -> torch.Tensor:
        """m embeddings of random vocabulary tokens (Lester et al.'s sampled-vocabulary init), not the
        demonstrations."""
        ids = torch.randint(self.model.embed_tokens.num_embeddings, (m,), generator=generator)
        return self.embed(ids.tolist())


def row_losses(io, hidden, targets, in_loss) -> torch.Tensor:
    """(B,) mean loss over each row's positions in the loss (the paper's mean per-token loss)."""
    per_position = io.position_loss(hidden[in_loss], targets[in_loss])
    rows = in_loss.nonzero()[:, 0]
    sums = torch.zeros(len(in_loss), device=hidden.device, dtype=per_position.dtype).index_add(0, rows, per_position)
    return sums / in_loss.sum(1).clamp(min=1)


def newline_ids(tok) -> list[int]:
    """Token ids ending a demonstration: the newline, as it tokenizes after text (sentencepiece adds a leading space
    piece to a lone "\\n"); eos when the tokenizer has no newline."""
    return tok.encode("a\n")[len(tok.encode("a")):] or [tok.eos_id]


def token_demo(model, ids: list[int], n_input: int) -> Demo:
    """A demonstration from its token ids (input, then output and separator): positions n_input-1 .. L-2 predict the
    output tokens; the last position predicts nothing."""
    device = model.embed_tokens.weight.device
    in_loss = torch.zeros(len(ids), dtype=torch.bool, device=device)
    in_loss[n_input - 1:len(ids) - 1] = True
    return Demo(TokenIO(model).embed(ids), torch.tensor(ids[1:] + [NO_TARGET], device=device), in_loss)


def token_lead(model, bos_id: int) -> Demo:
    """The context's start: BOS alone, in no loss and in no demonstration's span."""
    device = model.embed_tokens.weight.device
    return Demo(TokenIO(model).embed([bos_id]), torch.tensor([NO_TARGET], device=device),
                torch.zeros(1, dtype=torch.bool, device=device))


def demo_ids(tok, text_input: str, text_output: str, sep: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, output ids + separator): the output's tokens follow scoring.py's rule for an option after its
    context, so that a demonstration's answer is tokenized as a query's options are scored."""
    x = tok.encode(text_input)
    return x, scoring.option_tokens(tok, x, text_input, text_output) + sep


def longest_query_len(tok, task: Task, sep: list[int]) -> int:
    lengths = []
    for q in task.queries:
        x = tok.encode(q.input)
        lengths.append(len(x) + max(len(scoring.option_tokens(tok, x, q.input, o)) for o in q.options or [q.output]))
    return max(lengths) + len(sep)


def token_episode(model, tok, task: Task, truncate: bool = False) -> Episode:
    """[BOS] x_1 y_1 \\n x_2 y_2 \\n ...; checks that context + the longest query fits in max_seq_len."""
    sep = newline_ids(tok)
    demos = [demo_ids(tok, x, y, sep) for x, y in task.demos]
    longest_query = longest_query_len(tok, task, sep)
    limit = model.cfg.max_seq_len

    def context_len():
        return 1 + sum(len(x) + len(y) for x, y in demos)
    if truncate:
        dropped = 0
        while len(demos) > 1 and context_len() + longest_query > limit:
            demos.pop(0)
            dropped += 1
        if dropped:
            print(f"warning: {task.name}: dropped the first {dropped} of {len(task.demos)} demonstrations to fit "
                  f"max_seq_len {limit} (--truncate-demos)", file=sys.stderr)
    if context_len() + longest_query > limit:
        raise ValueError(f"{task.name}: demonstrations take {context_len()} tokens and the longest query "
                         f"{longest_query}, more than the model's context ({limit}); use fewer/shorter demonstrations "
                         f"or --truncate-demos")
    return Episode(token_lead(model, tok.bos_id), [token_demo(model, x + y, len(x)) for x, y in demos])


# ----------------------------------------------------------------------------------------------------------------------
# The methods. Each one ends as (model, prefix_kv): the query is then answered after that prefix (positions from P).


@dataclass
class TuneConfig:
    # epochs: one optimiser step over all k pairs each (paper: ~200; 16-20 on MMLU/BBH)
    steps: int = option(200, "optimisation steps (epochs over the k pairs)")
    # AdamW, no weight decay, cosine decay without warm-up (paper's CT-KV setting)
    lr: float = option(1e-3, "learning rate of K/V, prompts and prefixes")
    dropout: float = option(0.05, "token dropout rate p on the prefix (CT methods; paper: 0.05-0.1)")
    leave_one_out: bool = option(True, "hide demonstration i from pair i (CT methods)")
    prompt_len: int = option(32, "m, the trainable positions of prompt and prefix tuning")
    lora_rank: int = option(64, "TTT's LoRA rank")
    lora_lr: float = option(1e-4, "TTT's LoRA learning rate")
    micro_batch: int = option(0, "pairs per forward/backward (0: all k); gradients accumulate into the same step")
    grad_clip: float = 1.0
    seed: int = option(0, "seed of the demonstrations' sampling, dropout masks, TTT's permutations and adapters")
    progress: bool = True
    on_step: object = None     # called after every optimiser step (bench.py times steps with it)


def model_dtype(model):
    return model.embed_tokens.weight.dtype


def dropout_mask(rows: int, P: int, p: float, generator, device):
    """(rows, P) bool: prefix position j dropped for row b with probability p; None when p = 0. Only the P prefix
    (or soft-prompt) positions can be dropped: the mask's width stops there."""
    if p == 0:
        return None
    return (torch.rand(rows, P, generator=generator) < p).to(device)


def optimise(params, batch_loss, n_rows: int, cfg: TuneConfig, desc: str):
    """AdamW (no weight decay), cosine decay to 0 without warm-up, grad-norm clip, one step per epoch over all pairs.
    batch_loss(rows, generator) -> (len(rows),) per-pair losses; rows go in micro-batches of cfg.micro_batch."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, 0, cfg.steps))  # cosine, no warm-up
    generator = torch.Generator().manual_seed(cfg.seed)  # dropout masks and TTT permutations
    chunk = cfg.micro_batch or n_rows
    for _ in tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, leave=False):
        opt.zero_grad(set_to_none=True)
        for start in range(0, n_rows, chunk):
            rows = torch.arange(start, min(start + chunk, n_rows))
            (batch_loss(rows, generator).sum() / n_rows).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        schedule.step()
        if cfg.on_step is not None:
            cfg.on_step()


def kv_pair_losses(model, io, pairs, rows, prefix_kv, spans=None, dropped=None):
    """CT-KV / prefix tuning loss of training pairs `rows` (pairs = Episode.pairs()) after a prefix, per pair:
    the pairs' positions start at P, span i is hidden from pair i, dropped prefix positions are invisible."""
    embeds, targets, in_loss = pairs
    mask = AttentionMask(hidden_span=None if spans is None else spans[rows.to(spans.device)], dropped=dropped)
    hidden = model.hidden_states(embeds=embeds[rows], prefix_kv=prefix_kv, mask=mask)
    return row_losses(io, hidden, targets[rows], in_loss[rows])


def prompt_pair_losses(model, io, pairs, rows, prompt, spans=None, dropped=None):
    """CT-Prompt / prompt tuning loss of pairs `rows` after a soft prompt (1, P, dim) run through the model with them.
    Strict leave-one-out: span i is hidden from every later position of row i, prompt positions included."""
    embeds, targets, in_loss = pairs
    n, P = len(rows), prompt.shape[1]
    x = torch.cat([prompt.expand(n, -1, -1), embeds[rows]], dim=1)
    row_targets = torch.cat([targets.new_zeros(n, P), targets[rows]], dim=1)
    row_in_loss = torch.cat([in_loss.new_zeros(n, P), in_loss[rows]], dim=1)
    mask = AttentionMask(hidden_span=None if spans is None else spans[rows.to(spans.device)], dropped=dropped)
    return row_losses(io, model.hidden_states(embeds=x, mask=mask), row_targets, row_in_loss)


def tune_kv(model, io, ep: Episode, kv, cfg: TuneConfig, spans=None, dropout=0.0, desc="ct-kv"):
    """CT-KV (kv from the demonstrations, spans = leave-one-out) and prefix tuning (kv from random tokens, no spans).

    The trainable K/V and AdamW's state are fp32 even when the model computes in bf16 (the official code trains them
    in bf16, where lr 1e-3 updates underflow); each step casts them to the model's dtype. The prefix stays batch 1
    for all k pairs: model.py's attention shares it across rows without copying it per row."""
    dtype = model_dtype(model)
    params = [nn.Parameter(t.detach().float().clone()) for layer in kv for t in layer]
    pairs = ep.pairs()
    P = kv[0][0].shape[2]

    def prefix():
        return [(params[2 * i].to(dtype), params[2 * i + 1].to(dtype)) for i in range(len(kv))]

    def batch_loss(rows, generator):
        dropped = dropout_mask(len(rows), P, dropout, generator, pairs[0].device)
        return kv_pair_losses(model, io, pairs, rows, prefix(), spans, dropped)

    optimise(params, batch_loss, len(ep.demos), cfg, desc)
    with torch.no_grad():
        return prefix()


def tune_prompt(model, io, ep: Episode, prompt, cfg: TuneConfig, spans=None, dropout=0.0, desc="ct-prompt"):
    """CT-Prompt (prompt = the demonstrations' embeddings, spans = strict leave-one-out) and prompt tuning (random
    tokens, no spans). Every pair re-runs the whole prompt through the model: time quadratic in k. fp32 master copy."""
    dtype = model_dtype(model)
    param = nn.Parameter(prompt.detach().float().clone())  # (1, P, dim)
    pairs = ep.pairs()

    def batch_loss(rows, generator):
        dropped = dropout_mask(len(rows), prompt.shape[1], dropout, generator, pairs[0].device)
        return prompt_pair_losses(model, io, pairs, rows, param.to(dtype), spans, dropped)

    optimise([param], batch_loss, len(ep.demos), cfg, desc)
    return param.detach().to(dtype)


def tune_lora(model, io, ep: Episode, cfg: TuneConfig, desc="ttt"):
    """Test-time training (Akyurek et al. 2024): LoRA adapters, added to `model` in place, trained on leave-one-out
    tasks. Row i is [lead, the other demonstrations in a fresh random order, demonstration i], loss on y_i only."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the adapters' random init, reproducible without touching the caller's RNG
        apply_lora(model, rank=cfg.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    k = len(ep.demos)

    def batch_loss(rows, generator):
        seqs = []
        for i in rows.tolist():
            order = [j for j in torch.randperm(k, generator=generator).tolist() if j != i]
            seqs.append([ep.lead] + [ep.demos[j] for j in order] + [ep.demos[i]])
        embeds = torch.stack([torch.cat([d.embeds for d in s]) for s in seqs])
        targets = torch.stack([torch.cat([d.targets for d in s]) for s in seqs])
        in_loss = torch.stack([torch.cat([torch.zeros_like(d.in_loss) for d in s[:-1]] + [s[-1].in_loss])
                               for s in seqs])
        return row_losses(io, model.hidden_states(embeds=embeds), targets, in_loss)

    optimise(params, batch_loss, k, replace(cfg, lr=cfg.lora_lr), desc)
    return model


def adapt(method: str, model, io, ep: Episode, cfg: TuneConfig):
    """Run one method on one episode -> (model to answer with, prefix_kv to answer after)."""
    model.requires_grad_(False)
    spans = ep.spans() if cfg.leave_one_out else None
    context = ep.context()
    if method == "zero-shot":
        return model, prefill(model, embeds=ep.lead.embeds[None])
    if method == "icl":
        return model, prefill(model, embeds=context)
    if method in ("prompt-tuning", "prefix-tuning"):
        generator = torch.Generator().manual_seed(cfg.seed)
        start = torch.cat([ep.lead.embeds, io.random_context(cfg.prompt_len, generator)])[None]
        if method == "prompt-tuning":
            return model, prefill(model, embeds=tune_prompt(model, io, ep, start, cfg, desc=method))
        return model, tune_kv(model, io, ep, prefill(model, embeds=start), cfg, desc=method)
    if method == "ct-prompt":
        return model, prefill(model, embeds=tune_prompt(model, io, ep, context, cfg, spans, cfg.dropout))
    if method == "ct-kv":
        return model, tune_kv(model, io, ep, prefill(model, embeds=context), cfg, spans, cfg.dropout)
    if method == "ttt":  # on a copy: the caller's model stays as it was for the next task or method
        adapted = tune_lora(copy.deepcopy(model), io, ep, cfg)
        return adapted, prefill(adapted, embeds=context)
    if method == "ttt+ct-kv":
        adapted = merge_lora(tune_lora(copy.deepcopy(model), io, ep, cfg))
        return adapted, tune_kv(adapted, io, ep, prefill(adapted, embeds=context), cfg, spans, cfg.dropout)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


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
# The measurable reproduction without LLM weights (`--quick`): icl_regression.py's in-context linear-regression
# transformer (pretrained on w ~ N(0, I)) meets tasks it never saw, w ~ N(w_shift, I), with k demonstrations each.
# Every method above runs unchanged on it; the score is the squared error on fresh queries of the same task.

ABLATION = {"ct-kv (leave-one-out + dropout)": (True, True), "ct-kv (leave-one-out only)": (True, False),
            "ct-kv (dropout only)": (False, True), "ct-kv (neither)": (False, False)}


@torch.no_grad()
def regression_episode(io: RegressionIO, xs, ys) -> Episode:
    """k demonstrations (x_i, y_i) -> tokens x_i, y_i; the x_i position predicts y_i, the y_i position nothing."""
    embeds = io.embed(xs[None], ys[None])[0]
    in_loss = torch.tensor([True, False])
    demos = [Demo(embeds[2 * i:2 * i + 2], torch.stack([ys[i], ys.new_zeros(())]), in_loss) for i in range(len(xs))]
    return Episode(Demo(embeds[:0], ys[:0], in_loss[:0]), demos)


def quick_runs(q: CTQuickConfig, dim: int) -> dict:
    """{run name: (method, TuneConfig)}: every method, and CT-KV without leave-one-out and/or dropout."""
    # prompt/prefix tuning get as many trainable positions as the demonstrations fill (2k tokens): the same capacity
    # as CT-Prompt/CT-KV, and inside the context length the backbone was pretrained on
    base = TuneConfig(steps=q.steps, lr=q.lr, lora_lr=q.lora_lr, dropout=q.dropout, prompt_len=2 * q.k,
                      lora_rank=min(64, dim), progress=False)
    runs = {m: (m, base) for m in METHODS}
    runs.update({name: ("ct-kv", replace(base, leave_one_out=loo, dropout=q.dropout * drop))
                 for name, (loo, drop) in ABLATION.items() if (loo, drop) != (True, True)})  # = "ct-kv" itself
    return runs


def quick_seed(reg, q: CTQuickConfig, runs: dict, seed: int, bar) -> dict:
    """{run name: {"mse": [per task], "nmse": [per task]}} on q.tasks_per_seed fresh tasks of one seed.
    mse: squared error over the task's queries; nmse: the same divided by the task's mean squared label, so that
    averaged over tasks every task weighs the same (as accuracy does in the paper's tables)."""
    io, model = RegressionIO(reg), reg.backbone
    errors = {name: {"mse": [], "nmse": []} for name in runs}
    for t in range(q.tasks_per_seed):
        task = icl.sample_tasks("shifted-linear", 1, q.k + q.queries_per_task, reg.n_dims,
                                icl.generator("cpu", seed, "context-tuning", t), w_shift=q.w_shift)
        xs, ys = task.xs[0], task.values()[0]
        ep = regression_episode(io, xs[:q.k], ys[:q.k])
        label_power = ys[q.k:].pow(2).mean().item()
        for name, (method, cfg) in runs.items():
            answer_model, prefix_kv = adapt(method, model, io, ep, replace(cfg, seed=seed * 1000 + t))
            mse = regression_mse(answer_model, io, prefix_kv, xs[q.k:], ys[q.k:])
            errors[name]["mse"].append(mse)
            errors[name]["nmse"].append(mse / label_power)
            bar.update(1)
    return errors


def quick_experiment(reg, q: CTQuickConfig, progress: bool = True) -> dict:
    """{run name: {"mse", "mse_std", "mse_per_seed", "nmse", "nmse_std", "nmse_per_seed", "tasks_better_than_icl"}}
    (mean and sample std over seeds): every method and the leave-one-out/dropout ablation on the same tasks (per seed,
    q.tasks_per_seed fresh tasks of k demonstrations)."""
    runs = quick_runs(q, reg.backbone.cfg.dim)
    per_seed = {name: {"mse": [], "nmse": [], "wins": []} for name in runs}
    bar = tqdm(total=q.seeds * q.tasks_per_seed * len(runs), desc="context tuning", disable=not progress)
    for seed in range(q.seeds):
        errors = quick_seed(reg, q, runs, seed, bar)
        for name in runs:
            for metric in ("mse", "nmse"):
                per_seed[name][metric].append(sum(errors[name][metric]) / q.tasks_per_seed)
            # paired with ICL on the same task: the share of tasks where the method's error is lower
            per_seed[name]["wins"] += [e < i for e, i in zip(errors[name]["mse"], errors["icl"]["mse"])]
    bar.close()
    per_seed["ct-kv (leave-one-out + dropout)"] = per_seed["ct-kv"]
    results = {}
    for name, values in per_seed.items():
        results[name] = {}
        for metric in ("mse", "nmse"):
            mean, std = icl.mean_std(values[metric])
            results[name].update({metric: mean, f"{metric}_std": std, f"{metric}_per_seed": values[metric]})
        results[name]["tasks_better_than_icl"] = sum(values["wins"]) / len(values["wins"])
    return results


def run_quick(out, q: CTQuickConfig):
    torch.set_num_threads(1)  # tiny matrices: one thread beats two (and shares a busy machine better)
    out = Path(out or "runs/context_tuning")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    reg, meta = quick_backbone(out)
    print(f"backbone ready ({time.time() - start:.0f}s); {q.seeds} seeds x {q.tasks_per_seed} tasks, k = {q.k}, "
          f"w ~ N({q.w_shift}, I_{reg.n_dims})")
    results = quick_experiment(reg, q)
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "quick_config.json", json.dumps({**asdict(q), "seconds": round(time.time() - start, 1),
                                                      "backbone": meta["config"], "quality": meta.get("quality")}))
    print(f"mean +- std over {q.seeds} seeds")
    print(f"{'method':34s} {'mse':>18s} {'nmse':>18s}  tasks better than ICL")
    for name, r in results.items():
        print(f"{name:34s} {r['mse']:9.3f} +- {r['mse_std']:5.3f} {r['nmse']:9.4f} +- {r['nmse_std']:.4f}  "
              f"{r['tasks_better_than_icl']:.0%}")
    print(f"wrote {out / 'results.json'} ({time.time() - start:.0f}s)")


# ----------------------------------------------------------------------------------------------------------------------
# CLI: flags generated from CTRunConfig, TuneConfig and CTQuickConfig (config_flags.py), so each default lives in one
# dataclass field.


@dataclass
class CTRunConfig:
    checkpoint: str | None = option(None, "Hugging Face Llama folder (config.json + safetensors)")
    tokenizer: str | None = option(None, "sentencepiece tokenizer.model (default: the checkpoint folder's)")
    tasks: str = option("multifin-en", f"a task JSONL file, or a shared data set: {', '.join(TEXT_TASKS)}")
    data_dir: str = option(str(bd.DEFAULT_DATA_DIR), "folder of the shared data sets")
    k: int = option(16, "demonstrations per task (shared data sets)")
    max_queries: int = option(0, "random subset of test queries per task (0: all)")
    write_tasks: str | None = option(None, "write the k-shot tasks as JSONL to this new file and stop")
    method: str = option("ct-kv", "the method to run", choices=[*METHODS, "all"])
    max_new_tokens: int = option(32, "greedy answers to queries without options")
    truncate_demos: bool = option(False, "drop the earliest demonstrations (with a warning) when the context is too "
                                         "long")
    out: str | None = option(None, "results: a JSONL file (resumed when it exists); with --quick, a folder")
    quick: bool = option(False, "synthetic reproduction on the in-context regression transformer (CPU, minutes)")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    precision: str | None = option(None, "compute precision (default: bf16 on CUDA, fp32 on CPU)",
                                   choices=list(PRECISIONS))


def read_results(path: Path) -> dict:
    """Finished (task, method) results of an earlier run of the same --out file: a rerun resumes after them."""
    if not path.is_file():
        return {}
    done = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            done[(r["task"], r["method"])] = r
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: not a results line of this script; pass another --out") from None
    return done


def write_task_file(path, tasks: list[Task]):
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    write_text(path, "".join(json.dumps(t.to_json()) + "\n" for t in tasks))
    print(f"wrote {len(tasks)} task(s), {sum(len(t.queries) for t in tasks)} queries, to {path}")


def run_text_tasks(run: CTRunConfig, cfg: TuneConfig):
    tasks = (load_tasks(run.tasks) if run.tasks.endswith(".jsonl")
             else make_tasks(run.tasks, run.data_dir, run.k, cfg.seed, run.max_queries))
    if run.write_tasks:
        return write_task_file(run.write_tasks, tasks)
    if not run.checkpoint:
        raise ValueError("--checkpoint is required to run a method (or use --write-tasks / --quick)")
    tok = Tokenizer.resolve(run.tokenizer, run.checkpoint)
    model = load_pretrained(run.checkpoint, run.device, PRECISIONS[run.precision or default_precision(run.device)])
    tok.check_vocab(model.cfg.vocab_size)
    io = TokenIO(model.eval())
    methods = METHODS if run.method == "all" else (run.method,)
    out = Path(run.out or "context_tuning_results.jsonl")
    done = read_results(out)
    for task in tasks:
        ep = token_episode(model, tok, task, run.truncate_demos)
        for method in methods:
            if (task.name, method) in done:
                print(f"{task.name} {method}: done in {out}, skipping")
                continue
            start = time.time()
            answer_model, prefix_kv = adapt(method, model, io, ep, cfg)
            tuned = time.time() - start
            accuracy = evaluate_task(answer_model, tok, prefix_kv, task, run.max_new_tokens)
            result = {"task": task.name, "method": method, "k": len(ep.demos), "accuracy": accuracy,
                      "n_queries": len(task.queries), "tune_seconds": round(tuned, 2), "config": asdict(cfg)}
            with open(out, "a") as f:  # one line per finished (task, method): a killed run resumes after it
                f.write(json.dumps(result) + "\n")
            print(f"{task.name} {method}: accuracy {accuracy:.4f} ({len(task.queries)} queries, tuned {tuned:.1f}s)")
            del answer_model, prefix_kv


def check_ranges(args):
    for name in ("k", "steps", "prompt_len", "lora_rank", "seeds"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "steps" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= getattr(args, "dropout", 0.0) < 1:
        raise SystemExit(f"error: --dropout must be in [0, 1), got {args.dropout}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_flags(parser, CTRunConfig)
    add_config_flags(parser, TuneConfig)
    add_config_flags(parser, CTQuickConfig)
    args = parser.parse_args(argv)
    check_ranges(args)
    run = config_from_args(CTRunConfig, args)
    try:
        if run.quick:  # reads only --seeds: the experiment's other settings are CTQuickConfig's, not the text flags
            run_quick(run.out, CTQuickConfig(seeds=args.seeds) if "seeds" in args else CTQuickConfig())
        else:
            run_text_tasks(run, config_from_args(TuneConfig, args))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
