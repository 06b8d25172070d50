"""The kernels of model.attention beyond plain SDPA: the mask rule (model.allowed) run as FlexAttention block masks
on CUDA, and a prefix shared by every row attended without a per-row copy (the exact path for few queries).

A block mask records which 128 x 128 tiles of (queries x keys) hold any allowed pair, so memory grows with the number
of tiles, not with queries x keys, and fully masked tiles cost nothing. The rule is passed in (`rule(layout, b, q,
kv)`, or a mask it built), so this file depends on no model code and the paths cannot disagree about it.
"""
import warnings

import torch

_compiled = {}  # torch.compile'd callables, made on first use (CUDA only)


def _compile_once(name, fn):
    if name not in _compiled:
        # Every new (batch, length) recompiles until dynamo marks the shape dynamic; the default limit of 8 would
        # silently fall back to an unfused kernel that materialises all scores, so allow more.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def _block_mask(layout, key, mask_mod, batch, n_queries, n_keys, device):
    # Built once per forward and shared by every layer (the layout lives for one forward).
    if key not in layout.block_masks:
        from torch.nn.attention.flex_attention import create_block_mask
        with warnings.catch_warnings():  # _compile=True: evaluate the rule block-wise, never as a dense Q x K tensor
            warnings.simplefilter("ignore", DeprecationWarning)
            layout.block_masks[key] = create_block_mask(mask_mod, batch, None, n_queries, n_keys, device=device,
                                                        _compile=True)
    return layout.block_masks[key]


def prepend_prefix(k, v, prefix):
    """Keys/values [prefix | own] per row: the prefix is copied once per row (the exact path's layout)."""
    if prefix is None:
        return k, v
    B = k.shape[0]
    return (torch.cat([prefix[0].expand(B, -1, -1, -1), k], dim=2),
            torch.cat([prefix[1].expand(B, -1, -1, -1), v], dim=2))


# Scores held at once by shared_prefix_attention (fp32 elements): larger batches are attended in slices of rows.
SHARED_PREFIX_SCORE_BUDGET = 1 << 27


