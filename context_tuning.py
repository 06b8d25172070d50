"""Context tuning (Lu, Teehan, Yang, Ren 2025): CT-KV and CT-Prompt, against ICL, prompt/prefix tuning and TTT.

Given k demonstrations (x_i, y_i) of a new task and a frozen model:
- CT-KV: one no-grad pass over the concatenated demonstrations gives every layer's keys/values over the P prefix
  positions (keys already rotated). Those K/V tensors are the only trainable parameters. Demonstration i is re-posed as
  a training pair placed after the prefix (positions start at P), loss on y_i only, attending to the prefix with
  demonstration i's span hidden (leave-one-out) and each prefix position dropped with probability p (token dropout).
  The prefix is never recomputed, so a step costs time linear in k.
- CT-Prompt: a soft prompt initialised from the demonstrations' embeddings, trained the same way but passed through
  the whole model every step (strict leave-one-out: demonstration i's embeddings are hidden from pair i): quadratic in k.
- Baselines: zero-shot, ICL, prompt tuning and prefix tuning (m = 32 positions, initialised from random tokens, not
  from the demonstrations), TTT (LoRA on leave-one-out permutations of the demonstrations), TTT+CT-KV.
All masking goes through model.py's AttentionMask; every method ends as (model, prefix_kv) and is evaluated the same way.

Read top to bottom: tasks (JSONL format, converters for the shared finance/medical data) -> episodes (a task's
demonstrations as tensors) -> the methods -> evaluation (option log-likelihood / greedy exact match, regression MSE)
-> the synthetic reproduction (`--quick`) -> CLI.

  python context_tuning.py --checkpoint DIR --tokenizer FILE --tasks multifin-en --k 16 --method ct-kv
  python context_tuning.py --tasks fiqa-sa --k 16 --write-tasks fiqa16.jsonl      # convert only, no model
  python context_tuning.py --quick --out runs/ct                                 # CPU reproduction, <= 5 minutes
"""
import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaluate as ev
import synthetic as sy
from cft import lr_at
from model import AttentionMask, KVCache, apply_lora, generate, load_pretrained, merge_lora

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


def _field(obj, key, where, kind=str):
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise ValueError(f"{where}: expected field \"{key}\" of type {kind.__name__}")
    return obj[key]


def parse_task(obj, where: str) -> Task:
    """Validate one task object; every error names `where` and the offending field."""
    demos = obj.get("demos") if isinstance(obj, dict) else None
    if not isinstance(demos, list) or not demos:
        raise ValueError(f"{where}: task has no demonstrations (\"demos\" must be a non-empty list)")
    queries = _field(obj, "queries", where, list)
    if not queries:
        raise ValueError(f"{where}: task has no queries (\"queries\" must be a non-empty list)")
    parsed_demos = [(_field(d, "input", f"{where}: demos[{i}]"), _field(d, "output", f"{where}: demos[{i}]"))
                    for i, d in enumerate(demos)]
    parsed_queries = []
    for i, q in enumerate(queries):
        at = f"{where}: queries[{i}]"
        query = Query(_field(q, "input", at), _field(q, "output", at))
        if "options" in q:
            options = q["options"]
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
                raise ValueError(f"{at}: \"options\" must be a list of at least two non-empty strings")
            if query.output not in options:
                raise ValueError(f"{at}: options {options} do not contain the gold output {query.output!r}")
            query.options = options
        parsed_queries.append(query)
    return Task(obj.get("name") or where, parsed_demos, parsed_queries)


def load_tasks(path) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file (expected JSONL, one task per line)")
    tasks = [parse_task(obj, f"{path}, line {line_no}") for line_no, obj in ev.read_jsonl(path, keys=())]
    if not tasks:
        raise ValueError(f"{path}: no tasks in the file")
    return tasks


# Converters: the shared datasets, read by evaluate.py's loaders (one reader and one prompt format per dataset, the
# FLARE/lm-evaluation-harness prompts) and cut into k-shot tasks: demonstrations from train/dev, queries from test.
TEXT_TASKS = {"multifin-en": "multifin", "fiqa-sa": "fiqa-sa", "causal20": "causal20", "mmlu-medical": "mmlu-medical"}


