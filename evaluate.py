"""Evaluate a Llama on the paper's benchmarks by log-likelihood, with published prompt conventions, fast.

  python evaluate.py --checkpoint DIR --tasks mmlu-medical,medqa --out base.json     # the paper's table
  python evaluate.py --checkpoint DIR --suite icl --tasks fiqa-sa,multifin --out icl.json  # k = 0, 1, 4, 8
  python evaluate.py --compare base.json cft.json                                    # side by side, with deltas
  torchrun --nproc_per_node 8 evaluate.py --checkpoint DIR ...                      # questions split across ranks

Tasks (data read from --data-dir, laid out as ../shared/data; see DATA_LAYOUT):
  mmlu-medical  six MMLU subjects, lm-evaluation-harness `mmlu` format, 5-shot from dev in file order
  medqa         USMLE 4-option test (1,273), lm-evaluation-harness `medqa_4options` format
  fiqa-sa       financial sentiment (Negative/Neutral/Positive), PIXIU/FLARE prompt
  causal20      FinCausal 2020 sentences, causal/noise, FLARE prompt
  multifin      MultiFin English headlines, 6 high-level topics, FLARE prompt

How a question is scored (the harness's `multiple_choice` convention): context = [BOS] + shared prefix (header + k
demonstrations, each followed by " " + its answer and a blank line) + the question ending in "Answer:". An option's
continuation (" A", " Positive") is tokenized as encode(context + continuation)[len(encode(context)):], and the
prediction is the option with the highest summed log-likelihood. BOS is always prepended, as Llama saw it in
training (when comparing with harness numbers: many harness versions add BOS only with add_bos_token=True).

Why it is fast, with the same numbers as one-question-at-a-time scoring (tests/test_evaluate.py checks this):
- The token prefix shared by a group of questions (an MMLU subject's header and 5 demonstrations, ~400-1,100 tokens)
  runs through the model once; its keys/values are passed to every batch as `prefix_kv` (batch 1, never copied).
- Questions whose options are single tokens (" A".." D") take ONE forward: the options are read at the last position.
- Rows are sorted by length and cut into batches of about --batch-tokens tokens; they are right-padded, so causal
  attention keeps every real token away from the padding (no padding mask) and positions need no correction.
- The vocabulary projection runs only at the positions that are scored; bf16 on GPU; torchrun splits the rows.
"""
import argparse
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cft import setup_distributed, shutdown_distributed
from data import Tokenizer, atomic_write, open_bytes, tokenize_texts
from model import KVCache, ModelConfig, PRESETS, apply_lora, create_model, load_pretrained, merge_lora

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"
TASKS = ("mmlu-medical", "medqa", "fiqa-sa", "causal20", "multifin")
DEFAULT_SHOTS = {"mmlu-medical": 5, "medqa": 0, "fiqa-sa": 5, "causal20": 5, "multifin": 5}
ICL_SHOTS = (0, 1, 4, 8)
ICL_TASKS = ("medqa", "fiqa-sa", "causal20", "multifin")  # MMLU's dev split has only 5 demonstrations per subject
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine")
LETTERS = "ABCD"
MIN_SHARED_PREFIX = 32  # shorter common prefixes (zero-shot MedQA: "[BOS] Question:") are simply recomputed
MEDQA_DEMO_POOL = 8  # without a MedQA train file, demonstrations come from these many held-out test questions

DATA_LAYOUT = """expected layout under --data-dir (as in ../shared/data):
  mmlu-medical/test/<subject>_test.csv, mmlu-medical/dev/<subject>_dev.csv  (no header: question,A,B,C,D,answer letter)
  medqa-usmle-4opt/phrases_no_exclude_test.jsonl  (keys question, options{A..D}, answer_idx); optional
      phrases_no_exclude_train.jsonl as the demonstration pool
  fiqa-sa/pixiu_test.jsonl, fiqa-sa/pixiu_train.jsonl.gz  (PIXIU: blocks of 10 prompt templates per item; keys id,
      conversations[human prompt, agent label])
  fincausal2020/fnp2020-fincausal-task1_trial_8628.csv (test), fincausal2020/fnp2020-fincausal2-task1_practice_13478.csv.gz
      (demonstrations)  (';'-separated, header 'Index; Text; Gold', Gold 0/1)
  multifin/en_test_highlevel_546.jsonl, multifin/only-english-highlevel_train.jsonl  (keys text, label)"""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading the data files: every error names the file, and the line for a malformed row.


