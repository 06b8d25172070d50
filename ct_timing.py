"""Per-task wall time of context tuning's methods on Llama shapes with random weights (`context_tuning.py --time`),
beside the seconds the first author's code reports for MMLU on Llama-3.2-3B-Instruct (Jacklu0831/marc,
bash_cmds/mmlu/time.sh: the mean over tasks of each method's training time, KV initialisation logged apart).

Setting: marc's MMLU recipe (ct_methods.RECIPES["mmlu"]: CT-KV 20 epochs in mini-batches of 8, CT-Prompt and prompt
tuning 20 steps of 4 pairs, prefix tuning 24 epochs, TTT 20 steps of 8 of 400 permutations, TTT + CT-KV 10 more CT-KV
epochs), k = 16 demonstrations of random tokens after BOS, bf16 on CUDA. A method's time is its whole adaptation (the
one prefill pass included: milliseconds), after a warm-up run of every method (CUDA kernels, FlexAttention compiles);
TTT + CT-KV is timed as marc reports it: the CT-KV part after TTT. marc trains TTT with gradient checkpointing (slower
by about a third); here it runs without. Absolute times depend on the device; the order is what compares.
"""
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from atomic import write_text
from ct_methods import RECIPES, Episode, adapt_tasks
from ct_tokens import TokenIO, token_demo, token_lead
from model import ModelConfig, create_model, default_precision, PRECISIONS

SHAPE_PRESETS = {"tiny": "tiny", "1b": "llama3.2-1b", "3b": "llama3.2-3b", "7b": "llama2-7b"}
DEMO_TOKENS = {"tiny": (12, 4)}  # (tokens, answer tokens) per demonstration; the others (48, 8), MMLU-like
TIMING_SHAPES = tuple(SHAPE_PRESETS)
TIMED = ("prompt-tuning", "prefix-tuning", "ct-prompt", "ct-kv", "ttt", "ttt+ct-kv")
MARC_MMLU_SECONDS = {"prompt-tuning": 7.74, "prefix-tuning": 2.73, "ct-prompt": 18.35, "ct-kv": 3.33, "ttt": 10.67,
                     "ttt+ct-kv": 1.68}  # ttt+ct-kv: the CT-KV epochs after TTT (its total is ttt + this)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_episode(model, k: int, demo_tokens: int, answer_tokens: int, seed: int = 0) -> Episode:
    """BOS, then k demonstrations of random tokens with the last answer_tokens of each in the loss."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    demos = [token_demo(model, torch.randint(3, vocab, (demo_tokens,), generator=gen).tolist(),
                        demo_tokens - answer_tokens) for _ in range(k)]
    return Episode(token_lead(model, 1), demos)


def time_methods(model, ep: Episode, device) -> dict:
    """{method: seconds} of one adaptation each under marc's MMLU recipe, after one warm-up run of every method."""
    recipe = replace(RECIPES["mmlu"], progress=False)
    warm = replace(recipe, steps=1, ct_prompt_steps=1, prompt_tuning_steps=1, prefix_tuning_steps=1, ttt_steps=1,
                   ttt_kv_steps=1)
    io, seconds = TokenIO(model), {}
    for cfg, record in ((warm, False), (recipe, True)):
        ttt = None
        for method in TIMED:
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = time.perf_counter()
            adapted = adapt_tasks(method, model, io, [ep], cfg, ttt)
            synchronize(device)
            if record:
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(device).type == "cuda" else None
                seconds[method] = {"seconds": round(time.perf_counter() - start, 3), "peak_gib": peak}
            ttt = adapted if method == "ttt" else None
            del adapted
    return seconds


def timing_table(results: dict) -> str:
    shapes = list(results)
    header = "| method | marc, MMLU, Llama-3.2-3B (s) | " + " | ".join(f"{s} (s)" for s in shapes) + " |"
    lines = [header, "|---" * (2 + len(shapes)) + "|"]
    for method in TIMED:
        marc = ("+" if method == "ttt+ct-kv" else "") + f"{MARC_MMLU_SECONDS[method]:.2f}"
        cells = [("+" if method == "ttt+ct-kv" else "") + f"{results[s]['methods'][method]['seconds']:.2f}"
                 for s in shapes]
        lines.append(f"| {method} | {marc} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_timing(sizes: str, device, out=None, k: int = 16) -> dict:
    """Time every method on each shape of `sizes` (comma list of SHAPE_PRESETS); print a markdown table and, with
    `out` (a folder), write time.json and time.md there. Shapes already in OUT/time.json are not timed again."""
    names = sizes.split(",")
    unknown = [s for s in names if s not in SHAPE_PRESETS]
    if unknown:
        raise ValueError(f"--time: unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPE_PRESETS)}")
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --time writes time.json and time.md into a folder")
    saved = json.loads((out / "time.json").read_text()) if out is not None and (out / "time.json").is_file() else {}
    dtype = PRECISIONS[default_precision(device)]
    for name in names:
        if name in saved:
            print(f"{name}: timed earlier ({out / 'time.json'})")
            continue
        cfg = ModelConfig.from_name(SHAPE_PRESETS[name])
        model = create_model(cfg, device, dtype, seed=0).eval().requires_grad_(False)
        demo_tokens, answer_tokens = DEMO_TOKENS.get(name, (48, 8))
        ep = random_episode(model, k, demo_tokens, answer_tokens)
        saved[name] = {"preset": SHAPE_PRESETS[name], "k": k, "demo_tokens": demo_tokens, "dtype": str(dtype),
                       "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
                       "methods": time_methods(model, ep, device)}
        del model, ep
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "time.json", json.dumps(saved, indent=1))
        print(f"{name}: " + ", ".join(f"{m} {r['seconds']:.2f}s" for m, r in saved[name]["methods"].items()))
    table = timing_table({n: saved[n] for n in names})
    if out is not None:
        write_text(out / "time.md", "Per-task seconds (marc's MMLU recipe, k = 16)\n\n" + table)
    print(table)
    return saved
