"""Multiple-choice scoring by log-likelihood: every option of a question is a continuation of its context, and the
option with the highest (summed, or normalised) log-likelihood is the prediction. The project's one scorer and one
tokenization rule (evaluate.py's benchmarks, cft.py's closed-book demo, context tuning's text tasks).

A question's context is [BOS] + shared prefix (header + k demonstrations) + its own prompt ("...Answer:"). An option's
continuation is tokenized as encode(context + " " + option)[len(encode(context)):] (lm-evaluation-harness's
`multiple_choice` convention; see option_tokens).

Why score_options is fast, with the same numbers as one-question-at-a-time scoring (score_naive; tests check it):
- The token prefix shared by a group of questions (an MMLU subject's header and 5 demonstrations, ~400-1,100 tokens)
  runs through the model once (model.prefill); its keys/values are passed to every batch as `prefix_kv`.
- Questions whose options are single tokens (" A".." D") take ONE forward: the options are read at the last position.
- Rows are sorted by length and cut into batches of about `batch_tokens` tokens; they are right-padded, so causal
  attention keeps every real token away from the padding (no padding mask) and positions need no correction.
- The vocabulary projection runs only at the positions that are scored; torchrun ranks split the rows.
- The batches after a prefix differ in rows, length and prefix length; on CUDA their attention runs compiled
  FlexAttention kernels (fused_attention.py), and dynamo's automatic dynamic shapes make a size that changes symbolic
  at its first recompilation, so a few compilations serve every shape rather than one per shape.
"""
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import Tokenizer, tokenize_texts
from model import prefill

MIN_SHARED_PREFIX = 32  # shorter common prefixes (zero-shot MedQA: "[BOS] Question:") are simply recomputed
REDUCTIONS = ("sum", "mean", "chars")


@dataclass
class EncodedQuestion:
    group: str                 # questions of one group may share a context prefix (computed once)
    context: list[int]         # [BOS] + prefix + question
    continuations: list        # token ids of each option's continuation (" A" -> [319] with Llama-2's tokenizer)
    gold: int
    option_chars: list[int]    # characters of each continuation's text, " " + option ("chars" reduction)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization: a question becomes its context tokens and one continuation per option


def option_tokens(tok: Tokenizer, context_ids: list[int], context_text: str, option: str,
                  whole: list[int] | None = None) -> list[int]:
    """The continuation tokens of `option` after a context: THE tokenization rule of the project.

    context_ids = tok.encode(context_text) (no BOS). The continuation is encode(context_text + " " + option) minus
    its first len(context_ids) tokens (lm-evaluation-harness), because sentencepiece merges across the boundary
    differently from encoding " A" alone (["▁", "▁A"] instead of ["▁A"]). `whole`: that encoding when it is already
    computed (encode_questions tokenizes in parallel processes).
    Fallback, when the context's tokens are not a prefix of the whole (a merge across the boundary): the option's own
    tokens encode(" " + option). An option that adds no token is an error."""
    if whole is None:
        whole = tok.encode(context_text + " " + option)
    if whole[:len(context_ids)] == context_ids:
        continuation = whole[len(context_ids):]
    else:
        continuation = tok.encode(" " + option)
    if not continuation:
        raise ValueError(f"option {option!r} adds no token after its prompt {context_text[-40:]!r}")
    return continuation


def encode_questions(tok: Tokenizer, questions, bos: bool = True) -> list[EncodedQuestion]:
    """Tokenize every question (objects with group, prefix, text, choices, gold: benchmark_data.Question) with
    option_tokens; context = [BOS] + prefix + text (without BOS when a prefix_kv holds it). Contexts and
    context + " " + option are tokenized together, in worker processes for large tasks (data.tokenize_texts)."""
    contexts = [q.prefix + q.text for q in questions]
    extended = [c + " " + choice for c, q in zip(contexts, questions) for choice in q.choices]
    ids = [t.tolist() for t in tokenize_texts(contexts + extended, tok.path, progress=False)]
    encoded, rest = [], iter(ids[len(contexts):])
    for q, text, ctx in zip(questions, contexts, ids):
        try:
            continuations = [option_tokens(tok, ctx, text, choice, whole=next(rest)) for choice in q.choices]
        except ValueError as e:
            raise ValueError(f"{q.group}: {e}") from None
        context = [tok.bos_id] * bos + ctx
        if not context:
            raise ValueError(f"{q.group}: an empty context (no BOS, no text) has no position to predict an option")
        encoded.append(EncodedQuestion(q.group, context, continuations, q.gold,
                                       [len(" " + choice) for choice in q.choices]))
    return encoded


def single_token(q: EncodedQuestion) -> bool:
    return all(len(c) == 1 for c in q.continuations)