def text_lines(path: Path):
    """The lines of a UTF-8 text file (gzipped if it ends in .gz); undecodable bytes name their line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file\n{DATA_LAYOUT}")
    with open_bytes(path) as f:
        line_no = 0
        try:
            for line_no, raw in enumerate(f, 1):
                yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {line_no}: not UTF-8 text ({e.reason})") from None
        except OSError as e:  # a corrupt .gz
            raise DataError(f"{path}, line {line_no + 1}: unreadable ({e})") from None


def read_csv(path: Path, n_fields: int, delimiter: str = ",", header: bool = False):
    """Yield (line number, fields) of a CSV file; a row with the wrong number of fields is an error."""
    reader = csv.reader(text_lines(path), delimiter=delimiter)
    try:
        for i, row in enumerate(reader):
            if i == 0 and header:
                continue
            if len(row) != n_fields:
                raise DataError(f"{path}, line {reader.line_num}: expected {n_fields} '{delimiter}'-separated "
                                f"fields, found {len(row)}")
            yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None


def read_jsonl(path: Path, keys: tuple):
    """Yield (line number, object) of a JSON-lines file whose objects must carry `keys`."""
    for line_no, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise DataError(f"{path}, line {line_no}: missing key '{missing[0]}'")
        yield line_no, obj


def bad_row(path, line_no, what):
    return DataError(f"{path}, line {line_no}: {what}")


# ----------------------------------------------------------------------------------------------------------------------
# Tasks: each data row becomes an Example (its prompt ending where the answer starts, the answer strings, the gold index)


@dataclass
class Example:
    text: str            # this example's prompt, ending where the answer starts ("...\nAnswer:")
    choices: tuple       # the answer strings, without the leading space: ("A", "B", "C", "D"), ("noise", "causal")
    gold: int            # index of the right answer in `choices`


@dataclass
class Question:
    group: str           # the questions of one group share `prefix` (an MMLU subject; otherwise the task)
    prefix: str          # header + demonstrations, identical for the whole group
    text: str            # the question's own prompt
    choices: tuple
    gold: int


def multiple_choice_text(question: str, options) -> str:
    # lm-evaluation-harness: "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:" (mmlu and medqa_4options)
    return question + "\n" + "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options)) + "Answer:"


def few_shot_prefix(header: str, demos) -> str:
    # The harness's few-shot context: description + each demonstration as text + " " + answer + "\n\n".
    return header + "".join(f"{d.text} {d.choices[d.gold]}\n\n" for d in demos)


def load_mmlu(path: Path) -> list[Example]:
    examples = []
    for line_no, (question, *options, answer) in read_csv(path, 6):
        if answer not in LETTERS:
            raise bad_row(path, line_no, f"answer {answer!r} is not one of A, B, C, D")
        # mmlu's doc_to_text strips the question but not the options.
        examples.append(Example(multiple_choice_text(question.strip(), options), tuple(LETTERS), LETTERS.index(answer)))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def load_medqa(path: Path) -> list[Example]:
    examples = []
    for line_no, row in read_jsonl(path, ("question", "options", "answer_idx")):
        options = row["options"]
        if not isinstance(options, dict) or sorted(options) != list(LETTERS) or row["answer_idx"] not in LETTERS:
            raise bad_row(path, line_no, "expected options with keys A, B, C, D and answer_idx one of them")
        text = multiple_choice_text("Question: " + row["question"], [options[letter] for letter in LETTERS])
        examples.append(Example(text, tuple(LETTERS), LETTERS.index(row["answer_idx"])))
    return examples


FIQA_LABELS = ("Negative", "Neutral", "Positive")


def load_fiqa(path: Path) -> list[Example]:
    """PIXIU's FiQA-SA files hold each item 10 times, once per prompt template; the first template of each block of
    10 is FLARE's evaluation prompt ("What is the sentiment of the following financial post/headline: ...")."""
    examples = []
    for i, (line_no, row) in enumerate(read_jsonl(path, ("conversations",))):
        if i % 10:
            continue
        try:
            prompt, label = row["conversations"][0]["value"], row["conversations"][1]["value"]
        except (IndexError, KeyError, TypeError):
            raise bad_row(path, line_no, "expected conversations [{value: prompt}, {value: label}]") from None
        if label not in FIQA_LABELS or not prompt.endswith("Answer:"):
            raise bad_row(path, line_no, f"expected a prompt ending in 'Answer:' and a label in {FIQA_LABELS}")
        examples.append(Example(prompt, FIQA_LABELS, FIQA_LABELS.index(label)))
    return examples


