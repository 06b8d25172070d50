"""evaluate.py's result files and tables: the lm-evaluation-harness-shaped JSON, per-question samples files, the
paper's per-domain tables with standard errors, `--compare` (markdown and CSV), and the claim on --out.

Result JSON (RESULT_KEYS; tests validate a real run against them): lm-evaluation-harness's top level -- `results`
{run: {"<metric>,none": value, "<metric>_stderr,none": stderr or "N/A", "alias"}}, `groups` (mmlu-medical over its
subjects), `configs` {run: prompt template, labels, shots, scoring, generation settings, metrics}, `versions`,
`n-shot`, `n-samples` {run: {"original", "effective"}}, `higher_is_better`, `config` (CONFIG_KEYS: checkpoint,
tokenizer, precision, batch settings, seed, data folder, git commit, date, ...), `git_hash`, `date` -- plus `name`
and `tasks`, the project's short summary {run: accuracy / weighted_f1 / ... with *_stderr, n, shots, predictions},
which the tables and --compare read. Metric names follow the harness and FinBen: acc, f1 (weighted), macro_f1,
missing (FinBen: no label in the output), exact_match, leak_rate.
"""
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from atomic import atomic_folder, write_text
from benchmark_data import HARNESS_NAMES, DataError
from metrics import combined_stderr

RESULT_KEYS = ("results", "groups", "configs", "versions", "n-shot", "n-samples", "higher_is_better", "config",
               "git_hash", "date", "name", "tasks")
CONFIG_KEYS = ("checkpoint", "model", "random_init", "adapter", "soft_prompt", "tokenizer", "precision", "device",
               "world", "batch_tokens", "max_gen_toks", "seed", "data_dir", "suite", "scoring", "limit", "limit_mode",
               "bootstrap_iters", "git_commit", "date")
# summary key -> (harness/FinBen metric name, higher is better)
METRICS = {"accuracy": ("acc", True), "weighted_f1": ("f1", True), "macro_f1": ("macro_f1", True),
           "missing": ("missing", False), "exact_match": ("exact_match", True), "leak_rate": ("leak_rate", False)}
SHORT_NAMES = {"anatomy": "Anatomy", "clinical_knowledge": "Clinical Knowledge", "college_biology": "College Bio",
               "college_medicine": "College Med", "medical_genetics": "Medical Genetics",
               "professional_medicine": "Prof. Medicine", "medqa": "MedQA", "fiqa-sa": "FiQA-SA",
               "causal20": "Causal20", "multifin": "MultiFin"}
METRIC_MARKS = {"weighted_f1": " (wF1)", "exact_match": " (EM)", "accuracy": "", "leak_rate": " leak"}
DOMAINS = {"mmlu-medical": "Medical", "medqa": "Medical", "fiqa-sa": "Finance", "causal20": "Finance",
           "multifin": "Finance"}


