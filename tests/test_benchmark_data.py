"""benchmark_data.py: published prompt formats (golden prompts), k-shot demonstrations outside the test set, and
data errors that name the file and line."""
import json

import pytest

import benchmark_data as bd
from conftest import LLAMA_TOKENIZER, SHARED_DATA, needs_data
from data import Tokenizer
from scoring import encode_questions

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
    q = bd.build_questions("mmlu-medical", SHARED_DATA, shots=2, limit=1)[0]
    assert (q.group, q.prefix + q.text, q.gold) == ("anatomy", GOLDEN_MMLU, 0)
    enc = encode_questions(Tokenizer(LLAMA_TOKENIZER), [q])[0]
    assert enc.context[0] == 1 and enc.continuations == LLAMA_ABCD
    questions = bd.build_questions("mmlu-medical", SHARED_DATA, shots=5)
    assert len(questions) == 1089 and [sum(q.group == s for q in questions) for s in bd.MMLU_SUBJECTS] == \
        [135, 265, 144, 173, 100, 272]


@needs_data
def test_golden_medqa_prompt_and_held_out_demonstrations():
    q = bd.build_questions("medqa", SHARED_DATA, shots=0, limit=1)[0]
    assert (q.prefix + q.text, q.gold) == (GOLDEN_MEDQA, 1)
    assert encode_questions(Tokenizer(LLAMA_TOKENIZER), [q])[0].continuations == LLAMA_ABCD
    # No MedQA train split is staged: k-shot demonstrations come from a fixed pool of test questions, never scored.
    shots = bd.build_questions("medqa", SHARED_DATA, shots=4)
    assert len(shots) == 1273 - bd.MEDQA_DEMO_POOL
    demos = shots[0].prefix.split("\n\n")[:-1]
    assert len(demos) == 4 and not any(d.rsplit(" ", 1)[0] in {q.text for q in shots} for d in demos)
    # The ICL suite scores the same questions at k = 0 as at k > 0.
    zero = bd.build_questions("medqa", SHARED_DATA, shots=0, same_questions_at_every_k=True)
    assert [q.text for q in zero] == [q.text for q in shots] and zero[0].prefix == ""


@needs_data
def test_classification_tasks_load_with_demonstrations_outside_the_test_set():
    sizes = {"fiqa-sa": 235, "causal20": 8628, "multifin": 546}
    for task, n in sizes.items():
        q4, q1 = bd.build_questions(task, SHARED_DATA, shots=4), bd.build_questions(task, SHARED_DATA, shots=1)
        assert len(q4) == n and q4[0].text.endswith("Answer:")
        assert q4[0].prefix.startswith(q1[0].prefix) and q4[0].prefix.count("Answer: ") == 4  # nested across k
        assert not any(q.text in q4[0].prefix for q in q4)


def test_missing_file_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(bd.DataError) as e:
        bd.build_questions("medqa", tmp_path, shots=0)
    message = str(e.value)
    assert str(tmp_path / "medqa-usmle-4opt" / "phrases_no_exclude_test.jsonl") in message
    assert "expected layout" in message and "mmlu-medical/test/<subject>_test.csv" in message