CAUSAL20_LABELS = ("noise", "causal")  # Gold 0 / 1
CAUSAL20_PROMPT = ("In this task, you are provided with sentences extracted from financial news and SEC data. Your goal "
                   "is to classify each sentence into either 'causal' or 'noise' based on whether or not it indicates "
                   "a causal relationship between financial events. Please return only the category 'causal' or "
                   "'noise'.\nText: {text}\nAnswer:")


def load_causal20(path: Path) -> list[Example]:
    examples = []
    for line_no, (_, text, gold) in read_csv(path, 3, delimiter=";", header=True):
        if gold.strip() not in ("0", "1"):
            raise bad_row(path, line_no, f"Gold {gold.strip()!r} is not 0 or 1")
        examples.append(Example(CAUSAL20_PROMPT.format(text=text.strip()), CAUSAL20_LABELS, int(gold)))
    return examples


MULTIFIN_LABELS = ("Business & Management", "Finance", "Government & Controls", "Industry", "Tax & Accounting",
                   "Technology")
MULTIFIN_PROMPT = ("In this task, you're working with English headlines from the MULTIFIN dataset. This dataset is made "
                   "up of real-world article headlines from a large accounting firm's websites. Your objective is to "
                   "categorize each headline according to its primary topic. The potential categories are 'Finance', "
                   "'Technology', 'Tax & Accounting', 'Business & Management', 'Government & Controls', and "
                   "'Industry'. Your response should only include the category that best fits the headline.\n"
                   "Text: {text}\nAnswer:")


def load_multifin(path: Path) -> list[Example]:
    examples = []
    for line_no, row in read_jsonl(path, ("text", "label")):
        if row["label"] not in MULTIFIN_LABELS:
            raise bad_row(path, line_no, f"label {row['label']!r} is not one of {MULTIFIN_LABELS}")
        examples.append(Example(MULTIFIN_PROMPT.format(text=row["text"].strip()), MULTIFIN_LABELS,
                                MULTIFIN_LABELS.index(row["label"])))
    return examples


# (test file, demonstration pool file, loader) of the classification tasks
CLASSIFICATION = {
    "fiqa-sa": ("fiqa-sa/pixiu_test.jsonl", "fiqa-sa/pixiu_train.jsonl.gz", load_fiqa),
    "causal20": ("fincausal2020/fnp2020-fincausal-task1_trial_8628.csv",
                 "fincausal2020/fnp2020-fincausal2-task1_practice_13478.csv.gz", load_causal20),
    "multifin": ("multifin/en_test_highlevel_546.jsonl", "multifin/only-english-highlevel_train.jsonl", load_multifin),
}


