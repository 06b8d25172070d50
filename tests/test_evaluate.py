"""evaluate.py: published prompt formats, option scoring, sklearn-equal metrics, fast path == plain path, bad inputs."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import evaluate as ev
from conftest import LLAMA_TOKENIZER, ROOT, SHARED_DATA, needs_data, tiny_cfg, torchrun
from data import Tokenizer
from model import apply_lora, create_model

# lm-evaluation-harness `mmlu` (description + first_n dev shots + "\n\n" delimiters), anatomy, 2-shot, test row 1.
GOLDEN_MMLU = (
    "The following are multiple choice questions (with answers) about anatomy.\n\n"
    "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
    "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
    "D. The second and third pharyngeal arches\nAnswer: D\n\n"
    "Which of these branches of the trigeminal nerve contain somatic motor processes?\nA. The supraorbital nerve\n"
    "B. The infraorbital nerve\nC. The mental nerve\nD. None of the above\nAnswer: D\n\n"
    "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
    "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
    "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
    "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:")
# lm-evaluation-harness `medqa_4options`, zero-shot, test row 1.
GOLDEN_MEDQA = (
    "Question: A junior orthopaedic surgery resident is completing a carpal tunnel repair with the department chairman "
    "as the attending physician. During the case, the resident inadvertently cuts a flexor tendon. The tendon is "
    "repaired without complication. The attending tells the resident that the patient will do fine, and there is no "
    "need to report this minor complication that will not harm the patient, as he does not want to make the patient "
    "worry unnecessarily. He tells the resident to leave this complication out of the operative report. Which of the "
    "following is the correct next action for the resident to take?\n"
    "A. Disclose the error to the patient and put it in the operative report\n"
    "B. Tell the attending that he cannot fail to disclose this mistake\n"
    "C. Report the physician to the ethics committee\nD. Refuse to dictate the operative report\nAnswer:")
LLAMA_ABCD = [[319], [350], [315], [360]]  # "▁A" "▁B" "▁C" "▁D": what "Answer:" + " A" tokenizes to


@needs_data
def test_golden_mmlu_prompt_and_answer_tokens():
    q = ev.build_task("mmlu-medical", SHARED_DATA, shots=2, limit=1)[0]
    assert (q.group, q.prefix + q.text, q.gold) == ("anatomy", GOLDEN_MMLU, 0)
    enc = ev.encode_question(Tokenizer(LLAMA_TOKENIZER), q)
    assert enc.context[0] == 1 and enc.continuations == LLAMA_ABCD
    questions = ev.build_task("mmlu-medical", SHARED_DATA, shots=5)
    assert len(questions) == 1089 and [sum(q.group == s for q in questions) for s in ev.MMLU_SUBJECTS] == \
        [135, 265, 144, 173, 100, 272]


@needs_data
def test_golden_medqa_prompt_and_held_out_demonstrations():
    q = ev.build_task("medqa", SHARED_DATA, shots=0, limit=1)[0]
    assert (q.prefix + q.text, q.gold) == (GOLDEN_MEDQA, 1)
    assert ev.encode_question(Tokenizer(LLAMA_TOKENIZER), q).continuations == LLAMA_ABCD
    # No MedQA train split is staged: k-shot demonstrations come from a fixed pool of test questions, never scored.
    shots = ev.build_task("medqa", SHARED_DATA, shots=4)
    assert len(shots) == 1273 - ev.MEDQA_DEMO_POOL
    demos = shots[0].prefix.split("\n\n")[:-1]
    assert len(demos) == 4 and not any(d.rsplit(" ", 1)[0] in {q.text for q in shots} for d in demos)
    # The ICL suite scores the same questions at k = 0 as at k > 0.
    zero = ev.build_task("medqa", SHARED_DATA, shots=0, same_questions_at_every_k=True)
    assert [q.text for q in zero] == [q.text for q in shots] and zero[0].prefix == ""


@needs_data
def test_classification_tasks_load_with_demonstrations_outside_the_test_set():
    sizes = {"fiqa-sa": 235, "causal20": 8628, "multifin": 546}
    for task, n in sizes.items():
        q4, q1 = ev.build_task(task, SHARED_DATA, shots=4), ev.build_task(task, SHARED_DATA, shots=1)
        assert len(q4) == n and q4[0].text.endswith("Answer:")
        assert q4[0].prefix.startswith(q1[0].prefix) and q4[0].prefix.count("Answer: ") == 4  # nested across k
        assert not any(q.text in q4[0].prefix for q in q4)


def forced_model(bias):
    """A tiny Transformer whose every position predicts the same distribution: logits = bias."""
    model = create_model(tiny_cfg(), seed=0).eval()
    model.lm_head = nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=True)
    nn.init.zeros_(model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.bias.copy_(bias)
    return model


def test_scoring_picks_the_highest_likelihood_option(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    bias = torch.randn(512, generator=torch.Generator().manual_seed(0))
    model = forced_model(bias)
    logprobs = bias.log_softmax(-1)
    questions = [ev.Question("g", "Header.\n\n", f"The patient reduced the dose {i}.\nAnswer:",
                             ("pain", "drug", "dose", "risk") if i % 2 else ("B", "the risk", "revenue"), 0)
                 for i in range(6)]
    encoded = [ev.encode_question(tok, q) for q in questions]
    scores = ev.score_fast(model, encoded, batch_tokens=64, progress=False)
    for enc, s in zip(encoded, scores):
        expected = [logprobs[c].sum().item() for c in enc.continuations]  # the sum over the option's tokens
        assert s == pytest.approx(expected, abs=1e-4)
        assert ev.predict([s]) == [max(range(len(expected)), key=expected.__getitem__)]
    # Make option C of the single-token questions by far the likeliest: every prediction follows.
    c_token = encoded[1].continuations[2][-1]
    bias[c_token] += 50
    scores = ev.score_fast(forced_model(bias), encoded, progress=False)
    assert [p for p, q in zip(ev.predict(scores), questions) if len(q.choices) == 4] == [2, 2, 2]


def test_f1_matches_sklearn_on_worked_examples():
    # sklearn.metrics.f1_score docstring: per-class F1 [0.8, 0, 0] -> macro 0.2667, weighted 0.2667.
    weighted, macro = ev.f1_scores([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1])
    assert (weighted, macro) == pytest.approx((0.26666666, 0.26666666))
    # A class that is predicted but never true counts in macro (F1 0) and weighs 0 in weighted:
    # F1 class 0 = 2*2/(4+0+1) = 0.8, class 1 = 1, class 2 = 0 -> macro 0.6, weighted (3*0.8 + 1*1)/4 = 0.85.
    assert ev.f1_scores([0, 0, 0, 1], [0, 0, 2, 1]) == pytest.approx((0.85, 0.6))
    # Unequal supports: class a (support 3): TP 2, FP 1, FN 1 -> 2/3; class b (support 1): TP 0 -> 0.
    assert ev.f1_scores(["a", "a", "a", "b"], ["a", "a", "b", "a"]) == pytest.approx((0.5, 1 / 3))
    assert ev.accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5


def synthetic_questions():
    """Two groups with shared prefixes, single-token and multi-token options, lengths varying from row to row."""
    words = ["the patient", "a doctor", "the drug", "this trial", "the market", "revenue", "side effects"]
    questions = []
    for i in range(10):
        group = "g1" if i < 6 else "g2"
        # g1's shared prefix is long enough to be cached (>= MIN_SHARED_PREFIX tokens); g2's is recomputed per row
        prefix = "The patient reduced the dose in two weeks.\nAnswer: pain\n\n" * 4 if group == "g1" else "We.\n\n"
        text = " ".join(words[: 2 + i % 5]) + f" {i}.\nAnswer:"
        # single-token options with the tiny tokenizer ("▁pain", "▁drug", ...) and multi-token ones
        choices = ("pain", "drug", "dose", "risk") if i % 3 else ("B", "the risk", "the dose in two weeks")
        questions.append(ev.Question(group, prefix, text, choices, i % len(choices)))
    return questions


def flat(scores):
    return torch.tensor([x for row in scores for x in row])


def test_batched_cached_scoring_equals_the_plain_path(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    encoded = [ev.encode_question(tok, q) for q in synthetic_questions()]
    assert any(ev.single_token(q) for q in encoded) and not all(ev.single_token(q) for q in encoded)
    g1, g2 = ([q.context for q in encoded if q.group == g] for g in ("g1", "g2"))
    assert ev.shared_prefix_len(g1) >= ev.MIN_SHARED_PREFIX > ev.shared_prefix_len(g2)
    plain = ev.score_naive(lambda t: model(t), encoded)
    for batch_tokens in (1, 48, 4096):  # one row per batch, several padded rows, everything at once
        for per_row_prefix in (False, True):
            fast = ev.score_fast(model, encoded, batch_tokens=batch_tokens, progress=False,
                                 per_row_prefix=per_row_prefix)
            assert torch.allclose(flat(fast), flat(plain), atol=1e-4), (batch_tokens, per_row_prefix)
    # torchrun split: each rank scores every other row; together they give the same numbers.
    halves = [ev.score_fast(model, encoded, batch_tokens=48, rank=r, world=2, progress=False) for r in (0, 1)]
    assert torch.allclose(flat(halves[0]) + flat(halves[1]), flat(plain), atol=1e-4)


def test_soft_prompt_comes_before_bos_and_matches_the_plain_path(tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    soft = torch.randn(3, model.cfg.dim)
    save_file({"soft_prompt": soft}, tmp_path / "soft.safetensors")
    soft = ev.load_soft_prompt(tmp_path / "soft.safetensors", model.cfg.dim)
    encoded = [ev.encode_question(tok, q) for q in synthetic_questions()]

    def plain_with_soft_prompt(tokens):  # cft.py's ProMoT layout: [soft prompt] + BOS + text
        logits = model(embeds=torch.cat([soft[None], model.embed_tokens(tokens)], dim=1))
        return logits[:, len(soft):]  # drop the soft positions' outputs

    plain = ev.score_naive(plain_with_soft_prompt, encoded)
    fast = ev.score_fast(model, encoded, batch_tokens=48, soft_prompt=soft, progress=False)
    assert torch.allclose(flat(fast), flat(plain), atol=1e-4)
    assert not torch.allclose(flat(fast), flat(ev.score_naive(lambda t: model(t), encoded)), atol=1e-3)


def test_lora_adapter_file_is_applied(tmp_path):
    cfg = tiny_cfg()
    adapted = apply_lora(create_model(cfg, seed=0), rank=4, alpha=8.0, targets=("q_proj", "v_proj")).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    lora = {n: p.detach() for n, p in adapted.named_parameters() if ".lora_" in n}
    save_file(lora, tmp_path / "adapter.safetensors", metadata={"rank": "4", "alpha": "8.0"})
    model = create_model(cfg, seed=0).eval()
    ev.load_lora(model, tmp_path / "adapter.safetensors")
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    assert torch.allclose(model(tokens), adapted(tokens), atol=1e-4)
    save_file({k: v for k, v in list(lora.items())[1:]}, tmp_path / "partial.safetensors",
              metadata={"rank": "4", "alpha": "8.0"})
    with pytest.raises(ev.DataError, match="partial.safetensors: tensor layers.0"):
        ev.load_lora(create_model(cfg, seed=0), tmp_path / "partial.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ev.DataError, match="junk.safetensors: not a safetensors file"):
        ev.load_lora(create_model(cfg, seed=0), tmp_path / "junk.safetensors")
    with pytest.raises(ev.DataError, match="junk.safetensors: not a safetensors file"):
        ev.load_soft_prompt(tmp_path / "junk.safetensors", cfg.dim)


def test_missing_file_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(ev.DataError) as e:
        ev.build_task("medqa", tmp_path, shots=0)
    message = str(e.value)
    assert str(tmp_path / "medqa-usmle-4opt" / "phrases_no_exclude_test.jsonl") in message
    assert "expected layout" in message and "mmlu-medical/test/<subject>_test.csv" in message


def test_malformed_rows_name_the_file_and_line(tmp_path):
    mmlu = tmp_path / "mmlu-medical"
    (mmlu / "dev").mkdir(parents=True)
    (mmlu / "test").mkdir()
    (mmlu / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\n")
    (mmlu / "test" / "anatomy_test.csv").write_text('q1,a,b,c,d,B\n"multi\nline q",a,b,c,d,C\nq3,a,b,c,E\n')
    with pytest.raises(ev.DataError, match=r"anatomy_test.csv, line 4: expected 6 ','-separated fields, found 5"):
        ev.build_task("mmlu-medical", tmp_path, shots=1)
    (mmlu / "test" / "anatomy_test.csv").write_text("q1,a,b,c,d,B\nq2,a,b,c,d,E\n")
    with pytest.raises(ev.DataError, match=r"anatomy_test.csv, line 2: answer 'E' is not one of A, B, C, D"):
        ev.build_task("mmlu-medical", tmp_path, shots=1)
    medqa = tmp_path / "medqa-usmle-4opt"
    medqa.mkdir()
    good = json.dumps({"question": "q", "options": dict(A="a", B="b", C="c", D="d"), "answer_idx": "A"})
    (medqa / "phrases_no_exclude_test.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(ev.DataError, match=r"phrases_no_exclude_test.jsonl, line 3: not valid JSON"):
        ev.build_task("medqa", tmp_path, shots=0)
    (medqa / "phrases_no_exclude_test.jsonl").write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ev.DataError, match=r"phrases_no_exclude_test.jsonl, line 2: missing key 'options'"):
        ev.build_task("medqa", tmp_path, shots=0)
    (medqa / "phrases_no_exclude_test.jsonl").write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ev.DataError, match=r"phrases_no_exclude_test.jsonl, line 2: not UTF-8 text"):
        ev.build_task("medqa", tmp_path, shots=0)
    causal = tmp_path / "fincausal2020"
    causal.mkdir()
    (causal / "fnp2020-fincausal-task1_trial_8628.csv").write_text("Index; Text; Gold\n0001; a; 0\n0002; b; 2\n")
    with pytest.raises(ev.DataError, match=r"trial_8628.csv, line 3: Gold '2' is not 0 or 1"):
        ev.build_task("causal20", tmp_path, shots=0)


def result(name, anatomy, medqa, fiqa):
    return {"name": name, "tasks": {
        "mmlu-medical": {"accuracy": anatomy, "n": 10, "subjects": {"anatomy": {"accuracy": anatomy, "n": 10}}},
        "medqa": {"accuracy": medqa, "n": 10},
        "fiqa-sa": {"accuracy": 0.9, "weighted_f1": fiqa, "macro_f1": 0.1, "n": 10}}}


def test_tables_and_compare_cli(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(result("base", 0.5, 0.25, 0.6)))
    (tmp_path / "b.json").write_text(json.dumps(result("cft", 0.6, 0.25, 0.3)))
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "| model | Anatomy | MedQA | FiQA-SA (wF1) | Average |" in out
    assert "| base | 50.0 | 25.0 | 60.0 | 45.0 |" in out and "| cft | 60.0 | 25.0 | 30.0 | 38.3 |" in out
    assert "| task | base | cft | Δ cft − base |" in out
    assert "| Anatomy | 50.0 | 60.0 | +10.0 |" in out and "| FiQA-SA (wF1) | 60.0 | 30.0 | -30.0 |" in out
    assert "| Average | 45.0 | 38.3 | -6.7 |" in out


def test_cli_bad_inputs_exit_with_one_clear_line(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "taken.json").write_text("{}")
    cases = [(["--compare", str(tmp_path / "missing.json")], "missing.json: no such file"),
             (["--compare", str(tmp_path / "bad.json")], "bad.json: no 'tasks' object"),
             (["--tasks", "mmlu-medical,nope"], "unknown task 'nope'"),
             (["--limit", "0"], "--limit 0: expected an integer >= 1"),
             (["--out", str(tmp_path / "taken.json")], "taken.json exists; refusing to overwrite it"),
             (["--tasks", "medqa", "--data-dir", str(tmp_path), "--tokenizer", str(tmp_path / "none.model")],
              "none.model: no such file")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert str(e.value).startswith("error: ") and expected in str(e.value), argv
    assert (tmp_path / "taken.json").read_text() == "{}"


@needs_data
def test_cli_end_to_end_on_a_tiny_random_model(tmp_path):
    out = tmp_path / "r.json"
    ev.main(["--tasks", "mmlu-medical,fiqa-sa", "--shots", "0", "--limit", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["tasks"]["mmlu-medical"]["n"] == 6 and len(r["tasks"]["mmlu-medical"]["subjects"]) == 6
    assert set(r["tasks"]["fiqa-sa"]) >= {"accuracy", "weighted_f1", "macro_f1", "n"}
    ev.main(["--suite", "icl", "--tasks", "fiqa-sa", "--limit", "1", "--out", str(tmp_path / "icl.json")])
    icl = json.loads((tmp_path / "icl.json").read_text())["tasks"]
    assert list(icl) == ["fiqa-sa k=0", "fiqa-sa k=1", "fiqa-sa k=4", "fiqa-sa k=8"]
    assert [icl[k]["shots"] for k in icl] == [0, 1, 4, 8] and all(icl[k]["n"] == 1 for k in icl)


@needs_data
def test_torchrun_ranks_give_the_single_process_predictions(tmp_path):
    argv = ["--tasks", "medqa,fiqa-sa", "--shots", "1", "--limit", "3"]
    ev.main(argv + ["--out", str(tmp_path / "one.json")])
    torchrun(ROOT / "evaluate.py", argv + ["--out", str(tmp_path / "two.json")], cwd=tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world"] == 2
    for task in ("medqa", "fiqa-sa"):
        assert two["tasks"][task]["predictions"] == one["tasks"][task]["predictions"]
        assert two["tasks"][task]["n"] == 3