def _pools(name: str, root: Path):
    """[(task name, demonstration pool, test examples)] as evaluate.Example lists."""
    if name == "mmlu-medical":  # one task per subject; the pool is the subject's 5 dev questions
        folder = root / "mmlu-medical"
        return [(f"mmlu-{s}", ev.load_mmlu(folder / "dev" / f"{s}_dev.csv"),
                 ev.load_mmlu(folder / "test" / f"{s}_test.csv")) for s in ev.MMLU_SUBJECTS]
    test_file, pool_file, load = ev.CLASSIFICATION[TEXT_TASKS[name]]
    return [(name, load(root / pool_file), load(root / test_file))]


def make_tasks(name: str, data_dir, k: int, seed: int = 0, max_queries: int = 0) -> list[Task]:
    """k-shot tasks from a shared dataset (see TEXT_TASKS)."""
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
        demos = ev.sample_demos(pool, k, seed)
        if 0 < max_queries < len(test):
            test = random.Random(seed).sample(test, max_queries)
        tasks.append(Task(f"{sub}/k{k}/seed{seed}", [(e.text, e.choices[e.gold]) for e in demos],
                          [Query(e.text, e.choices[e.gold], list(e.choices)) for e in test]))
    return tasks


# ----------------------------------------------------------------------------------------------------------------------
# Episodes: a task's demonstrations as model inputs. Everything is in embedding space, so the same methods run on
# model.py's Llama (token embeddings, next-token loss) and on synthetic.py's regression transformer (read-in vectors,
# squared error).


@dataclass
class Demo:
    embeds: torch.Tensor   # (L, dim) model inputs of this demonstration
    targets: torch.Tensor  # (L,) what each position predicts: the next token id, or the regression target
    keep: torch.Tensor     # (L,) bool: positions in the loss (those that predict y_i)


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
        """Demonstration i re-posed as training pair i (row i), right-padded: embeds (k, T, dim), targets, keep (k, T).
        Padding sits after every real position, so causal attention keeps it out of the loss positions."""
        T = max(len(d.embeds) for d in self.demos)
        pad = lambda t: F.pad(t, (0, 0) * (t.dim() - 1) + (0, T - len(t)))
        return tuple(torch.stack([pad(getattr(d, f)) for d in self.demos]) for f in ("embeds", "targets", "keep"))


class TokenHead:
    """Llama: inputs are token embeddings, positions in the loss predict the next token (cross-entropy)."""

    def __init__(self, model):
        self.embed_tokens = model.embed_tokens
        self.out_weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight

    def position_loss(self, hidden, targets):
        return F.cross_entropy(F.linear(hidden, self.out_weight).float(), targets, reduction="none")

    @torch.no_grad()
    def random_context(self, m: int, generator) -> torch.Tensor:
        """m embeddings of random vocabulary tokens (Lester et al.'s sampled-vocabulary init): not the demonstrations."""
        ids = torch.randint(self.embed_tokens.num_embeddings, (m,), generator=generator)
        return self.embed_tokens(ids.to(self.embed_tokens.weight.device))


def row_losses(head, hidden, targets, keep) -> torch.Tensor:
    """(B,) mean loss over each row's kept positions (the paper's mean per-token loss; also option scoring)."""
    per_position = head.position_loss(hidden[keep], targets[keep])
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(keep), device=hidden.device, dtype=per_position.dtype).index_add(0, rows, per_position)
    return sums / keep.sum(1).clamp(min=1)


def newline_ids(tok) -> list[int]:
    """Token ids ending a demonstration: the newline, as it tokenizes after text (sentencepiece adds a leading space
    piece to a lone "\\n"); eos when the tokenizer has no newline."""
    return tok.encode("a\n")[len(tok.encode("a")):] or [tok.eos_id]


def token_demo(model, ids: list[int], n_input: int) -> Demo:
    """A demonstration from its token ids (input, then output and separator): positions n_input-1 .. L-2 predict the
    output tokens."""
    ids_t = torch.tensor(ids, device=model.embed_tokens.weight.device)
    keep = torch.zeros(len(ids), dtype=torch.bool, device=ids_t.device)
    keep[n_input - 1:len(ids) - 1] = True
    with torch.no_grad():
        embeds = model.embed_tokens(ids_t)
    return Demo(embeds, torch.cat([ids_t[1:], ids_t[:1] * 0]), keep)


