"""Context tuning's methods as marc (the first author's research code) runs them: TTT's LoRA (scale 1, six
projections) on permutations of all k demonstrations with loss on every answer, BOS never dropped or trained, the
official token-weighted loss, CT-Prompt's step per mini-batch, prompt/prefix tuning from dummy ids, TTT + CT-KV's
shorter CT-KV, and several tasks trained at once equal to one at a time."""
import itertools
from dataclasses import replace

import pytest
import torch

import context_tuning as ct
import ct_methods as cm
import ct_regression
import ct_timing
import icl_regression
from conftest import tiny_cfg
from data import Tokenizer
from lora import LoRALinear
from model import create_model, prefill

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = {"name": "toy", "demos": [{"input": "The patient reported", "output": "pain"},
                                 {"input": "A company showed", "output": "profits in the first quarter"},
                                 {"input": "The drug reduced", "output": "the risk"}],
        "queries": [{"input": "We treated", "output": "pain", "options": ["pain", "revenue"]}]}
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def setup(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = create_model(tiny_cfg(tok.vocab_size), seed=0).eval().requires_grad_(False)
    task = ct.parse_task(TASK, "toy")
    return tok, model, task, ct.token_episode(model, tok, task)


class RecordingIO(ct.TokenIO):
    """TokenIO that records every (embeds-free) loss call: targets and loss positions of each row."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def loss_sums(self, hidden, targets, in_loss):
        self.calls.append((targets.detach().clone(), in_loss.clone()))
        return super().loss_sums(hidden, targets, in_loss)


def test_ttt_lora_is_scale_one_on_the_six_projections_by_default(setup):
    _, model, _, ep = setup
    cfg = cm.TuneConfig(**QUIET)
    assert (cfg.ttt_rank, cfg.ttt_alpha, cfg.ttt_dropout, cfg.ttt_lr) == (64, 64.0, 0.05, 1e-4)
    adapted = create_model(model.cfg, seed=0)
    cm.tune_lora(adapted, ct.TokenIO(adapted), ep, replace(cfg, steps=0))
    layers = cm.lora_modules(adapted)
    assert {name.rsplit(".", 1)[-1] for name in layers} == {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"}
    assert len(layers) == 6 * model.cfg.n_layers
    assert all(m.scale == 1.0 and m.rank == 64 and m.dropout.p == 0.05 for m in layers.values())
    assert not any(isinstance(m, LoRALinear) for m in cm.adapt("ttt", model, ct.TokenIO(model), ep,
                                                                 replace(cfg, ttt_steps=1))[0].modules())  # merged


def test_ttt_rows_are_permutations_of_all_demonstrations_with_loss_on_every_answer(setup):
    _, model, _, ep = setup
    io = RecordingIO(model)
    cfg = cm.TuneConfig(ttt_steps=3, ttt_batch_size=2, ttt_permutations=5, **QUIET)
    cm.adapt("ttt", model, io, ep, cfg)
    answers = [d.targets[d.in_loss].tolist() for d in ep.demos]
    assert len(io.calls) == 3  # one optimiser step per mini-batch of sequences
    for targets, in_loss in io.calls:
        assert targets.shape == (2, ep.context().shape[1])  # BOS + all k demonstrations
        for row_targets, row_in_loss in zip(targets, in_loss):
            got = row_targets[row_in_loss].tolist()
            assert row_in_loss.sum() == sum(map(len, answers))  # loss on every answer, the first one included
            found, rest = [], got
            while rest:  # the row's answers are the k demonstrations' answers, each once, in some order
                i = next(i for i, a in enumerate(answers) if i not in found and rest[:len(a)] == a)
                found.append(i)
                rest = rest[len(answers[i]):]
            assert sorted(found) == list(range(len(answers)))
    stack = cm.stack_episodes(ep)
    orders = cm.ttt_orders([torch.Generator().manual_seed(0)], 50, 3)
    assert {tuple(o) for o in orders[0].tolist()} == set(itertools.permutations(range(3)))
    positions = cm.permuted_positions(stack, orders)
    assert torch.equal(positions[0, :, 0], torch.zeros(50, dtype=torch.long))  # BOS first in every row
    assert all(sorted(row.tolist()) == list(range(stack.context.shape[1])) for row in positions[0])


def test_bos_is_never_dropped_nor_trained(setup, monkeypatch):
    _, model, _, ep = setup
    generator = torch.Generator().manual_seed(0)
    dropped = cm.dropout_mask(2000, 10, 0.5, generator, "cpu", keep=1)
    assert not dropped[:, 0].any() and dropped[:, 1:].float().mean().item() == pytest.approx(0.5, abs=0.02)
    seen = []
    kv_sums, prompt_sums = cm.kv_pair_sums, cm.prompt_pair_sums
    monkeypatch.setattr(cm, "kv_pair_sums", lambda *a, **kw: seen.append(a[7]) or kv_sums(*a, **kw))
    monkeypatch.setattr(cm, "prompt_pair_sums", lambda *a, **kw: seen.append(a[7]) or prompt_sums(*a, **kw))
    cfg = cm.TuneConfig(steps=5, dropout=0.9, ct_prompt_steps=5, ct_prompt_dropout=0.9, **QUIET)
    initial = prefill(model, embeds=ep.context())
    _, tuned = cm.adapt("ct-kv", model, ct.TokenIO(model), ep, cfg)
    cm.adapt("ct-prompt", model, ct.TokenIO(model), ep, cfg)
    assert len(seen) == 10 and all(d is not None and d[:, 0].sum() == 0 and d[:, 1:].any() for d in seen)
    for (k0, v0), (k1, v1) in zip(initial, tuned):
        assert torch.equal(k0[:, :, :1], k1[:, :, :1]) and torch.equal(v0[:, :, :1], v1[:, :, :1])  # BOS's K/V
        assert not torch.equal(k0[:, :, 1:], k1[:, :, 1:])  # the demonstrations' K/V did train


def test_no_bos_layout_is_marcs(setup):
    tok, model, task, ep = setup
    bare = ct.token_episode(model, tok, task, bos=False)
    assert len(bare.lead.embeds) == 0 and bare.spans()[0, 0] == 0
    torch.testing.assert_close(bare.context()[0], ep.context()[0, 1:])  # the same demonstrations, no BOS in front
    cfg = cm.TuneConfig(steps=2, dropout=0.5, **QUIET)
    assert cm.adapt("ct-kv", model, ct.TokenIO(model), bare, cfg)[1][0][0].shape[2] == bare.context().shape[1]
    assert cm.adapt("zero-shot", model, ct.TokenIO(model), bare, cfg)[1] is None  # nothing before the query


def test_official_reduction_is_the_token_weighted_mean(setup):
    """The 'tokens' loss of a mini-batch = sum of every answer token's cross-entropy / number of answer tokens
    (Hugging Face's loss over the batch), computed by hand here; 'pairs' = mean of each pair's mean."""
    _, model, _, ep = setup
    io, pairs = ct.TokenIO(model), ep.pairs()
    prefix = prefill(model, embeds=ep.context())
    rows = torch.arange(len(ep.demos))
    sums = cm.kv_pair_sums(model, io, pairs[0], pairs[1], pairs[2], prefix)
    tokens = pairs[2].sum(1)
    per_token = []
    for demo in ep.demos:  # by hand: one plain forward over [context, demonstration i]
        logits = model(embeds=torch.cat([ep.context()[0], demo.embeds])[None])[0, -len(demo.embeds):]
        logp = logits.log_softmax(-1)[demo.in_loss]
        per_token += (-logp.gather(1, demo.targets[demo.in_loss][:, None])[:, 0]).tolist()
    assert len(set(tokens.tolist())) > 1  # answers of different lengths: the two reductions differ
    official = cm.mini_batch_loss(sums[None], tokens[None], tokens.sum()[None], len(rows), "tokens")
    assert official.item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
    per_pair = cm.mini_batch_loss(sums[None], tokens[None], tokens.sum()[None], len(rows), "pairs")
    assert per_pair.item() == pytest.approx(cm.kv_pair_losses(model, io, pairs, rows, prefix).mean().item(), rel=1e-5)
    assert cm.TuneConfig().reduction == "tokens"


@pytest.mark.parametrize("reduction", cm.REDUCTIONS)
def test_micro_batches_keep_the_mini_batch_loss(reduction):
    """optimise's gradient: the token-weighted mean over the whole mini-batch, however it is split for memory."""
    a, tokens = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 3, 2, 5])
    grads = []
    for micro in (0, 1, 3):
        w = torch.nn.Parameter(torch.zeros(1, 4))
        cfg = cm.TuneConfig(steps=1, batch_size=4, micro_batch=micro, reduction=reduction, grad_clip=1e9,
                            on_step=lambda: grads.append(w.grad.clone()), **QUIET)
        cm.optimise([w], lambda rows: w.gather(1, rows) * a[rows], lambda rows: tokens[rows], 4, cfg, "",
                    per_epoch=True)
    expected = a / tokens.sum() if reduction == "tokens" else a / tokens / 4
    for g in grads:
        torch.testing.assert_close(g[0], expected)


