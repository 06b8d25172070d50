"""Context tuning: the leave-one-out and dropout masks, zero gradients where the paper says so, exact reduction to
ICL at zero steps, positions after the prefix, task files and bad input."""
import json
import math
import shutil

import pytest
import torch

import context_tuning as ct
import ct_methods as cm
import ct_regression
import ct_reproduction
import icl_regression
import scoring
from conftest import SHARED_DATA, tiny_cfg
from data import Tokenizer
from hf_checkpoint import save_pretrained
from model import AttentionMask, MaskLayout, allowed, create_model, prefill

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster

TASK = {"name": "toy", "demos": [{"input": "The patient reported", "output": "pain"},
                                 {"input": "A company showed", "output": "profits in the first quarter"},
                                 {"input": "The drug reduced", "output": "the risk"},
                                 {"input": "This trial measured", "output": "blood pressure"}],
        "queries": [{"input": "We treated", "output": "inflammation", "options": ["inflammation", "revenue"]},
                    {"input": "The market caused", "output": "side effects"}]}


@pytest.fixture(scope="module")
def setup(tokenizer_path):
    torch.manual_seed(0)
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(tok.vocab_size), seed=0).eval().requires_grad_(False)
    task = ct.parse_task(TASK, "toy")
    return tok, model, task, ct.token_episode(model, tok, task)


def test_spans_tile_the_context(setup):
    _, _, _, ep = setup
    spans, context = ep.spans(), ep.context()[0]
    assert spans[0, 0] == 1 and spans[-1, 1] == context.shape[0]  # after BOS, up to P
    assert torch.equal(spans[1:, 0], spans[:-1, 1])
    for (s, e), demo in zip(spans.tolist(), ep.demos):
        assert torch.equal(context[s:e], demo.embeds)


def test_leave_one_out_hides_exactly_span_i(setup):
    _, _, _, ep = setup
    spans, k, P = ep.spans(), len(ep.demos), ep.context().shape[1]
    T = ep.pairs()[0].shape[1]
    mask = MaskLayout(AttentionMask(hidden_span=spans), prefix_len=P)
    b, q, kv = torch.arange(k)[:, None, None], torch.arange(T)[None, :, None], torch.arange(P + T)[None, None, :]
    got = allowed(mask, b, q, kv)
    in_span = (kv >= spans[:, 0, None, None]) & (kv < spans[:, 1, None, None])
    assert torch.equal(got, (kv <= P + q) & ~in_span)  # naive reference: causal minus span i, nothing else


def test_gradient_of_pair_i_wrt_demo_i_kv_is_zero(setup):
    tok, model, _, ep = setup
    spans = ep.spans()
    kv = [(k.clone().requires_grad_(), v.clone().requires_grad_()) for k, v in prefill(model, embeds=ep.context())]
    pairs = ep.pairs()
    generator = torch.Generator().manual_seed(0)
    for i in range(len(ep.demos)):
        rows = torch.tensor([i])
        dropped = cm.dropout_mask(1, spans[-1, 1].item(), 0.1, generator, "cpu")
        loss = cm.kv_pair_losses(model, io := ct.TokenIO(model), pairs, rows, kv, spans, dropped).sum()
        grads = torch.autograd.grad(loss, [t for layer in kv for t in layer])
        s, e = spans[i].tolist()
        for g in grads:
            assert torch.equal(g[:, :, s:e], torch.zeros_like(g[:, :, s:e]))
            assert g[:, :, :s].abs().sum() + g[:, :, e:].abs().sum() > 0  # the rest of the prefix does get gradient
    # CT-Prompt's strict leave-one-out: demonstration i's embeddings get no gradient from pair i either.
    prompt = ep.context().clone().requires_grad_()
    for i in range(len(ep.demos)):
        loss = cm.prompt_pair_losses(model, io, pairs, torch.tensor([i]), prompt, spans).sum()
        (g,) = torch.autograd.grad(loss, prompt)
        s, e = spans[i].tolist()
        assert torch.equal(g[:, s:e], torch.zeros_like(g[:, s:e])) and g.abs().sum() > 0


