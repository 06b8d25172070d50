"""Context tuning's methods (Lu, Teehan, Yang, Ren 2025) as the first author's research code (Jacklu0831/marc) runs
them: CT-KV, CT-Prompt, prompt tuning, prefix tuning, TTT and TTT + CT-KV, on one task or on several tasks at once.

A task is an Episode: a lead (Llama's BOS, or nothing) and k demonstrations, each a Demo of model inputs
(embeddings), targets and the positions in the loss. The methods see a model through an IO object
(context_tuning.TokenIO for Llama, ct_regression.RegressionIO for the in-context regression transformer):
  io.embed(...)                            inputs -> the backbone's embedding space
  io.loss_sums(hidden, targets, in_loss)   (R, L, dim), (R, L), (R, L) -> (R,): each row's loss summed over its loss
                                           positions (next-token cross-entropy, or squared error)
  io.init_context(m)                       (m, dim): prompt and prefix tuning's starting embeddings, the same
                                           for every task (Llama: the dummy tokens 0..m-1)
and every method ends as an Adapted: the model to answer with and the prefix K/V to answer after.

- CT-KV: one no-grad pass over the demonstrations gives every layer's K/V over the P context positions; they are the
  trainable parameters. Pair i (demonstration i) is placed after the prefix (positions from P), attends to it with
  demonstration i's span hidden (leave-one-out) and each position dropped with probability p (token dropout), loss on
  y_i. One optimiser step per epoch: gradients sum over the epoch's mini-batches. Time linear in k.
- CT-Prompt: a soft prompt initialised from the demonstrations' embeddings, trained the same way but re-run through
  the model with every pair (strict leave-one-out), one optimiser step per mini-batch: time quadratic in k.
- Prompt / prefix tuning: m = 32 trainable positions initialised from dummy tokens (ids 0..m-1), not from the
  demonstrations; prompt tuning with token dropout, prefix tuning without (as the official scripts).
- TTT: LoRA (rank 64, alpha 64, dropout 0.05 on q, v, o, gate, up, down) trained on random permutations of all k
  demonstrations with loss on every answer; merged; then ICL with the adapted model. TTT + CT-KV: CT-KV (fewer epochs)
  on the adapted model.
The lead (BOS, Llama's attention sink) is never dropped and never trained.

Several tasks of one layout (the regression reproduction's batch of tasks) train together: every trainable tensor
has a leading task axis and the tasks' rows are folded task-major into one batch (each row after its own task's prefix
or prompt; TTT's LoRA applies task t's adapters to task t's rows: folded_lora). Each task draws from its own streams,
one per purpose (token dropout, mini-batch order, TTT's permutations, adapters and LoRA dropout), each seeded from the
task's seed (cfg.task_seeds[t], default cfg.seed + t; purpose_seed), and may have its own learning rate
(cfg.task_lr_scales); AdamW (elementwise) and the gradient clipping (per task) keep the tasks independent, so T tasks at
once train as T separate runs with those seeds and rates would.
"""
import contextlib
import copy
import functools
import hashlib
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from config_flags import option
from lora import LoRALinear, apply_lora, merge_lora
from model import AttentionMask, prefill
from training import lr_at

METHODS = ("zero-shot", "icl", "prompt-tuning", "prefix-tuning", "ct-prompt", "ct-kv", "ttt", "ttt+ct-kv")
NO_TARGET = -100  # the target of a position outside the loss (Transformer.loss's ignore index)
TTT_TARGETS = "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # marc's LoraConfig target_modules (Llama)
REDUCTIONS = ("tokens", "pairs")


# ----------------------------------------------------------------------------------------------------------------------
# Episodes: a task's demonstrations as model inputs, and several tasks of one layout stacked on a task axis.


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


@dataclass
class EpisodeStack:
    """T episodes of one layout (same lead length, demonstration lengths and loss positions) on a leading task axis:
    a batch of regression tasks, or one text task (T = 1)."""
    context: torch.Tensor          # (T, P, dim) lead + demonstrations
    context_targets: torch.Tensor  # (T, P)
    context_in_loss: torch.Tensor  # (P,) bool
    embeds: torch.Tensor           # (T, k, L, dim) the training pairs, right-padded
    targets: torch.Tensor          # (T, k, L)
    in_loss: torch.Tensor          # (k, L) bool
    spans: torch.Tensor            # (k, 2) demonstration i's [start, end) in the context
    lead_len: int

    @property
    def tasks(self) -> int:
        return self.context.shape[0]