def test_step_counts_and_mini_batches_per_method(setup):
    """CT-KV: one step per epoch over mini-batches of batch_size; CT-Prompt and prompt tuning: one step per
    mini-batch of prompt_batch_size pairs; TTT + CT-KV: ttt_kv_steps CT-KV epochs after TTT."""
    _, model, _, ep = setup
    cfg = cm.TuneConfig(steps=3, batch_size=2, ct_prompt_steps=5, prompt_batch_size=2, prompt_tuning_steps=4,
                        prefix_tuning_steps=2, ttt_steps=2, ttt_kv_steps=1, **QUIET)
    # marc's loaders keep the short last batch (drop_last=False): 3 pairs in batches of 2 are batches of 2 and 1
    expected = {"ct-kv": [2, 1] * 3, "prefix-tuning": [2, 1] * 2, "ct-prompt": [2, 1, 2, 1, 2],
                "prompt-tuning": [2, 1, 2, 1]}
    for method, sizes in expected.items():
        io = RecordingIO(model)
        steps = []
        cm.adapt(method, model, io, ep, replace(cfg, on_step=lambda: steps.append(1)))
        assert sorted(len(t) for t, _ in io.calls) == sorted(sizes) and len(steps) == len(sizes) // (
            2 if method in ("ct-kv", "prefix-tuning") else 1), method
    io, steps = RecordingIO(model), []
    ttt = cm.adapt_tasks("ttt", model, io, [ep], cfg)
    cm.adapt_tasks("ttt+ct-kv", model, io, [ep], replace(cfg, on_step=lambda: steps.append(1)), after_ttt=ttt)
    assert len(steps) == 1  # ttt_kv_steps epochs, not CT-KV's own `steps`
    assert cm.RECIPES["mmlu"].ttt_kv_steps < cm.RECIPES["mmlu"].steps


