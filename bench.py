"""Benchmarks for the GPU machine (each also runs on CPU at a tiny size with --tiny, as a smoke test).

    python bench.py attention [--tiny]     fused attention vs SDPA's cuDNN/flash backends; fused vs exact parity
    python bench.py ct [--tiny]            context tuning: step time and memory vs k for CT-KV, CT-Prompt, TTT
    python bench.py eval [--tiny]          evaluate.py scoring vs naive transformers scoring (MMLU-medical, MedQA)
    python bench.py synthetic [--tiny]     synthetic.py's training steps vs the official schedule's (step time)
    python bench.py train [--tiny]         cft.py's training loop vs transformers LlamaForCausalLM (tokens/s, MFU)

Each subcommand prints a markdown table for BENCHMARKS.md. Timings: CUDA events, warm-up first, median of repeats.
"""
import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from model import AttentionMask, MaskLayout, attention, dense_mask, prepend_prefix


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
    import fused_attention as fa
    from model import allowed
    rows = []
    cases = [(name, q, k, v, prefix, fields, lambda m, q, k, v, p: attention(q, k, v, m, p))
             for name, q, k, v, prefix, fields in _parity_cases(device, dtype)]
    if device == "cuda":  # the two-call candidate on the shared-prefix case
        name, q, k, v, prefix, fields, _ = cases[0]
        cases.append((name + " [two-call candidate]", q, k, v, prefix, fields,
                      lambda m, q, k, v, p: fa.two_part_flex(q, k, v, m, p, True, allowed)))
    for name, q, k, v, prefix, fields, fused in cases:
        P = 0 if prefix is None else prefix[0].shape[2]
        mask = MaskLayout(AttentionMask(**fields), prefix_len=P)
        inputs = [q, k, v] + ([] if prefix is None else list(prefix))
        try:
            out, grads = _fwd_bwd(lambda: fused(mask, q, k, v, prefix), inputs)()
        except Exception as e:
            rows.append((name, f"failed: {type(e).__name__}: {str(e)[:80]}", "", "FAIL"))
            continue
        # exact reference: dense mask + SDPA in fp32
        up = [x.detach().float().requires_grad_() for x in inputs]
        qr = up[0]
        kr, vr = prepend_prefix(up[1], up[2], None if prefix is None else (up[3], up[4]))
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
    # q, k, v in the layout the model hands to attention(): a (B, H, T, D) view of (B, T, H, D) projections
    rand = lambda B, H, T, D: torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    rows = []

    # (a) causal, batch 8 x 4096 tokens, 32 heads of 128
    B, H, T, D = 8 // scale, 32 // scale, 4096 // scale, 128 // (2 if args.tiny else 1)
    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    causal_flops = 3.5 * 4 * B * H * T * T * D / 2  # fwd = 4·B·H·T²·D/2 (causal half); bwd = 2.5 x fwd
    candidates = {"ours: attention() (plain causal)": lambda: attention(q, k, v, MaskLayout())}
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
    mask = MaskLayout(AttentionMask(hidden_span=span), prefix_len=P)
    pairs = dense_mask(mask, n_demo, T, P + T, device).sum().item()
    loo_flops = 3.5 * 4 * H * D * pairs
    inputs = [q, k, v, *prefix]
    candidates = {"ours: attention() (FlexAttention, shared prefix)" if device == "cuda" else "ours: attention()":
                  lambda: attention(q, k, v, mask, prefix)}
    if device == "cuda":
        def two_part():  # candidate: prefix broadcast over rows (no fold, no copy) + own keys, merged by LSE
            import fused_attention as fa
            from model import allowed
            return fa.two_part_flex(q, k, v, mask, prefix, False, allowed)
        candidates["candidate: two calls (prefix broadcast, own keys) merged by log-sum-exp"] = two_part

        def sdpa_dense():  # what a caller without the description would do: copy the prefix per row + dense mask
            keys, values = prepend_prefix(k, v, prefix)
            keep = dense_mask(mask, n_demo, T, P + T, device)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep)
        candidates["SDPA + dense mask, prefix copied per row"] = sdpa_dense
    for name, fn in candidates.items():
        run = _fwd_bwd(fn, inputs)
        try:
            ms = timed(run)
        except Exception as e:  # a candidate that does not compile on this torch: report it, time the others
            rows.append((f"(b) leave-one-out, P={P}, {n_demo}x{T}", name, f"failed: {type(e).__name__}", "", ""))
            continue
        rows.append((f"(b) leave-one-out, P={P}, {n_demo}x{T}", name, f"{ms:.2f}", f"{loo_flops / ms / 1e9:.0f}",
                     f"{peak_extra_gib(run):.2f}"))
    print("\nForward + backward:")
    print(table(rows, ["shape", "implementation", "ms", "TFLOP/s", "extra peak GiB"]))