def stack_episodes(episodes) -> EpisodeStack:
    """An Episode or a list of them (of one layout) -> EpisodeStack."""
    episodes = episodes if isinstance(episodes, list) else [episodes]
    spans, pairs = episodes[0].spans(), [ep.pairs() for ep in episodes]
    for ep, (_, _, in_loss) in zip(episodes, pairs):
        if not torch.equal(ep.spans(), spans) or not torch.equal(in_loss, pairs[0][2]):
            raise ValueError("tasks trained together need one layout (demonstration lengths and loss positions)")
    joined = lambda ep, f: torch.cat([getattr(ep.lead, f)] + [getattr(d, f) for d in ep.demos])
    return EpisodeStack(torch.stack([joined(ep, "embeds") for ep in episodes]),
                        torch.stack([joined(ep, "targets") for ep in episodes]), joined(episodes[0], "in_loss"),
                        torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), pairs[0][2], spans,
                        len(episodes[0].lead.embeds))


# ----------------------------------------------------------------------------------------------------------------------
# Settings. Epochs for CT-KV and prefix tuning (one optimiser step per pass over the k pairs), optimiser steps for
# CT-Prompt, prompt tuning and TTT (one per mini-batch), as marc counts them.


@dataclass
class TuneConfig:
    # CT-KV (marc `run_gs`): AdamW without weight decay, cosine to 0 without warm-up, grad-norm clip 1
    steps: int = option(200, "CT-KV epochs (one optimiser step per pass over the k pairs)")
    lr: float = option(1e-3, "CT-KV learning rate")
    dropout: float = option(0.05, "CT-KV token dropout p (never on BOS)")
    leave_one_out: bool = option(True, "hide demonstration i from pair i (CT-KV, CT-Prompt)")
    batch_size: int = option(16, "pairs per mini-batch of CT-KV and prefix tuning (their gradients sum over an epoch)")
    # CT-Prompt (marc *_prompt `run_gs`: its "epochs" are optimiser steps, one per mini-batch)
    ct_prompt_steps: int = option(200, "CT-Prompt optimiser steps (one per mini-batch)")
    ct_prompt_lr: float = option(1e-3, "CT-Prompt learning rate")
    ct_prompt_dropout: float = option(0.1, "CT-Prompt token dropout p (never on BOS)")
    prompt_batch_size: int = option(4, "pairs per optimiser step of CT-Prompt and prompt tuning")
    # prompt / prefix tuning (marc --random_prompt / --random_kv token, m = 32, from dummy ids 0..m-1)
    prompt_len: int = option(32, "m, the trainable positions of prompt and prefix tuning")
    prompt_tuning_steps: int = option(300, "prompt tuning optimiser steps (one per mini-batch)")
    prompt_tuning_lr: float = option(3e-3, "prompt tuning learning rate")
    prompt_tuning_dropout: float = option(0.1, "prompt tuning token dropout p")
    prefix_tuning_steps: int = option(200, "prefix tuning epochs")
    prefix_tuning_lr: float = option(3e-3, "prefix tuning learning rate")
    prefix_tuning_dropout: float = option(0.0, "prefix tuning token dropout p")
    # TTT (marc `run_ttt`)
    ttt_rank: int = option(64, "TTT's LoRA rank")
    ttt_alpha: float = option(64.0, "TTT's LoRA alpha (scale alpha / rank)")
    ttt_dropout: float = option(0.05, "TTT's LoRA dropout")
    ttt_targets: str = option(TTT_TARGETS, "TTT's LoRA target projections, comma-separated")
    ttt_permutations: int = option(1000, "TTT's training sequences: random permutations of all k demonstrations")
    ttt_steps: int = option(250, "TTT optimiser steps (one per mini-batch of sequences)")
    ttt_batch_size: int = option(4, "TTT sequences per optimiser step")
    ttt_lr: float = option(1e-4, "TTT's LoRA learning rate")
    ttt_kv_steps: int = option(30, "TTT + CT-KV: CT-KV epochs on the TTT-adapted model")
    # every method
    reduction: str = option("tokens", "loss of a mini-batch: 'tokens' = token-weighted mean over its rows (official, "
                                      "Hugging Face's loss), 'pairs' = mean over rows of each row's mean",
                            choices=list(REDUCTIONS))
    micro_batch: int = option(0, "rows per forward/backward (0: a whole mini-batch); gradients accumulate, same step")
    grad_clip: float = 1.0
    seed: int = option(0, "seed of the demonstrations' sampling, dropout masks, TTT's permutations and adapters")
    task_seeds: tuple | None = None  # several tasks at once: each task's seed (default seed + t)
    task_lr_scales: tuple | None = None  # several tasks at once: each task's learning rate = lr x its scale
    progress: bool = True
    on_step: object = None  # called after every optimiser step (bench.py times steps with it)