def test_dropout_hits_only_prefix_positions_at_rate_p(setup):
    generator = torch.Generator().manual_seed(0)
    P, T, p = 50, 7, 0.1
    dropped = cm.dropout_mask(400, P, p, generator, "cpu")
    assert dropped.shape == (400, P) and abs(dropped.float().mean().item() - p) < 0.01
    assert cm.dropout_mask(4, P, 0.0, generator, "cpu") is None
    mask = MaskLayout(AttentionMask(dropped=dropped), prefix_len=P)
    b, q, kv = torch.arange(400)[:, None, None], torch.arange(T)[None, :, None], torch.arange(P + T)[None, None, :]
    got = allowed(mask, b, q, kv)
    assert torch.equal(got[:, :, P:], (kv <= P + q)[..., P:].expand(400, T, T))  # query keys never dropped
    assert torch.equal(got[:, :, :P], ~dropped[:, None, :].expand(400, T, P))  # prefix: exactly the mask's drops


def query_logits(model, prefix_kv, tok, text):
    return model(torch.tensor([tok.encode(text)]), prefix_kv=prefix_kv)


def test_zero_steps_of_ct_kv_and_ct_prompt_reproduce_icl_exactly(setup):
    tok, model, task, ep = setup
    cfg = cm.TuneConfig(steps=0, ct_prompt_steps=0, progress=False)
    io = ct.TokenIO(model)
    icl = query_logits(model, cm.adapt("icl", model, io, ep, cfg)[1], tok, "We treated inflammation")
    for method in ("ct-kv", "ct-prompt"):
        _, prefix_kv = cm.adapt(method, model, io, ep, cfg)
        assert torch.equal(query_logits(model, prefix_kv, tok, "We treated inflammation"), icl), method
    # ...and ICL through the prefix is the same computation as one pass over [context, query].
    query = tok.encode("We treated inflammation")
    full = model(embeds=torch.cat([ep.context(), model.embed_tokens(torch.tensor([query]))], dim=1))
    torch.testing.assert_close(full[:, -len(query):], icl, atol=1e-5, rtol=1e-5)


def test_options_are_scored_by_mean_per_token_loss(setup):
    """The answer is the option with the lowest mean per-token loss after the context (a naive full pass here)."""
    tok, model, _, ep = setup
    query = ct.Query("We treated", "the risk", ["pain", "the risk", "profits in the first quarter", "revenue"])
    x = tok.encode(query.input)

    def mean_loss(option):  # continuation tokens by scoring.py's one rule, as the demonstrations are tokenized
        ids = x + scoring.option_tokens(tok, x, query.input, option)
        inputs = torch.cat([ep.context()[0], model.embed_tokens(torch.tensor(ids))])[None]
        logp = model(embeds=inputs)[0, -len(ids):].log_softmax(-1)[len(x) - 1:-1]
        return -logp.gather(1, torch.tensor(ids[len(x):])[:, None]).mean().item()
    losses = {o: mean_loss(o) for o in query.options}
    assert len(set(losses.values())) == len(losses)  # no ties: the test can tell options apart
    prefix_kv = prefill(model, embeds=ep.context())
    assert ct.choose_options(model, tok, prefix_kv, "toy", [query]) == [min(losses, key=losses.get)]


def test_training_pairs_sit_at_positions_from_P(setup):
    """Pair i after the prefix gives the same loss as one plain causal pass over [context, demonstration i]: rotary
    positions continue at P (a pair re-started at 0 would not match)."""
    _, model, _, ep = setup
    io, pairs = ct.TokenIO(model), ep.pairs()
    kv = prefill(model, embeds=ep.context())
    losses = cm.kv_pair_losses(model, io, pairs, torch.arange(len(ep.demos)), kv)
    for i, demo in enumerate(ep.demos):
        hidden = model.hidden_states(embeds=torch.cat([ep.context()[0], demo.embeds])[None])[:, -len(demo.embeds):]
        expected = cm.row_losses(io, hidden, demo.targets[None], demo.in_loss[None])
        torch.testing.assert_close(losses[i:i + 1], expected, atol=1e-5, rtol=1e-5)


