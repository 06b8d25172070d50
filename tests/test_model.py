"""model.py: the mask rule against a naive reference, forward variants (prefix KV, cache, generation), presets, the
output projection and loss, and the generation CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_TOKENIZER, ROOT, tiny_cfg

from hf_checkpoint import save_pretrained
from fused_attention import folded_rule
from model import (AttentionMask, KVCache, MaskLayout, ModelConfig, Transformer, allowed, attention, create_model,
                   dense_mask, generate, prefill)


def test_llama2_7b_preset_builds_on_meta():
    cfg = ModelConfig.from_name("llama2-7b")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616 == cfg.num_params()
    assert all(p.is_meta for p in model.parameters())
    assert ModelConfig.from_name("llama2-70b-chat").n_kv_heads == 8
    for name in ("llama2-13b", "llama2-70b", "tiny"):
        with torch.device("meta"):
            assert sum(p.numel() for p in Transformer(ModelConfig.from_name(name)).parameters()) == \
                ModelConfig.from_name(name).num_params()


def test_caller_mask_is_never_modified_by_a_forward():
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0).eval()
    mask = AttentionMask(doc_ids=torch.tensor([[0, 0, 1, 1, 1]]))
    before = repr(mask)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 5)), mask=mask)
    assert repr(mask) == before
    with pytest.raises(Exception):  # frozen: a forward cannot write into it either
        mask.doc_ids = None


def test_logits_and_loss_are_the_output_projection_and_cross_entropy():
    for cfg in (tiny_cfg(), tiny_cfg(tie_embeddings=True)):
        model = create_model(cfg, seed=0).eval()
        tokens = torch.randint(0, cfg.vocab_size, (2, 7))
        targets = torch.randint(0, cfg.vocab_size, (2, 7))
        targets[0, :3] = -100
        with torch.no_grad():
            hidden = model.hidden_states(tokens)
            weight = model.embed_tokens.weight if cfg.tie_embeddings else model.lm_head.weight
            torch.testing.assert_close(model.logits(hidden), hidden @ weight.T)
            reference = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none")
            per_token = model.loss(hidden, targets, reduction="none")
            assert per_token.shape == targets.shape and torch.all(per_token[0, :3] == 0)
            torch.testing.assert_close(per_token.flatten(), reference)
            torch.testing.assert_close(model.loss(hidden, targets), reference.sum())


def test_prefill_equals_the_cached_prefix():
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        cache = KVCache(cfg, 1, 9)
        model(tokens, cache=cache)
        for (k, v), (ck, cv) in zip(prefill(model, tokens), cache.prefix()):
            assert torch.equal(k, ck) and torch.equal(v, cv)
        from_embeds = prefill(model, embeds=model.embed_tokens(tokens))
    assert torch.equal(from_embeds[0][0], cache.prefix()[0][0])
    assert prefill(model, tokens[:, :0]) is None


# ---------------------------------------------------------------------------------------------------------------------
# The attention mask against a naive reference: loops over (row, query, key), then softmax by hand.


def naive_keep(B, T, P, S_own, offset=0, hidden_span=None, dropped=None, doc_ids=None, pad_left=None):
    keep = torch.zeros(B, 1, T, P + S_own, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            me = P + offset + t
            for key in range(P + S_own):
                ok = key <= me
                if pad_left is not None and P <= key < P + int(pad_left[b]) and key != me:
                    ok = False
                if doc_ids is not None and key >= P and doc_ids[b, key - P] != doc_ids[b, me - P]:
                    ok = False
                if hidden_span is not None:
                    lo, hi = hidden_span[b].tolist()
                    if lo <= key < hi and not lo <= me < hi:
                        ok = False
                if dropped is not None and key < dropped.shape[1] and dropped[b, key] and key != me:
                    ok = False
                keep[b, 0, t, key] = ok
    return keep


def naive_attention(q, k, v, keep):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v


def mask_cases():
    B, P = 3, 5  # rows, prefix positions (6 tokens per row: see test_attention_equals_naive_reference)
    g = torch.Generator().manual_seed(0)
    yield "causal", dict(), 0
    yield "prefix+leave-one-out", dict(hidden_span=torch.tensor([[0, 2], [2, 4], [4, 5]])), P
    yield "token-dropout", dict(dropped=torch.rand(B, P, generator=g) < 0.4), P
    yield "loo+dropout", dict(hidden_span=torch.tensor([[1, 3], [0, 1], [3, 5]]),
                              dropped=torch.rand(B, P, generator=g) < 0.3), P
    yield "packed-docs", dict(doc_ids=torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]])), 0
    yield "left-padding", dict(pad_left=torch.tensor([0, 2, 5])), 0
    # strict CT-Prompt: the hidden span lies inside the sequence itself
    yield "in-sequence-span", dict(hidden_span=torch.tensor([[0, 2], [2, 4], [1, 3]])), 0
    in_sequence_drop = torch.rand(B, 4, generator=g) < 0.5
    in_sequence_drop[:, 0] = True  # query 0 keeps its own (dropped) key: no empty row
    yield "in-sequence-dropout", dict(dropped=in_sequence_drop), 0


@pytest.mark.parametrize("case", list(mask_cases()), ids=lambda c: c[0])
def test_attention_equals_naive_reference(case):
    _, fields, P = case
    B, H, Hkv, T, D = 3, 4, 2, 6, 8
    q = torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, dtype=torch.float64, requires_grad=True)
    prefix = None
    if P:
        prefix = tuple(torch.randn(1, Hkv, P, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, MaskLayout(AttentionMask(**fields), prefix_len=P), prefix)
    keep = naive_keep(B, T, P, T, **fields)
    k_all = k if prefix is None else torch.cat([prefix[0].expand(B, -1, -1, -1), k], 2)
    v_all = v if prefix is None else torch.cat([prefix[1].expand(B, -1, -1, -1), v], 2)
    ref = naive_attention(q, k_all, v_all, keep)
    torch.testing.assert_close(out, ref)
    inputs = [q, k, v] + ([] if prefix is None else list(prefix))
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_leave_one_out_gradient_is_exactly_zero_on_hidden_span():
    B, H, T, D, P = 2, 2, 4, 8, 6
    prefix = [torch.randn(1, H, P, D, requires_grad=True) for _ in range(2)]
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    layout = MaskLayout(AttentionMask(hidden_span=torch.tensor([[0, 3], [3, 6]])), prefix_len=P)
    out = attention(q, k, v, layout, prefix)
    grad_k, _ = torch.autograd.grad(out[0].sum(), prefix)  # row 0 hides prefix positions 0..2
    assert torch.all(grad_k[:, :, :3] == 0) and torch.all(grad_k[:, :, 3:].abs().sum((0, 1, 3)) > 0)


def test_folded_rule_equals_per_row_rule():
    """The CUDA path folds a shared-prefix batch into one sequence; its mask must be the per-row mask, rearranged."""
    B, T, S, P = 3, 4, 6, 5
    mask = AttentionMask(hidden_span=torch.tensor([[0, 2], [2, 4], [4, 5]]), dropped=torch.rand(B, P) < 0.3,
                         pad_left=torch.tensor([0, 1, 2]))
    layout = MaskLayout(mask, prefix_len=P, query_offset=S - T)
    per_row = dense_mask(layout, B, T, P + S)[:, 0]  # (B, T, P + S)
    qi = torch.arange(B * T).view(-1, 1)
    ki = torch.arange(P + B * S).view(1, -1)
    folded = folded_rule(layout, T, S, allowed)(0, 0, qi, ki).view(B, T, P + B * S)
    for b in range(B):
        own = slice(P + b * S, P + (b + 1) * S)
        assert torch.equal(folded[b, :, :P], per_row[b, :, :P])
        assert torch.equal(folded[b, :, own], per_row[b, :, P:])
        assert not folded[b, :, P:].sum() - folded[b, :, own].sum()  # nothing from other rows


def shared_prefix_cases():
    """(name, mask fields, B, H, Hkv, T, cached positions): every field that can occur with a shared prefix."""
    B, P = 3, 5
    g = torch.Generator().manual_seed(1)
    yield "prefix-only", dict(), B, 4, 2, 3, 1  # one mask for every row
    yield "decode-left-padding", dict(pad_left=torch.tensor([0, 2, 4])), B, 4, 2, 1, 5
    yield "decode-mha", dict(pad_left=torch.tensor([1, 0, 3])), B, 2, 2, 1, 6
    yield "leave-one-out", dict(hidden_span=torch.tensor([[0, 2], [2, 4], [4, 5]])), B, 4, 2, 4, 0
    yield "span-across-the-prefix-end", dict(hidden_span=torch.tensor([[3, 7], [0, 5], [5, 8]])), B, 4, 1, 4, 2
    yield "dropout-prefix-and-own", dict(dropped=torch.rand(B, P + 3, generator=g) < 0.4), B, 4, 2, 3, 2
    yield "packed-docs", dict(doc_ids=torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]])), B, 4, 2, 3, 2
    yield "everything", dict(pad_left=torch.tensor([1, 0, 2]), hidden_span=torch.tensor([[1, 3], [0, 1], [3, 6]]),
                             dropped=torch.rand(B, P, generator=g) < 0.3,
                             doc_ids=torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1], [2, 2, 2, 2]])), B, 8, 2, 2, 2
    yield "one-row-of-many", dict(pad_left=torch.tensor([3, 0, 1, 0, 2, 0, 0])), 7, 4, 2, 1, 3


@pytest.mark.parametrize("case", list(shared_prefix_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("score_budget", [None, 1])  # 1: attended one row at a time (large batches)
def test_shared_prefix_path_equals_naive_reference_and_the_copying_path(case, score_budget, monkeypatch):
    """A batch-1 prefix with few queries per row, given as batch 1 or expanded to the rows (a view, as scoring's
    per_row_prefix hands it): attended once (no per-row copy), one softmax over prefix and own scores; outputs and
    gradients (the prefix's too: CT-KV trains it) equal the naive reference and the exact path over [prefix | own
    keys] copied per row (a batch-B prefix with storage per row takes that path)."""
    import fused_attention
    import model as model_module
    _, fields, B, H, Hkv, T, cached = case
    P, D, S = 5, 8, cached + T
    if score_budget:
        monkeypatch.setattr(fused_attention, "SHARED_PREFIX_SCORE_BUDGET", score_budget)
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    q, k, v, prefix_k, prefix_v = make(B, H, T, D), make(B, Hkv, S, D), make(B, Hkv, S, D), make(1, Hkv, P, D), \
        make(1, Hkv, P, D)
    layout = lambda: MaskLayout(AttentionMask(**fields), prefix_len=P, query_offset=cached)
    copies = []
    monkeypatch.setattr(model_module, "prepend_prefix",
                        lambda *a: copies.append(1) or fused_attention.prepend_prefix(*a))
    out = attention(q, k, v, layout(), (prefix_k, prefix_v))
    expanded = attention(q, k, v, layout(), (prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)))
    assert not copies  # the shared prefix was never copied per row, nor a batch-1 prefix expanded to the rows (a view)
    per_row = attention(q, k, v, layout(), (prefix_k.expand(B, -1, -1, -1).clone(),
                                            prefix_v.expand(B, -1, -1, -1).clone()))
    assert copies  # ... while a batch-B prefix (its own storage per row) takes the copying exact path
    keep = naive_keep(B, T, P, S, offset=cached, **fields)[:, :, :, :P + S]
    ref = naive_attention(q, torch.cat([prefix_k.expand(B, -1, -1, -1), k], 2),
                          torch.cat([prefix_v.expand(B, -1, -1, -1), v], 2), keep)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, per_row)
    torch.testing.assert_close(expanded, per_row)
    inputs, upstream = [q, k, v, prefix_k, prefix_v], torch.randn_like(out)
    for expected in (ref, per_row, expanded):
        for got, want in zip(torch.autograd.grad(out, inputs, upstream, retain_graph=True),
                             torch.autograd.grad(expected, inputs, upstream, retain_graph=True)):
            torch.testing.assert_close(got, want)


def test_shared_prefix_path_in_low_precision_rounds_once():
    """bf16 in, bf16 out, computed in fp32 inside (as SDPA's math backend on CUDA), under autocast too: the fp32
    result, rounded once."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 1, 16, generator=g).bfloat16()
    k, v, prefix_k, prefix_v = (torch.randn(n, 2, s, 16, generator=g).bfloat16() for n, s in ((4, 3), (4, 3), (1, 40),
                                                                                               (1, 40)))
    out = attention(q, k, v, MaskLayout(AttentionMask(pad_left=torch.tensor([0, 1, 0, 2])), prefix_len=40,
                                        query_offset=2), (prefix_k, prefix_v))
    keep = naive_keep(4, 1, 40, 3, offset=2, pad_left=torch.tensor([0, 1, 0, 2]))
    ref = naive_attention(q.float(), torch.cat([prefix_k.expand(4, -1, -1, -1), k], 2).float(),
                          torch.cat([prefix_v.expand(4, -1, -1, -1), v], 2).float(), keep)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=2 ** -8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast region does not lower the scores' precision
        auto = attention(q.float(), k.float(), v.float(), MaskLayout(AttentionMask(pad_left=torch.tensor(
            [0, 1, 0, 2])), prefix_len=40, query_offset=2), (prefix_k.float(), prefix_v.float()))
    torch.testing.assert_close(auto, ref)


# ---------------------------------------------------------------------------------------------------------------------
# Forward variants: prefix KV, explicit positions, embeddings, cache


def test_prefix_kv_and_cache_equal_full_forward():
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(cfg, 1, 12)
        model(tokens[:, :12], cache=cache)
        with_prefix = model(tokens[:, 12:], prefix_kv=cache.prefix())  # positions start at P = 12
        embeds = model(embeds=model.embed_tokens(tokens))
        explicit = model(tokens[:, 12:], prefix_kv=cache.prefix(), positions=torch.arange(12, 20))
    torch.testing.assert_close(with_prefix, full[:, 12:], atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit, with_prefix)
    torch.testing.assert_close(embeds, full)


def test_generation_with_cache_equals_full_forward_steps():
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0).eval()
    prompts = [[1, 5, 9, 33, 7], [1, 200], [1, 3, 4, 5, 6, 7, 8, 9]]
    batched = generate(model, prompts, 12)
    for prompt, got in zip(prompts, batched):
        tokens, step_logits = list(prompt), []
        with torch.no_grad():
            for _ in range(12):
                logits = model(torch.tensor([tokens]))[0, -1]
                step_logits.append(logits)
                tokens.append(int(logits.argmax()))
        assert got == tokens[len(prompt):]
    # logits of the cached decode path equal those of the full forward
    with torch.no_grad():
        cache = KVCache(cfg, 1, 30)
        seq = torch.tensor([prompts[2] + batched[2]])
        model(seq[:, :8], cache=cache)
        for i in range(8, seq.shape[1]):
            cached = model(seq[:, i:i + 1], cache=cache)[0, -1]
            torch.testing.assert_close(cached, model(seq[:, :i + 1])[0, -1], atol=1e-5, rtol=0)