# marc's per-benchmark settings (bash_cmds/*/time.sh and the paper-run scripts); TuneConfig's defaults are NLP's.
RECIPES = {
    "nlp": TuneConfig(),
    "mmlu": TuneConfig(steps=20, dropout=0.1, batch_size=8, ct_prompt_steps=20, prompt_tuning_steps=20,
                       prefix_tuning_steps=24, ttt_permutations=400, ttt_steps=20, ttt_batch_size=8, ttt_kv_steps=10),
    "bbh": TuneConfig(steps=16, dropout=0.1, batch_size=2, ct_prompt_steps=12, ct_prompt_lr=3e-4, prompt_batch_size=2,
                      prompt_tuning_steps=16, prompt_tuning_lr=1e-3, prefix_tuning_steps=16, ttt_permutations=40,
                      ttt_steps=8, ttt_batch_size=5, ttt_kv_steps=8),
}


def method_config(method: str, cfg: TuneConfig) -> TuneConfig:
    """cfg with steps, lr, dropout and batch_size set to `method`'s (the training functions read only those)."""
    if method == "prefix-tuning":
        return replace(cfg, steps=cfg.prefix_tuning_steps, lr=cfg.prefix_tuning_lr, dropout=cfg.prefix_tuning_dropout)
    if method == "prompt-tuning":
        return replace(cfg, steps=cfg.prompt_tuning_steps, lr=cfg.prompt_tuning_lr, dropout=cfg.prompt_tuning_dropout,
                       batch_size=cfg.prompt_batch_size)
    if method == "ct-prompt":
        return replace(cfg, steps=cfg.ct_prompt_steps, lr=cfg.ct_prompt_lr, dropout=cfg.ct_prompt_dropout,
                       batch_size=cfg.prompt_batch_size)
    if method == "ttt":
        return replace(cfg, steps=cfg.ttt_steps, lr=cfg.ttt_lr, batch_size=cfg.ttt_batch_size)
    if method == "ttt+ct-kv":  # its CT-KV part, after TTT
        return replace(cfg, steps=cfg.ttt_kv_steps)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Optimisation


def model_dtype(model):
    return model.embed_tokens.weight.dtype


def dropout_mask(rows: int, P: int, p: float, generator, device, keep: int = 0):
    """(rows, P) bool: prefix position j dropped for row b with probability p; None when p = 0. Only the P prefix
    (or soft-prompt) positions can be dropped, and never the first `keep` (the lead: BOS)."""
    if p == 0:
        return None
    dropped = torch.rand(rows, P, generator=generator) < p
    dropped[:, :keep] = False
    return dropped.to(device)


def task_seeds(cfg: TuneConfig, tasks: int) -> list[int]:
    """Each task's seed: cfg.task_seeds, else cfg.seed + t. Everything random of task t (dropout masks, mini-batch
    order, TTT's permutations, adapters and LoRA dropout) comes from it (purpose_seed), so task t of a batch draws
    what a run of that task alone with --seed task_seeds[t] draws."""
    if cfg.task_seeds is None:
        return [cfg.seed + t for t in range(tasks)]
    if len(cfg.task_seeds) != tasks:
        raise ValueError(f"task_seeds: {len(cfg.task_seeds)} seeds for {tasks} tasks")
    return list(cfg.task_seeds)


# The random streams of a task, one per purpose. Seeding two of them with the task's seed itself would make them draw
# the same numbers (a torch.Generator seeded s, and torch.manual_seed(s) on CPU and on CUDA, start one sequence).
RANDOM_PURPOSES = ("token-dropout", "mini-batch-order", "ttt-permutations", "ttt-mini-batch-order", "lora-init",
                   "lora-dropout")


def purpose_seed(seed: int, purpose: str) -> int:
    """The seed of task seed `seed`'s stream for `purpose` (RANDOM_PURPOSES): a hash, the same on every machine."""
    if purpose not in RANDOM_PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; one of {', '.join(RANDOM_PURPOSES)}")
    digest = hashlib.blake2b(f"{purpose}/{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def task_generators(cfg: TuneConfig, tasks: int, purpose: str, device="cpu") -> list[torch.Generator]:
    """Each task's random stream for `purpose` (RANDOM_PURPOSES), on `device`."""
    return [torch.Generator(device).manual_seed(purpose_seed(seed, purpose)) for seed in task_seeds(cfg, tasks)]


def task_dropout(generators, rows: int, P: int, p: float, device, keep: int):
    """(T, rows, P) dropout masks, one per task from its own stream; None when p = 0."""
    if p == 0:
        return None
    return torch.stack([dropout_mask(rows, P, p, g, device, keep) for g in generators])


def step_batches(n_rows: int, size: int, generator, per_epoch: bool, drop_last: bool):
    """For every optimiser step, the mini-batches (row index tensors) whose gradients it sums: a shuffled epoch's
    batches (per_epoch), else the next batch of a shuffled, cycling loader (marc's DataLoader(shuffle=True))."""
    while True:
        batches = list(torch.randperm(n_rows, generator=generator).split(size))
        if drop_last and len(batches[-1]) < size:
            batches.pop()
        if per_epoch:
            yield batches
        else:
            yield from ([b] for b in batches)


def clip_per_task(params, max_norm: float):
    """torch.nn.utils.clip_grad_norm_ for each task separately (params carry a leading task axis)."""
    squares = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params if p.grad is not None)
    factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor.view(-1, *[1] * (p.dim() - 1)).to(p.grad.dtype))


