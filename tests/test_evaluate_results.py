"""evaluate.py's result files: the lm-evaluation-harness-shaped JSON has every documented key, the samples files'
log-likelihoods (and generations) reproduce the summary metrics, the paper's per-domain tables and averages with
standard errors, and --compare's deltas and CSV."""
import csv
import io
import json
import math

import pytest

import evaluate as ev
import eval_report as er
from answer_generation import finben_label
from benchmark_data import Question, build_questions
from conftest import LLAMA_TOKENIZER, SHARED_DATA, needs_data
from data import Tokenizer
from metrics import f1_scores, mean_stderr
from scoring import encode_questions

RANDOM_TINY = ["--random-init", "--tokenizer", str(LLAMA_TOKENIZER), "--no-progress"]


def read_samples(folder, run):
    return [json.loads(line) for line in (folder / er.samples_file_name(run)).read_text().splitlines()]


@needs_data
def test_result_json_has_the_harness_layout_and_samples_reproduce_the_log_likelihood_metrics(tmp_path):
    out = tmp_path / "r.json"
    ev.main(RANDOM_TINY + ["--tasks", "mmlu-medical,medqa,fiqa-sa", "--scoring", "loglik", "--shots", "1",
                           "--limit", "3", "--out", str(out), "--log-samples"])
    r = json.loads(out.read_text())
    assert set(er.RESULT_KEYS) <= set(r) and set(er.CONFIG_KEYS) <= set(r["config"])
    assert r["config"]["tokenizer"] == str(LLAMA_TOKENIZER) and r["config"]["random_init"] is True
    assert r["config"]["data_dir"] == str(SHARED_DATA.resolve()) and r["config"]["limit_mode"] == "random"
    assert r["git_hash"] == r["config"]["git_commit"] and len(r["config"]["git_commit"] or "x" * 40) >= 40
    assert r["n-shot"] == {"mmlu-medical": 1, "medqa": 1, "fiqa-sa": 1}
    assert r["n-samples"]["fiqa-sa"] == {"original": 235, "effective": 3}
    assert r["n-samples"]["mmlu-medical"] == {"original": 1089, "effective": 18}
    assert r["n-samples"]["medqa"]["original"] == 1273 - 8  # the demonstration pool is carved out of the test set
    for run in ("mmlu-medical", "medqa", "fiqa-sa", "mmlu_anatomy"):
        assert {"acc,none", "acc_stderr,none"} <= set(r["results"][run]), run
    assert {"f1,none", "f1_stderr,none", "macro_f1,none"} <= set(r["results"]["fiqa-sa"])
    assert r["groups"]["mmlu-medical"]["acc,none"] == r["tasks"]["mmlu-medical"]["accuracy"]
    assert r["configs"]["fiqa-sa"]["description"].startswith("PIXIU/FLARE flare_fiqasa")
    assert r["configs"]["fiqa-sa"]["output_type"] == "multiple_choice" and r["versions"]["medqa"] == 1.0
    assert r["higher_is_better"]["fiqa-sa"] == {"acc": True, "f1": True, "macro_f1": True}
    assert "drawn at random" in r["tasks"]["fiqa-sa"]["subset"]

    folder = tmp_path / "r_samples"
    tok = Tokenizer(LLAMA_TOKENIZER)
    for run in ("mmlu-medical", "medqa", "fiqa-sa"):
        rows = read_samples(folder, run)
        predictions = [max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__) for s in rows]
        assert predictions == [s["prediction"] for s in rows] == r["tasks"][run]["predictions"]
        correct = [p == s["target"] for p, s in zip(predictions, rows)]
        assert correct == [s["correct"] for s in rows]
        assert r["results"][run]["acc,none"] == pytest.approx(sum(correct) / len(rows))
        assert r["results"][run]["acc_stderr,none"] == pytest.approx(mean_stderr([float(c) for c in correct]))
        # the exact prompt: re-encoding it gives the option token counts the scores were summed over
        encoded = encode_questions(tok, [Question("g", "", s["prompt"], tuple(s["options"]), s["target"])
                                         for s in rows])
        assert [[len(c) for c in e.continuations] for e in encoded] == [s["token_counts"] for s in rows]
        assert all(a == [s["prompt"], " " + o] for s in rows for a, o in zip(s["arguments"], s["options"]))
    rows = read_samples(folder, "fiqa-sa")
    golds, preds = [s["target"] for s in rows], [s["prediction"] for s in rows]
    weighted, macro = f1_scores(golds, preds, sorted(set(golds)))
    assert (r["results"]["fiqa-sa"]["f1,none"], r["results"]["fiqa-sa"]["macro_f1,none"]) == \
        pytest.approx((weighted, macro))
    rows = read_samples(folder, "mmlu-medical")
    anatomy = [s["correct"] for s in rows if s["group"] == "anatomy"]
    assert r["results"]["mmlu_anatomy"]["acc,none"] == pytest.approx(sum(anatomy) / len(anatomy))
    # doc ids point at the test file's items
    first = read_samples(folder, "medqa")[0]
    question = {q.doc_id: q for q in build_questions("medqa", SHARED_DATA, 1)}[first["doc_id"]]
    assert question.prefix + question.text == first["prompt"]