def git_commit() -> str | None:
    """This checkout's commit, with "-dirty" when tracked files differ from it (None outside git)."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# ----------------------------------------------------------------------------------------------------------------------
# The lm-evaluation-harness-shaped result file


def harness_metrics(summary: dict) -> dict:
    """{"acc,none": ..., "acc_stderr,none": ...} of one summary entry (no standard error: "N/A", as the harness)."""
    out = {}
    for key, (name, _) in METRICS.items():
        if key in summary:
            stderr = summary.get(f"{key}_stderr")
            out[f"{name},none"] = summary[key]
            out[f"{name}_stderr,none"] = "N/A" if stderr is None else stderr
    return out


def run_task(name: str) -> tuple[str, str]:
    """("fiqa-sa", " k=4") of a run name ("fiqa-sa k=4"); ("medqa", "") of a plain one."""
    task, _, k = name.partition(" ")
    return task, f" {k}" if k else ""


def harness_results(tasks: dict) -> tuple[dict, dict]:
    """(results, groups): every run, and every MMLU subject as its own harness task under the mmlu-medical group."""
    results, groups = {}, {}
    for name, summary in tasks.items():
        task, suffix = run_task(name)
        alias = HARNESS_NAMES.get(task, task) if task != "mmlu-medical" else "mmlu (medical subjects)"
        entry = {"alias": alias + suffix} | harness_metrics(summary)
        if task == "mmlu-medical":
            groups[name] = entry
            for subject, s in summary.get("subjects", {}).items():
                results[HARNESS_NAMES[task].format(subject=subject) + suffix] = \
                    {"alias": f" - {subject}"} | harness_metrics(s)
        results[name] = entry
    return results, groups


def result_document(name: str, tasks: dict, configs: dict, config: dict, original_sizes: dict) -> dict:
    """The whole result file of one model (see the module doc)."""
    results, groups = harness_results(tasks)
    metric_names = lambda s: {METRICS[k][0]: METRICS[k][1] for k in METRICS if k in s}
    return {"results": results, "groups": groups, "configs": configs,
            "versions": {run: 1.0 for run in tasks},
            "n-shot": {run: s["shots"] for run, s in tasks.items()},
            "n-samples": {run: {"original": original_sizes[run], "effective": s["n"]} for run, s in tasks.items()},
            "higher_is_better": {run: metric_names(s) for run, s in tasks.items()},
            "config": config, "git_hash": config.get("git_commit"), "date": time.time(), "name": name,
            "tasks": tasks}


# ----------------------------------------------------------------------------------------------------------------------
# Per-question samples (--log-samples): one JSON line per question, as the harness's --log_samples


def samples_file_name(run: str) -> str:
    return "samples_" + run.replace(" k=", "_k").replace(" ", "_") + ".jsonl"


def loglik_sample(question, encoded, scores: list[float], prediction: int) -> dict:
    """One multiple-choice question: the exact prompt (after BOS), each option's request and summed log-likelihood."""
    prompt = question.prefix + question.text
    return {"doc_id": question.doc_id, "group": question.group, "prompt": prompt, "options": list(question.choices),
            "arguments": [[prompt, " " + option] for option in question.choices],
            "loglikelihoods": scores, "token_counts": [len(c) for c in encoded.continuations],
            "target": question.gold, "target_text": question.choices[question.gold],
            "prediction": prediction, "prediction_text": question.choices[prediction],
            "correct": prediction == question.gold}


def generated_sample(question, generation: str, prediction: int, correct: bool, extra: dict | None = None) -> dict:
    """One generated answer: the exact prompt (after BOS), the output, the label read from it (-1: "missing")."""
    return {"doc_id": question.doc_id, "group": question.group, "prompt": question.prefix + question.text,
            "options": list(question.choices), "generation": generation,
            "target": question.gold, "target_text": question.choices[question.gold],
            "prediction": prediction,
            "prediction_text": question.choices[prediction] if prediction >= 0 else "missing",
            "correct": correct} | (extra or {})


def write_samples(folder: Path, samples: dict) -> None:
    """samples_<run>.jsonl for every run, in one folder that appears whole (atomic.atomic_folder)."""
    with atomic_folder(folder) as tmp:
        for run, rows in samples.items():
            (tmp / samples_file_name(run)).write_text("".join(json.dumps(row) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------------------------------
# Tables: the paper's blocks (medical: six MMLU subjects + MedQA; finance: FiQA-SA, Causal20, MultiFin), each with
# the average over its own domain; scores in %, with ± one standard error when the result file has one.


def main_metric(summary: dict) -> str:
    """The table metric of a summary entry: weighted F1 (FinBen) for classification, else exact match or accuracy."""
    return next(k for k in ("weighted_f1", "exact_match", "accuracy") if k in summary)


def table_cells(result: dict) -> dict:
    """{(block, suffix): {column: (score %, stderr % or None)}}, blocks in the paper's order."""
    blocks = {}
    for name, s in result["tasks"].items():
        task, suffix = run_task(name)
        cells = blocks.setdefault((DOMAINS.get(task, "Other"), suffix), {})
        if task == "mmlu-medical" and "subjects" in s:
            for subject, sub in s["subjects"].items():
                cells[SHORT_NAMES.get(subject, subject) + suffix] = percent(sub, "accuracy")
        else:
            metric = main_metric(s)
            cells[SHORT_NAMES.get(task, task) + METRIC_MARKS[metric] + suffix] = percent(s, metric)
        if "leak_rate" in s:
            blocks.setdefault(("Leak", suffix), {})[f"{SHORT_NAMES.get(task, task)}{suffix} leak"] = \
                percent(s, "leak_rate")
    order = {"Medical": 0, "Finance": 1, "Other": 2, "Leak": 3}
    return dict(sorted(blocks.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])))