def mini_batch_loss(sums, tokens, batch_tokens, batch_rows: int, reduction: str):
    """(T,) loss of rows with summed losses `sums` (T, R) and loss-token counts `tokens` (T, R), part of each task's
    mini-batch of batch_rows rows and batch_tokens (T,) tokens in the loss: 'tokens' (official) divides by the
    mini-batch's token count, 'pairs' averages each row's mean over the mini-batch's rows. Summed over a mini-batch's
    parts (micro-batches), either gives the mini-batch's loss."""
    if reduction == "tokens":
        return sums.sum(1) / batch_tokens.float().clamp(min=1.0)
    return (sums / tokens.clamp(min=1)).sum(1) / batch_rows


def optimise(params, pair_sums, row_tokens, n_rows: int, cfg: TuneConfig, desc: str, *, per_epoch: bool,
             drop_last: bool = False, order_stream: str = "mini-batch-order"):
    """AdamW (no weight decay), cosine decay to 0 without warm-up over cfg.steps optimiser steps, grad norm clipped to
    cfg.grad_clip per task. A mini-batch's loss is marc's: `reduction` over its rows times rows / batch size (a short
    last batch weighs less), divided by the step's number of mini-batches. Each task shuffles its rows with its own
    stream and steps at its own rate (cfg.task_lr_scales: AdamW's step, linear in lr without weight decay, scaled).
    params carry a leading task axis (T); pair_sums(rows) -> (T, R) summed loss of each task's rows (rows: (T, R)
    indices); row_tokens(rows) -> (T, R) their tokens in the loss; order_stream: the purpose (RANDOM_PURPOSES) of the
    tasks' streams that shuffle the rows."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # marc: no weight decay
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, 0, cfg.steps))  # cosine, no warm-up
    size, T = min(cfg.batch_size or n_rows, n_rows), params[0].shape[0]
    scales = None if cfg.task_lr_scales is None else torch.tensor(cfg.task_lr_scales, dtype=torch.float64)
    if scales is not None and len(scales) != T:
        raise ValueError(f"task_lr_scales: {len(scales)} rates for {T} tasks")
    streams = [step_batches(n_rows, size, g, per_epoch, drop_last) for g in task_generators(cfg, T, order_stream)]
    for _ in tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, leave=False):
        opt.zero_grad(set_to_none=True)
        group = [torch.stack(parts) for parts in zip(*(next(s) for s in streams))]  # the step's (T, R) mini-batches
        for rows in group:
            tokens = row_tokens(rows).float()
            chunk = cfg.micro_batch or rows.shape[1]
            for start in range(0, rows.shape[1], chunk):
                part = slice(start, start + chunk)
                sums = pair_sums(rows[:, part])
                loss = mini_batch_loss(sums, tokens[:, part], tokens.sum(1), rows.shape[1], cfg.reduction)
                (loss.sum() * rows.shape[1] / size / len(group)).backward()
        clip_per_task(params, cfg.grad_clip)
        before = None if scales is None else [p.detach().clone() for p in params]
        # Per-task rates: AdamW's step p - p0 = -lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p0) is linear in lr
        # (its decoupled weight decay too) and its moments come from the gradients, not from lr, so task t's step at
        # lr x scale[t] is scale[t] x its step at lr. An optimiser whose step is not linear in lr would break this.
        opt.step()
        if before is not None:
            with torch.no_grad():
                for p, p0 in zip(params, before):
                    p.copy_(p0 + (p - p0) * scales.to(p.device, p.dtype).view(-1, *[1] * (p.dim() - 1)))
        schedule.step()
        if cfg.on_step is not None:
            cfg.on_step()


# ----------------------------------------------------------------------------------------------------------------------
# CT-KV and prefix tuning: trainable K/V of a prefix


def kv_pair_sums(model, io, embeds, targets, in_loss, prefix_kv, spans=None, dropped=None):
    """Summed loss of training pairs (rows of embeds/targets/in_loss) after a prefix: positions start at P, spans (R, 2)
    are hidden from their row (leave-one-out), dropped (R, P) prefix positions are invisible."""
    hidden = model.hidden_states(embeds=embeds, prefix_kv=prefix_kv, mask=AttentionMask(hidden_span=spans,
                                                                                      dropped=dropped))
    return io.loss_sums(hidden, targets, in_loss)


def kv_pair_losses(model, io, pairs, rows, prefix_kv, spans=None, dropped=None):
    """Mean loss of each training pair `rows` (pairs = Episode.pairs()) after a prefix (see kv_pair_sums)."""
    embeds, targets, in_loss = pairs
    sums = kv_pair_sums(model, io, embeds[rows], targets[rows], in_loss[rows], prefix_kv,
                        None if spans is None else spans[rows.to(spans.device)], dropped)
    return sums / in_loss[rows].sum(1).clamp(min=1)


def row_losses(io, hidden, targets, in_loss) -> torch.Tensor:
    """(B,) mean loss over each row's positions in the loss."""
    return io.loss_sums(hidden, targets, in_loss) / in_loss.sum(1).clamp(min=1)


