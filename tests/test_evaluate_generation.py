"""Answers by generation: FinBen's label match on worked examples, a forced-logits model whose generated labels,
"missing" outputs and weighted F1 are known by hand, batched/cached/rank-split generation equal to one prompt at a
time, and the icl-gen suite's exact match and format-leak rate."""
import json

import pytest
import torch
import torch.nn as nn

import evaluate as ev
from answer_generation import MISSING, finben_label, gather_answers, generate_answers
from benchmark_data import CAUSAL20_LABELS, FIQA_LABELS, MULTIFIN_LABELS, Question
from conftest import LLAMA_TOKENIZER, needs_data, tiny_cfg
from data import Tokenizer
from model import create_model, generate
from scoring import MIN_SHARED_PREFIX, encode_questions, shared_prefix_len


def test_finben_label_match_on_worked_examples():
    # PIXIU/FinBen Classification.process_results: lower-cased, stripped output; the first label in label order
    # that occurs anywhere in it; none -> "missing".
    assert finben_label(" Positive\n\nWhat is the", FIQA_LABELS) == 2
    assert finben_label("The sentiment is NEGATIVE.", FIQA_LABELS) == 0
    assert finben_label("positive or negative", FIQA_LABELS) == 0  # Negative comes first in the label order
    assert finben_label("I cannot tell", FIQA_LABELS) == MISSING
    assert finben_label("tax & accounting", MULTIFIN_LABELS) == 4
    assert finben_label("non-causal", CAUSAL20_LABELS) == 1  # a substring match, as FinBen's
    assert finben_label("", CAUSAL20_LABELS) == MISSING


def bigram_model(tok: Tokenizer, mapping: dict[str, str]):
    """A tiny Transformer whose next token depends only on the current one: attention and MLP outputs are zero, so the
    final hidden state is the normalised embedding of the current token, and lm_head maps each source piece's
    embedding to its target (logit 10 x dim against |random overlaps| of about 10 x sqrt(dim))."""
    model = create_model(tiny_cfg(), seed=0).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head = nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=False)
        nn.init.zeros_(model.lm_head.weight)
        for source, target in mapping.items():
            (s,), (t,) = tok.encode(source), [tok.eos_id] if target == "</s>" else tok.encode(target)
            x = model.embed_tokens.weight[s]
            model.lm_head.weight[t] += 10 * x / x.pow(2).mean().sqrt()
    return model.requires_grad_(False)


CHOICES = ("pain", "drug", "risk")
# (last word of the prompt -> what the forced model generates): dose -> "pain", revenue -> "drug", market -> "profits"
MAPPING = {" dose": " pain", " revenue": " drug", " market": " profits", " pain": "</s>", " drug": "</s>",
           " profits": "</s>"}
WORKED = [("dose", 0), ("dose", 1), ("revenue", 1), ("market", 2), ("revenue", 0), ("market", 0)]  # (last word, gold)


def worked_questions(prefix=""):
    return [Question("g", prefix, f"We treated the {word}", CHOICES, gold, i) for i, (word, gold) in enumerate(WORKED)]


def test_forced_logits_model_generated_labels_missing_and_f1(tokenizer_path, one_thread):
    tok = Tokenizer(tokenizer_path)
    model = bigram_model(tok, MAPPING)
    questions = worked_questions()
    encoded = encode_questions(tok, questions)
    answers = generate_answers(model, [e.context for e in encoded], [q.group for q in questions], max_new_tokens=4,
                               eos_id=tok.eos_id, progress=False)
    outputs = [tok.decode(a) for a in answers]
    assert outputs == ["pain", "pain", "drug", "profits", "drug", "profits"]
    run = ev.Run("fiqa-sa", 0, "fiqa-sa", "generate")
    summary, samples = ev.generated_summary(run, questions, outputs, seed=0, leak_labels=None)
    # golds [pain, drug, drug, risk, pain, pain], predictions [pain, pain, drug, missing, drug, missing]:
    # accuracy 2/6, missing 2/6. F1 over the gold labels (FinBen): pain TP1 FP1 FN2 -> 0.4 (support 3);
    # drug TP1 FP1 FN1 -> 0.5 (support 2); risk TP0 FN1 -> 0 (support 1): weighted 2.2/6, macro 0.3.
    assert summary["predictions"] == [0, 0, 1, MISSING, 1, MISSING]
    assert summary["accuracy"] == pytest.approx(2 / 6) and summary["missing"] == pytest.approx(2 / 6)
    assert summary["weighted_f1"] == pytest.approx(2.2 / 6) and summary["macro_f1"] == pytest.approx(0.3)
    assert summary["accuracy_stderr"] == pytest.approx(((2 / 6) * (4 / 6) / 5) ** 0.5)
    assert summary["weighted_f1_stderr"] > 0
    assert [s["prediction_text"] for s in samples] == ["pain", "pain", "drug", "missing", "drug", "missing"]
    assert [s["generation"] for s in samples] == outputs and samples[3]["correct"] is False
    sklearn = pytest.importorskip("sklearn.metrics")
    names = [CHOICES[g] for g in [q.gold for q in questions]]
    preds = [CHOICES[p] if p >= 0 else "missing" for p in summary["predictions"]]
    labels = sorted(set(names))
    assert summary["weighted_f1"] == pytest.approx(sklearn.f1_score(names, preds, average="weighted", labels=labels))
    assert summary["macro_f1"] == pytest.approx(sklearn.f1_score(names, preds, average="macro", labels=labels))