def token_lead(model, bos_id: int) -> Demo:
    """The context's start: BOS alone, in no loss and in no demonstration's span."""
    bos = torch.tensor([bos_id], device=model.embed_tokens.weight.device)
    with torch.no_grad():
        return Demo(model.embed_tokens(bos), bos * 0, bos < 0)


def token_episode(model, tok, task: Task, truncate: bool = False) -> Episode:
    """[BOS] x_1 y_1 \\n x_2 y_2 \\n ...; checks that context + the longest query fits in max_seq_len."""
    sep = newline_ids(tok)
    demos = [(tok.encode(x), tok.encode(y) + sep) for x, y in task.demos]
    longest_query = max(len(tok.encode(q.input)) + max(len(tok.encode(o)) for o in q.options or [q.output]) + len(sep)
                        for q in task.queries)
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
    steps: int = 200           # epochs: one optimiser step over all k pairs each (paper: ~200; 16-20 on MMLU/BBH)
    lr: float = 1e-3           # AdamW, no weight decay, cosine decay without warm-up (paper's CT-KV setting)
    dropout: float = 0.05      # token dropout rate p on prefix positions (paper: 0.05-0.1); CT methods only
    leave_one_out: bool = True  # hide demonstration i from pair i; CT methods only
    prompt_len: int = 32       # m, the trainable positions of prompt/prefix tuning
    lora_rank: int = 64        # TTT
    lora_lr: float = 1e-4      # TTT's LoRA learning rate
    micro_batch: int = 0       # pairs per forward/backward (0: all k at once); gradients accumulate, same step
    grad_clip: float = 1.0
    seed: int = 0
    progress: bool = True
    on_step: object = None     # called after every optimiser step (bench.py times steps with it)


def model_dtype(model):
    return next(model.parameters()).dtype


@torch.no_grad()
def prefix_kv_of(model, embeds):
    """Every layer's (k, v) over a context (1, P, dim), keys rotated for positions 0..P-1; None for an empty context."""
    if embeds.shape[1] == 0:
        return None
    cache = KVCache(model.cfg, 1, embeds.shape[1], embeds.device, model_dtype(model))
    model.hidden_states(embeds=embeds.to(model_dtype(model)), cache=cache)
    return cache.prefix()


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


def kv_pair_losses(model, head, pairs, rows, prefix_kv, spans=None, dropped=None):
    """CT-KV / prefix tuning loss of training pairs `rows` (pairs = Episode.pairs()) after a prefix, per pair:
    the pairs' positions start at P, span i is hidden from pair i, dropped prefix positions are invisible."""
    embeds, targets, keep = pairs
    mask = AttentionMask(hidden_span=None if spans is None else spans[rows.to(spans.device)], dropped=dropped)
    hidden = model.hidden_states(embeds=embeds[rows], prefix_kv=prefix_kv, mask=mask)
    return row_losses(head, hidden, targets[rows], keep[rows])


def prompt_pair_losses(model, head, pairs, rows, prompt, spans=None, dropped=None):
    """CT-Prompt / prompt tuning loss of pairs `rows` after a soft prompt (1, P, dim) run through the model with them.
    Strict leave-one-out: span i is hidden from every later position of row i, prompt positions included."""
    embeds, targets, keep = pairs
    n, P = len(rows), prompt.shape[1]
    x = torch.cat([prompt.expand(n, -1, -1), embeds[rows]], dim=1)
    row_targets = torch.cat([targets.new_zeros(n, P), targets[rows]], dim=1)
    row_keep = torch.cat([keep.new_zeros(n, P), keep[rows]], dim=1)
    mask = AttentionMask(hidden_span=None if spans is None else spans[rows.to(spans.device)], dropped=dropped)
    return row_losses(head, model.hidden_states(embeds=x, mask=mask), row_targets, row_keep)


def tune_kv(model, head, ep: Episode, kv, cfg: TuneConfig, spans=None, dropout=0.0, desc="ct-kv"):
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
        return kv_pair_losses(model, head, pairs, rows, prefix(), spans, dropped)

    optimise(params, batch_loss, len(ep.demos), cfg, desc)
    with torch.no_grad():
        return prefix()