def sample_demos(pool: list[Example], k: int, seed: int) -> list[Example]:
    """The first k of one seeded shuffle of the pool, so the k=1 demonstrations are part of the k=4 ones, and so on."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if k > len(pool):
        raise DataError(f"{k} demonstrations asked for but the pool has {len(pool)}")
    return [pool[i] for i in order[:k]]


def build_task(task: str, data_dir, shots: int, seed: int = 1234, limit: int | None = None,
               same_questions_at_every_k: bool = False) -> list[Question]:
    """The questions of one task, each with its group's shared prefix. `limit`: first N questions per group.
    same_questions_at_every_k (the ICL suite): a demonstration pool carved out of the test set (MedQA here) is
    left out at k = 0 too, so that every k scores the same questions."""
    data_dir = Path(data_dir)
    if task == "mmlu-medical":
        questions = []
        for subject in MMLU_SUBJECTS:
            dev = load_mmlu(data_dir / "mmlu-medical" / "dev" / f"{subject}_dev.csv")
            test = load_mmlu(data_dir / "mmlu-medical" / "test" / f"{subject}_test.csv")
            if shots > len(dev):
                raise DataError(f"mmlu-medical: {shots} shots asked for but {subject}_dev.csv has {len(dev)} rows")
            header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            prefix = few_shot_prefix(header, dev[:shots])  # the harness's first_n sampler: dev in file order
            questions += [Question(subject, prefix, e.text, e.choices, e.gold) for e in test[:limit]]
        return questions
    if task == "medqa":
        folder = data_dir / "medqa-usmle-4opt"
        test = load_medqa(folder / "phrases_no_exclude_test.jsonl")
        demos = []
        if (folder / "phrases_no_exclude_train.jsonl").is_file():
            if shots:
                demos = sample_demos(load_medqa(folder / "phrases_no_exclude_train.jsonl"), shots, seed)
        elif shots or same_questions_at_every_k:
            # No train split staged: a fixed, seeded pool of test questions gives the demonstrations and is not scored.
            order = list(range(len(test)))
            random.Random(seed).shuffle(order)
            held_out = set(order[:MEDQA_DEMO_POOL])
            demos = sample_demos([test[i] for i in order[:MEDQA_DEMO_POOL]], shots, seed)
            test = [e for i, e in enumerate(test) if i not in held_out]
        prefix = few_shot_prefix("", demos)
        return [Question(task, prefix, e.text, e.choices, e.gold) for e in test[:limit]]
    if task in CLASSIFICATION:
        test_file, pool_file, load = CLASSIFICATION[task]
        test = load(data_dir / test_file)
        demos = []
        if shots:
            test_texts = {e.text for e in test}  # a demonstration must never be a test item (causal20 sets overlap)
            demos = sample_demos([e for e in load(data_dir / pool_file) if e.text not in test_texts], shots, seed)
        prefix = few_shot_prefix("", demos)
        return [Question(task, prefix, e.text, e.choices, e.gold) for e in test[:limit]]
    raise DataError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization: a question becomes its context tokens and one continuation per option


@dataclass
class Encoded:
    group: str
    context: list[int]        # [BOS] + prefix + question
    continuations: list       # token ids of each option's continuation (" A" -> [319] with Llama-2's tokenizer)
    gold: int


def encode_questions(tok: Tokenizer, questions: list[Question]) -> list[Encoded]:
    """Tokenize (in parallel worker processes for large tasks: data.tokenize_texts) every context, and every context
    followed by each option, as the harness does: an option's continuation is encode(context + " " + option) minus
    encode(context), because sentencepiece merges across the boundary differently from encoding " A" alone
    (["▁", "▁A"] instead of ["▁A"])."""
    contexts = [q.prefix + q.text for q in questions]
    extended = [c + " " + choice for c, q in zip(contexts, questions) for choice in q.choices]
    ids = [t.tolist() for t in tokenize_texts(contexts + extended, tok.path, progress=False)]
    encoded, rest = [], iter(ids[len(contexts):])
    for q, ctx in zip(questions, ids):
        continuations = []
        for choice in q.choices:
            whole = next(rest)
            if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
                raise ValueError(f"{q.group}: option {choice!r} does not tokenize as a continuation of its prompt")
            continuations.append(whole[len(ctx):])
        encoded.append(Encoded(q.group, [tok.bos_id] + ctx, continuations, q.gold))
    return encoded


def encode_question(tok: Tokenizer, q: Question) -> Encoded:
    return encode_questions(tok, [q])[0]


def single_token(q: Encoded) -> bool:
    return all(len(c) == 1 for c in q.continuations)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring. score_naive is the plain reference (and bench.py's baseline); score_fast must give the same numbers.


@torch.no_grad()
def score_naive(logits_fn, questions: list[Encoded], progress: bool = False) -> list[list[float]]:
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
    return scores


@dataclass
class Row:
    question: int     # index into the question list
    tokens: list      # this row's tokens after the group's shared prefix
    targets: list     # (option, first scored position in `tokens`, continuation token ids)


def question_rows(i: int, q: Encoded, skip: int) -> list[Row]:
    """The forward rows of question i, without its first `skip` tokens (the shared prefix)."""
    last = len(q.context) - 1 - skip  # the position whose logits predict the first continuation token
    if single_token(q):
        return [Row(i, q.context[skip:], [(c, last, cont) for c, cont in enumerate(q.continuations)])]
    return [Row(i, q.context[skip:] + cont[:-1], [(c, last, cont)]) for c, cont in enumerate(q.continuations)]


def shared_prefix_len(token_lists) -> int:
    """Length of the longest common token prefix, kept at least one token short of the shortest list so that every
    row still has the position that predicts its first continuation token."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - 1
    for tokens in token_lists[1:]:
        n = next((j for j in range(n) if tokens[j] != first[j]), n)
    return n