def tune_kv(model, io, ep, kv, cfg: TuneConfig, spans=None, dropout=0.0, desc="ct-kv", adapters=None):
    """CT-KV (kv from the demonstrations, spans = leave-one-out) and prefix tuning (kv from dummy tokens, no spans) on
    the T tasks of `ep` (an Episode or a list): kv per layer (T, Hkv, P, head_dim) -> the tuned prefix, same shapes.

    The lead's K/V (BOS) stay fixed. The trained K/V and AdamW's state are fp32 even when the model computes in bf16
    (the official code trains them in bf16, where lr 1e-3 updates underflow); each step casts them to the model's
    dtype. adapters: each task's LoRA weights {name: (T, ...)} (TTT + CT-KV on several tasks)."""
    stack = stack_episodes(ep)
    T, lead, dtype, P = stack.tasks, stack.lead_len, model_dtype(model), kv[0][0].shape[2]
    fixed = [t[:, :, :lead] for layer in kv for t in layer]
    params = [nn.Parameter(t[:, :, lead:].detach().float().clone()) for layer in kv for t in layer]
    generators, device = task_generators(cfg, T, "token-dropout"), stack.embeds.device
    tasks = torch.arange(T, device=device)[:, None]

    def prefix_of(trained, frozen):
        joined = [torch.cat([f, t.to(dtype)], -2) for f, t in zip(frozen, trained)]
        return list(zip(joined[0::2], joined[1::2]))

    def pair_sums(rows):  # the T tasks' rows (T, R) in one batch, each row after its task's prefix
        R, n, rows = rows.shape[1], len(stack.in_loss), rows.to(device)
        dropped = task_dropout(generators, n, P, dropout, device, lead)  # drawn per pair: independent of the order
        prefix = [(k.repeat_interleave(R, 0), v.repeat_interleave(R, 0)) if T > 1 else (k, v)
                  for k, v in prefix_of(params, fixed)]
        with folded_lora(model, adapters):  # TTT + CT-KV: task t's rows through task t's LoRA weights
            sums = kv_pair_sums(model, io, stack.embeds[tasks, rows].flatten(0, 1),
                                stack.targets[tasks, rows].flatten(0, 1), stack.in_loss[rows].flatten(0, 1), prefix,
                                None if spans is None else spans[rows.to(spans.device)].flatten(0, 1),
                                None if dropped is None else dropped[tasks, rows].flatten(0, 1))
        return sums.view(T, R)

    optimise(params, pair_sums, lambda rows: stack.in_loss[rows.to(device)].sum(-1), len(stack.in_loss), cfg, desc,
             per_epoch=True)
    with torch.no_grad():
        return prefix_of(params, fixed)


# ----------------------------------------------------------------------------------------------------------------------
# CT-Prompt and prompt tuning: a trainable soft prompt, re-run through the model with every pair


def prompt_pair_sums(model, io, embeds, targets, in_loss, prompt, spans=None, dropped=None):
    """Summed loss of training pairs (rows) after a soft prompt (1 or rows, P, dim) run through the model with them.
    Strict leave-one-out: span i is hidden from every later position of row i, prompt positions included."""
    n, P = len(embeds), prompt.shape[1]
    x = torch.cat([prompt.expand(n, -1, -1), embeds], dim=1)
    row_targets = torch.cat([targets.new_zeros(n, P), targets], dim=1)
    row_in_loss = torch.cat([in_loss.new_zeros(n, P), in_loss], dim=1)
    hidden = model.hidden_states(embeds=x, mask=AttentionMask(hidden_span=spans, dropped=dropped))
    return io.loss_sums(hidden, row_targets, row_in_loss)


