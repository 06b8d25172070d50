"""The benchmark data sets and k-shot task construction: each data file becomes BenchmarkItems (a prompt ending where
the answer starts, the answer strings, the gold index), and a task becomes Questions that share a few-shot prefix.

Tasks (read from a data folder laid out as ../shared/data; see DATA_LAYOUT), each with its published prompt:
  mmlu-medical  six MMLU subjects, lm-evaluation-harness `mmlu` format, k-shot from dev in file order
  medqa         USMLE 4-option test (1,273), lm-evaluation-harness `medqa_4options` format
  fiqa-sa       financial sentiment (Negative/Neutral/Positive), PIXIU/FLARE prompt
  causal20      FinCausal 2020 sentences, causal/noise, FLARE prompt
  multifin      MultiFin English headlines, 6 high-level topics, FLARE prompt

A --limit subset (select_questions) is the first N of each group or, as evaluate.py asks, a seeded random sample of
each group, class-stratified for the classification tasks, the same at every k. Each Question keeps its doc_id (its
index in the test file) for per-question result files.

Every error for a missing or malformed file is a DataError naming the file, and the line as `path:line: message`.
"""
import csv
import random
from dataclasses import dataclass
from pathlib import Path

from data import open_bytes, read_jsonl, require_field

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"
TASKS = ("mmlu-medical", "medqa", "fiqa-sa", "causal20", "multifin")
DEFAULT_SHOTS = {"mmlu-medical": 5, "medqa": 0, "fiqa-sa": 5, "causal20": 5, "multifin": 5}
ICL_SHOTS = (0, 1, 4, 8)
ICL_TASKS = ("medqa", "fiqa-sa", "causal20", "multifin")  # MMLU's dev split has only 5 demonstrations per subject
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine")
LETTERS = "ABCD"
MEDQA_DEMO_POOL = 8  # without a MedQA train file, demonstrations come from these many held-out test questions

DATA_LAYOUT = """expected layout under --data-dir (as in ../shared/data):
  mmlu-medical/test/<subject>_test.csv, mmlu-medical/dev/<subject>_dev.csv  (no header: question,A,B,C,D,answer letter)
  medqa-usmle-4opt/phrases_no_exclude_test.jsonl  (keys question, options{A..D}, answer_idx); optional
      phrases_no_exclude_train.jsonl as the demonstration pool
  fiqa-sa/pixiu_test.jsonl, fiqa-sa/pixiu_train.jsonl.gz  (PIXIU: blocks of 10 prompt templates per item; keys id,
      conversations[human prompt, agent label])
  fincausal2020/fnp2020-fincausal-task1_trial_8628.csv (test),
      fincausal2020/fnp2020-fincausal2-task1_practice_13478.csv.gz (demonstrations)  (';'-separated,
      header 'Index; Text; Gold', Gold 0/1)
  multifin/en_test_highlevel_546.jsonl, multifin/only-english-highlevel_train.jsonl  (keys text, label)"""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading the data files: every error names the file, and `path:line` for a malformed row.


def require_data_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file\n{DATA_LAYOUT}")


def text_lines(path: Path):
    """The lines of a UTF-8 text file (gzipped if it ends in .gz); undecodable bytes name their line."""
    require_data_file(path)
    with open_bytes(path) as f:
        line_no = 0
        try:
            for line_no, raw in enumerate(f, 1):
                yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
        except OSError as e:  # a corrupt .gz
            raise DataError(f"{path}:{line_no + 1}: unreadable ({e})") from None