def test_batched_cached_rank_split_generation_equals_one_prompt_at_a_time(tokenizer_path, one_thread):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    shared = "The patient reduced the dose in two weeks.\nAnswer: pain\n\n" * 4  # a cached few-shot prefix
    questions = [Question("g1", shared, f"We treated the {w} {i}.\nAnswer:", CHOICES, 0, i)
                 for i, w in enumerate(["dose", "revenue", "the risk of side effects"])]
    questions += [Question("g2", "", f"A doctor measured {w}.\nAnswer:", CHOICES, 0, i)
                  for i, w in enumerate(["pain", "profits in the first quarter"])]
    prompts = [e.context for e in encode_questions(tok, questions)]
    assert len(prompts[0]) - len(questions[0].text) // 2 > MIN_SHARED_PREFIX
    plain = [generate(model, [p], 5) for p in prompts]
    plain = [p[0] for p in plain]
    groups = [q.group for q in questions]
    for batch_tokens in (1, 4096):  # one row per batch; everything at once
        batched = generate_answers(model, prompts, groups, max_new_tokens=5, eos_id=None, batch_tokens=batch_tokens,
                                   progress=False)
        assert batched == plain, batch_tokens
    halves = [generate_answers(model, prompts, groups, max_new_tokens=5, eos_id=None, rank=r, world=2,
                               progress=False) for r in (0, 1)]
    assert [a if a is not None else b for a, b in zip(*halves)] == plain
    assert all((a is None) != (b is None) for a, b in zip(*halves))
    assert gather_answers(plain, 1) == plain


def test_shared_prefix_is_passed_once_and_counted_once_per_batch(tokenizer_path, one_thread, monkeypatch):
    """The group's prefix reaches model.generate with batch 1 (every row attends to the one stored copy), and
    batch_tokens bounds one prefix + the rows' own positions: all rows fit in one batch at prefix + rows x (own + new)
    tokens, where counting the prefix per row would allow one; the answers stay those of one prompt at a time."""
    import answer_generation
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    shared = "The patient reduced the dose in two weeks.\nAnswer: pain\n\n" * 4
    questions = [Question("g", shared, f"We treated {w}.\nAnswer:", CHOICES, 0, i)
                 for i, w in enumerate(["the dose", "revenue", "the risk", "pain in the first week"])]
    prompts = [e.context for e in encode_questions(tok, questions)]
    prefix_len = shared_prefix_len(prompts)
    own = max(len(p) for p in prompts) - prefix_len
    calls, real = [], answer_generation.generate
    monkeypatch.setattr(answer_generation, "generate", lambda m, rows, *a, prefix_kv=None, **kw: calls.append(
        (len(rows), prefix_kv[0][0].shape[0], prefix_kv[0][0].shape[2])) or real(m, rows, *a, prefix_kv=prefix_kv,
                                                                                   **kw))
    plain = [generate(model, [p], 3)[0] for p in prompts]
    fits = prefix_len + 4 * (own + 3)
    assert generate_answers(model, prompts, ["g"] * 4, max_new_tokens=3, eos_id=None, batch_tokens=fits,
                            progress=False) == plain
    (rows, prefix_batch, cached_prefix), = calls
    assert rows == 4 and prefix_batch == 1 and cached_prefix == prefix_len >= MIN_SHARED_PREFIX
    assert 2 * (cached_prefix + own + 3) > fits  # counted once per row, the prefix would leave room for one row


def test_icl_gen_exact_match_and_format_leak_rate():
    questions = [Question("fiqa-sa", "", f"q{i}\nAnswer:", FIQA_LABELS, gold, i)
                 for i, gold in enumerate([2, 0, 1, 2, 0])]
    outputs = [" Positive\n\nWhat is", "negative.", " True", "False\nText", " Positive sentiment"]
    run = ev.Run("fiqa-sa", 4, "fiqa-sa k=4", "exact")
    summary, samples = ev.generated_summary(run, questions, outputs, seed=0, leak_labels=["True", "False"])
    # exact match reads the first line, stripped, without a final period, lower-cased
    assert summary["exact_match"] == pytest.approx(2 / 5) and summary["leak_rate"] == pytest.approx(2 / 5)
    assert summary["predictions"] == [2, 0, MISSING, MISSING, MISSING]
    assert [s["leaked"] for s in samples] == [False, False, True, True, False]
    assert "leak_rate" not in ev.generated_summary(run, questions, outputs, seed=0, leak_labels=None)[0]


@needs_data
def test_icl_gen_suite_end_to_end(tmp_path, capsys):
    out = tmp_path / "gen.json"
    ev.main(["--random-init", "--tokenizer", str(LLAMA_TOKENIZER), "--no-progress", "--suite", "icl-gen", "--tasks",
             "medqa,fiqa-sa", "--limit", "2", "--gen-tokens", "2", "--leak-labels", "True,False", "--out", str(out)])
    r = json.loads(out.read_text())
    assert list(r["tasks"]) == ["medqa k=1", "medqa k=4", "fiqa-sa k=1", "fiqa-sa k=4"]
    for name, s in r["tasks"].items():
        assert s["n"] == 2 and s["scoring"] == "exact" and {"exact_match", "leak_rate"} <= set(s), name
        assert {"exact_match,none", "leak_rate_stderr,none"} <= set(r["results"][name])
        assert r["configs"][name]["output_type"] == "generate_until"
    assert r["higher_is_better"]["medqa k=1"] == {"exact_match": True, "leak_rate": False}
    table = capsys.readouterr().out
    assert "| model | MedQA k=1 leak | FiQA-SA k=1 leak | Leak avg k=1 |" in table
    assert "| model | MedQA (EM) k=4 |" in table and "| model | FiQA-SA (EM) k=4 |" in table