def tune_prompt(model, head, ep: Episode, prompt, cfg: TuneConfig, spans=None, dropout=0.0, desc="ct-prompt"):
    """CT-Prompt (prompt = the demonstrations' embeddings, spans = strict leave-one-out) and prompt tuning (random
    tokens, no spans). Every pair re-runs the whole prompt through the model: time quadratic in k. fp32 master copy."""
    dtype = model_dtype(model)
    param = nn.Parameter(prompt.detach().float().clone())  # (1, P, dim)
    pairs = ep.pairs()

    def batch_loss(rows, generator):
        dropped = dropout_mask(len(rows), prompt.shape[1], dropout, generator, pairs[0].device)
        return prompt_pair_losses(model, head, pairs, rows, param.to(dtype), spans, dropped)

    optimise([param], batch_loss, len(ep.demos), cfg, desc)
    return param.detach().to(dtype)


def tune_lora(model, head, ep: Episode, cfg: TuneConfig, desc="ttt"):
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
        keep = torch.stack([torch.cat([torch.zeros_like(d.keep) for d in s[:-1]] + [s[-1].keep]) for s in seqs])
        return row_losses(head, model.hidden_states(embeds=embeds), targets, keep)

    optimise(params, batch_loss, k, replace(cfg, lr=cfg.lora_lr), desc)
    return model


def adapt(method: str, model, head, ep: Episode, cfg: TuneConfig):
    """Run one method on one episode -> (model to answer with, prefix_kv to answer after)."""
    model.requires_grad_(False)
    spans = ep.spans() if cfg.leave_one_out else None
    context = ep.context()
    if method == "zero-shot":
        return model, prefix_kv_of(model, ep.lead.embeds[None])
    if method == "icl":
        return model, prefix_kv_of(model, context)
    if method in ("prompt-tuning", "prefix-tuning"):
        generator = torch.Generator().manual_seed(cfg.seed)
        start = torch.cat([ep.lead.embeds, head.random_context(cfg.prompt_len, generator)])[None]
        if method == "prompt-tuning":
            return model, prefix_kv_of(model, tune_prompt(model, head, ep, start, cfg, desc=method))
        return model, tune_kv(model, head, ep, prefix_kv_of(model, start), cfg, desc=method)
    if method == "ct-prompt":
        return model, prefix_kv_of(model, tune_prompt(model, head, ep, context, cfg, spans, cfg.dropout))
    if method == "ct-kv":
        return model, tune_kv(model, head, ep, prefix_kv_of(model, context), cfg, spans, cfg.dropout)
    if method == "ttt":  # on a copy: the caller's model stays as it was for the next task or method
        adapted = tune_lora(copy.deepcopy(model), head, ep, cfg)
        return adapted, prefix_kv_of(adapted, context)
    if method == "ttt+ct-kv":
        adapted = merge_lora(tune_lora(copy.deepcopy(model), head, ep, cfg))
        return adapted, tune_kv(adapted, head, ep, prefix_kv_of(adapted, context), cfg, spans, cfg.dropout)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation on text tasks: option log-likelihood (mean per-token loss, as the paper) or greedy exact match.


