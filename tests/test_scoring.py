"""scoring.py: the one tokenization rule, the option scores (summed, per token, per character), and the fast path
(shared prefix, batches, rank split, soft prompt, a given prefix_kv) equal to the plain one-question-at-a-time path."""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import scoring as sc
from answer_generation import bucket_length, generate_answers
from benchmark_data import Question
from conftest import tiny_cfg
from data import Tokenizer
from evaluate import load_soft_prompt
from model import create_model, generate, prefill


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
    questions = [Question("g", "Header.\n\n", f"The patient reduced the dose {i}.\nAnswer:",
                             ("pain", "drug", "dose", "risk") if i % 2 else ("B", "the risk", "revenue"), 0)
                 for i in range(6)]
    encoded = sc.encode_questions(tok, questions)
    scores = sc.score_options(model, encoded, batch_tokens=64, progress=False)
    for enc, s in zip(encoded, scores):
        expected = [logprobs[c].sum().item() for c in enc.continuations]  # the sum over the option's tokens
        assert s == pytest.approx(expected, abs=1e-4)
        assert sc.predict([s]) == [max(range(len(expected)), key=expected.__getitem__)]
    # Make option C of the single-token questions by far the likeliest: every prediction follows.
    c_token = encoded[1].continuations[2][-1]
    bias[c_token] += 50
    scores = sc.score_options(forced_model(bias), encoded, progress=False)
    assert [p for p, q in zip(sc.predict(scores), questions) if len(q.choices) == 4] == [2, 2, 2]


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
        questions.append(Question(group, prefix, text, choices, i % len(choices)))
    return questions


def flat(scores):
    return torch.tensor([x for row in scores for x in row])