@needs_data
def test_generated_samples_reproduce_the_finben_metrics(tmp_path):
    out = tmp_path / "g.json"
    ev.main(RANDOM_TINY + ["--tasks", "multifin", "--shots", "1", "--limit", "6", "--gen-tokens", "3",
                           "--out", str(out), "--log-samples"])
    r = json.loads(out.read_text())
    rows = read_samples(tmp_path / "g_samples", "multifin")
    preds = [finben_label(s["generation"], s["options"]) for s in rows]
    assert preds == [s["prediction"] for s in rows] == r["tasks"]["multifin"]["predictions"]
    golds = [s["target"] for s in rows]
    assert r["results"]["multifin"]["acc,none"] == pytest.approx(sum(p == g for p, g in zip(preds, golds)) / 6)
    assert r["results"]["multifin"]["missing,none"] == pytest.approx(sum(p == -1 for p in preds) / 6)
    assert r["results"]["multifin"]["f1,none"] == pytest.approx(f1_scores(golds, preds, sorted(set(golds)))[0])
    assert r["configs"]["multifin"]["output_type"] == "generate_until"
    assert r["configs"]["multifin"]["generation_kwargs"]["max_gen_toks"] == 3
    assert r["higher_is_better"]["multifin"]["missing"] is False
    assert len({s["target"] for s in rows}) >= 4  # a class-stratified subset: 6 of 546 spread over the topics


def summary(accuracy, stderr, n=100, **extra):
    return {"accuracy": accuracy, "accuracy_stderr": stderr, "n": n, "shots": 5} | extra


def paper_result(name, shift):
    subjects = {s: summary(0.40 + shift, 0.03) for s in ("anatomy", "clinical_knowledge", "college_biology",
                                                         "college_medicine", "medical_genetics",
                                                         "professional_medicine")}
    finance = lambda f1: summary(0.5, 0.05, weighted_f1=f1, weighted_f1_stderr=0.04, macro_f1=0.3)
    return {"name": name, "tasks": {"mmlu-medical": summary(0.4 + shift, 0.01) | {"subjects": subjects},
                                    "medqa": summary(0.33 + shift, 0.02), "fiqa-sa": finance(0.6 + shift),
                                    "causal20": finance(0.7), "multifin": finance(0.2 - shift)}}


def test_per_domain_tables_averages_and_standard_errors():
    blocks = er.table_cells(paper_result("base", 0.0))
    assert list(blocks) == [("Medical", ""), ("Finance", "")]
    columns = er.with_averages(blocks)
    medical = [40.0] * 6 + [33.0]
    assert columns["Medical avg"][0] == pytest.approx(sum(medical) / 7)
    assert columns["Medical avg"][1] == pytest.approx(math.sqrt(6 * 3.0 ** 2 + 2.0 ** 2) / 7)
    assert columns["Finance avg"] == pytest.approx(((60 + 70 + 20) / 3, math.sqrt(3 * 4.0 ** 2) / 3))
    table = er.markdown_table([paper_result("base", 0.0)])
    assert "| model | Anatomy | Clinical Knowledge | College Bio | College Med | Medical Genetics | Prof. Medicine " \
           "| MedQA | Medical avg |" in table
    assert "| base | 40.0 ± 3.0 | 40.0 ± 3.0 |" in table and "| 33.0 ± 2.0 | 39.0 ± 1.1 |" in table
    assert "| model | FiQA-SA (wF1) | Causal20 (wF1) | MultiFin (wF1) | Finance avg |" in table
    assert "| base | 60.0 ± 4.0 | 70.0 ± 4.0 | 20.0 ± 4.0 | 50.0 ± 2.3 |" in table
    # ICL suites: one block per domain and k
    icl = {"name": "m", "tasks": {f"medqa k={k}": summary(0.3, 0.02) for k in (0, 4)} |
           {f"fiqa-sa k={k}": summary(0.5, 0.05, weighted_f1=0.4) for k in (0, 4)}}
    assert list(er.table_cells(icl)) == [("Medical", " k=0"), ("Finance", " k=0"), ("Medical", " k=4"),
                                         ("Finance", " k=4")]


def test_compare_deltas_with_standard_errors_and_csv(tmp_path, capsys):
    for name, shift in (("base", 0.0), ("cft", 0.05)):
        (tmp_path / f"{name}.json").write_text(json.dumps(paper_result(name, shift)))
    ev.main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "cft.json"), "--compare-out",
             str(tmp_path / "delta.csv")])
    out = capsys.readouterr().out
    assert "| Anatomy | 40.0 ± 3.0 | 45.0 ± 3.0 | +5.0 ± 4.2 |" in out
    assert "| MultiFin (wF1) | 20.0 ± 4.0 | 15.0 ± 4.0 | -5.0 ± 5.7 |" in out
    assert "| Finance avg | 50.0 ± 2.3 | 50.0 ± 2.3 | +0.0 ± 3.3 |" in out
    rows = list(csv.reader(io.StringIO((tmp_path / "delta.csv").read_text())))
    assert rows[0] == ["task", "base", "base stderr", "cft", "cft stderr", "delta cft - base",
                       "delta cft - base stderr"]
    anatomy = next(r for r in rows if r[0] == "Anatomy")
    assert [float(x) for x in anatomy[1:]] == pytest.approx([40, 3, 45, 3, 5, math.sqrt(18)], abs=1e-3)
    assert [r[0] for r in rows[1:]][-4:] == ["FiQA-SA (wF1)", "Causal20 (wF1)", "MultiFin (wF1)", "Finance avg"]