def test_prompt_and_prefix_tuning_start_from_dummy_ids(setup):
    tok, model, _, ep = setup
    io = ct.TokenIO(model)
    torch.testing.assert_close(io.init_context(5), model.embed_tokens(torch.arange(5)))
    cfg = cm.TuneConfig(prompt_len=5, prompt_tuning_steps=0, prefix_tuning_steps=0, **QUIET)
    start = torch.cat([ep.lead.embeds, model.embed_tokens(torch.arange(5))])[None]  # BOS, then ids 0..4
    for method in ("prompt-tuning", "prefix-tuning"):
        prefix = cm.adapt(method, model, io, ep, cfg)[1]
        for (k0, v0), (k1, v1) in zip(prefill(model, embeds=start), prefix):
            torch.testing.assert_close(k1, k0)
            torch.testing.assert_close(v1, v0)
    defaults = cm.TuneConfig()
    assert (defaults.prompt_tuning_dropout, defaults.prefix_tuning_dropout) == (0.1, 0.0)  # marc's scripts


def test_recipes_hold_marcs_numbers():
    mmlu = cm.RECIPES["mmlu"]
    assert (mmlu.steps, mmlu.lr, mmlu.dropout, mmlu.batch_size) == (20, 1e-3, 0.1, 8)  # CT-KV
    assert (mmlu.ct_prompt_steps, mmlu.ct_prompt_lr, mmlu.prompt_batch_size) == (20, 1e-3, 4)  # CT-Prompt
    assert (mmlu.ttt_steps, mmlu.ttt_batch_size, mmlu.ttt_permutations, mmlu.ttt_kv_steps) == (20, 8, 400, 10)
    assert (mmlu.prefix_tuning_steps, mmlu.prefix_tuning_lr, mmlu.prompt_tuning_lr) == (24, 3e-3, 3e-3)
    nlp = cm.RECIPES["nlp"]
    assert (nlp.steps, nlp.dropout, nlp.batch_size, nlp.ttt_steps, nlp.ttt_batch_size, nlp.ttt_permutations) == (
        200, 0.05, 16, 250, 4, 1000)