def read_csv(path: Path, n_fields: int, delimiter: str = ",", header: bool = False):
    """Yield ("path:line", fields) of a CSV file; a row with the wrong number of fields is an error."""
    reader = csv.reader(text_lines(path), delimiter=delimiter)
    try:
        for i, row in enumerate(reader):
            if i == 0 and header:
                continue
            if len(row) != n_fields:
                raise DataError(f"{path}:{reader.line_num}: expected {n_fields} '{delimiter}'-separated "
                                f"fields, found {len(row)}")
            yield f"{path}:{reader.line_num}", row
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def jsonl_rows(path: Path, fields: dict):
    """Yield ("path:line", object) of a JSON-lines file (data.read_jsonl) whose objects must carry `fields`
    ({name: type}, checked by data.require_field); its errors become DataErrors."""
    require_data_file(path)
    try:
        for line_no, obj in read_jsonl(path):
            where = f"{path}:{line_no}"
            for name, kind in fields.items():
                require_field(obj, name, where, kind)
            yield where, obj
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e)) from None


def bad_row(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}")


# ----------------------------------------------------------------------------------------------------------------------
# Data sets: each data row becomes a BenchmarkItem


@dataclass
class BenchmarkItem:
    text: str            # this item's prompt, ending where the answer starts ("...\nAnswer:")
    choices: tuple       # the answer strings, without the leading space: ("A", "B", "C", "D"), ("noise", "causal")
    gold: int            # index of the right answer in `choices`


@dataclass
class Question:
    group: str           # the questions of one group share `prefix` (an MMLU subject; otherwise the task)
    prefix: str          # header + demonstrations, identical for the whole group
    text: str            # the question's own prompt
    choices: tuple
    gold: int
    doc_id: int = 0      # the item's index in its test file (an MMLU subject's file), as the harness's doc_id


def multiple_choice_text(question: str, options) -> str:
    # lm-evaluation-harness: "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:" (mmlu and medqa_4options)
    return question + "\n" + "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options)) + "Answer:"


def few_shot_prefix(header: str, demos) -> str:
    # The harness's few-shot context: description + each demonstration as text + " " + answer + "\n\n".
    return header + "".join(f"{d.text} {d.choices[d.gold]}\n\n" for d in demos)


def load_mmlu(path: Path) -> list[BenchmarkItem]:
    items = []
    for where, (question, *options, answer) in read_csv(path, 6):
        if answer not in LETTERS:
            raise bad_row(where, f"answer {answer!r} is not one of A, B, C, D")
        # mmlu's doc_to_text strips the question but not the options.
        items.append(BenchmarkItem(multiple_choice_text(question.strip(), options), tuple(LETTERS),
                                   LETTERS.index(answer)))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def load_medqa(path: Path) -> list[BenchmarkItem]:
    items = []
    for where, row in jsonl_rows(path, {"question": str, "options": dict, "answer_idx": str}):
        options = row["options"]
        if sorted(options) != list(LETTERS) or row["answer_idx"] not in LETTERS:
            raise bad_row(where, "expected options with keys A, B, C, D and answer_idx one of them")
        text = multiple_choice_text("Question: " + row["question"], [options[letter] for letter in LETTERS])
        items.append(BenchmarkItem(text, tuple(LETTERS), LETTERS.index(row["answer_idx"])))
    return items


FIQA_LABELS = ("Negative", "Neutral", "Positive")


def load_fiqa(path: Path) -> list[BenchmarkItem]:
    """PIXIU's FiQA-SA files hold each item 10 times, once per prompt template; the first template of each block of
    10 is FLARE's evaluation prompt ("What is the sentiment of the following financial post/headline: ...")."""
    items = []
    for i, (where, row) in enumerate(jsonl_rows(path, {"conversations": list})):
        if i % 10:
            continue
        try:
            prompt, label = row["conversations"][0]["value"], row["conversations"][1]["value"]
        except (IndexError, KeyError, TypeError):
            raise bad_row(where, "expected conversations [{value: prompt}, {value: label}]") from None
        if label not in FIQA_LABELS or not isinstance(prompt, str) or not prompt.endswith("Answer:"):
            raise bad_row(where, f"expected a prompt ending in 'Answer:' and a label in {FIQA_LABELS}")
        items.append(BenchmarkItem(prompt, FIQA_LABELS, FIQA_LABELS.index(label)))
    return items