def reduce_scores(scores: list[list[float]], questions: list[EncodedQuestion], reduction: str) -> list[list[float]]:
    """Summed log-likelihoods -> the score of each option under `reduction` (see score_options)."""
    if reduction == "sum":
        return scores
    if reduction == "mean":
        return [[s / len(c) for s, c in zip(row, q.continuations)] for row, q in zip(scores, questions)]
    if reduction == "chars":
        return [[s / n for s, n in zip(row, q.option_chars)] for row, q in zip(scores, questions)]
    raise ValueError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Scoring. score_naive is the plain reference (and bench.py's baseline); score_options must give the same numbers.


@torch.no_grad()
def score_naive(logits_fn, questions: list[EncodedQuestion], reduction: str = "sum",
                progress: bool = False) -> list[list[float]]:
    """Log-likelihood of every option, one question at a time over its full prompt with full-sequence logits.
    logits_fn(tokens (1, T) long) -> logits (1, T, vocab): our Transformer, or a transformers model's `.logits`."""
    scores = []
    for q in tqdm(questions, desc="naive", disable=not progress):
        if single_token(q):  # one forward; the options are read at the last position
            logprobs = logits_fn(torch.tensor([q.context]))[0, -1].float().log_softmax(-1)
            scores.append([logprobs[c[0]].item() for c in q.continuations])
            continue
        row_scores = []
        for cont in q.continuations:
            logits = logits_fn(torch.tensor([q.context + cont[:-1]]))[0, len(q.context) - 1:]
            row_scores.append(logits.float().log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum().item())
        scores.append(row_scores)
    return reduce_scores(scores, questions, reduction)


@dataclass
class ScoringRow:
    question: int     # index into the question list
    tokens: list      # this row's tokens after the group's shared prefix
    targets: list     # (option, first scored position in `tokens`, continuation token ids)


def question_rows(i: int, q: EncodedQuestion, skip: int) -> list[ScoringRow]:
    """The forward rows of question i, without its first `skip` tokens (the shared prefix)."""
    last = len(q.context) - 1 - skip  # the position whose logits predict the first continuation token
    if single_token(q):
        return [ScoringRow(i, q.context[skip:], [(c, last, cont) for c, cont in enumerate(q.continuations)])]
    return [ScoringRow(i, q.context[skip:] + cont[:-1], [(c, last, cont)]) for c, cont in enumerate(q.continuations)]


def shared_prefix_len(token_lists) -> int:
    """Length of the longest common token prefix, kept at least one token short of the shortest list so that every
    row still has the position that predicts its first continuation token."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - 1
    for tokens in token_lists[1:]:
        n = next((j for j in range(n) if tokens[j] != first[j]), n)
    return n


def length_batches(rows: list[ScoringRow], batch_tokens: int) -> list[list[ScoringRow]]:
    """Rows sorted longest first, cut so that rows x longest row <= batch_tokens (at least one row per batch)."""
    rows = sorted(rows, key=lambda r: -len(r.tokens))
    batches, current = [], []
    for row in rows:
        if current and (len(current) + 1) * len(current[0].tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


@dataclass
class GroupPlan:
    prefix: list[int]                    # the group's shared tokens, prefilled once (empty: none)
    batches: list[list[ScoringRow]]      # this rank's rows


def plan_batches(model, questions, batch_tokens: int, extra_prefix: int, detect_prefix: bool, rank: int, world: int,
                 too_long_advice: str = "") -> list[GroupPlan]:
    """One GroupPlan per group. Rows and prefix lengths are fixed before the rank split, so that every world size
    computes the same thing. extra_prefix: positions before every row (a soft prompt, a given prefix_kv), for the
    length warning; too_long_advice: what the warning suggests (e.g. fewer shots, which only a caller with
    demonstrations can offer)."""
    groups = {}
    for i, q in enumerate(questions):
        groups.setdefault(q.group, []).append(i)
    plan = []
    for members in groups.values():
        skip = shared_prefix_len([questions[i].context for i in members]) if detect_prefix else 0
        if skip < MIN_SHARED_PREFIX:
            skip = 0  # recomputing a few tokens is cheaper than leaving SDPA's plain causal kernel (flash)
        rows = [row for i in members for row in question_rows(i, questions[i], skip)]
        longest = extra_prefix + skip + max(len(r.tokens) for r in rows)
        if longest > model.cfg.max_seq_len and rank == 0:  # as model.generate: rotary positions go on, quality may not
            print(f"warning: {questions[members[0]].group}: prompts of up to {longest} tokens, past the model's "
                  f"max_seq_len {model.cfg.max_seq_len}" + (f" ({too_long_advice})" if too_long_advice else ""),
                  file=sys.stderr)
        rows = sorted(rows, key=lambda r: -len(r.tokens))[rank::world]
        plan.append(GroupPlan(questions[members[0]].context[:skip], length_batches(rows, batch_tokens)))
    return plan


def group_prefix(model, tokens: list[int], soft_prompt=None):
    """prefix_kv (batch 1) of a group's shared tokens, after the soft prompt if any; None when both are empty."""
    weight = model.embed_tokens.weight
    embeds = model.embed_tokens(torch.tensor([tokens], dtype=torch.long, device=weight.device))
    if soft_prompt is not None:
        embeds = torch.cat([soft_prompt[None].to(weight.device, weight.dtype), embeds], dim=1)
    return prefill(model, embeds=embeds)


def batch_logprobs(model, batch: list[ScoringRow], prefix_kv, per_row_prefix: bool):
    """[(row in batch, option, log-likelihood of one continuation token)] of one batch of rows."""
    device = model.embed_tokens.weight.device
    n_rows, length = len(batch), len(batch[0].tokens)
    # Right padding: causal attention already hides the padding from every real token.
    tokens = torch.zeros(n_rows, length, dtype=torch.long)
    for b, row in enumerate(batch):
        tokens[b, :len(row.tokens)] = torch.tensor(row.tokens)
    if per_row_prefix and prefix_kv is not None and prefix_kv[0][0].shape[0] == 1:
        prefix_kv = [(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1)) for k, v in prefix_kv]
    hidden = model.hidden_states(tokens.to(device), prefix_kv=prefix_kv)
    where = [(b, c, pos + j, t) for b, row in enumerate(batch) for c, pos, cont in row.targets
             for j, t in enumerate(cont)]
    b_idx, _, pos_idx, target = (torch.tensor(x, device=device) for x in zip(*where))
    logprobs = model.logits(hidden[b_idx, pos_idx]).float().log_softmax(-1)
    picked = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
    return [(b, c, value) for (b, c, _, _), value in zip(where, picked)]