def prompt_pair_losses(model, io, pairs, rows, prompt, spans=None, dropped=None):
    """Mean loss of each training pair `rows` (pairs = Episode.pairs()) after a soft prompt (see prompt_pair_sums)."""
    embeds, targets, in_loss = pairs
    sums = prompt_pair_sums(model, io, embeds[rows], targets[rows], in_loss[rows], prompt,
                            None if spans is None else spans[rows.to(spans.device)], dropped)
    return sums / in_loss[rows].sum(1).clamp(min=1)


def tune_prompt(model, io, ep, prompt, cfg: TuneConfig, spans=None, dropout=0.0, desc="ct-prompt"):
    """CT-Prompt (prompt = the demonstrations' embeddings, spans = strict leave-one-out) and prompt tuning (dummy
    tokens' embeddings, no spans) on the T tasks of `ep`: prompt (T, P, dim) -> the tuned prompt, same shape. One
    optimiser step per mini-batch of cfg.batch_size pairs. The lead (BOS) stays fixed; fp32 master copy."""
    stack = stack_episodes(ep)
    T, lead, dtype, P = stack.tasks, stack.lead_len, model_dtype(model), prompt.shape[1]
    fixed = prompt[:, :lead]
    param = nn.Parameter(prompt[:, lead:].detach().float().clone())
    generators, device = task_generators(cfg, T, "token-dropout"), stack.embeds.device
    tasks = torch.arange(T, device=device)[:, None]

    def pair_sums(rows):  # the T tasks' rows (T, R) in one batch, each after its task's prompt
        R, n, rows = rows.shape[1], len(stack.in_loss), rows.to(device)
        dropped = task_dropout(generators, n, P, dropout, device, lead)  # drawn per pair: independent of the order
        soft = torch.cat([fixed, param.to(dtype)], 1)  # (T, P, dim)
        sums = prompt_pair_sums(model, io, stack.embeds[tasks, rows].flatten(0, 1),
                                stack.targets[tasks, rows].flatten(0, 1), stack.in_loss[rows].flatten(0, 1),
                                soft.repeat_interleave(R, 0) if T > 1 else soft,
                                None if spans is None else spans[rows.to(spans.device)].flatten(0, 1),
                                None if dropped is None else dropped[tasks, rows].flatten(0, 1))
        return sums.view(T, R)

    optimise([param], pair_sums, lambda rows: stack.in_loss[rows.to(device)].sum(-1), len(stack.in_loss), cfg, desc,
             per_epoch=False)
    return torch.cat([fixed, param.detach().to(dtype)], 1)


# ----------------------------------------------------------------------------------------------------------------------
# TTT: LoRA trained on permutations of the demonstrations (marc `run_ttt`, `TTTDataset`)