def test_batched_cached_scoring_equals_the_plain_path(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    encoded = sc.encode_questions(tok, synthetic_questions())
    assert any(sc.single_token(q) for q in encoded) and not all(sc.single_token(q) for q in encoded)
    g1, g2 = ([q.context for q in encoded if q.group == g] for g in ("g1", "g2"))
    assert sc.shared_prefix_len(g1) >= sc.MIN_SHARED_PREFIX > sc.shared_prefix_len(g2)
    plain = sc.score_naive(lambda t: model(t), encoded)
    for batch_tokens in (1, 48, 4096):  # one row per batch, several padded rows, everything at once
        for per_row_prefix in (False, True):
            fast = sc.score_options(model, encoded, batch_tokens=batch_tokens, progress=False,
                                 per_row_prefix=per_row_prefix)
            assert torch.allclose(flat(fast), flat(plain), atol=1e-4), (batch_tokens, per_row_prefix)
    # torchrun split: each rank scores every other row; together they give the same numbers.
    halves = [sc.score_options(model, encoded, batch_tokens=48, rank=r, world=2, progress=False) for r in (0, 1)]
    assert torch.allclose(flat(halves[0]) + flat(halves[1]), flat(plain), atol=1e-4)


def test_soft_prompt_comes_before_bos_and_matches_the_plain_path(tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    soft = torch.randn(3, model.cfg.dim)
    save_file({"soft_prompt": soft}, tmp_path / "soft.safetensors")
    soft = load_soft_prompt(tmp_path / "soft.safetensors", model.cfg.dim)
    encoded = sc.encode_questions(tok, synthetic_questions())

    def plain_with_soft_prompt(tokens):  # cft.py's ProMoT layout: [soft prompt] + BOS + text
        logits = model(embeds=torch.cat([soft[None], model.embed_tokens(tokens)], dim=1))
        return logits[:, len(soft):]  # drop the soft positions' outputs

    plain = sc.score_naive(plain_with_soft_prompt, encoded)
    fast = sc.score_options(model, encoded, batch_tokens=48, soft_prompt=soft, progress=False)
    assert torch.allclose(flat(fast), flat(plain), atol=1e-4)
    assert not torch.allclose(flat(fast), flat(sc.score_naive(lambda t: model(t), encoded)), atol=1e-3)


def test_option_tokens_is_the_harness_rule_with_its_fallback(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    context = "The patient reduced the dose.\nAnswer:"
    ids = tok.encode(context)
    for option in ("pain", "the risk", "B"):
        whole = tok.encode(context + " " + option)
        assert whole[:len(ids)] == ids and sc.option_tokens(tok, ids, context, option) == whole[len(ids):]
    # encode_questions applies the same rule, after [BOS] + context, and counts the characters of " " + option
    q = Question("g", "Header.\n\n", "The patient reduced the dose.\nAnswer:", ("pain", "the risk"), 1)
    enc = sc.encode_questions(tok, [q])[0]
    prompt = q.prefix + q.text
    assert enc.context == [tok.bos_id] + tok.encode(prompt) and enc.option_chars == [5, 9]
    assert enc.continuations == [sc.option_tokens(tok, tok.encode(prompt), prompt, o) for o in q.choices]
    assert sc.encode_questions(tok, [q], bos=False)[0].context == tok.encode(prompt)
    # context tokens that are not a prefix of the whole: the option's own tokens, encode(" " + option)
    assert sc.option_tokens(tok, [3, 3, 3], context, "the risk") == tok.encode(" the risk")
    with pytest.raises(ValueError, match="adds no token"):
        sc.option_tokens(tok, ids, context, "")


def test_reductions_divide_the_sum_by_tokens_or_characters(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    encoded = sc.encode_questions(tok, synthetic_questions())
    total = sc.score_options(model, encoded, batch_tokens=48, progress=False)
    per_token = [[s / len(c) for s, c in zip(row, q.continuations)] for row, q in zip(total, encoded)]
    per_char = [[s / len(" " + o) for s, o in zip(row, q.choices)] for row, q in zip(total, synthetic_questions())]
    for reduction, expected in (("mean", per_token), ("chars", per_char)):
        fast = sc.score_options(model, encoded, batch_tokens=48, reduction=reduction, progress=False)
        plain = sc.score_naive(lambda t: model(t), encoded, reduction=reduction)
        assert torch.allclose(flat(fast), flat(expected), atol=1e-5), reduction
        assert torch.allclose(flat(plain), flat(expected), atol=1e-4), reduction
    assert any(len(c) > 1 for q in encoded for c in q.continuations)  # "mean" differs from "sum" somewhere
    with pytest.raises(ValueError, match="reduction 'max'"):
        sc.score_options(model, encoded, reduction="max", progress=False)


def test_given_prefix_kv_matches_the_plain_path_over_the_whole_context(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    context = [tok.bos_id] + tok.encode("The patient reduced the dose in two weeks.\nAnswer: pain\n\n")
    prefix_kv = prefill(model, torch.tensor([context]))
    questions = [Question("g", q.prefix, q.text, q.choices, q.gold) for q in synthetic_questions()]
    encoded = sc.encode_questions(tok, questions, bos=False)  # the prefix_kv holds BOS
    plain = sc.score_naive(lambda t: model(torch.cat([torch.tensor([context]), t], dim=1))[:, len(context):],
                           encoded, reduction="mean")
    for per_row_prefix in (False, True):
        fast = sc.score_options(model, encoded, batch_tokens=48, prefix_kv=prefix_kv, reduction="mean",
                                progress=False, per_row_prefix=per_row_prefix)
        assert torch.allclose(flat(fast), flat(plain), atol=1e-4), per_row_prefix
    with pytest.raises(ValueError, match="not both"):
        sc.score_options(model, encoded, prefix_kv=prefix_kv, soft_prompt=torch.zeros(2, model.cfg.dim))


def test_too_long_warning_suggests_fewer_shots_only_when_the_caller_has_some(tokenizer_path, capsys):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(max_seq_len=8), seed=0).eval()
    encoded = sc.encode_questions(tok, synthetic_questions()[:2])
    sc.score_options(model, encoded, progress=False)
    warning = capsys.readouterr().err
    assert "past the model's max_seq_len 8" in warning and "shots" not in warning  # a 0-shot prompt: no such advice
    sc.score_options(model, encoded, progress=False, too_long_advice="fewer --shots would fit")
    assert "max_seq_len 8 (fewer --shots would fit)" in capsys.readouterr().err


def varied_questions(seed: int, n: int = 24):
    """Three groups with cached prefixes of different lengths, question texts of 1 to 40 words."""
    g = torch.Generator().manual_seed(seed)
    words = ["the patient", "a doctor", "the drug", "this trial", "the dose", "two weeks", "side effects", "pain"]
    questions = []
    for i in range(n):
        group = i % 3
        prefix = "The patient reduced the dose in two weeks.\nAnswer: pain\n\n" * (3 + 2 * group)
        n_words = int(torch.randint(1, 40, (1,), generator=g))
        text = " ".join(words[int(j)] for j in torch.randint(len(words), (n_words,), generator=g)) + ".\nAnswer:"
        questions.append(Question(f"g{group}", prefix, text, ("pain", "drug", "dose", "risk"), 0))
    return questions


def test_groups_with_cached_prefixes_of_different_lengths_match_the_plain_path(tokenizer_path):
    """Batches of varied row counts and lengths after prefixes of varied lengths (the shapes the compiled attention
    sees on CUDA) score as one question at a time does, with the prefix shared (batch 1) or handed per row."""
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    encoded = sc.encode_questions(tok, varied_questions(0))
    plain = sc.score_naive(lambda t: model(t), encoded)
    for per_row_prefix in (False, True):
        fast = sc.score_options(model, encoded, batch_tokens=256, progress=False, per_row_prefix=per_row_prefix)
        assert torch.allclose(flat(fast), flat(plain), atol=1e-4), per_row_prefix


def test_generation_shape_buckets_give_the_same_answers_in_few_prefill_shapes(tokenizer_path):
    """answer_generation's buckets: a pad-token prompt sets the bucket length (model.generate's pad_left mask hides
    the extra left padding from the real rows), padding rows are dropped; the answers equal one prompt at a time."""
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(), seed=0).eval()
    questions = varied_questions(2, n=12)
    prompts, groups = [e.context for e in sc.encode_questions(tok, questions)], [q.group for q in questions]
    plain = [generate(model, [p], 4)[0] for p in prompts]
    prefills, forward = [], model.hidden_states

    def recording(tokens=None, **kwargs):
        if kwargs.get("mask") is not None and kwargs.get("cache") is not None and kwargs["cache"].length == 0:
            prefills.append(tuple(tokens.shape))  # model.generate's prefill of a batch (then one-token steps)
        return forward(tokens, **kwargs)
    model.hidden_states = recording
    shapes = {}
    for buckets in (False, True):
        for batch_tokens in (1, 200, 4096):  # one row per batch (+ the length-setting row), several, all at once
            prefills.clear()
            answers = generate_answers(model, prompts, groups, max_new_tokens=4, eos_id=None,
                                       batch_tokens=batch_tokens, progress=False, shape_buckets=buckets)
            assert answers == plain, (buckets, batch_tokens)
            shapes[buckets, batch_tokens] = set(prefills)
    assert all(length == bucket_length(length) for _, length in shapes[True, 200])
    assert len(shapes[True, 200]) < len(shapes[False, 200])
    halves = [generate_answers(model, prompts, groups, max_new_tokens=4, eos_id=None, batch_tokens=200, rank=r,
                               world=2, progress=False, shape_buckets=True) for r in (0, 1)]
    assert [a if a is not None else b for a, b in zip(*halves)] == plain
