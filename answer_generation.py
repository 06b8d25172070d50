"""Answers by greedy generation, and how a generated answer is read: FinBen's label match.

FinBen (and PIXIU before it) scores its classification tasks generatively: the model continues the prompt greedily,
and the answer is the first label, in the task's label order, found anywhere in the lower-cased, stripped output;
an output holding no label is "missing" and counts as wrong (The-FinAI/PIXIU, src/tasks/flare.py,
Classification.process_results: `for choice in doc["choices"]: if choice.lower() in ini_result: ...`, else
"missing"; its weighted F1 is sklearn's f1_score(golds, preds, average="weighted", labels=set(golds))). FinBen
generates until end of text; here at most `max_new_tokens` tokens (a label is a few tokens), which finds the same
label unless a model writes more than that before it.

generate_answers batches the prompts with model.py's `generate` (greedy, KV cache, left padding): a group's token
prefix (the few-shot demonstrations) is prefilled once and shared by its rows, never copied per row (batch 1: every
decode step attends to it through model.attention's shared-prefix path); rows are sorted by length and cut into
batches of about `batch_tokens` cached positions, the shared prefix counted once per batch and each row's own prompt
and answer positions filling the rest; torchrun ranks split the rows (gather_answers joins them). With shape buckets
(on CUDA by default), the prefill of a batch, whose FlexAttention kernels compile for every new shape, takes one of a
few: prompts left-padded to a power-of-two length (a pad-token row of that length sets it; model.generate's pad_left
mask hides the padding), rows padded to a full batch or a power of two; padding rows' answers are dropped.
"""
import contextlib
import sys

import torch
from tqdm import tqdm

from model import generate
from scoring import MIN_SHARED_PREFIX, group_prefix, shared_prefix_len

MISSING = -1  # the prediction of an output in which no label was found


def finben_label(output: str, labels) -> int:
    """Index of the label FinBen reads in a generated answer, MISSING when there is none (see the module doc)."""
    text = output.strip().lower()
    return next((i for i, label in enumerate(labels) if label.lower() in text), MISSING)


def generation_batches(lengths: list[int], rows: list[int], max_new_tokens: int, batch_tokens: int) -> list[list[int]]:
    """Rows (indices into lengths: the rows' own prompt lengths), longest first, cut so that rows x (longest +
    max_new_tokens) <= batch_tokens (at least one row per batch)."""
    rows = sorted(rows, key=lambda i: -lengths[i])
    batches, current = [], []
    for i in rows:
        if current and (len(current) + 1) * (lengths[current[0]] + max_new_tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def bucket_length(n: int) -> int:
    """The padded length of n positions under shape buckets: the next power of two (at least 16)."""
    return max(16, 1 << (n - 1).bit_length())


def bucket_rows(n: int, full: int) -> int:
    """The padded row count of a batch of n rows under shape buckets, `full` rows being a full batch: the next power
    of two, at most full."""
    return min(full, 1 << (n - 1).bit_length())


def static_shapes(enabled: bool):
    """A context in which torch.compile keeps shapes static (dynamo's automatic dynamic shapes off: a bucket compiles
    once, for its own shape) and may compile more shapes than its default limit (the buckets are a bounded set)."""
    if not enabled:
        return contextlib.nullcontext()
    limit = max(torch._dynamo.config.recompile_limit, 128)
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=limit)


