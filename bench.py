"""Benchmarks for the GPU machine (each also runs on CPU at a tiny size with --tiny, as a smoke test).

    python bench.py attention [--tiny]     fused attention vs SDPA's cuDNN/flash backends; fused vs exact parity

Each subcommand prints a markdown table for BENCHMARKS.md. Timings: CUDA events, warm-up first, median of repeats.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from model import AttentionMask, attention, dense_mask


def timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_gib(fn) -> float:
    """Peak memory fn() allocates above what is already allocated, in GiB (CUDA only)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# attention


def _fwd_bwd(fn, inputs):
    def run():
        out = fn()
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        return out, grads
    return run


def _parity_cases(device, dtype):
    """(name, q, k, v, prefix, mask) covering every field of the description, the shared-prefix fold included."""
    g = torch.Generator(device).manual_seed(0)
    B, H, Hkv, T, D, P = 4, 8, 4, 384, 64, 256
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()
    q, k, v = rand(B, H, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    shared = (rand(1, Hkv, P, D), rand(1, Hkv, P, D))
    span = torch.stack([torch.arange(B) * (P // B), (torch.arange(B) + 1) * (P // B)], 1).to(device)
    dropped = torch.rand(B, P, device=device, generator=g) < 0.1
    docs = torch.cumsum(torch.rand(B, T, device=device, generator=g) < 0.02, 1)
    in_seq_span = torch.tensor([[0, 100], [50, 150], [100, 200], [0, 1]], device=device)
    yield "prefix + leave-one-out + dropout (folded)", q, k, v, shared, dict(hidden_span=span, dropped=dropped)
    yield "per-row prefix + leave-one-out", q, k, v, tuple(x.expand(B, -1, -1, -1) for x in shared), dict(hidden_span=span)
    yield "packed documents", q, k, v, None, dict(doc_ids=docs)
    yield "left padding", q, k, v, None, dict(pad_left=torch.tensor([0, 7, 130, 300], device=device))
    yield "in-sequence span + dropout (CT-Prompt)", q, k, v, None, dict(hidden_span=in_seq_span, dropped=dropped)


def attention_parity(device, dtype):
    """Fused path (what `attention` runs on this device) against the exact dense path in fp32: outputs and grads."""
    rows = []
    for name, q, k, v, prefix, fields in _parity_cases(device, dtype):
        P = 0 if prefix is None else prefix[0].shape[2]
        mask = AttentionMask(prefix_len=P, **fields)
        inputs = [q, k, v] + ([] if prefix is None else list(prefix))
        out, grads = _fwd_bwd(lambda: attention(q, k, v, mask, prefix), inputs)()
        # exact reference: dense mask + SDPA in fp32
        up = [x.detach().float().requires_grad_() for x in inputs]
        qr, kr, vr = up[:3]
        if prefix is not None:
            B = q.shape[0]
            kr = torch.cat([up[3].expand(B, -1, -1, -1), kr], 2)
            vr = torch.cat([up[4].expand(B, -1, -1, -1), vr], 2)
        keep = dense_mask(mask, q.shape[0], q.shape[2], kr.shape[2], q.device)
        ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=keep, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, up, torch.ones_like(ref))
        rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
        worst_grad = max(rel(g, r) for g, r in zip(grads, ref_grads))
        rows.append((name, f"{rel(out, ref):.1e}", f"{worst_grad:.1e}", "ok" if max(rel(out, ref), worst_grad) < 2e-2
                     else "FAIL"))
    return rows


def bench_attention(argv):
    parser = argparse.ArgumentParser(prog="bench.py attention", description="attention fwd+bwd, bf16")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}")

    print("\nFused vs exact path (relative L2 error, bf16 inputs vs fp32 reference):")
    print(table(attention_parity(device, dtype), ["mask", "output", "worst grad", ""]))

    scale = 8 if args.tiny else 1
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    rows = []

    # (a) causal, batch 8 x 4096 tokens, 32 heads of 128
    B, H, T, D = 8 // scale, 32 // scale, 4096 // scale, 128 // (2 if args.tiny else 1)
    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    causal_flops = 3.5 * 4 * B * H * T * T * D / 2  # fwd = 4·B·H·T²·D/2 (causal half); bwd = 2.5 x fwd
    candidates = {"ours: attention() (plain causal)": lambda: attention(q, k, v, AttentionMask())}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend(b):
            def run():
                with sdpa_kernel(b):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return run
        candidates["SDPA cuDNN"] = backend(SDPBackend.CUDNN_ATTENTION)
        candidates["SDPA flash"] = backend(SDPBackend.FLASH_ATTENTION)
    for name, fn in candidates.items():
        run = _fwd_bwd(fn, [q, k, v])
        ms = timed(run)
        rows.append((f"(a) causal {B}x{T}, {H}x{D}", name, f"{ms:.2f}", f"{causal_flops / ms / 1e9:.0f}",
                     f"{peak_extra_gib(run):.2f}"))

    # (b) leave-one-out prefix attention: P = 4096 shared prefix positions, 8 demonstrations x 512 query tokens
    n_demo, T, P = 8 // (2 if args.tiny else 1), 512 // scale, 4096 // scale
    q, k, v = rand(n_demo, H, T, D), rand(n_demo, H, T, D), rand(n_demo, H, T, D)
    prefix = (rand(1, H, P, D), rand(1, H, P, D))
    span_len = P // n_demo
    span = torch.stack([torch.arange(n_demo) * span_len, (torch.arange(n_demo) + 1) * span_len], 1).to(device)
    mask = AttentionMask(prefix_len=P, hidden_span=span)
    pairs = dense_mask(mask, n_demo, T, P + T, device).sum().item()
    loo_flops = 3.5 * 4 * H * D * pairs
    inputs = [q, k, v, *prefix]
    candidates = {"ours: attention() (FlexAttention, shared prefix)" if device == "cuda" else "ours: attention()":
                  lambda: attention(q, k, v, mask, prefix)}
    if device == "cuda":
        def sdpa_dense():  # what a caller without the description would do: copy the prefix per row + dense mask
            keys = torch.cat([prefix[0].expand(n_demo, -1, -1, -1), k], 2)
            values = torch.cat([prefix[1].expand(n_demo, -1, -1, -1), v], 2)
            keep = dense_mask(mask, n_demo, T, P + T, device)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep)
        candidates["SDPA + dense mask, prefix copied per row"] = sdpa_dense
    for name, fn in candidates.items():
        run = _fwd_bwd(fn, inputs)
        ms = timed(run)
        rows.append((f"(b) leave-one-out, P={P}, {n_demo}x{T}", name, f"{ms:.2f}", f"{loo_flops / ms / 1e9:.0f}",
                     f"{peak_extra_gib(run):.2f}"))
    print("\nForward + backward:")
    print(table(rows, ["shape", "implementation", "ms", "TFLOP/s", "extra peak GiB"]))


SUBCOMMANDS = {
    "attention": bench_attention,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        print(__doc__)
        raise SystemExit(f"usage: python bench.py {{{','.join(SUBCOMMANDS)}}} [options]; see --help of each")
    SUBCOMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