CAUSAL20_LABELS = ("noise", "causal")  # Gold 0 / 1
CAUSAL20_PROMPT = ("In this task, you are provided with sentences extracted from financial news and SEC data. "
                   "Your goal is to classify each sentence into either 'causal' or 'noise' based on whether or not "
                   "it indicates a causal relationship between financial events. Please return only the category "
                   "'causal' or 'noise'.\nText: {text}\nAnswer:")


def load_causal20(path: Path) -> list[BenchmarkItem]:
    items = []
    for where, (_, text, gold) in read_csv(path, 3, delimiter=";", header=True):
        if gold.strip() not in ("0", "1"):
            raise bad_row(where, f"Gold {gold.strip()!r} is not 0 or 1")
        items.append(BenchmarkItem(CAUSAL20_PROMPT.format(text=text.strip()), CAUSAL20_LABELS, int(gold)))
    return items


MULTIFIN_LABELS = ("Business & Management", "Finance", "Government & Controls", "Industry", "Tax & Accounting",
                   "Technology")
MULTIFIN_PROMPT = ("In this task, you're working with English headlines from the MULTIFIN dataset. "
                   "This dataset is made up of real-world article headlines from a large accounting firm's websites. "
                   "Your objective is to categorize each headline according to its primary topic. The potential "
                   "categories are 'Finance', 'Technology', 'Tax & Accounting', 'Business & Management', "
                   "'Government & Controls', and 'Industry'. Your response should only include the category that "
                   "best fits the headline.\nText: {text}\nAnswer:")


def load_multifin(path: Path) -> list[BenchmarkItem]:
    items = []
    for where, row in jsonl_rows(path, {"text": str, "label": str}):
        if row["label"] not in MULTIFIN_LABELS:
            raise bad_row(where, f"label {row['label']!r} is not one of {MULTIFIN_LABELS}")
        items.append(BenchmarkItem(MULTIFIN_PROMPT.format(text=row["text"].strip()), MULTIFIN_LABELS,
                                   MULTIFIN_LABELS.index(row["label"])))
    return items


# (test file, demonstration pool file, loader) of the classification tasks
CLASSIFICATION = {
    "fiqa-sa": ("fiqa-sa/pixiu_test.jsonl", "fiqa-sa/pixiu_train.jsonl.gz", load_fiqa),
    "causal20": ("fincausal2020/fnp2020-fincausal-task1_trial_8628.csv",
                 "fincausal2020/fnp2020-fincausal2-task1_practice_13478.csv.gz", load_causal20),
    "multifin": ("multifin/en_test_highlevel_546.jsonl", "multifin/only-english-highlevel_train.jsonl", load_multifin),
}


# ----------------------------------------------------------------------------------------------------------------------
# What each task is, for result files: the prompt template, the label set, the names other harnesses give it.

PROMPT_TEMPLATES = {
    "mmlu-medical": "lm-evaluation-harness mmlu: description 'The following are multiple choice questions (with "
                    "answers) about {subject}.\\n\\n' + k dev demonstrations in file order, each '{question}\\nA. "
                    "{A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}\\n\\n', then the question ending in 'Answer:'",
    "medqa": "lm-evaluation-harness medqa_4options: 'Question: {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n"
             "Answer:'; k seeded demonstrations '{prompt} {letter}\\n\\n' from the train split, else from "
             f"{MEDQA_DEMO_POOL} seeded test questions that are then not scored",
    "fiqa-sa": "PIXIU/FLARE flare_fiqasa: the first of the 10 templates of each item ('What is the sentiment of the "
               "following financial {category}: Positive, Negative, or Neutral?\\nText: {text}\\nAnswer:'); k "
               "seeded train demonstrations '{prompt} {label}\\n\\n'",
    "causal20": "FLARE flare_causal20_sc: '" + CAUSAL20_PROMPT.replace("\n", "\\n") + "'; k seeded practice-set "
                "demonstrations '{prompt} {label}\\n\\n'",
    "multifin": "FLARE flare_multifin_en: '" + MULTIFIN_PROMPT.replace("\n", "\\n") + "'; k seeded train "
                "demonstrations '{prompt} {label}\\n\\n'",
}
# The name of each task in lm-evaluation-harness (MMLU: one task per subject) or FinBen, for diffing result files.
HARNESS_NAMES = {"mmlu-medical": "mmlu_{subject}", "medqa": "medqa_4options", "fiqa-sa": "flare_fiqasa",
                 "causal20": "flare_causal20_sc", "multifin": "flare_multifin_en"}