def percent(summary: dict, key: str) -> tuple:
    stderr = summary.get(f"{key}_stderr")
    return 100 * summary[key], None if stderr is None else 100 * stderr


def with_averages(blocks: dict) -> dict:
    """{column: (score, stderr)} with each block's "<domain> avg" after it (blocks of two or more columns): the plain
    mean of the block's columns, its standard error combined as for independent estimates."""
    columns = {}
    for (domain, suffix), cells in blocks.items():
        columns |= cells
        if len(cells) >= 2:
            values = list(cells.values())
            columns[f"{domain} avg{suffix}"] = (sum(v for v, _ in values) / len(values),
                                                combined_stderr([s for _, s in values], 1 / len(values)))
    return columns


def format_cell(cell, sign: str = "") -> str:
    if cell is None or cell[0] is None:
        return "-"
    value, stderr = cell
    return f"{value:{sign}.1f}" + ("" if stderr is None else f" ± {stderr:.1f}")


def markdown_table(results: list[dict]) -> str:
    """One table per block (domain, and k for the ICL suites): a row per model, a column per task, the average."""
    tables = []
    blocks_of = [table_cells(r) for r in results]
    for key in dict.fromkeys(k for blocks in blocks_of for k in blocks):
        per_model = [with_averages({key: blocks[key]}) if key in blocks else {} for blocks in blocks_of]
        header = list(dict.fromkeys(c for cols in per_model for c in cols))
        lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        lines += [f"| {r.get('name', 'model')} | " + " | ".join(format_cell(cols.get(c)) for c in header) + " |"
                  for r, cols in zip(results, per_model)]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def comparison_rows(results: list[dict]) -> tuple[list[str], list[list]]:
    """(names, rows): one row per column of the tables [column, cell per result, delta per later result], a delta
    being (difference, its standard error as for independent estimates)."""
    names = [r.get("name", "model") for r in results]
    columns = [with_averages(table_cells(r)) for r in results]
    rows = []
    for column in dict.fromkeys(c for cols in columns for c in cols):
        cells = [cols.get(column) for cols in columns]
        first = cells[0]
        deltas = [None if c is None or first is None else
                  (c[0] - first[0], combined_stderr([c[1], first[1]])) for c in cells[1:]]
        rows.append([column, cells, deltas])
    return names, rows


def comparison_table(results: list[dict]) -> str:
    """Side by side: one row per task column, one column per result, then each result's delta against the first."""
    names, rows = comparison_rows(results)
    deltas = [f"Δ {name} − {names[0]}" for name in names[1:]]
    lines = ["| task | " + " | ".join(names + deltas) + " |", "|---" * (1 + len(names) + len(deltas)) + "|"]
    for column, cells, diffs in rows:
        lines.append(f"| {column} | " + " | ".join([format_cell(c) for c in cells] +
                                                  [format_cell(d, "+") for d in diffs]) + " |")
    return "\n".join(lines)


def comparison_csv(results: list[dict]) -> str:
    """The comparison as CSV: task, then value and stderr per result, then delta and its stderr per later result (%)."""
    names, rows = comparison_rows(results)
    header = ["task"] + [x for n in names for x in (n, f"{n} stderr")] + \
        [x for n in names[1:] for x in (f"delta {n} - {names[0]}", f"delta {n} - {names[0]} stderr")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    rounded = lambda x: "" if x is None else round(x, 4)
    for column, cells, diffs in rows:
        writer.writerow([column] + [rounded(part) for c in cells + diffs for part in (c or (None, None))])
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Reading result files for --compare: every malformed file or entry is one line naming the file and the entry


def check_summary(path, name: str, s) -> None:
    where = f"{path}: tasks[{name!r}]"
    if not isinstance(s, dict):
        raise DataError(f"{where} is not an object (expected a result JSON written by evaluate.py --out)")
    for key, value in s.items():
        if (key in METRICS or key.endswith("_stderr")) and value is not None and \
                (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"{where}: {key} is {value!r}, expected a number")
    if not any(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool) for k in METRICS):
        raise DataError(f"{where} has no numeric {' / '.join(METRICS)} (expected a result JSON written by "
                        f"evaluate.py --out)")
    subjects = s.get("subjects", {})
    if not isinstance(subjects, dict):
        raise DataError(f"{where}: subjects is not an object")
    for subject, sub in subjects.items():
        check_summary(path, f"{name}/{subject}", sub)


