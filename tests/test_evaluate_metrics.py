"""metrics.py: scikit-learn's F1 (with and without FinBen's gold-only labels), lm-evaluation-harness's standard error
of a mean, the seeded bootstrap standard error of F1, exact match and the format-leak rate."""
import math
import random

import numpy as np
import pytest

import metrics as mt


def test_f1_with_gold_labels_only_is_finbens_definition():
    # FinBen: f1_score(golds, preds, labels=set(golds)). A "missing" prediction (-1) is a false negative of its gold
    # class and has no F1 of its own; weighted F1 is the same either way, macro F1 is not.
    golds, preds = [0, 0, 1, 1], [0, -1, 1, 1]
    assert mt.f1_scores(golds, preds, labels=[0, 1]) == pytest.approx(((2 / 3 * 2 + 1 * 2) / 4, (2 / 3 + 1) / 2))
    assert mt.f1_scores(golds, preds)[0] == pytest.approx(mt.f1_scores(golds, preds, labels=[0, 1])[0])
    assert mt.f1_scores(golds, preds)[1] == pytest.approx((0 + 2 / 3 + 1) / 3)  # -1 counts in macro without labels


def test_f1_matches_sklearn_on_random_labels():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for trial in range(20):
        golds = [rng.randrange(4) for _ in range(rng.randrange(2, 40))]
        preds = [rng.randrange(-1, 5) for _ in golds]
        labels = sorted(set(golds))
        for given in (None, labels):
            ours = mt.f1_scores(golds, preds, given)
            theirs = tuple(sklearn.f1_score(golds, preds, average=a, labels=given, zero_division=0)
                           for a in ("weighted", "macro"))
            assert ours == pytest.approx(theirs), (trial, given)
        boot = mt.bootstrap_f1(golds, preds, labels, seed=trial, samples=3)
        idx = np.random.default_rng(trial).integers(0, len(golds), size=(3, len(golds)))
        for b in range(3):  # each bootstrap row is f1_scores of that resample
            resample = ([golds[i] for i in idx[b]], [preds[i] for i in idx[b]])
            assert tuple(boot[b]) == pytest.approx(mt.f1_scores(*resample, labels)), (trial, b)


def test_standard_errors():
    # lm-evaluation-harness mean_stderr: sample std / sqrt(n) = sqrt(p (1 - p) / (n - 1)) for 0/1 values
    flags = [1.0] * 30 + [0.0] * 70
    assert mt.mean_stderr(flags) == pytest.approx(math.sqrt(0.3 * 0.7 / 99))
    assert mt.mean_stderr([1.0]) is None and mt.rate_with_stderr([True, False], "acc") == \
        {"acc": 0.5, "acc_stderr": pytest.approx(0.5)}
    golds = [i % 3 for i in range(300)]
    preds = [g if i % 4 else (g + 1) % 3 for i, g in enumerate(golds)]
    first = mt.f1_with_stderr(golds, preds, [0, 1, 2], seed=1)
    assert first == mt.f1_with_stderr(golds, preds, [0, 1, 2], seed=1)  # seeded: the same numbers every run
    assert first["weighted_f1_stderr"] != mt.f1_with_stderr(golds, preds, [0, 1, 2], seed=2)["weighted_f1_stderr"]
    # the bootstrap standard error of F1 is close to the binomial one of accuracy here (75% right, balanced classes)
    assert first["weighted_f1_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 299), rel=0.25)
    assert mt.f1_with_stderr([1], [1], [1], seed=0)["weighted_f1_stderr"] is None
    assert mt.combined_stderr([3.0, 4.0]) == 5.0 and mt.combined_stderr([3.0, None]) is None
    assert mt.combined_stderr([2.0, 2.0], 0.5) == pytest.approx(math.sqrt(2))


def test_exact_match_and_leak():
    assert mt.answer_line("  Positive.\n\nText: more") == "positive"
    assert mt.exact_match(" B\n", "B") and not mt.exact_match(" B. Tell the attending", "B")
    assert mt.leaked(" True", ["True", "False"]) and mt.leaked("false.", ["True", "False"])
    assert not mt.leaked(" True story", ["True", "False"])


def test_t_interval_over_seeds_or_tasks():
    assert mt.t_quantile_975(2) == 4.303  # the table, where the expansion is poor
    assert mt.t_quantile_975(5) == pytest.approx(2.5706, abs=2e-3)
    assert mt.t_quantile_975(30) == pytest.approx(2.0423, abs=1e-3)
    mean, std, half = mt.mean_std_ci95([1.0, 2.0, 6.0])
    assert (mean, std) == pytest.approx((3.0, 2.6457513)) and half == pytest.approx(4.303 * std / 3 ** 0.5)
    assert mt.mean_std_ci95([5.0])[1] == 0.0