def test_generate_stops_at_eos_and_samples_reproducibly():
    cfg = tiny_cfg()
    model = create_model(cfg, seed=0).eval()
    greedy = generate(model, [[1, 5]], 6)[0]
    assert generate(model, [[1, 5]], 6, eos_id=greedy[2])[0] == greedy[:2]
    assert generate(model, [[1, 5]], 6, eos_id=[999999, greedy[2]])[0] == greedy[:2]  # Llama-3: a list of ids
    run = lambda: generate(model, [[1, 5], [1, 7, 8]], 8, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(3))
    assert run() == run()



# ---------------------------------------------------------------------------------------------------------------------
# CLI and bad input: one clear line, non-zero exit


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "model.py"), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def saved_tiny(tmp_path):
    model = create_model(tiny_cfg(), seed=0)
    save_pretrained(model, tmp_path / "ckpt", shard_bytes=50_000)
    return tmp_path / "ckpt"


def test_cli_random_tiny_model_runs():
    result = run_cli("--random-init", "--model", "tiny", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "random weights (--random-init)" in result.stdout and "generated token ids" in result.stdout


def test_cli_model_name_resolves_real_weights_from_the_cache(saved_tiny, tokenizer_path, tmp_path):
    """--model NAME means the real model: found in the Hugging Face cache layout, its own tokenizer used."""
    import shutil
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    shutil.copytree(saved_tiny, snapshot)
    shutil.copy(tokenizer_path, snapshot / "tokenizer.model")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    result = subprocess.run([sys.executable, str(ROOT / "model.py"), "--model", "llama2-7b", "--prompt", "The patient",
                             "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"model llama2-7b: weights from {snapshot}\nThe patient")


def test_cli_folder_without_a_tokenizer_gives_token_ids(saved_tiny):
    """--model PATH (not a preset) with no tokenizer in the folder: token ids after the config's BOS."""
    result = run_cli("--model", str(saved_tiny), "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert f"weights from {saved_tiny}" in result.stdout and "generated token ids" in result.stdout


def test_cli_missing_model_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty-hub"))
    result = subprocess.run([sys.executable, str(ROOT / "model.py"), "--model", "llama2-7b"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert_one_line_error(result, "model llama2-7b: not found in", "meta-llama/Llama-2-7b-hf", "--random-init")


def test_cli_memory_check_refuses_before_allocating():
    """A 70B in fp32 (~276 GB) on a CPU host: refused in one line by the estimate, not by the allocator."""
    result = run_cli("--random-init", "--model", "llama2-70b", "--device", "cpu", "--precision", "fp32")
    assert_one_line_error(result, "not enough memory on cpu", "GiB")


def test_cli_generates_from_checkpoint(saved_tiny, tokenizer_path):
    result = run_cli("--checkpoint", str(saved_tiny), "--tokenizer", tokenizer_path, "--prompt", "The patient",
                     "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The patient")


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_unknown_preset():
    assert_one_line_error(run_cli("--random-init", "--model", "llama9-1b"), "unknown model preset 'llama9-1b'")
    assert_one_line_error(run_cli("--model", "llama9-1b"), "model llama9-1b: not found", "not a preset")
    assert_one_line_error(run_cli("--model", "tiny"), "no released weights", "--random-init")
    assert_one_line_error(run_cli("--checkpoint", "x", "--random-init"), "give one")


def test_bad_input_missing_shard(saved_tiny):
    shard = sorted(saved_tiny.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_one_line_error(run_cli("--checkpoint", str(saved_tiny)), shard.name, "missing")


def test_bad_input_truncated_safetensors(saved_tiny):
    shard = sorted(saved_tiny.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_one_line_error(run_cli("--checkpoint", str(saved_tiny)), shard.name, "truncated or corrupt")


def test_bad_input_shape_disagrees_with_config(saved_tiny):
    config = json.loads((saved_tiny / "config.json").read_text())
    config["intermediate_size"] = 96
    (saved_tiny / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("--checkpoint", str(saved_tiny)), "has shape", "config.json implies")


def test_bad_input_tokenizer_vocab_mismatch(saved_tiny):
    if not LLAMA_TOKENIZER.exists():
        pytest.skip("../shared/data/llama2-tokenizer not present")
    result = run_cli("--checkpoint", str(saved_tiny), "--tokenizer", str(LLAMA_TOKENIZER))
    assert_one_line_error(result, "32000 tokens", "512")


def test_real_llama_tokenizer_round_trip():
    if not LLAMA_TOKENIZER.exists():
        pytest.skip("../shared/data/llama2-tokenizer not present")
    from data import Tokenizer
    tok = Tokenizer(LLAMA_TOKENIZER)
    text = "The patient presented with acute myocardial infarction."
    assert tok.encode(text) == [450, 16500, 9132, 411, 1274, 1082, 590, 542, 538, 616, 3041, 279, 428, 29889]  # SOURCE.md
    assert tok.encode(text, bos=True, eos=True)[0] == 1 and tok.decode(tok.encode(text)) == text