def shared_prefix_attention(q, k, v, prefix, keep):
    """Exact attention of q (B, H, T, D) to [shared prefix | own keys], the prefix (k, v) of batch 1 (1, Hkv, P, D)
    never copied per row: every row's queries meet it in one matmul per KV head (rows folded into the query axis),
    the own keys k, v (B, Hkv, S, D) in a batched one, and one softmax runs over both score blocks side by side (the
    log-sum-exp merge of two softmaxes, done before the exponentials). keep: bool, broadcastable to (Hkv, B, G, T,
    P + S) (G = H / Hkv query heads per KV head), True = may attend. At least fp32 inside (as SDPA's math
    backend)."""
    B, H, T, D = q.shape
    rows = max(1, SHARED_PREFIX_SCORE_BUDGET // (H * T * (prefix[0].shape[2] + k.shape[2])))
    if B <= rows:
        return _shared_prefix_rows(q, k, v, prefix, keep)
    per_row = keep.shape[1] > 1
    return torch.cat([_shared_prefix_rows(q[i:i + rows], k[i:i + rows], v[i:i + rows], prefix,
                                          keep[:, i:i + rows] if per_row else keep) for i in range(0, B, rows)])


@torch.autocast("cuda", enabled=False)  # scores stay in fp32 under a bf16 autocast too (as SDPA's math backend)
@torch.autocast("cpu", enabled=False)
def _shared_prefix_rows(q, k, v, prefix, keep):
    B, H, T, D = q.shape
    Hkv, P = k.shape[1], prefix[0].shape[2]
    G, q_dtype, exact = H // Hkv, q.dtype, torch.promote_types(q.dtype, torch.float32)
    q = q.to(exact).reshape(B, Hkv, G * T, D) * D ** -0.5  # grouped query heads ride along the query axis
    prefix_k, prefix_v = prefix[0][0].to(exact), prefix[1][0].to(exact)  # (Hkv, P, D)
    prefix_scores = q.transpose(0, 1).reshape(Hkv, B * G * T, D) @ prefix_k.transpose(1, 2)
    own_scores = q @ k.to(exact).transpose(2, 3)  # (B, Hkv, G*T, S)
    scores = torch.cat([prefix_scores.view(Hkv, B, G, T, P), own_scores.view(B, Hkv, G, T, -1).transpose(0, 1)], -1)
    probs = torch.softmax(scores.masked_fill_(~keep, float("-inf")), -1)  # (Hkv, B, G, T, P + S)
    from_prefix = probs[..., :P].reshape(Hkv, B * G * T, P) @ prefix_v  # a view: rows, heads, queries merge
    from_own = probs[..., P:].transpose(0, 1).reshape(B, Hkv, G * T, -1) @ v.to(exact)
    out = from_prefix.view(Hkv, B, G * T, D).transpose(0, 1) + from_own
    return out.reshape(B, H, T, D).to(q_dtype)


def folded_rule(layout, n_queries: int, n_own_keys: int, rule):
    """`rule` for a batch folded into one sequence: query qi = row * n_queries + t, key ki < P is the shared prefix,
    key P + row * n_own_keys + j is row's own key j. Rows never see each other's own keys."""
    P = layout.prefix_len

    def mask_mod(_b, _h, qi, ki):
        row, t = qi // n_queries, qi % n_queries
        j = (ki - P).clamp(min=0)
        key_in_row = torch.where(ki < P, ki, P + j % n_own_keys)
        return ((ki < P) | (j // n_own_keys == row)) & rule(layout, row, t, key_in_row)
    return mask_mod


def _folded_flex(q, k, v, prefix_k, prefix_v, block_mask, gqa: bool):
    """Shared prefix, stored once: fold the batch into the sequence axis, queries (1, H, B*T, D) attend to
    [prefix | row 0's keys | row 1's keys | ...] (1, Hkv, P + B*S, D). The folding copies stay eager: compiling them
    together with the kernel measured slower (6.1 against 3.9 ms at P = 4096, 8 x 512, H200; BENCHMARKS.md)."""
    from torch.nn.attention.flex_attention import flex_attention
    B, H, T, D = q.shape
    fold = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], -1, D)  # (B, h, n, D) -> (1, h, B*n, D)
    keys = torch.cat([prefix_k, fold(k)], dim=2)
    values = torch.cat([prefix_v, fold(v)], dim=2)
    out = _compile_once("plain", flex_attention)(fold(q), keys, values, block_mask=block_mask, enable_gqa=gqa)
    return out.view(H, B, T, D).transpose(0, 1)


def flex_attention_path(q, k, v, layout, prefix, gqa: bool, rule):
    """FlexAttention under `rule`: q (B, H, T, D), own keys k, v (B, Hkv, S, D), prefix (k, v) of batch 1 (shared,
    folded) or B (copied per row), or None."""
    B, H, T, D = q.shape
    S, P = k.shape[2], layout.prefix_len
    if prefix is not None and prefix[0].shape[0] == 1 and B > 1:
        block_mask = _block_mask(layout, ("folded", B, T, S), folded_rule(layout, T, S, rule), 1, B * T, P + B * S,
                                 q.device)
        return _folded_flex(q, k, v, prefix[0], prefix[1], block_mask, gqa)
    from torch.nn.attention.flex_attention import flex_attention
    k, v = prepend_prefix(k, v, prefix)
    mask_mod = lambda b, _h, qi, ki: rule(layout, b, qi, ki)
    rows = B if layout.mask.varies_by_row() else None  # None: one block mask broadcast over the batch
    block_mask = _block_mask(layout, ("plain", rows, T, k.shape[2]), mask_mod, rows, T, k.shape[2], q.device)
    return _compile_once("plain", flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _merge_by_lse(out_a, lse_a, out_b, lse_b):
    """Softmax over the union of two key sets from each set's own softmax: weights exp(lse - max)."""
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    return ((out_a.float() * w_a + out_b.float() * w_b) / (w_a + w_b)).to(out_a.dtype)


def two_part_flex(q, k, v, layout, prefix, gqa: bool, rule):
    """The shared prefix without folding or copying: FlexAttention broadcasts the batch-1 prefix keys over the B
    query rows (a per-row block mask), a second call covers the rows' own keys, and the two softmaxes are merged by
    their log-sum-exp (exact: the softmax over the union of the two key sets)."""
    from torch.nn.attention.flex_attention import flex_attention
    B, H, T, D = q.shape
    S, P = k.shape[2], layout.prefix_len
    flex = _compile_once("plain", flex_attention)
    prefix_mask = _block_mask(layout, ("prefix part", B, T, P), lambda b, _h, qi, ki: rule(layout, b, qi, ki), B, T,
                              P, q.device)
    own_mask = _block_mask(layout, ("own part", B, T, S), lambda b, _h, qi, ki: rule(layout, b, qi, P + ki), B, T, S,
                           q.device)
    out_a, lse_a = flex(q, prefix[0], prefix[1], block_mask=prefix_mask, enable_gqa=gqa, return_lse=True)
    out_b, lse_b = flex(q, k, v, block_mask=own_mask, enable_gqa=gqa, return_lse=True)
    return _compile_once("merge", _merge_by_lse)(out_a, lse_a, out_b, lse_b)