# ----------------------------------------------------------------------------------------------------------------------
# ct: context tuning's cost against the number of demonstrations k


def log_log_slope(ks, times) -> float:
    """Least-squares slope of log(time) on log(k): 1 = linear in k, 2 = quadratic."""
    x, y = [math.log(k) for k in ks], [math.log(t) for t in times]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def bench_ct(argv):
    import ct_methods
    import ct_tokens
    from lora import merge_lora
    from model import ModelConfig, create_model, prefill
    parser = argparse.ArgumentParser(prog="bench.py ct", description="context tuning: time per optimisation step and "
                                     "peak memory against k, for CT-KV, CT-Prompt and TTT (random-weight Llama shapes)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, k up to 8, 16-token demonstrations, "
                        "1 timed step (CPU smoke test)")
    parser.add_argument("--sizes", default="1b,7b", help="comma list of 1b (TinyLlama-1.1B shape), 7b (Llama-2-7B)")
    parser.add_argument("--ks", default="2,4,8,16,32,64", help="numbers of demonstrations")
    parser.add_argument("--methods", default="ct-kv,ct-prompt,ttt")
    parser.add_argument("--demo-tokens", type=int, default=32, help="tokens per demonstration (the last 8 are y_i)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up step")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="tokens per forward/backward: longer batches of pairs go in micro-batches (same step)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = {"1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632),
              "7b": ModelConfig.from_name("llama2-7b")}
    sizes = {"tiny": ModelConfig.from_name("tiny")} if args.tiny else {s: shapes[s] for s in args.sizes.split(",")}
    ks = [2, 4, 8] if args.tiny else [int(k) for k in args.ks.split(",")]
    methods, L = args.methods.split(","), 16 if args.tiny else args.demo_tokens
    steps = 1 if args.tiny else args.steps
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; {dtype}; "
          f"{L} tokens per demonstration; median of {steps} steps after 1 warm-up")
    rows, times = [], {}
    for size, cfg in sizes.items():
        model = create_model(cfg, device, dtype, seed=0).eval().requires_grad_(False)
        io = ct_tokens.TokenIO(model)
        for k in ks:
            gen = torch.Generator().manual_seed(k)
            demos = [ct_tokens.token_demo(model, torch.randint(3, cfg.vocab_size, (L,), generator=gen).tolist(), L - 8)
                     for _ in range(k)]
            ep = ct_methods.Episode(ct_tokens.token_lead(model, 1), demos)
            P = ep.context().shape[1]
            for method in methods:
                row_len = {"ct-kv": L, "ct-prompt": P + L, "ttt": P}[method]
                per_forward = max(1, args.max_tokens // row_len)
                stamps = []

                def on_step():
                    if cuda:
                        torch.cuda.synchronize()
                    stamps.append(time.perf_counter())
                tune = ct_methods.TuneConfig(steps=1 + steps, micro_batch=per_forward if per_forward < k else 0,
                                     progress=False, on_step=on_step)
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                try:
                    if method == "ct-kv":
                        ct_methods.tune_kv(model, io, ep, prefill(model, embeds=ep.context()), tune, ep.spans(), 0.05)
                    elif method == "ct-prompt":
                        ct_methods.tune_prompt(model, io, ep, ep.context(), tune, ep.spans(), 0.05)
                    else:
                        ct_methods.tune_lora(model, io, ep, tune)
                except torch.OutOfMemoryError:
                    rows.append((size, k, P, method, "OOM", "", ""))
                    continue
                finally:
                    if method == "ttt":
                        merge_lora(model)  # removes the adapters again (random weights: merging changes no timing)
                ms = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) * 1e3
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
                times.setdefault((size, method), {})[k] = ms
                rows.append((size, k, P, method, f"{ms:.1f}", f"{peak:.2f}", math.ceil(k / min(per_forward, k))))
                print(*rows[-1], sep="\t", flush=True)
        del model, io
    print("\nTime per optimisation step and peak memory above the weights:")
    print(table(rows, ["model", "k", "prefix tokens P", "method", "ms/step", "peak GiB", "micro-batches"]))
    summary = []
    for (size, method), by_k in times.items():
        ratio = ""
        if method == "ct-prompt" and 16 in by_k and 16 in times.get((size, "ct-kv"), {}):
            ratio = f"{by_k[16] / times[(size, 'ct-kv')][16]:.1f}x"
        summary.append((size, method, f"{log_log_slope(list(by_k), list(by_k.values())):.2f}" if len(by_k) > 1 else "",
                        ratio))
    print("\nLog-log slope of step time against k (goal: CT-KV <= 1.1), CT-Prompt/CT-KV time at k = 16 (goal >= 3x):")
    print(table(summary, ["model", "method", "slope", "CT-Prompt / CT-KV at k=16"]))