def score_group(model, group: GroupPlan, prefix_kv, per_row_prefix: bool):
    """Per batch of one group, after its prefix: [(row, option, log-likelihood of one continuation token)]."""
    for batch in group.batches:
        yield [(batch[b], c, value) for b, c, value in batch_logprobs(model, batch, prefix_kv, per_row_prefix)]


@torch.no_grad()
def score_options(model, questions: list[EncodedQuestion], *, batch_tokens: int = 8192, prefix_kv=None,
                  soft_prompt=None, reduction: str = "sum", rank: int = 0, world: int = 1, desc: str = "scoring",
                  progress: bool = True, per_row_prefix: bool = True, too_long_advice: str = "") -> list[list[float]]:
    """The score of every option of every question: the same numbers as score_naive. model: a model.py Transformer.

    reduction, the option's summed log-likelihood divided by nothing or a length:
      "sum"    the summed log-likelihood of its continuation tokens (lm-evaluation-harness `acc`; evaluate.py);
      "mean"   per continuation token (context tuning's mean per-token loss, Lu, Teehan, Yang, Ren 2025;
               context_tuning.py);
      "chars"  per character of " " + option (lm-evaluation-harness `acc_norm`; cft.py's closed-book demo).
    prefix_kv: a context every row starts after (model.prefill's output, e.g. context tuning's tuned cache); the
    questions' contexts then hold only what follows it, and no shared prefix is detected among them.
    soft_prompt (n, dim): vectors placed before every context (cft.py's ProMoT layout: [soft prompt] + BOS + text).
    With world > 1 this rank scores every world-th row (longest first) and leaves the others at 0: combine with
    sum_over_ranks.
    per_row_prefix: hand the prefix to the model expanded to the batch (a view) instead of as batch 1. On CUDA, batch 1
    takes FlexAttention's folded path (prefix stored once); per row takes the plain block mask, with the prefix
    copied into every row where FlexAttention runs (CUDA, rows of >= 128 tokens) and attended once, uncopied,
    elsewhere. bench.py eval times both: on one H100 (llama2-7b shapes) per row was as fast once compiled and
    compiled 2.5x sooner (MMLU + MedQA first pass 42 s against 118 s; BENCHMARKS.md), so it is the default here,
    where no gradient needs the memory saving.
    too_long_advice: appended to the warning printed when prompts run past the model's max_seq_len."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if prefix_kv is not None and soft_prompt is not None:
        raise ValueError("score_options: pass a prefix_kv or a soft_prompt, not both (prefill the soft prompt)")
    extra = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0 if soft_prompt is None else len(soft_prompt)
    plan = plan_batches(model, questions, batch_tokens, extra, prefix_kv is None, rank, world, too_long_advice)
    scores = [[0.0] * len(q.continuations) for q in questions]
    bar = tqdm(total=sum(len(g.batches) for g in plan), desc=desc, disable=not progress or rank != 0)
    for group in plan:
        kv = prefix_kv if prefix_kv is not None else group_prefix(model, group.prefix, soft_prompt)
        for results in score_group(model, group, kv, per_row_prefix):
            for row, c, value in results:
                scores[row.question][c] += value
            bar.update()
        del kv
    bar.close()
    return reduce_scores(scores, questions, reduction)


def sum_over_ranks(scores, world: int):
    """Every (question, option) score was computed by exactly one rank (the others hold 0): sum the ranks' lists."""
    if world == 1:
        return scores
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, scores)
    return [[sum(s[i][c] for s in gathered) for c in range(len(row))] for i, row in enumerate(scores)]


def predict(scores) -> list[int]:
    return [max(range(len(s)), key=s.__getitem__) for s in scores]  # ties: the first option, as numpy's argmax
