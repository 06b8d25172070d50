"""Benchmark metrics and their standard errors: accuracy, scikit-learn's F1, exact match, a format-leak rate.

Definitions (hand-written; tests check them against worked examples and scikit-learn):
- accuracy and every other per-question 0/1 metric (exact match, leak rate, FinBen's "missing" rate): the mean, with
  lm-evaluation-harness's standard error sqrt(p (1 - p) / (n - 1)) (the sample standard deviation over sqrt(n)).
- F1: per class 2TP / (2TP + FP + FN) (0 when the class is neither true nor predicted), macro = plain mean over the
  labels, weighted = mean weighted by each label's support in the gold answers: sklearn.metrics.f1_score. The labels
  are the gold and predicted classes (sklearn's default), or the ones given: FinBen passes the gold classes only, so
  a prediction outside them (FinBen's "missing") is a false negative of its gold class and has no F1 of its own.
  Standard error: the standard deviation of a seeded bootstrap (questions resampled with replacement).
"""
import math

import numpy as np

BOOTSTRAP_SAMPLES = 1000  # resamples for an F1 standard error; its Monte Carlo error is ~2% of the standard error


def accuracy(golds, preds) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


# Two-sided 95% quantiles of Student's t for 1-10 degrees of freedom (exact to 3 decimals); beyond, an expansion.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom: the table above, then the Cornish-Fisher
    expansion around the normal's 1.96 (within 1e-3 of the exact value for df >= 3); nan for df < 1."""
    if df < 1:
        return math.nan
    if df in T_975:
        return T_975[df]
    z, n = 1.959963984540054, float(df)
    return (z + (z ** 3 + z) / (4 * n) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * n ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * n ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * n ** 4))


def mean_std(values) -> tuple[float, float]:
    """(mean, sample standard deviation); std 0 for a single value."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def mean_std_ci95(values) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the mean's 95% t interval); std 0 and half-width nan for a single value."""
    n = len(values)
    mean, std = mean_std(values)
    return mean, std, (t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan)


def mean_stderr(values) -> float | None:
    """lm-evaluation-harness's mean_stderr of 0/1 (or any) values: sample std / sqrt(n); None for fewer than 2."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def f1_scores(golds, preds, labels=None) -> tuple[float, float]:
    """(weighted F1, macro F1) as sklearn.metrics.f1_score(golds, preds, average="weighted" / "macro", labels=labels).
    labels None: the classes present in golds or preds (a class never predicted scores 0)."""
    labels = sorted(set(golds) | set(preds)) if labels is None else list(labels)
    f1, support = [], []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        support.append(sum(g == label for g in golds))
    weighted = sum(f * s for f, s in zip(f1, support)) / sum(support) if sum(support) else 0.0
    return weighted, sum(f1) / len(f1)


def bootstrap_f1(golds, preds, labels, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """(samples, 2) weighted and macro F1 of `samples` seeded resamples of the questions (vectorised f1_scores)."""
    codes = {label: i for i, label in enumerate(labels)}
    g = np.array([codes.get(x, -1) for x in golds])
    p = np.array([codes.get(x, -2) for x in preds])  # -2: a prediction outside the labels matches no gold
    idx = np.random.default_rng(seed).integers(0, len(g), size=(samples, len(g)))
    G, P = g[idx], p[idx]
    f1s, supports = [], []
    for c in range(len(labels)):
        tp = ((G == c) & (P == c)).sum(1)
        fp = ((G != c) & (P == c)).sum(1)
        fn = ((G == c) & (P != c)).sum(1)
        denominator = 2 * tp + fp + fn
        f1s.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
        supports.append((G == c).sum(1))
    f1s, supports = np.stack(f1s, 1), np.stack(supports, 1)
    weighted = (f1s * supports).sum(1) / np.maximum(supports.sum(1), 1)
    return np.stack([weighted, f1s.mean(1)], 1)


def f1_with_stderr(golds, preds, labels, seed: int) -> dict:
    """{"weighted_f1", "weighted_f1_stderr", "macro_f1", "macro_f1_stderr"} over `labels` (stderr None below 2)."""
    weighted, macro = f1_scores(golds, preds, labels)
    result = {"weighted_f1": weighted, "weighted_f1_stderr": None, "macro_f1": macro, "macro_f1_stderr": None}
    if len(golds) >= 2:
        boot = bootstrap_f1(golds, preds, labels, seed)
        result["weighted_f1_stderr"], result["macro_f1_stderr"] = (float(s) for s in boot.std(0, ddof=1))
    return result


def rate_with_stderr(flags, name: str) -> dict:
    """{name: mean of 0/1 flags, name_stderr: its standard error}."""
    flags = [float(f) for f in flags]
    return {name: sum(flags) / len(flags), f"{name}_stderr": mean_stderr(flags)}


def answer_line(text: str) -> str:
    """A generated answer as exact match reads it: the first line after leading whitespace, stripped, without a final
    period, lower-cased (so " Positive\\n\\nText: ..." and "positive." both read "positive")."""
    return text.strip().split("\n", 1)[0].strip().removesuffix(".").strip().lower()


def exact_match(output: str, target: str) -> bool:
    return answer_line(output) == answer_line(target)


def leaked(output: str, leak_labels) -> bool:
    """Is the answer one of the fine-tuning task's labels (ProMoT's format leak: "True" on a sentiment question)?"""
    return answer_line(output) in {answer_line(label) for label in leak_labels}


def combined_stderr(stderrs, scale: float = 1.0) -> float | None:
    """Standard error of scale * sum of independent estimates (a domain average: scale 1/k; a difference of two models:
    scale 1 over both). None when any part has none."""
    if not stderrs or any(s is None for s in stderrs):
        return None
    return scale * math.sqrt(sum(s * s for s in stderrs))