TEST_FILES = {"mmlu-medical": "mmlu-medical/test/{subject}_test.csv",
              "medqa": "medqa-usmle-4opt/phrases_no_exclude_test.jsonl"} | {t: f for t, (f, _, _) in CLASSIFICATION.items()}
LIMIT_MODES = ("random", "first")


def task_labels(task: str) -> tuple:
    """The answer strings of a task, in the order FinBen's label matching tries them."""
    if task in CLASSIFICATION:
        return {"fiqa-sa": FIQA_LABELS, "causal20": CAUSAL20_LABELS, "multifin": MULTIFIN_LABELS}[task]
    return tuple(LETTERS)


# ----------------------------------------------------------------------------------------------------------------------
# Subsets (--limit): a seeded random subset by default, class-stratified for classification; or the first N


def stratified_quota(counts: dict, limit: int) -> dict:
    """How many of each class a subset of `limit` takes: proportional to the class sizes, rounded by the largest
    remainder (ties: the class listed first), so the subset's class shares follow the test set's."""
    total = sum(counts.values())
    exact = {c: limit * n / total for c, n in counts.items()}
    quota = {c: int(x) for c, x in exact.items()}
    for c in sorted(counts, key=lambda c: -(exact[c] - quota[c]))[:limit - sum(quota.values())]:
        quota[c] += 1
    return quota


def subset_indices(golds: list[int], limit: int | None, seed, mode: str = "first",
                   stratified: bool = False) -> list[int]:
    """Indices (in file order) of the items --limit keeps. mode "first": the first `limit`; "random": a sample drawn
    with random.Random(seed), per class by stratified_quota when `stratified`."""
    if mode not in LIMIT_MODES:
        raise DataError(f"--limit-mode {mode!r}: expected one of {', '.join(LIMIT_MODES)}")
    if limit is None or limit >= len(golds):
        return list(range(len(golds)))
    if mode == "first":
        return list(range(limit))
    rng = random.Random(seed)
    if not stratified:
        return sorted(rng.sample(range(len(golds)), limit))
    by_class = {}
    for i, gold in enumerate(golds):
        by_class.setdefault(gold, []).append(i)
    quota = stratified_quota({c: len(members) for c, members in sorted(by_class.items())}, limit)
    return sorted(i for c, members in sorted(by_class.items()) for i in rng.sample(members, quota[c]))


def select_questions(questions: list[Question], limit: int | None, seed: int, mode: str = "first") -> list[Question]:
    """--limit applied per group (an MMLU subject; otherwise the task): subset_indices with a seed per group, class-
    stratified for the classification tasks. It depends on the seed and the test set only, so every k keeps the same
    questions."""
    groups = {}
    for q in questions:
        groups.setdefault(q.group, []).append(q)
    chosen = []
    for group, members in groups.items():
        seed_of_group = seed if len(groups) == 1 else f"{seed}:{group}"
        keep = subset_indices([q.gold for q in members], limit, seed_of_group, mode, stratified=group in CLASSIFICATION)
        chosen += [members[i] for i in keep]
    return chosen


def describe_subset(task: str, limit: int | None, mode: str) -> str:
    """How --limit chose a task's questions, in words (printed and stored in the result file); None: all of them."""
    if limit is None:
        return "all"
    per = " per subject" if task == "mmlu-medical" else ""
    if mode == "first":
        return f"the first {limit}{per} (--limit-mode first)"
    kind = "class-stratified, seeded" if task in CLASSIFICATION else "seeded"
    return f"{limit}{per} drawn at random ({kind}; --limit-mode first for the first {limit})"