def test_malformed_rows_name_the_file_and_line(tmp_path):
    mmlu = tmp_path / "mmlu-medical"
    (mmlu / "dev").mkdir(parents=True)
    (mmlu / "test").mkdir()
    (mmlu / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\n")
    (mmlu / "test" / "anatomy_test.csv").write_text('q1,a,b,c,d,B\n"multi\nline q",a,b,c,d,C\nq3,a,b,c,E\n')
    with pytest.raises(bd.DataError, match=r"anatomy_test.csv:4: expected 6 ','-separated fields, found 5"):
        bd.build_questions("mmlu-medical", tmp_path, shots=1)
    (mmlu / "test" / "anatomy_test.csv").write_text("q1,a,b,c,d,B\nq2,a,b,c,d,E\n")
    with pytest.raises(bd.DataError, match=r"anatomy_test.csv:2: answer 'E' is not one of A, B, C, D"):
        bd.build_questions("mmlu-medical", tmp_path, shots=1)
    medqa = tmp_path / "medqa-usmle-4opt"
    medqa.mkdir()
    good = json.dumps({"question": "q", "options": dict(A="a", B="b", C="c", D="d"), "answer_idx": "A"})
    (medqa / "phrases_no_exclude_test.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(bd.DataError, match=r"phrases_no_exclude_test.jsonl:3: not valid JSON"):
        bd.build_questions("medqa", tmp_path, shots=0)
    (medqa / "phrases_no_exclude_test.jsonl").write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(bd.DataError, match=r"phrases_no_exclude_test.jsonl:2: no field 'options'"):
        bd.build_questions("medqa", tmp_path, shots=0)
    (medqa / "phrases_no_exclude_test.jsonl").write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(bd.DataError, match=r"phrases_no_exclude_test.jsonl:2: not UTF-8 text"):
        bd.build_questions("medqa", tmp_path, shots=0)
    causal = tmp_path / "fincausal2020"
    causal.mkdir()
    (causal / "fnp2020-fincausal-task1_trial_8628.csv").write_text("Index; Text; Gold\n0001; a; 0\n0002; b; 2\n")
    with pytest.raises(bd.DataError, match=r"trial_8628.csv:3: Gold '2' is not 0 or 1"):
        bd.build_questions("causal20", tmp_path, shots=0)


def test_stratified_subset_keeps_the_class_shares():
    golds = [0] * 76 + [1] * 18 + [2] * 141  # FiQA-SA's test classes (Negative, Neutral, Positive)
    # 40 x (76, 18, 141) / 235 = (12.94, 3.06, 24.0): floors 12, 3, 24, the last one to the largest remainder
    assert bd.stratified_quota({0: 76, 1: 18, 2: 141}, 40) == {0: 13, 1: 3, 2: 24}
    keep = bd.subset_indices(golds, 40, 7, "random", stratified=True)
    assert [sum(golds[i] == c for i in keep) for c in (0, 1, 2)] == [13, 3, 24] and keep == sorted(keep)
    assert keep == bd.subset_indices(golds, 40, 7, "random", stratified=True)  # seeded
    assert keep != bd.subset_indices(golds, 40, 8, "random", stratified=True)
    assert bd.subset_indices(golds, 40, 7, "first") == list(range(40))
    assert len(set(bd.subset_indices(golds, 10, 7, "random"))) == 10
    assert bd.subset_indices(golds, 500, 7, "random") == list(range(235))
    assert sum(bd.stratified_quota({"a": 1, "b": 1, "c": 1}, 2).values()) == 2
    with pytest.raises(bd.DataError, match="--limit-mode 'last'"):
        bd.subset_indices(golds, 4, 0, "last")


@needs_data
def test_limit_draws_the_same_stratified_questions_at_every_k():
    first = bd.build_questions("fiqa-sa", SHARED_DATA, shots=0, limit=40)  # the old behaviour: all Negative
    assert {q.gold for q in first} == {0}
    picks = [bd.build_questions("fiqa-sa", SHARED_DATA, shots=k, limit=40, limit_mode="random") for k in (0, 4)]
    assert [q.doc_id for q in picks[0]] == [q.doc_id for q in picks[1]]
    assert [sum(q.gold == c for q in picks[0]) for c in (0, 1, 2)] == [13, 3, 24]
    mmlu = bd.build_questions("mmlu-medical", SHARED_DATA, shots=0, limit=3, limit_mode="random")
    assert [q.group for q in mmlu] == [s for s in bd.MMLU_SUBJECTS for _ in range(3)]
    assert bd.describe_subset("fiqa-sa", 40, "random") == \
        "40 drawn at random (class-stratified, seeded; --limit-mode first for the first 40)"
    assert bd.describe_subset("mmlu-medical", 3, "first") == "the first 3 per subject (--limit-mode first)"