def lora_modules(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def cuda_devices(model) -> list:
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


def lora_dropout_keep(shape, p: float, generators, device) -> torch.Tensor:
    """(T, *shape) bool: which inputs LoRA dropout keeps (probability 1 - p), task t's from generators[t]. A bool mask
    (what backward keeps) drawn as nn.Dropout draws its noise on CPU: one bernoulli_ per task."""
    keep = torch.empty(len(generators), *shape, dtype=torch.bool, device=device)
    for part, generator in zip(keep, generators):
        part.bernoulli_(1 - p, generator=generator)
    return keep


def _folded_lora_forward(module: LoRALinear, lora_a, lora_b, generators, x):
    """module's output for a batch folded task-major from len(lora_a) tasks: task t's rows with lora_a[t], lora_b[t];
    in training mode, LoRA dropout with task t's masks drawn from generators[t]."""
    xs = x.unflatten(0, (len(lora_a), -1))
    p = module.dropout.p if isinstance(module.dropout, nn.Dropout) and module.training else 0.0
    if p > 0:
        xs = xs * lora_dropout_keep(xs.shape[1:], p, generators, xs.device) / (1 - p)  # saves the bool mask only
    low = torch.einsum("t...i,tri->t...r", xs, lora_a)
    return module.base(x) + torch.einsum("t...r,tor->t...o", low, lora_b).flatten(0, 1) * module.scale


@contextlib.contextmanager
def folded_lora(model, adapters: dict | None, generators=None):
    """Inside: every LoRA module of `model` runs a batch folded task-major (T groups of rows, T = the adapters' task
    axis) with task t's weights adapters[name][t]; nothing changes without adapters. LoRA dropout (training mode)
    draws each module's masks when it runs (the model's fixed order of modules), task t's from generators[t] (on CPU:
    what the modules' nn.Dropout draw after torch.manual_seed)."""
    modules = lora_modules(model) if adapters else {}
    for name, module in modules.items():
        module.forward = functools.partial(_folded_lora_forward, module, adapters[f"{name}.lora_a"],
                                           adapters[f"{name}.lora_b"], generators)
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward


def init_adapters(model, seeds) -> dict[str, torch.Tensor]:
    """{parameter name: (T, ...)}: the LoRA adapters' initial values (A random, B zero) for each task seed, as
    apply_lora under torch.manual_seed(purpose_seed(seed, "lora-init")) draws them."""
    values = {}
    for seed in seeds:
        with torch.random.fork_rng(devices=cuda_devices(model)):
            torch.manual_seed(purpose_seed(seed, "lora-init"))
            for name, module in lora_modules(model).items():
                module.init_weights()
                values.setdefault(f"{name}.lora_a", []).append(module.lora_a.detach().clone())
                values.setdefault(f"{name}.lora_b", []).append(module.lora_b.detach().clone())
    return {name: torch.stack(v) for name, v in values.items()}


@torch.no_grad()
def load_adapters(model, adapters: dict, t: int):
    """Put task t's LoRA weights into the model's adapters."""
    for name, value in adapters.items():
        model.get_parameter(name).copy_(value[t])


def ttt_orders(generators, n: int, k: int) -> torch.Tensor:
    """(T, n, k): n random orders of the k demonstrations per task (marc: not de-duplicated)."""
    return torch.stack([torch.stack([torch.randperm(k, generator=g) for _ in range(n)]) for g in generators])


def permuted_positions(stack: EpisodeStack, orders: torch.Tensor) -> torch.Tensor:
    """(T, n, P): the context positions of each training sequence: the lead, then the demonstrations in `orders`."""
    lengths = (stack.spans[:, 1] - stack.spans[:, 0]).tolist()
    T, n, _ = orders.shape
    lead = torch.arange(stack.lead_len).expand(T, n, -1)
    if len(set(lengths)) == 1:  # one demonstration length (regression): vectorised
        L = lengths[0]
        rest = (stack.lead_len + orders[..., None] * L + torch.arange(L)).flatten(2)
    else:
        ranges = [torch.arange(s, e) for s, e in stack.spans.tolist()]
        rest = torch.stack([torch.stack([torch.cat([ranges[j] for j in order]) for order in task.tolist()])
                            for task in orders])
    return torch.cat([lead, rest], 2).to(stack.context.device)


def tune_lora(model, io, ep, cfg: TuneConfig, desc="ttt") -> dict[str, torch.Tensor]:
    """Test-time training on the T tasks of `ep`: LoRA adapters (cfg.ttt_*) are added to `model` in place and trained
    on cfg.ttt_permutations random orders of all k demonstrations each, loss on every answer; one optimiser step per
    mini-batch of cfg.batch_size sequences (shuffled, cycling, last partial batch dropped, as marc's loader). Returns
    the trained adapters {name: (T, ...)} (in the model's dtype, trained as fp32 master copies); with one task the
    model's adapters hold them too."""
    stack = stack_episodes(ep)
    T, dtype, k = stack.tasks, model_dtype(model), len(stack.spans)
    with torch.random.fork_rng(devices=cuda_devices(model)):  # apply_lora draws A: leave the caller's RNG alone
        apply_lora(model, rank=cfg.ttt_rank, alpha=cfg.ttt_alpha, targets=tuple(cfg.ttt_targets.split(",")),
                   dropout=cfg.ttt_dropout)
    model.requires_grad_(False)
    initial = init_adapters(model, task_seeds(cfg, T))
    adapters = {name: nn.Parameter(v.float()) for name, v in initial.items()}
    positions = permuted_positions(stack, ttt_orders(task_generators(cfg, T, "ttt-permutations"), cfg.ttt_permutations,
                                                     k))
    lora_dropout = task_generators(cfg, T, "lora-dropout", positions.device)  # drawn on the model's device
    tasks = torch.arange(T, device=positions.device)[:, None, None]
    answers = stack.context_in_loss.sum()

    def pair_sums(rows):  # the T tasks' sequences (T, R) in one batch, task t's through task t's adapters
        at = positions[tasks[..., 0], rows.to(positions.device)]  # (T, R, P)
        cast = {name: p.to(dtype) for name, p in adapters.items()}
        with folded_lora(model, cast, lora_dropout):
            hidden = model.hidden_states(embeds=stack.context[tasks, at].flatten(0, 1))
        return io.loss_sums(hidden, stack.context_targets[tasks, at].flatten(0, 1),
                            stack.context_in_loss[at].flatten(0, 1)).view(T, -1)

    model.train()  # LoRA dropout (drawn from each task's stream)
    try:
        optimise(list(adapters.values()), pair_sums, lambda rows: answers.expand(rows.shape),
                 cfg.ttt_permutations, cfg, desc, per_epoch=False, drop_last=True, order_stream="ttt-mini-batch-order")
    finally:
        model.eval()
    trained = {name: p.detach().to(dtype) for name, p in adapters.items()}
    if T == 1:
        load_adapters(model, trained, 0)
    return trained


# ----------------------------------------------------------------------------------------------------------------------
# Every method on T tasks -> Adapted


@dataclass
class Adapted:
    """What each of T tasks answers with: `model`, after the prefix prefix_kv (per layer (T, Hkv, P, head_dim); None:
    no prefix). adapters: TTT's LoRA weights of each task {name: (T, ...)}, applied per task by folded_lora (the
    model's own LoRA parameters do not hold them); None when there are none or (one task) they are merged into
    `model`."""
    model: nn.Module
    prefix_kv: list | None
    adapters: dict | None = None


@torch.no_grad()
def task_prefill(model, contexts, adapters=None):
    """prefill of T contexts (T, P, dim), each with its task's adapters (if any) -> per layer (T, Hkv, P, head_dim)."""
    with folded_lora(model, adapters):
        return prefill(model, embeds=contexts)


def run_ttt(model, io, episodes, cfg: TuneConfig) -> Adapted:
    """TTT on a copy of the model (the caller's stays as it was). One task: the adapters are merged (marc merges
    before ICL); several: kept per task, applied unmerged (the same function: W x + s B A x = (W + s B A) x)."""
    adapted = copy.deepcopy(model)
    adapters = tune_lora(adapted, io, episodes, method_config("ttt", cfg))
    if len(episodes) == 1:
        merge_lora(adapted)
        adapters = None
    return Adapted(adapted, task_prefill(adapted, stack_episodes(episodes).context, adapters), adapters)


def adapt_tasks(method: str, model, io, episodes, cfg: TuneConfig, after_ttt: Adapted | None = None) -> Adapted:
    """Run one method on T episodes of one layout. after_ttt: TTT's result on the same episodes, reused by
    ttt+ct-kv (marc loads the saved TTT adapters; else TTT runs first)."""
    model.requires_grad_(False)
    episodes = episodes if isinstance(episodes, list) else [episodes]
    stack, run = stack_episodes(episodes), method_config(method, cfg)
    spans = stack.spans if cfg.leave_one_out else None
    lead = stack.context[:, :stack.lead_len]
    if method == "zero-shot":
        return Adapted(model, prefill(model, embeds=lead))
    if method == "icl":
        return Adapted(model, prefill(model, embeds=stack.context))
    if method in ("prompt-tuning", "prefix-tuning"):
        dummy = io.init_context(cfg.prompt_len).to(lead.dtype)
        start = torch.cat([lead, dummy.expand(stack.tasks, -1, -1)], 1)
        if method == "prompt-tuning":
            tuned = tune_prompt(model, io, episodes, start, run, dropout=run.dropout, desc=method)
            return Adapted(model, prefill(model, embeds=tuned))
        kv = prefill(model, embeds=start)
        return Adapted(model, tune_kv(model, io, episodes, kv, run, None, run.dropout, method))
    if method == "ct-prompt":
        tuned = tune_prompt(model, io, episodes, stack.context, run, spans, run.dropout)
        return Adapted(model, prefill(model, embeds=tuned))
    if method == "ct-kv":
        return Adapted(model, tune_kv(model, io, episodes, prefill(model, embeds=stack.context), run, spans,
                                      run.dropout))
    if method == "ttt":
        return run_ttt(model, io, episodes, cfg)
    if method == "ttt+ct-kv":
        ttt = after_ttt or run_ttt(model, io, episodes, cfg)
        return Adapted(ttt.model, tune_kv(ttt.model, io, episodes, ttt.prefix_kv, run, spans, run.dropout, method,
                                          ttt.adapters), ttt.adapters)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def adapt(method: str, model, io, ep: Episode, cfg: TuneConfig, after_ttt: Adapted | None = None):
    """One method on one episode -> (model to answer with, prefix_kv to answer after, batch 1)."""
    adapted = adapt_tasks(method, model, io, [ep], cfg, after_ttt)
    return adapted.model, adapted.prefix_kv