def test_methods_train_and_leave_the_model_untouched(setup):
    tok, model, task, ep = setup
    io, pairs, rows = ct.TokenIO(model), ep.pairs(), torch.arange(len(ep.demos))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cfg = cm.TuneConfig(steps=15, lr=1e-2, ttt_lr=1e-2, dropout=0.0, leave_one_out=False, progress=False,
                        ct_prompt_steps=15, prompt_tuning_steps=15, prefix_tuning_steps=15, ttt_steps=15,
                        ttt_kv_steps=15)
    start = cm.kv_pair_losses(model, io, pairs, rows, prefill(model, embeds=ep.context())).mean()
    for method in cm.METHODS:
        answer_model, prefix_kv = cm.adapt(method, model, io, ep, cfg)
        if method in ("ct-kv", "ttt+ct-kv", "ttt"):
            tuned = cm.kv_pair_losses(answer_model, io, pairs, rows, prefix_kv).mean()
            assert tuned < start, method  # training on the pairs (no leave-one-out here) lowers their loss
        assert 0.0 <= ct.evaluate_task(answer_model, tok, prefix_kv, task, 4, progress=False) <= 1.0
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # TTT adapts a copy


def test_bf16_keeps_fp32_master_kv(setup):
    tok, model, task, _ = setup
    bf16 = create_model(model.cfg, dtype=torch.bfloat16, seed=0).eval()
    ep = ct.token_episode(bf16, tok, task)
    prefix = cm.adapt("ct-kv", bf16, ct.TokenIO(bf16), ep, cm.TuneConfig(steps=2, progress=False))[1]
    assert prefix[0][0].dtype == torch.bfloat16 and prefix[0][0].shape[0] == 1  # one shared prefix, not per row


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(demos=[]), "task has no demonstrations"),
    (lambda t: t.pop("demos"), "task has no demonstrations"),
    (lambda t: t["queries"][0].update(options=["revenue", "pain"]), "do not contain the gold output 'inflammation'"),
    (lambda t: t["demos"][1].pop("output"), "demos[1]: no field 'output'"),
    (lambda t: t.update(queries=[]), "task has no queries"),
])
def test_bad_task_files_fail_with_one_clear_line(tmp_path, change, message):
    task = json.loads(json.dumps(TASK))
    change(task)
    path = write_jsonl(tmp_path / "tasks.jsonl", [TASK, task])
    with pytest.raises(SystemExit) as e:
        ct.main(["--tasks", str(path), "--write-tasks", str(tmp_path / "out.jsonl")])
    assert str(e.value).startswith(f"error: {path}:2: ") and message in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: not valid JSON"):
        ct.main(["--tasks", str(tmp_path / "bad.jsonl"), "--write-tasks", str(tmp_path / "out.jsonl")])


def test_demonstrations_longer_than_the_context(setup, capsys):
    tok, model, task, _ = setup
    short = create_model(tiny_cfg(tok.vocab_size, max_seq_len=24), seed=0)
    with pytest.raises(ValueError, match="more than the model's context \\(24\\).*--truncate-demos"):
        ct.token_episode(short, tok, task)
    ep = ct.token_episode(short, tok, task, truncate=True)
    assert 0 < len(ep.demos) < len(task.demos) and ep.context().shape[1] <= 24
    assert "dropped the first" in capsys.readouterr().err


def test_cli_runs_writes_and_resumes(setup, tmp_path, tokenizer_path, capsys):
    _, model, _, _ = setup
    save_pretrained(model, tmp_path / "ckpt")
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [TASK])
    out = tmp_path / "results.jsonl"
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", tokenizer_path, "--tasks", str(tasks),
            "--method", "ct-kv", "--steps", "2", "--out", str(out), "--device", "cpu", "--precision", "fp32"]
    ct.main(argv)
    result = json.loads(out.read_text())
    assert result["task"] == "toy" and result["method"] == "ct-kv" and result["k"] == 4 and result["n_queries"] == 2
    ct.main(argv)
    assert "skipping" in capsys.readouterr().out and len(out.read_text().splitlines()) == 1
    with pytest.raises(SystemExit, match="exists; refusing to overwrite"):
        ct.main(["--tasks", str(tasks), "--write-tasks", str(tasks)])
    with pytest.raises(SystemExit, match="--checkpoint is required"):
        ct.main(["--tasks", str(tasks)])
    # the one tokenizer rule: without --tokenizer, the checkpoint folder's tokenizer.model
    icl_argv = ["--checkpoint", str(tmp_path / "ckpt"), "--tasks", str(tasks), "--method", "icl", "--out", str(out),
                "--device", "cpu"]
    with pytest.raises(SystemExit, match="no tokenizer: .*ckpt has no tokenizer.model; pass --tokenizer"):
        ct.main(icl_argv)
    shutil.copy(tokenizer_path, tmp_path / "ckpt" / "tokenizer.model")
    ct.main(icl_argv)
    assert [json.loads(line)["method"] for line in out.read_text().splitlines()] == ["ct-kv", "icl"]