# ----------------------------------------------------------------------------------------------------------------------
# eval: evaluate.py's scoring against transformers scoring the same prompts one question at a time


# path name -> per_row_prefix of scoring.score_options (per-row first: its default)
EVAL_PATHS = {"per-row": True, "shared": False}


def bench_eval(argv):
    from pathlib import Path

    import benchmark_data
    import evaluate as ev
    import scoring
    from data import Tokenizer
    from hf_checkpoint import hf_key
    from model import ModelConfig, create_model
    parser = argparse.ArgumentParser(prog="bench.py eval", description="evaluate.py's log-likelihood scoring (shared "
                                     "prefix encoded once, length-sorted right-padded batches, vocabulary projection "
                                     "only where scored) vs transformers' LlamaForCausalLM scoring the same prompts "
                                     "naively (batch 1, one question per forward with its options read at the last "
                                     "position, full prompt, full logits); same random weights, same tokens")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of llama2-7b, 3 questions per "
                        "subject and task unless --limit (CPU smoke test, well under a minute)")
    parser.add_argument("--data-dir", default=str(benchmark_data.DEFAULT_DATA_DIR),
                        help="laid out as ../shared/data: mmlu-medical/, medqa-usmle-4opt/, llama2-tokenizer/")
    parser.add_argument("--limit", type=int, help="first N questions of each MMLU subject and of MedQA")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="evaluate.py's padded tokens per batch")
    parser.add_argument("--paths", default=",".join(EVAL_PATHS),
                        help="comma-separated, from: " + ", ".join(EVAL_PATHS) + " (default: all, in that order)")
    args = parser.parse_args(argv)
    if any(name not in EVAL_PATHS for name in args.paths.split(",")):
        raise SystemExit(f"error: --paths {args.paths}: expected names from {', '.join(EVAL_PATHS)}")
    try:
        import transformers
    except ImportError:
        raise SystemExit("error: bench.py eval compares against transformers: pip install -r requirements-dev.txt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    preset = "tiny" if args.tiny else "llama2-7b"
    if args.tiny and args.limit is None:
        args.limit = 3
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"transformers {transformers.__version__}; {preset} shapes, random weights, {str(dtype)[6:]}")

    start = time.perf_counter()
    tasks = {"MMLU-medical 5-shot": ("mmlu-medical", 5), "MedQA 0-shot": ("medqa", 0)}
    try:
        tok = Tokenizer(Path(args.data_dir) / "llama2-tokenizer" / "tokenizer.model")
        questions = {name: scoring.encode_questions(tok, benchmark_data.build_questions(task, args.data_dir, k,
                                                                                        limit=args.limit))
                     for name, (task, k) in tasks.items()}
    except (ValueError, FileNotFoundError) as e:  # benchmark_data.DataError is a ValueError
        raise SystemExit(f"error: {e}")
    print(f"tokenized {sum(map(len, questions.values()))} questions in {time.perf_counter() - start:.1f} s "
          "(shared by both paths, not timed)")

    ours = create_model(ModelConfig.from_name(preset), device, dtype, seed=0).eval()
    fields = {k: v for k, v in ours.cfg.to_hf_dict().items()
              if k not in ("architectures", "model_type", "torch_dtype", "rope_parameters")}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the reference directly in bf16 (a fp32 7B would need 27 GB first)
    with torch.device(device):
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    torch.set_default_dtype(default_dtype)
    reference.load_state_dict({hf_key(name): p for name, p in ours.state_dict().items()})

    def seconds(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    naive_logits = lambda tokens: reference(tokens.to(device)).logits
    # Ours twice per path: the first pass includes compiling attention kernels for its shapes (from a cold cache: dynamo
    # reset, inductor's caches off), naive once after a warm-up. Shared prefix = batch-1 prefix_kv (FlexAttention's
    # folded path on CUDA, no copy); per-row = the same prefix expanded to the batch (plain block mask; the prefix is
    # copied into every row where FlexAttention runs, rows of >= 128 tokens, and attended once elsewhere).
    paths = {f"ours, {name}": EVAL_PATHS[name] for name in args.paths.split(",")}
    if device == "cuda":
        torch._inductor.config.force_disable_caches = True
    shapes, forward = set(), ours.hidden_states

    def recording_shapes(tokens=None, **kwargs):  # the batches after a prefix (a prefill runs SDPA's causal kernel)
        if kwargs.get("prefix_kv") is not None:
            shapes.add((*tokens.shape, kwargs["prefix_kv"][0][0].shape[2]))
        return forward(tokens, **kwargs)
    ours.hidden_states = recording_shapes
    rows, totals, shape_counts = [], {}, {}
    for name, qs in questions.items():
        scoring.score_naive(naive_logits, qs[:3])  # warm-up
        naive, naive_s = seconds(lambda: scoring.score_naive(naive_logits, qs, progress=True))
        golds = [q.gold for q in qs]
        rows.append((name, "transformers naive", len(qs), sum(len(q.context) for q in qs), "", f"{naive_s:.1f}", "",
                     "", "", "", "", f"{ev.accuracy(golds, scoring.predict(naive)):.3f}"))
        totals.setdefault("transformers naive", [0, 0.0, 0.0])[1] += naive_s
        for path, per_row in paths.items():
            run = lambda: scoring.score_options(ours, qs, batch_tokens=args.batch_tokens, desc=name, progress=False,
                                                per_row_prefix=per_row)
            torch._dynamo.reset()
            shapes.clear()
            try:
                _, first_s = seconds(run)
                fast, fast_s = seconds(run)
            except Exception as e:  # report a failing path (e.g. a kernel compile error) and time the other one
                rows.append((name, path, len(qs), "", "", f"failed: {type(e).__name__}: {str(e)[:120]}", "", "", "",
                             "", "", ""))
                totals.setdefault(path, [0, 0.0, 0.0])[0] = float("nan")
                continue
            shape_counts[path] = shape_counts.get(path, 0) + len(shapes)  # per task: a new prefix compiles anew
            same = sum(a == b for a, b in zip(scoring.predict(fast), scoring.predict(naive)))
            diff = max(abs(a - b) for fr, nr in zip(fast, naive) for a, b in zip(fr, nr))
            # How close to a tie the disagreements were (bf16 rounding differs between the two implementations).
            margins = [sorted(nr)[-1] - sorted(nr)[-2] for fr, nr in zip(fast, naive)
                       if scoring.predict([fr]) != scoring.predict([nr])]
            rows.append((name, path, len(qs), "", f"{first_s:.1f}", f"{fast_s:.1f}", f"{naive_s / fast_s:.1f}x",
                         f"{naive_s / first_s:.1f}x", f"{same}/{len(qs)}", f"{diff:.3f}",
                         f"{max(margins):.3f}" if margins else "-", f"{ev.accuracy(golds, scoring.predict(fast)):.3f}"))
            t = totals.setdefault(path, [0, 0.0, 0.0])
            t[1], t[2] = t[1] + fast_s, t[2] + first_s
    ours.hidden_states = forward
    naive_total = totals["transformers naive"][1]
    for path, (failed, s, first_s) in totals.items():
        ok = not path.startswith("transformers") and failed == 0
        rows.append(("total", path, sum(map(len, questions.values())), "", f"{first_s:.1f}" if first_s else "",
                     f"{s:.1f}" if failed == 0 else "failed", f"{naive_total / s:.1f}x" if ok else "",
                     f"{naive_total / first_s:.1f}x" if ok else "", "", "", "", ""))
    print(f"\nbatch tokens {args.batch_tokens}; wall-clock seconds per full pass over the task; first pass from a cold "
          f"compile cache{'' if device == 'cuda' else ' (CPU: attention is not compiled)'}")
    print(table(rows, ["task", "path", "questions", "prompt tokens", "1st pass s (compiles)", "s", "speed-up",
                       "speed-up incl. compilation", "same predictions", "max |Δ log-lik|",
                       "largest naive top-2 margin of a disagreement", "accuracy"]))
    print("distinct batch shapes after a prefix (the shapes the compiled attention sees on CUDA): "
          + "; ".join(f"{path}: {n}" for path, n in shape_counts.items()))


# ----------------------------------------------------------------------------------------------------------------------
# synthetic


def bench_synthetic(argv):
    """synthetic.py's training step on the full-size regression transformer (d = 20, 12 x 256 x 8): the official
    schedule's step (batch 64, fp32, eager) against synthetic.py's pretraining step (batch 512, bf16, compiled) and
    fine-tuning steps (batch 128, bf16, eager), with the time each schedule's step count would take."""
    from contextlib import nullcontext

    import icl_regression as R
    import cft_regression as S
    parser = argparse.ArgumentParser(prog="bench.py synthetic", description=bench_synthetic.__doc__)
    parser.add_argument("--tiny", action="store_true", help="the test-sized model (CPU smoke test)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = S.SYNTHETIC_PRESETS["test" if args.tiny else "full"]
    model = R.build_regression_model(cfg, 0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")

    def training_step(forward, task, method, batch_size, bf16):
        prompt, _ = S.sample_prompt(cfg, task, method, batch_size, torch.Generator(device).manual_seed(0))

        def step():
            with R.bf16_autocast(device) if bf16 else nullcontext():
                loss = S.squared_errors(forward, prompt).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    compiled = torch.compile(model)
    ours = "bf16" if device == "cuda" else "fp32"  # icl_regression.bf16_autocast is bf16 on CUDA only
    cases = [("pretrain, official: fp32, eager", model, "linear", "cpt", 64, False, 500_000),
             (f"pretrain, synthetic.py: {ours}, compiled", compiled, "linear", "cpt", cfg.pretrain_batch, True,
              cfg.pretrain_steps),
             (f"fine-tune CPT, synthetic.py: {ours}, eager", model, "polynomial", "cpt", cfg.finetune_batch, True,
              cfg.finetune_steps),
             (f"fine-tune CFT, synthetic.py: {ours}, eager", model, "polynomial", "cft", cfg.finetune_batch, True,
              cfg.finetune_steps)]
    rows = []
    for name, forward, task, method, batch_size, bf16, steps in cases:
        ms = timed(training_step(forward, task, method, batch_size, bf16), repeats=20, warmup=3)
        rows.append((name, batch_size, f"{ms:.2f}", f"{batch_size * 1000 / ms:,.0f}", f"{steps:,}",
                     f"{steps * ms / 60_000:.1f}"))
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; model d={cfg.n_dims}, "
          f"{cfg.n_layers} layers x {cfg.dim} x {cfg.n_heads} heads; prompts of {cfg.n_points} pairs (CFT: twice)")
    print(table(rows, ["step", "batch", "ms/step", "prompts/s", "steps in schedule", "minutes for those steps"]))


# ----------------------------------------------------------------------------------------------------------------------
# train


def bench_train(argv):
    """cft.py's training step against transformers' LlamaForCausalLM in the same run and settings (random weights,
    fp32 master weights with bf16 compute, fused AdamW, SDPA, no activation checkpointing): tokens/s and MFU with
    ModelConfig.flops_per_token. One process: bf16 autocast. Under torchrun: FSDP2 (each block, then the root) with
    MixedPrecisionPolicy(bf16 params, fp32 reduce) for both."""
    import gc
    from contextlib import nullcontext

    import numpy as np

    import cft
    from data import Rows
    from distributed import setup_distributed, shutdown_distributed
    from model import ModelConfig
    parser = argparse.ArgumentParser(prog="bench.py train", description=bench_train.__doc__)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model, fp32")
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--layers", type=int, default=8, help="blocks (0: the preset's)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences per process per forward")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process per optimiser step "
                        "(real runs accumulate many: the paper's batch 128 is 64 on one GPU at micro-batch 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-eager", action="store_true", help="time only the compiled loop of ours (on CUDA)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 2 steps of each of our cases: GPU time by kernel category")
    args = parser.parse_args(argv)
    env = setup_distributed("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cuda = env.device.type == "cuda"
    if args.tiny:
        model_cfg = ModelConfig.from_name("tiny", n_layers=2)
        args.seq_len, args.micro_batch_size, args.steps, args.warmup = 128, 2, 3, 1
    else:
        model_cfg = ModelConfig.from_name(args.model, **({"n_layers": args.layers} if args.layers else {}))
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, args.seq_len)
    flops = model_cfg.flops_per_token(args.seq_len)
    rows_per_rank = args.micro_batch_size * args.grad_accum  # per optimiser step
    tokens_per_step = rows_per_rank * env.world * args.seq_len
    rng = np.random.default_rng(0)
    n_rows = rows_per_rank * env.world * (args.steps + args.warmup)
    rows = Rows(rng.integers(3, model_cfg.vocab_size, (n_rows, args.seq_len + 1)).astype(np.int32),
                np.ones((n_rows, args.seq_len + 1), bool), None)

    def rank_rows(s: int) -> np.ndarray:
        """This process's rows of optimiser step s."""
        first = (s * env.world + env.rank) * rows_per_rank
        return np.arange(first, first + rows_per_rank)

    def measure(step) -> tuple[float, float]:
        """(tokens/s, peak GiB) over args.steps steps after args.warmup."""
        for s in range(args.warmup):
            step(s)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for s in range(args.warmup, args.warmup + args.steps):
            step(s)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return tokens_per_step * args.steps / seconds, peak

    def ours(compile_blocks: bool):
        cfg = cft.CFTConfig(batch_size=rows_per_rank * env.world, micro_batch_size=args.micro_batch_size,
                         seq_len=args.seq_len, lr=1e-5, compile=compile_blocks, precision="bf16" if cuda else "fp32")
        lm = cft.build_language_model(cfg, model_cfg, env, 0)
        optimizer, params = cft.make_optimizer(lm, "model", cfg, env)
        n_targets = tokens_per_step

        def step(s):
            cft.train_step(lm, optimizer, rows, rank_rows(s), n_targets, cfg, env, params)
        result = measure(step)
        if args.profile and cuda:
            profiles[f"compiled={compile_blocks}"] = kernel_breakdown(lambda: [step(s) for s in range(2)])
        del lm, optimizer, params
        return result

    def transformers_llama():
        from transformers import LlamaConfig, LlamaForCausalLM
        fields = {k: v for k, v in model_cfg.to_hf_dict().items()
                  if k not in ("architectures", "torch_dtype", "rope_parameters")}
        hf = LlamaConfig(**fields, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(env.device):
            model = LlamaForCausalLM(hf).float()
        autocast = nullcontext()
        if env.world > 1:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32, reduce_dtype=torch.float32)
            for layer in model.model.layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        elif cuda:
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=1e-5, betas=(0.9, 0.95), fused=cuda)

        def step(s):
            index = rank_rows(s)
            for i in range(args.grad_accum):
                if env.world > 1:  # reduce-scatter once, after the last micro-batch (as cft.train_step)
                    model.set_requires_gradient_sync(i == args.grad_accum - 1)
                part = index[i * args.micro_batch_size:(i + 1) * args.micro_batch_size]
                tokens = torch.from_numpy(rows.tokens[part]).long().to(env.device)
                with autocast:
                    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1].clone(), use_cache=False).loss
                (loss / args.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result = measure(step)
        del model, optimizer
        return result

    profiles = {}
    cases = [] if args.skip_eager and cuda else [("cft.py loop, eager", lambda: ours(False))]
    if cuda:
        cases.append(("cft.py loop, torch.compile per block + fused loss", lambda: ours(True)))
    if not args.skip_transformers:
        cases.append(("transformers LlamaForCausalLM", transformers_llama))
    results = {}
    for name, run in cases:
        results[name] = run()
        if env.is_main:  # as each case ends, so a run cut short still reports what it measured
            print(f"{name}: {results[name][0]:,.0f} tokens/s, peak {results[name][1]:.1f} GiB", flush=True)
        gc.collect()  # free the previous model before the next one is built
        if cuda:
            torch.cuda.empty_cache()
    base = results.get("transformers LlamaForCausalLM")
    peak_flops = 989e12 * env.world
    table_rows = [(name, f"{tps:,.0f}", f"{tps * flops / peak_flops:.1%}", f"{peak:.1f}",
                   f"{tps / base[0]:.2f}x" if base else "") for name, (tps, peak) in results.items()]
    if env.is_main:
        device = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"device: {env.world} x {device}; {model_cfg.n_layers} layers x {model_cfg.dim} "
              f"({model_cfg.num_params() / 1e9:.2f}B params), seq {args.seq_len}, micro-batch {args.micro_batch_size} "
              f"x {args.grad_accum} accumulated per process, {'FSDP2' if env.world > 1 else 'single process'}, "
              f"{'bf16 compute, fp32 master weights' if cuda else 'fp32'}; MFU = {flops / 1e9:.2f} GFLOP/token / "
              f"989 TFLOP/s per GPU; {args.steps} timed steps after {args.warmup}")
        print(table(table_rows, ["implementation", "tokens/s", "MFU", "peak GiB", "vs transformers"]))
        for name, breakdown in profiles.items():
            print(f"\nGPU time of 2 steps by kernel category (rank 0, ours, {name}):")
            print(table(breakdown, ["category", "ms", "share", "largest kernel"]))
    shutdown_distributed(env, finished=True)