def length_batches(rows: list[Row], batch_tokens: int) -> list[list[Row]]:
    """Rows sorted longest first, cut so that rows x longest row <= batch_tokens (at least one row per batch)."""
    rows = sorted(rows, key=lambda r: -len(r.tokens))
    batches, current = [], []
    for row in rows:
        if current and (len(current) + 1) * len(current[0].tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


def lm_logits(model, hidden):
    return F.linear(hidden, model.embed_tokens.weight) if model.lm_head is None else model.lm_head(hidden)


@torch.no_grad()
def prefix_cache(model, tokens: list[int], soft_prompt=None):
    """prefix_kv (batch 1) of the shared tokens, after the soft prompt if any (see load_soft_prompt)."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    embeds = model.embed_tokens(torch.tensor([tokens], dtype=torch.long, device=device))
    if soft_prompt is not None:
        embeds = torch.cat([soft_prompt[None].to(device, dtype), embeds], dim=1)
    cache = KVCache(model.cfg, 1, embeds.shape[1], device, dtype)
    model.hidden_states(embeds=embeds, cache=cache)
    return cache.prefix()


@torch.no_grad()
def score_fast(model, questions: list[Encoded], batch_tokens: int = 8192, soft_prompt=None, rank: int = 0,
               world: int = 1, desc: str = "scoring", progress: bool = True,
               per_row_prefix: bool = True) -> list[list[float]]:
    """Log-likelihood of every option of every question: the same numbers as score_naive. With world > 1 this rank
    scores every world-th row (longest first) and leaves the others at 0: combine with sum_over_ranks.
    per_row_prefix: hand the prefix to the model expanded to the batch (a view) instead of as batch 1. On CUDA, batch 1
    takes FlexAttention's folded path (prefix stored once); per row takes the plain block mask, and attention copies
    the prefix per row. bench.py eval times both: on one H100 (llama2-7b shapes) per row was as fast once compiled and
    compiled 2.5x sooner (MMLU + MedQA first pass 42 s against 118 s; BENCHMARKS.md), so it is the default here,
    where no gradient needs the memory saving."""
    device = model.embed_tokens.weight.device
    scores = [[0.0] * len(q.continuations) for q in questions]
    groups = {}
    for i, q in enumerate(questions):
        groups.setdefault(q.group, []).append(i)
    # Rows and prefix lengths are fixed before splitting, so that every world size computes the same thing.
    plan = []
    for members in groups.values():
        skip = shared_prefix_len([questions[i].context for i in members])
        if skip < MIN_SHARED_PREFIX:
            skip = 0  # recomputing a few tokens is cheaper than leaving SDPA's plain causal kernel (flash)
        rows = [row for i in members for row in question_rows(i, questions[i], skip)]
        longest = skip + max(len(r.tokens) for r in rows) + (0 if soft_prompt is None else len(soft_prompt))
        if longest > model.cfg.max_seq_len and rank == 0:  # as model.generate: rotary positions go on, quality may not
            print(f"warning: {questions[members[0]].group}: prompts of up to {longest} tokens, past the model's "
                  f"max_seq_len {model.cfg.max_seq_len} (fewer --shots would fit)", file=sys.stderr)
        rows = sorted(rows, key=lambda r: -len(r.tokens))[rank::world]
        plan.append((questions[members[0]].context[:skip], length_batches(rows, batch_tokens)))
    bar = tqdm(total=sum(len(b) for _, b in plan), desc=desc, disable=not progress or rank != 0)
    for prefix_tokens, batches in plan:
        prefix_kv = None if not prefix_tokens and soft_prompt is None else prefix_cache(model, prefix_tokens, soft_prompt)
        for batch in batches:
            # Right padding: causal attention already hides the padding from every real token.
            T = len(batch[0].tokens)
            tokens = torch.zeros(len(batch), T, dtype=torch.long)
            for b, row in enumerate(batch):
                tokens[b, :len(row.tokens)] = torch.tensor(row.tokens)
            kv = prefix_kv
            if per_row_prefix and kv is not None:
                kv = [(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1)) for k, v in kv]
            hidden = model.hidden_states(tokens.to(device), prefix_kv=kv)
            where = [(b, c, pos + j, t) for b, row in enumerate(batch) for c, pos, cont in row.targets
                     for j, t in enumerate(cont)]
            b_idx, _, pos_idx, target = (torch.tensor(x, device=device) for x in zip(*where))
            logprobs = lm_logits(model, hidden[b_idx, pos_idx]).float().log_softmax(-1)
            picked = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
            for (b, c, _, _), value in zip(where, picked):
                scores[batch[b].question][c] += value
            bar.update()
        del prefix_kv
    bar.close()
    return scores


def sum_over_ranks(scores, world: int):
    """Every (question, option) score was computed by exactly one rank (the others hold 0): sum the ranks' lists."""
    if world == 1:
        return scores
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, scores)
    return [[sum(s[i][c] for s in gathered) for c in range(len(row))] for i, row in enumerate(scores)]


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (scikit-learn's definitions, hand-written; tests check them on worked examples)


def predict(scores) -> list[int]:
    return [max(range(len(s)), key=s.__getitem__) for s in scores]  # ties: the first option, as numpy's argmax


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


def task_result(task: str, questions: list[Encoded], scores, shots: int) -> dict:
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


def fmt(value, sign="") -> str:
    return "-" if value is None else f"{value:{sign}.1f}"


def markdown_table(results: list[dict]) -> str:
    """The paper's layout: one row per model/method, one column per task, then the average (scores in %)."""
    rows = [(r.get("name", "model"), table_columns(r)) for r in results]
    header = [c for c in dict.fromkeys(c for _, cols in rows for c in cols) if c != "Average"] + ["Average"]
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(cols.get(c)) for c in header) + " |" for name, cols in rows]
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
        lines.append(f"| {task} | " + " | ".join([fmt(v) for v in values] + [fmt(d, "+") for d in diffs]) + " |")
    return "\n".join(lines)