@pytest.mark.skipif(not (SHARED_DATA / "multifin").is_dir(), reason="shared data absent")
def test_converters_make_k_shot_tasks_from_the_shared_data(tmp_path):
    sizes = {"multifin-en": (546, 6), "fiqa-sa": (235, 3), "causal20": (8628, 2)}
    for name, (n_queries, n_options) in sizes.items():
        (task,) = ct.make_tasks(name, SHARED_DATA, 16, seed=1)
        assert len(task.demos) == 16 and len(task.queries) == n_queries
        assert all(q.output in q.options and len(q.options) == n_options for q in task.queries)
        assert not {x for x, _ in task.demos} & {q.input for q in task.queries}
    mmlu = ct.make_tasks("mmlu-medical", SHARED_DATA, 5, max_queries=10)
    assert len(mmlu) == 6 and all(len(t.queries) == 10 and t.queries[0].options == list("ABCD") for t in mmlu)
    with pytest.raises(ValueError, match="mmlu-anatomy: only 5 demonstrations"):
        ct.make_tasks("mmlu-medical", SHARED_DATA, 16)
    with pytest.raises(SystemExit, match="--tasks nosuch: neither a .jsonl task file nor one of multifin-en"):
        ct.main(["--tasks", "nosuch", "--write-tasks", str(tmp_path / "x.jsonl")])
    out = tmp_path / "fiqa.jsonl"
    ct.main(["--tasks", "fiqa-sa", "--k", "4", "--max-queries", "20", "--write-tasks", str(out)])
    (task,) = ct.load_tasks(out)  # the written file reads back through the validator
    assert len(task.demos) == 4 and len(task.queries) == 20


def test_regression_backbone_icl_matches_synthetic_forward_and_quick_experiment_runs():
    """On icl_regression.py's regression transformer: ICL through the prefix predicts what the model's own forward over
    [demonstrations, query] predicts; the --quick experiment reports every method and the ablation."""
    reg = icl_regression.build_regression_model(icl_regression.REGRESSION_PRESETS["test"], seed=0)
    reg = reg.eval().requires_grad_(False)
    io = ct_regression.RegressionIO(reg)
    task = icl_regression.sample_tasks("shifted-linear", 1, 5, reg.n_dims, icl_regression.generator("cpu", 0, "t"))
    xs, ys = task.xs[0], task.values()[0]
    ep = ct_regression.regression_episode(io, xs[:4], ys[:4])
    _, prefix_kv = cm.adapt("icl", reg.backbone, io, ep, cm.TuneConfig(progress=False))
    hidden = reg.backbone.hidden_states(embeds=io.embed(xs[None, 4:], ys[None, 4:] * 0)[:, :1], prefix_kv=prefix_kv)
    torch.testing.assert_close(reg.read_out(hidden)[0, 0, 0], reg(xs[None], ys[None])[0, -1], atol=1e-5, rtol=1e-5)
    errors = ct_regression.regression_errors(cm.Adapted(reg.backbone, prefix_kv), io, xs[None, 4:], ys[None, 4:])
    assert errors[0] == pytest.approx((reg(xs[None], ys[None])[0, -1] - ys[4]).item() ** 2, rel=1e-4)
    q = ct_regression.CTQuickConfig(ks=[3], tasks_per_seed=1, queries_per_task=4, seeds=2, steps=2)
    results = ct_reproduction.quick_experiment(reg, q, progress=False)
    assert set(results) == set(cm.METHODS) | set(ct_reproduction.ABLATION)
    for name, r in results.items():
        assert len(r["mse_per_seed"]) == 2 and math.isfinite(r["mse"]) and math.isfinite(r["mse_std"]), name
    # seeded: TTT's adapters and dropout included
    assert results == ct_reproduction.quick_experiment(reg, q, progress=False)
