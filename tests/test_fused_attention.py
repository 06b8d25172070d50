"""fused_attention.py (the CUDA path; its kernels need a GPU, bench.py attention checks them against the exact path
there): the pieces that run anywhere."""
import torch

from fused_attention import _merge_by_lse


def test_two_softmaxes_merged_by_log_sum_exp_equal_one_softmax_over_both_key_sets():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(2, 3, 5, 5, generator=g) < 0.7
    keep[..., 3:] = True  # every query keeps some key of the second set
    keep[0, 0, 0, :3] = False  # a query that sees nothing of the first set (its lse is -inf there)
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~keep, float("-inf"))
    full = torch.softmax(scores, -1) @ v
    parts = []
    for cols in (slice(0, 3), slice(3, 5)):
        s = scores[..., cols]
        parts += [torch.nan_to_num(torch.softmax(s, -1)) @ v[..., cols, :], torch.logsumexp(s, -1)]
    torch.testing.assert_close(_merge_by_lse(*parts), full)