def bucketed_generation_batches(lengths, rows: list[int], extra: int, batch_tokens: int, pad_id: int):
    """[(rows, padding prompts)]: rows longest first, as many per batch as batch_tokens holds at the longest row's
    bucket_length + extra (the answer's positions), one of them kept free for a pad-token prompt of that length when
    no row has it; one-token padding prompts fill the batch to the full row count or a power of two."""
    rows = sorted(rows, key=lambda i: -lengths[i])
    batches = []
    while rows:
        length = bucket_length(lengths[rows[0]])
        full = max(1, batch_tokens // (length + extra))
        setter = int(lengths[rows[0]] < length)  # the pad-token prompt that makes the batch `length` long
        batch, rows = rows[:max(1, full - setter)], rows[max(1, full - setter):]
        n_rows = max(len(batch) + setter, bucket_rows(len(batch) + setter, full))
        batches.append((batch, [[pad_id] * length] * setter + [[pad_id]] * (n_rows - len(batch) - setter)))
    return batches


def group_plan(prompts: list[list[int]], groups: list[str], rank: int, world: int):
    """[(shared prefix tokens, this rank's row indices)] per group. Rows are split after sorting by length (longest
    first, every world-th), so the ranks get similar work and every world size generates the same answers."""
    members = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    plan = []
    for rows in members.values():
        skip = shared_prefix_len([prompts[i] for i in rows])
        skip = skip if skip >= MIN_SHARED_PREFIX else 0
        mine = sorted(rows, key=lambda i: -len(prompts[i]))[rank::world]
        plan.append((prompts[rows[0]][:skip], mine))
    return plan


@torch.no_grad()
def generate_answers(model, prompts: list[list[int]], groups: list[str], *, max_new_tokens: int, eos_id: int,
                     pad_id: int = 0, batch_tokens: int = 8192, soft_prompt=None, rank: int = 0, world: int = 1,
                     desc: str = "generating", progress: bool = True,
                     shape_buckets: bool | None = None) -> list[list[int] | None]:
    """The greedy continuation (token ids, cut before eos_id) of each prompt ([BOS] + text); with world > 1 only this
    rank's rows are filled (the others None): join with gather_answers. Prompts of one group that share a prefix of at
    least MIN_SHARED_PREFIX tokens have it prefilled once. soft_prompt (n, dim): vectors before every prompt, as
    scoring.score_options places them (cft.py's ProMoT layout). shape_buckets: see the module doc (default: on CUDA);
    the answers are the same either way."""
    answers = [None] * len(prompts)
    plan = group_plan(prompts, groups, rank, world)
    longest = max(len(p) for p in prompts) + max_new_tokens + (0 if soft_prompt is None else len(soft_prompt))
    if longest > model.cfg.max_seq_len and rank == 0:
        print(f"warning: {desc}: prompts and answers of up to {longest} tokens, past the model's max_seq_len "
              f"{model.cfg.max_seq_len}", file=sys.stderr)
    bar = tqdm(total=sum(len(rows) for _, rows in plan), desc=desc, disable=not progress or rank != 0)
    if shape_buckets is None:
        shape_buckets = model.embed_tokens.weight.device.type == "cuda"
    with static_shapes(shape_buckets):
        for prefix, rows in plan:
            prefix_kv = group_prefix(model, prefix, soft_prompt)  # batch 1, stored once for all the group's batches
            rests = {i: prompts[i][len(prefix):] for i in rows}
            lengths = {i: len(rest) for i, rest in rests.items()}  # the rows' own positions set sizes and shapes
            own_tokens = batch_tokens - (0 if prefix_kv is None else prefix_kv[0][0].shape[2])  # one prefix a batch
            if shape_buckets:
                batches = bucketed_generation_batches(lengths, rows, max_new_tokens, own_tokens, pad_id)
            else:
                batches = [(batch, []) for batch in generation_batches(lengths, rows, max_new_tokens, own_tokens)]
            for batch, padding in batches:
                outputs = generate(model, [rests[i] for i in batch] + padding, max_new_tokens, eos_id=eos_id,
                                   pad_id=pad_id, prefix_kv=prefix_kv)
                for i, output in zip(batch, outputs):  # padding rows come last and are dropped
                    answers[i] = output
                bar.update(len(batch))
    bar.close()
    return answers


def gather_answers(answers: list, world: int) -> list:
    """Every rank filled its own rows (the others None): the complete list on every rank."""
    if world == 1:
        return answers
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, answers)
    return [next(part[i] for part in gathered if part[i] is not None) for i in range(len(answers))]