def compare(paths) -> str:
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


def build_model(args, device, dtype):
    if args.checkpoint:
        model = load_pretrained(args.checkpoint, device, dtype)
    else:
        model = create_model(ModelConfig.from_name(args.model), device, dtype, seed=args.seed)
    if args.lora:
        load_lora(model, args.lora)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def run_suite(args, model, tok, rank, world) -> dict:
    """{"tasks": {name: result}}; the ICL suite names its entries "<task> k=<k>"."""
    soft = load_soft_prompt(args.soft_prompt, model.cfg.dim) if args.soft_prompt else None
    if args.suite == "icl":
        runs = [(task, k, f"{task} k={k}") for task in args.tasks for k in ICL_SHOTS]
    else:
        runs = [(task, DEFAULT_SHOTS[task] if args.shots is None else args.shots, task) for task in args.tasks]
    results = {}
    for task, shots, name in runs:
        start = time.time()
        questions = encode_questions(tok, build_task(task, args.data_dir, shots, args.seed, args.limit,
                                                     same_questions_at_every_k=args.suite == "icl"))
        if not questions:
            raise DataError(f"{task}: the test file has no questions (see --data-dir)")
        scores = sum_over_ranks(score_fast(model, questions, args.batch_tokens, soft, rank, world, desc=name), world)
        results[name] = task_result(task, questions, scores, shots) | {"seconds": round(time.time() - start, 2)}
        if rank == 0:
            r = results[name]
            extra = f", weighted F1 {r['weighted_f1']:.4f}, macro F1 {r['macro_f1']:.4f}" if "macro_f1" in r else ""
            print(f"{name}: accuracy {r['accuracy']:.4f} (n={r['n']}, {shots}-shot){extra}", file=sys.stderr)
    return {"tasks": results}