# ----------------------------------------------------------------------------------------------------------------------
# k-shot tasks: the test items of a task as Questions, each group's demonstrations in its shared prefix


def sample_demos(pool: list[BenchmarkItem], k: int, seed: int) -> list[BenchmarkItem]:
    """The first k of one seeded shuffle of the pool, so the k=1 demonstrations are part of the k=4 ones, and so on."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    if k > len(pool):
        raise DataError(f"{k} demonstrations asked for but the pool has {len(pool)}")
    return [pool[i] for i in order[:k]]


def mmlu_questions(data_dir: Path, shots: int) -> list[Question]:
    questions = []
    for subject in MMLU_SUBJECTS:
        dev = load_mmlu(data_dir / "mmlu-medical" / "dev" / f"{subject}_dev.csv")
        test = load_mmlu(data_dir / "mmlu-medical" / "test" / f"{subject}_test.csv")
        if shots > len(dev):
            raise DataError(f"mmlu-medical: {shots} shots asked for but {subject}_dev.csv has {len(dev)} rows")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = few_shot_prefix(header, dev[:shots])  # the harness's first_n sampler: dev in file order
        questions += [Question(subject, prefix, e.text, e.choices, e.gold, i) for i, e in enumerate(test)]
    return questions


def medqa_questions(data_dir: Path, shots: int, seed: int, same_questions_at_every_k: bool) -> list[Question]:
    folder = data_dir / "medqa-usmle-4opt"
    test = list(enumerate(load_medqa(folder / "phrases_no_exclude_test.jsonl")))  # (doc_id, item)
    demos = []
    if (folder / "phrases_no_exclude_train.jsonl").is_file():
        if shots:
            demos = sample_demos(load_medqa(folder / "phrases_no_exclude_train.jsonl"), shots, seed)
    elif shots or same_questions_at_every_k:
        # No train split staged: a fixed, seeded pool of test questions gives the demonstrations and is not scored.
        order = list(range(len(test)))
        random.Random(seed).shuffle(order)
        held_out = set(order[:MEDQA_DEMO_POOL])
        demos = sample_demos([test[i][1] for i in order[:MEDQA_DEMO_POOL]], shots, seed)
        test = [pair for i, pair in enumerate(test) if i not in held_out]
    prefix = few_shot_prefix("", demos)
    return [Question("medqa", prefix, e.text, e.choices, e.gold, doc_id) for doc_id, e in test]


def classification_questions(task: str, data_dir: Path, shots: int, seed: int) -> list[Question]:
    test_file, pool_file, load = CLASSIFICATION[task]
    test = load(data_dir / test_file)
    demos = []
    if shots:
        test_texts = {e.text for e in test}  # a demonstration must never be a test item (causal20 sets overlap)
        demos = sample_demos([e for e in load(data_dir / pool_file) if e.text not in test_texts], shots, seed)
    prefix = few_shot_prefix("", demos)
    return [Question(task, prefix, e.text, e.choices, e.gold, i) for i, e in enumerate(test)]


def build_questions(task: str, data_dir, shots: int, seed: int = 1234, limit: int | None = None,
                    same_questions_at_every_k: bool = False, limit_mode: str = "first") -> list[Question]:
    """The questions of one task, each with its group's shared prefix, in test-file order; `limit`: select_questions
    (N per group: the first N, or a seeded random sample with limit_mode "random").
    same_questions_at_every_k (the ICL suites): a demonstration pool carved out of the test set (MedQA here) is
    left out at k = 0 too, so that every k scores the same questions."""
    data_dir = Path(data_dir)
    if task == "mmlu-medical":
        questions = mmlu_questions(data_dir, shots)
    elif task == "medqa":
        questions = medqa_questions(data_dir, shots, seed, same_questions_at_every_k)
    elif task in CLASSIFICATION:
        questions = classification_questions(task, data_dir, shots, seed)
    else:
        raise DataError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    return select_questions(questions, limit, seed, limit_mode)