def test_tasks_trained_together_equal_tasks_trained_alone():
    """Tasks folded into one batch give what single-task runs give (task t of a batch draws as a run alone with seed
    task_seeds[t] and steps at lr x task_lr_scales[t]): every trained method, with dropout (LoRA dropout too),
    mini-batches smaller than the rows (each task its own order) and a learning rate per task."""
    reg = icl_regression.build_regression_model(icl_regression.REGRESSION_PRESETS["test"], seed=0)
    reg = reg.eval().requires_grad_(False)
    io, model = ct_regression.RegressionIO(reg), reg.backbone
    gen = icl_regression.generator("cpu", 0, "together")
    batch = icl_regression.sample_tasks("shifted-linear", 3, 9, reg.n_dims, gen)
    xs, ys = batch.xs, batch.values()
    episodes = [ct_regression.regression_episode(io, x[:4], y[:4]) for x, y in zip(xs, ys)]
    cfg = cm.TuneConfig(steps=4, lr=1e-2, dropout=0.3, batch_size=3, ct_prompt_steps=3, ct_prompt_lr=1e-2,
                        ct_prompt_dropout=0.2, prompt_batch_size=3, prompt_len=4, prompt_tuning_steps=3,
                        prompt_tuning_lr=1e-2, prefix_tuning_steps=3, prefix_tuning_lr=1e-2, ttt_steps=3,
                        ttt_permutations=6, ttt_batch_size=2, ttt_dropout=0.2, ttt_rank=4, ttt_alpha=4, ttt_lr=1e-2,
                        ttt_kv_steps=2, seed=7, **QUIET)
    seeds, scales = (7, 1003, 12), (1.0, 3.0, 0.5)
    together_cfg = replace(cfg, task_seeds=seeds, task_lr_scales=scales)
    ttt_together = cm.adapt_tasks("ttt", model, io, episodes, together_cfg)
    lr_field = {"ct-kv": "lr", "ttt+ct-kv": "lr", "ct-prompt": "ct_prompt_lr", "prompt-tuning": "prompt_tuning_lr",
                "prefix-tuning": "prefix_tuning_lr", "ttt": "ttt_lr"}
    for method in ("ct-kv", "ct-prompt", "prompt-tuning", "prefix-tuning", "ttt", "ttt+ct-kv"):
        together = ct_regression.regression_errors(
            cm.adapt_tasks(method, model, io, episodes, together_cfg, ttt_together if method == "ttt+ct-kv" else None),
            io, xs[:, 4:], ys[:, 4:], rows_per_call=10)
        alone = []
        for t, ep in enumerate(episodes):
            one = replace(cfg, seed=seeds[t], **{lr_field[method]: getattr(cfg, lr_field[method]) * scales[t]})
            if method == "ttt+ct-kv":  # the TTT part at its own task's rate too
                one = replace(one, ttt_lr=cfg.ttt_lr * scales[t])
            alone.append(ct_regression.regression_errors(cm.adapt_tasks(method, model, io, [ep], one), io,
                                                         xs[t:t + 1, 4:], ys[t:t + 1, 4:])[0])
        assert together == pytest.approx(alone, rel=1e-4, abs=1e-5), method


def test_each_purpose_draws_from_a_stream_of_its_own():
    """A task's streams (token dropout, mini-batch orders, TTT's permutations, adapters, LoRA dropout) are seeded
    apart: none from the task's seed itself, where a torch.Generator and torch.manual_seed would start one sequence."""
    seeds = [cm.purpose_seed(s, purpose) for s in (0, 1, 7) for purpose in cm.RANDOM_PURPOSES]
    assert len(set(seeds) | {0, 1, 7}) == len(seeds) + 3 and cm.purpose_seed(7, "lora-init") == cm.purpose_seed(
        7, "lora-init")
    with pytest.raises(ValueError, match="unknown random stream"):
        cm.purpose_seed(0, "dropout")


def test_folded_lora_dropout_draws_what_torch_dropout_draws():
    """folded_lora's dropout draws, module by module as they run, the masks the modules' nn.Dropout draw after
    torch.manual_seed(seed); afterwards the plain forward is back."""
    loras = [LoRALinear(torch.nn.Linear(6, 5), rank=2, alpha=2, dropout=0.3),
             LoRALinear(torch.nn.Linear(5, 4), rank=2, alpha=2, dropout=0.5)]
    for lora in loras:
        lora.lora_b.data.normal_()
    model = torch.nn.Sequential(*loras).train()
    x = torch.randn(4, 3, 6)
    torch.manual_seed(11)
    expected = model(x)
    adapters = {f"{i}.{w}": getattr(lora, w).detach()[None] for i, lora in enumerate(loras)
                for w in ("lora_a", "lora_b")}
    with cm.folded_lora(model, adapters, [torch.Generator().manual_seed(11)]):
        folded = model(x)
    torch.testing.assert_close(folded, expected)
    torch.manual_seed(11)
    assert torch.equal(model(x), expected) and not any("forward" in lora.__dict__ for lora in loras)  # restored


def test_timing_reports_every_method_beside_marcs_seconds(setup):
    _, model, _, _ = setup
    ep = ct_timing.random_episode(model, 2, 6, 2)
    seconds = ct_timing.time_methods(model, ep, "cpu")
    assert set(seconds) == set(ct_timing.TIMED) and all(r["seconds"] > 0 for r in seconds.values())
    table = ct_timing.timing_table({"tiny": {"methods": seconds}})
    assert "| ct-kv | 3.33 |" in table and "| ttt+ct-kv | +1.68 |" in table and "| ct-prompt | 18.35 |" in table