@torch.no_grad()
def answer(model, head, tok, prefix_kv, query: Query, max_new_tokens: int) -> str:
    device = model.embed_tokens.weight.device
    x = tok.encode(query.input)
    if query.options:
        rows = [x + tok.encode(o) for o in query.options]
        T = -(-max(map(len, rows)) // 64) * 64  # right-pad to a multiple of 64: few shapes for CUDA's compiled attention
        tokens = torch.zeros(len(rows), T, dtype=torch.long, device=device)
        keep = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
            keep[i, len(x) - 1:len(r) - 1] = True  # positions predicting the option's tokens
        targets = torch.cat([tokens[:, 1:], tokens[:, :1] * 0], dim=1)
        losses = row_losses(head, model.hidden_states(tokens, prefix_kv=prefix_kv), targets, keep)
        return query.options[int(losses.argmin())]
    sep = newline_ids(tok)
    out = generate(model, [x], max_new_tokens, prefix_kv=prefix_kv, eos_id=sep[-1] if len(sep) == 1 else None)[0]
    return tok.decode(out).split("\n")[0].strip()


def evaluate_task(model, head, tok, prefix_kv, task: Task, max_new_tokens: int, progress=True) -> float:
    correct = 0
    for q in tqdm(task.queries, desc="queries", disable=not progress, leave=False):
        gold = q.output if q.options else q.output.strip()  # an option comes back verbatim; generations stripped
        correct += answer(model, head, tok, prefix_kv, q, max_new_tokens) == gold
    return correct / len(task.queries)


# ----------------------------------------------------------------------------------------------------------------------
# The measurable reproduction without LLM weights (`--quick`): synthetic.py's in-context linear-regression transformer
# (pretrained on w ~ N(0, I)) meets tasks it never saw, w ~ N(w_shift, I), with k demonstrations each. Every method
# above runs unchanged on it; the score is the squared error on fresh queries of the same task.

ABLATION = {"ct-kv (leave-one-out + dropout)": (True, True), "ct-kv (leave-one-out only)": (True, False),
            "ct-kv (dropout only)": (False, True), "ct-kv (neither)": (False, False)}


@dataclass
class QuickConfig:
    k: int = 8                # demonstrations per task (the backbone was pretrained on prompts of up to 11 pairs)
    w_shift: float = 2.0      # task distribution w ~ N(w_shift, I): out of the pretraining distribution
    tasks_per_seed: int = 8
    queries_per_task: int = 128
    seeds: int = 3
    steps: int = 100          # lr and steps: from a small sweep on other tasks (generator stream "diag")
    lr: float = 1e-2
    lora_lr: float = 1e-2
    dropout: float = 0.1


class RegressionHead:
    """synthetic.py's regression transformer: inputs are read_in vectors, the x_i position predicts y_i."""

    def __init__(self, reg):
        self.reg = reg

    def embed(self, xs, ys):
        """(B, n, d), (B, n) -> (B, 2n, dim): the tokens x_1, y_1, ... through the read-in."""
        return self.reg.read_in(sy.interleave(xs, ys))

    def position_loss(self, hidden, targets):
        return (self.reg.read_out(hidden).squeeze(-1).float() - targets) ** 2

    @torch.no_grad()
    def random_context(self, m: int, generator) -> torch.Tensor:
        """m embeddings of random (x, y) tokens, y on the labels' scale: not the task's demonstrations."""
        d = self.reg.n_dims
        xs = torch.randn(1, (m + 1) // 2, d, generator=generator)
        ys = torch.randn(1, (m + 1) // 2, generator=generator) * math.sqrt(d)
        return self.embed(xs, ys)[0, :m]


@torch.no_grad()
def regression_episode(head: RegressionHead, xs, ys) -> Episode:
    """k demonstrations (x_i, y_i) -> tokens x_i, y_i; the x_i position is the one that predicts y_i."""
    embeds = head.embed(xs[None], ys[None])[0]
    keep = torch.tensor([True, False])
    demos = [Demo(embeds[2 * i:2 * i + 2], torch.stack([ys[i], ys[i] * 0]), keep) for i in range(len(xs))]
    return Episode(Demo(embeds[:0], ys[:0], keep[:0]), demos)


@torch.no_grad()
def regression_mse(model, head: RegressionHead, prefix_kv, xs, ys) -> float:
    """Mean squared error of queries xs (Q, d) answered after prefix_kv (one batch-1 prefix shared by all Q)."""
    x_tokens = head.embed(xs[:, None], ys[:, None] * 0)[:, :1]
    hidden = model.hidden_states(embeds=x_tokens, prefix_kv=prefix_kv)
    return head.position_loss(hidden[:, 0], ys).mean().item()


def quick_backbone(out: Path):
    """synthetic.py's CPU-sized regression transformer, pretrained into OUT/pretrain (or reused from there)."""
    cfg = sy.PRESETS["quick"]
    if not sy.pretrain(cfg, out, "cpu"):
        raise ValueError(f"{out}/pretrain: pretraining did not finish")
    reg, meta = sy.load_model(out / "pretrain")
    return reg.eval().requires_grad_(False), meta


def quick_experiment(reg, q: QuickConfig, progress: bool = True) -> dict:
    """{run name: {"mse", "mse_std", "mse_per_seed", "nmse", "nmse_std", "nmse_per_seed", "tasks_better_than_icl"}}
    (mean and sample std over seeds): every method and the leave-one-out/dropout ablation on the same tasks (per seed,
    q.tasks_per_seed fresh tasks of k demonstrations)."""
    head, model, d = RegressionHead(reg), reg.backbone, reg.n_dims
    # prompt/prefix tuning get as many trainable positions as the demonstrations fill (2k tokens): the same capacity
    # as CT-Prompt/CT-KV, and inside the context length the backbone was pretrained on
    base = TuneConfig(steps=q.steps, lr=q.lr, lora_lr=q.lora_lr, dropout=q.dropout, prompt_len=2 * q.k,
                      lora_rank=min(64, model.cfg.dim), progress=False)
    runs = {m: (m, base) for m in METHODS}
    runs.update({name: ("ct-kv", replace(base, leave_one_out=loo, dropout=q.dropout * drop))
                 for name, (loo, drop) in ABLATION.items() if (loo, drop) != (True, True)})  # = "ct-kv" itself
    # mse: squared error averaged over every query of every task (dominated by the tasks with the largest |w|);
    # nmse: each task's mse divided by its mean squared label, then averaged, so that every task weighs the same
    # (as accuracy does in the paper's tables)
    per_seed = {name: {"mse": [], "nmse": [], "wins": []} for name in runs}
    bar = tqdm(total=q.seeds * q.tasks_per_seed * len(runs), desc="context tuning", disable=not progress)
    for seed in range(q.seeds):
        errors = {name: [] for name in runs}
        for t in range(q.tasks_per_seed):
            task = sy.sample_tasks("shifted-linear", 1, q.k + q.queries_per_task, d,
                                   sy.generator("cpu", seed, "context-tuning", t), w_shift=q.w_shift)
            xs, ys = task.xs[0], task.values()[0]
            ep = regression_episode(head, xs[:q.k], ys[:q.k])
            for name, (method, cfg) in runs.items():
                answer_model, prefix_kv = adapt(method, model, head, ep, replace(cfg, seed=seed * 1000 + t))
                errors[name].append(regression_mse(answer_model, head, prefix_kv, xs[q.k:], ys[q.k:]))
                bar.update(1)
            label_power = ys[q.k:].pow(2).mean().item()
            for name in runs:
                errors[name][-1] = (errors[name][-1], errors[name][-1] / label_power)
        for name in runs:
            per_seed[name]["mse"].append(sum(e[0] for e in errors[name]) / q.tasks_per_seed)
            per_seed[name]["nmse"].append(sum(e[1] for e in errors[name]) / q.tasks_per_seed)
            # paired with ICL on the same task: the share of tasks where the method's error is lower
            per_seed[name]["wins"] += [e[0] < i[0] for e, i in zip(errors[name], errors["icl"])]
    bar.close()
    per_seed["ct-kv (leave-one-out + dropout)"] = per_seed["ct-kv"]
    results = {}
    for name, values in per_seed.items():
        results[name] = {}
        for metric in ("mse", "nmse"):
            mean, std = sy.mean_std(values[metric])
            results[name].update({metric: mean, f"{metric}_std": std, f"{metric}_per_seed": values[metric]})
        results[name]["tasks_better_than_icl"] = sum(values["wins"]) / len(values["wins"])
    return results


def run_quick(args):
    torch.set_num_threads(1)  # tiny matrices: one thread beats two (and shares a busy machine better)
    out = Path(args.out or "runs/context_tuning")
    out.mkdir(parents=True, exist_ok=True)
    q = QuickConfig(seeds=args.seeds)
    start = time.time()
    reg, meta = quick_backbone(out)
    print(f"backbone ready ({time.time() - start:.0f}s); {q.seeds} seeds x {q.tasks_per_seed} tasks, k = {q.k}, "
          f"w ~ N({q.w_shift}, I_{reg.n_dims})")
    results = quick_experiment(reg, q)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "quick_config.json").write_text(json.dumps({**asdict(q), "seconds": round(time.time() - start, 1),
                                                       "backbone": meta["config"], "quality": meta.get("quality")}))
    print(f"mean +- std over {q.seeds} seeds")
    print(f"{'method':34s} {'mse':>18s} {'nmse':>18s}  tasks better than ICL")
    for name, r in results.items():
        print(f"{name:34s} {r['mse']:9.3f} +- {r['mse_std']:5.3f} {r['nmse']:9.4f} +- {r['nmse_std']:.4f}  "
              f"{r['tasks_better_than_icl']:.0%}")
    print(f"wrote {out / 'results.json'} ({time.time() - start:.0f}s)")


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def tune_config(args) -> TuneConfig:
    return TuneConfig(steps=args.steps, lr=args.lr, dropout=args.dropout, leave_one_out=not args.no_leave_one_out,
                      prompt_len=args.prompt_len, lora_rank=args.lora_rank, lora_lr=args.lora_lr,
                      micro_batch=args.micro_batch, seed=args.seed)


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


def run_text_tasks(args):
    from data import Tokenizer
    tasks = (load_tasks(args.tasks) if args.tasks.endswith(".jsonl")
             else make_tasks(args.tasks, args.data_dir, args.k, args.seed, args.max_queries))
    if args.write_tasks:
        out = Path(args.write_tasks)
        if out.exists():
            raise FileExistsError(f"{out} exists; refusing to overwrite it")
        out.write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))
        print(f"wrote {len(tasks)} task(s), {sum(len(t.queries) for t in tasks)} queries, to {out}")
        return
    if not args.checkpoint or not args.tokenizer:
        raise ValueError("--checkpoint and --tokenizer are required to run a method (or use --write-tasks / --quick)")
    tok = Tokenizer(args.tokenizer)
    model = load_pretrained(args.checkpoint, args.device, getattr(torch, args.dtype)).eval()
    tok.check_vocab(model.cfg.vocab_size)
    head, cfg = TokenHead(model), tune_config(args)
    methods = METHODS if args.method == "all" else (args.method,)
    out = Path(args.out or "context_tuning_results.jsonl")
    done = read_results(out)
    for task in tasks:
        ep = token_episode(model, tok, task, args.truncate_demos)
        for method in methods:
            if (task.name, method) in done:
                print(f"{task.name} {method}: done in {out}, skipping")
                continue
            start = time.time()
            answer_model, prefix_kv = adapt(method, model, head, ep, cfg)
            tuned = time.time() - start
            accuracy = evaluate_task(answer_model, head, tok, prefix_kv, task, args.max_new_tokens)
            result = {"task": task.name, "method": method, "k": len(ep.demos), "accuracy": accuracy,
                      "n_queries": len(task.queries), "tune_seconds": round(tuned, 2), "config": asdict(cfg)}
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{task.name} {method}: accuracy {accuracy:.4f} ({len(task.queries)} queries, tuned {tuned:.1f}s)")
            del answer_model, prefix_kv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="Hugging Face Llama folder (config.json + safetensors)")
    parser.add_argument("--tokenizer", help="sentencepiece tokenizer.model of the checkpoint")
    parser.add_argument("--tasks", default="multifin-en",
                        help=f"a task JSONL file, or a shared dataset: {', '.join(TEXT_TASKS)}")
    parser.add_argument("--data-dir", default=str(ev.DEFAULT_DATA_DIR), help="folder of the shared datasets")
    parser.add_argument("--k", type=int, default=16, help="demonstrations per task (shared datasets)")
    parser.add_argument("--max-queries", type=int, default=0, help="random subset of test queries per task (0: all)")
    parser.add_argument("--write-tasks", help="write the k-shot tasks as JSONL to this new file and stop")
    parser.add_argument("--method", default="ct-kv", choices=METHODS + ("all",))
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps (epochs over the k pairs)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of K/V, prompts and prefixes")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="TTT's LoRA learning rate")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.05, help="token dropout rate on the prefix (CT methods)")
    parser.add_argument("--no-leave-one-out", action="store_true", help="do not hide demonstration i from pair i")
    parser.add_argument("--prompt-len", type=int, default=32, help="m for prompt and prefix tuning")
    parser.add_argument("--micro-batch", type=int, default=0, help="pairs per forward/backward (0: all k)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy answers to queries without options")
    parser.add_argument("--truncate-demos", action="store_true",
                        help="drop the earliest demonstrations (with a warning) when the context is too long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results: a JSONL file (resumed when it exists); with --quick, a folder")
    parser.add_argument("--quick", action="store_true",
                        help="synthetic reproduction on the in-context regression transformer (CPU, minutes)")
    parser.add_argument("--seeds", type=int, default=3, help="--quick: seeds to average over")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    for name in ("k", "steps", "prompt_len", "lora_rank", "seeds"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        raise SystemExit(f"error: --dropout must be in [0, 1), got {args.dropout}")
    try:
        if args.quick:
            run_quick(args)
        else:
            run_text_tasks(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