def read_result_file(path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected a result JSON written by evaluate.py --out)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder (expected a result JSON written by evaluate.py --out)") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (expected a result JSON written by evaluate.py --out)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(result, dict) and isinstance(result.get("running"), dict):
        who = result["running"]
        raise DataError(f"{path}: an evaluation is still writing it (process {who.get('pid')} on {who.get('host')} "
                        f"since {who.get('started')}), or was interrupted")
    if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
        raise DataError(f"{path}: no 'tasks' object (expected a result JSON written by evaluate.py --out)")
    if not result["tasks"]:
        raise DataError(f"{path}: 'tasks' is empty")
    for name, summary in result["tasks"].items():
        check_summary(path, name, summary)
    if not isinstance(result.get("name", ""), str):
        raise DataError(f"{path}: 'name' is not a string")
    result.setdefault("name", Path(path).stem)
    return result


def compare_results(paths) -> tuple[str, list[dict]]:
    results = [read_result_file(path) for path in paths]
    return markdown_table(results) + "\n\n" + comparison_table(results), results


# ----------------------------------------------------------------------------------------------------------------------
# Output files are claimed before any work: a placeholder naming this process takes the --out name at start (so a
# read-only folder, or a name another run holds, fails at once), and only that placeholder is ever replaced.


class OutputClaim:
    def __init__(self, path: Path, identity: tuple, placeholder: str):
        self.path, self.identity, self.placeholder, self.done = path, identity, placeholder, False

    def still_mine(self) -> bool:
        try:
            st = os.stat(self.path)
            return (st.st_dev, st.st_ino) == self.identity and self.path.read_text() == self.placeholder
        except (OSError, UnicodeDecodeError):
            return False

    def write(self, text: str) -> None:
        if not self.still_mine():
            raise DataError(f"--out {self.path}: the file was replaced or removed by someone else during the run; "
                            f"not overwriting it")
        write_text(self.path, text)
        self.done = True


def check_new_path(path: Path, flag: str) -> None:
    """An output that must not exist yet, whose folder (or the nearest existing folder above it) this process can
    write. Nothing is created."""
    if path.exists() or path.is_symlink():
        raise DataError(f"{flag} {path} exists; refusing to overwrite it")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: the folder {folder} is not writable")


def missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, innermost first (created for it, removed again on failure)."""
    missing, folder = [], path.absolute().parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _take_stale_claim(path: Path) -> bool:
    """Remove a placeholder left by a process that no longer runs on this host; True when one was removed."""
    try:
        who = json.loads(path.read_text()).get("running")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(who, dict) or who.get("host") != socket.gethostname() or not isinstance(who.get("pid"), int):
        return False
    try:
        os.kill(who["pid"], 0)
        return False
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    print(f"note: --out {path}: taking over the placeholder of process {who['pid']}, which no longer runs",
          file=sys.stderr)
    path.unlink(missing_ok=True)
    return True


@contextmanager
def claimed_output(path, flag: str = "--out"):
    """with claimed_output(out) as claim: ... claim.write(text). None in, None out. The placeholder is removed when
    the block ends without writing (an error, an interrupt)."""
    if path is None:
        yield None
        return
    path = Path(path)
    if path.exists() and not _take_stale_claim(path):
        raise DataError(f"{flag} {path} exists; refusing to overwrite it")
    check_new_path(path, flag)
    created = missing_folders(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
    placeholder = json.dumps({"running": {"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}}) + "\n"
    claim = None
    try:
        claim = _write_placeholder(path, flag, placeholder)
        yield claim
    finally:
        if claim is None or not claim.done:
            if claim is not None and claim.still_mine():
                path.unlink(missing_ok=True)
            for folder in created:  # innermost first; only empty ones go
                try:
                    folder.rmdir()
                except OSError:
                    break


def _write_placeholder(path: Path, flag: str, placeholder: str) -> OutputClaim:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        raise DataError(f"{flag} {path} exists; refusing to overwrite it") from None
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write it ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(placeholder)
            f.flush()
            identity = (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise DataError(f"{flag} {path}: cannot write it ({e.strerror})") from None
    return OutputClaim(path, identity, placeholder)