def default_name(args) -> str:
    """The table label: the checkpoint folder (its parent for cft.py's <out>/final), else the preset."""
    if not args.checkpoint:
        return args.model
    path = Path(args.checkpoint).resolve()
    return path.parent.name if path.name == "final" else path.name


def default_tokenizer(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.checkpoint and (Path(args.checkpoint) / "tokenizer.model").is_file():
        return str(Path(args.checkpoint) / "tokenizer.model")
    return str(Path(args.data_dir) / "llama2-tokenizer" / "tokenizer.model")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=DATA_LAYOUT)
    p.add_argument("--checkpoint", help="Hugging Face Llama folder (config.json + safetensors); "
                                        "without it, a random --model preset (smoke tests)")
    p.add_argument("--model", default="tiny", help=f"preset when no --checkpoint: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: the checkpoint's, else "
                                       "<data-dir>/llama2-tokenizer/tokenizer.model)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="data folder (default ../shared/data)")
    p.add_argument("--tasks", help="comma-separated, from: " + ", ".join(TASKS) + " (default: all; the icl suite: "
                                   + ", ".join(ICL_TASKS) + ")")
    p.add_argument("--suite", default="main", choices=["main", "icl"],
                   help="main: each task at its default shots (mmlu-medical 5, medqa 0, classification 5); "
                        f"icl: in-context-learning retention, each task at k = {', '.join(map(str, ICL_SHOTS))}")
    p.add_argument("--shots", type=int, help="demonstrations per prompt for every task (main suite)")
    p.add_argument("--seed", type=int, default=1234, help="demonstration sampling (and random --model weights)")
    p.add_argument("--limit", type=int, help="score only the first N questions of each task (of each MMLU subject)")
    p.add_argument("--lora", help="LoRA adapter .safetensors to apply (merged) on top of the model")
    p.add_argument("--soft-prompt", help="soft prompt .safetensors (tensor 'soft_prompt', (n, dim)) placed before BOS, "
                                         "as cft.py's ProMoT trains it (it writes <out>/final/soft_prompt.safetensors)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per batch (default 16384 on GPU, 2048 on CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--name", help="row label in tables (default: the checkpoint folder name or the preset)")
    p.add_argument("--out", help="write the results JSON here (refuses to overwrite an existing file)")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="print the side-by-side table of result files, "
                                                                "with deltas against the first, and exit")
    args = p.parse_args(argv)
    env, finished = None, False
    try:
        if args.compare:
            print(compare(args.compare))
            return
        args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else \
            list(ICL_TASKS if args.suite == "icl" else TASKS)
        unknown = [t for t in args.tasks if t not in TASKS]
        if unknown:
            raise DataError(f"--tasks: unknown task '{unknown[0]}'; choose from {', '.join(TASKS)}")
        for flag, value, least in (("--limit", args.limit, 1), ("--shots", args.shots, 0),
                                   ("--batch-tokens", args.batch_tokens, 1)):
            if value is not None and value < least:
                raise DataError(f"{flag} {value}: expected an integer >= {least}")
        if args.out and Path(args.out).exists():
            raise DataError(f"--out {args.out} exists; refusing to overwrite it")
        env = setup_distributed(None)  # each rank holds the whole model and scores its share of the rows
        rank, world, device = env.rank, env.world, str(env.device)
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
        args.batch_tokens = args.batch_tokens or (16384 if device.startswith("cuda") else 2048)
        tok = Tokenizer(default_tokenizer(args))
        model = build_model(args, device, dtype)
        tok.check_vocab(model.cfg.vocab_size)
        start = time.time()
        result = {"name": args.name or default_name(args),
                  "checkpoint": args.checkpoint, "lora": args.lora, "soft_prompt": args.soft_prompt,
                  "suite": args.suite, "seed": args.seed, "limit": args.limit, "dtype": str(dtype), "world": world}
        result |= run_suite(args, model, tok, rank, world)
        result["seconds"] = round(time.time() - start, 2)
        if rank == 0:
            print(markdown_table([result]))
            if args.out:  # written whole and renamed into place: never a half-written result file
                atomic_write(Path(args.out), lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
                print(f"wrote {args.out}", file=sys.stderr)
        finished = True
    except (DataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        if env is not None:
            shutdown_distributed(env, finished)


if __name__ == "__main__":
    main()