KERNEL_CATEGORIES = (("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
                     ("attention", ("flash", "fmha", "attention", "cudnn")),
                     ("communication", ("nccl",)), ("optimizer", ("adam", "multi_tensor")),
                     ("fused (compiled)", ("triton",)), ("elementwise/reduce (eager)", ("elementwise", "reduce")))


def kernel_breakdown(run) -> list[tuple]:
    """Profile run() on CUDA and sum each kernel's own GPU time into a category by its name."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals, largest = {}, {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        name = event.key.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        totals[category] = totals.get(category, 0.0) + us
        if us > largest.get(category, (0, ""))[0]:
            largest[category] = (us, event.key[:70])
    total = sum(totals.values())
    return [(c, f"{us / 1e3:.1f}", f"{us / total:.1%}", largest[c][1])
            for c, us in sorted(totals.items(), key=lambda kv: -kv[1])]


SUBCOMMANDS = {
    "attention": bench_attention,
    "ct": bench_ct,
    "eval": bench_eval,
    "synthetic": bench_synthetic,
    "train": bench_train,
}


def main():
    usage = f"usage: python bench.py {{{','.join(SUBCOMMANDS)}}} [options]; see --help of each"
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print(f"{__doc__}\n{usage}")
        return
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        print(__doc__)
        raise SystemExit(usage)
    SUBCOMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
