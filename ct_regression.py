"""icl_regression.py's in-context regression transformer as context tuning's model, for the synthetic reproduction
(`context_tuning.py --quick` / `--reproduce`): its inputs and outputs in context tuning's terms (RegressionIO), the
reproduction's settings and presets, its task families, the backbone, and the squared error of queries answered by
an adapted model.

Context tuning's methods see a model through an IO object (ct_methods.py's docstring); context_tuning.TokenIO is the
same for Llama.
"""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import icl_regression as icl
from config_flags import option
from ct_methods import Adapted, Demo, Episode, TuneConfig, folded_lora


SWEPT = ("ct-kv", "ct-prompt", "prompt-tuning", "prefix-tuning", "ttt")  # the methods with a learning rate of their own
SWEEP_LRS = {"ttt": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}  # marc: TTT 1e-4, the others 1e-3 to 3e-3, on Llama
SWEEP_LRS_DEFAULT = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


@dataclass
class CTQuickConfig:
    """The synthetic reproduction: a pretrained icl_regression backbone meets task families it never saw, with k
    demonstrations per task; every method runs on the same tasks. Presets: CT_REPRODUCTIONS."""
    preset: str = "quick"          # icl_regression.REGRESSION_PRESETS: the backbone
    ks: list[int] = field(default_factory=lambda: [8])  # demonstrations per task (the same tasks at every k)
    families: list[str] = field(default_factory=lambda: ["shifted"])  # TASK_FAMILIES
    w_shift: float = 2.0           # shifted: w ~ N(w_shift, I), out of the pretraining distribution w ~ N(0, I)
    tasks_per_seed: int = 8
    queries_per_task: int = 128
    seeds: int = option(3, "--quick / --reproduce: seeds to run (more seeds resume a finished run)")
    steps: int = 100               # every method's steps (CT-KV/prefix tuning: epochs); TTT + CT-KV: half
    # each method's learning rate (TTT + CT-KV: TTT's, then CT-KV's), the best of a sweep on held-out tasks
    # (sweep_learning_rates: SWEEP_LRS, generator stream "sweep"): the quick preset's come from one such sweep on its
    # backbone (8 tasks, k = 8); with sweep_tasks > 0 a run sweeps on its own backbone first (per family, at the middle
    # k) and records what it chose
    lrs: dict = field(default_factory=lambda: {"ct-kv": 1e-2, "ct-prompt": 3e-2, "prompt-tuning": 3e-2,
                                               "prefix-tuning": 1e-1, "ttt": 3e-4})
    sweep_tasks: int = 0
    dropout: float = 0.1           # token dropout of CT-KV, CT-Prompt and prompt tuning
    task_batch: int = 8            # tasks trained together (folded into one batch; same results)


CT_REPRODUCTIONS = {
    "quick": CTQuickConfig(),
    # the full-size backbone (d = 20, 12 layers, width 256), every k, two task families: the GPU run (gpu/ct.sh)
    # 6 x 32 tasks per optimisation: a sweep's six rates at once, a cell's 5 seeds x 32 tasks at once
    "full": CTQuickConfig(preset="full", ks=[4, 8, 16, 32], families=["shifted", "offset"], tasks_per_seed=32,
                          seeds=5, task_batch=192, sweep_tasks=32),
    # seconds on a CPU: the tests and gpu/ct.sh's CPU check
    "tiny": CTQuickConfig(preset="test", ks=[2, 3], families=["shifted", "offset"], tasks_per_seed=2,
                          queries_per_task=8, seeds=2, steps=3, task_batch=2, sweep_tasks=2),
}

TASK_FAMILIES = {
    "shifted": "y = w^T x, w ~ N(w_shift 1, I): weights outside pretraining's w ~ N(0, I)",
    "offset": "y = w^T x + b, w ~ N(0, I), b ~ N(0, d): an intercept the pretrained estimator (through the origin) "
              "lacks and k demonstrations reveal",
}


def regression_tune_config(q: CTQuickConfig, k: int, lrs: dict | None = None) -> TuneConfig:
    """Every method's settings on the regression tasks: marc's structure at this problem's step count and learning
    rates (lrs: {method: lr}, default q.lrs). As marc's MMLU runs: every method the same number of steps (CT-KV, prefix
    tuning: epochs), TTT + CT-KV half of CT-KV's epochs; as its NLP runs: CT-KV's mini-batch = all k pairs,
    CT-Prompt / prompt tuning 4 pairs per step, TTT 4 sequences per step (from 400 permutations); LoRA rank = alpha =
    64, prefix tuning without dropout. Prompt and prefix tuning get as many positions as the demonstrations fill (2k
    tokens): CT's capacity, inside the context length the backbone was pretrained on."""
    s, lr = q.steps, lrs or q.lrs
    return TuneConfig(steps=s, lr=lr["ct-kv"], dropout=q.dropout, batch_size=k, ct_prompt_steps=s,
                      ct_prompt_lr=lr["ct-prompt"], ct_prompt_dropout=q.dropout, prompt_batch_size=4, prompt_len=2 * k,
                      prompt_tuning_steps=s, prompt_tuning_lr=lr["prompt-tuning"], prompt_tuning_dropout=q.dropout,
                      prefix_tuning_steps=s, prefix_tuning_lr=lr["prefix-tuning"], ttt_permutations=400, ttt_steps=s,
                      ttt_batch_size=4, ttt_lr=lr["ttt"], ttt_kv_steps=max(1, s // 2), progress=False)


class RegressionIO:
    """The regression transformer's inputs and outputs: x and y tokens in through read_in, the x_i position's
    read_out predicts y_i (squared error)."""

    def __init__(self, reg):
        self.reg = reg

    def embed(self, xs, ys):
        """(B, n, d), (B, n) -> (B, 2n, dim): the tokens x_1, y_1, ... through the read-in."""
        return self.reg.read_in(icl.interleave(xs, ys))

    def position_loss(self, hidden, targets):
        return (self.reg.read_out(hidden).squeeze(-1).float() - targets) ** 2

    def loss_sums(self, hidden, targets, in_loss):
        """(R,) squared error summed over each row's loss positions (a mask, not a selection)."""
        return (self.position_loss(hidden, targets) * in_loss).sum(-1)

    @torch.no_grad()
    def init_context(self, m: int) -> torch.Tensor:
        """m embeddings of fixed random (x, y) tokens, y on the labels' scale: the regression counterpart of Llama's
        dummy tokens 0..m-1 (the same for every task, not the task's demonstrations)."""
        d, generator = self.reg.n_dims, torch.Generator().manual_seed(0)
        xs = torch.randn(1, (m + 1) // 2, d, generator=generator)
        ys = torch.randn(1, (m + 1) // 2, generator=generator) * math.sqrt(d)
        device = self.reg.read_in.weight.device
        return self.embed(xs.to(device), ys.to(device))[0, :m]


@torch.no_grad()
def regression_episode(io: RegressionIO, xs, ys) -> Episode:
    """k demonstrations (x_i, y_i) -> tokens x_i, y_i; the x_i position predicts y_i, the y_i position nothing."""
    embeds = io.embed(xs[None], ys[None])[0]
    in_loss = torch.tensor([True, False], device=embeds.device)
    demos = [Demo(embeds[2 * i:2 * i + 2], torch.stack([ys[i], ys.new_zeros(())]), in_loss) for i in range(len(xs))]
    return Episode(Demo(embeds[:0], ys[:0], in_loss[:0]), demos)


def sample_family(family: str, q: CTQuickConfig, n_dims: int, seed: int, task: int, stream: str = "context-tuning"):
    """Task `task` of seed `seed`: xs (max(ks) + queries, d), ys. Demonstrations are xs[:k], queries the last
    q.queries_per_task points, so every k sees the same task and queries (smaller k: a prefix of the demonstrations).
    stream "sweep": the held-out tasks the learning rates are chosen on."""
    n = max(q.ks) + q.queries_per_task
    if family == "shifted":
        batch = icl.sample_tasks("shifted-linear", 1, n, n_dims, icl.generator("cpu", seed, stream, task),
                                 w_shift=q.w_shift)
        return batch.xs[0], batch.values()[0]
    if family == "offset":
        gen = icl.generator("cpu", seed, stream, "offset", task)
        batch = icl.sample_tasks("linear", 1, n, n_dims, gen)
        return batch.xs[0], batch.values()[0] + torch.randn((), generator=gen) * math.sqrt(n_dims)
    raise ValueError(f"task family {family!r} is not one of {', '.join(TASK_FAMILIES)}")


@torch.no_grad()
def regression_errors(adapted: Adapted, io: RegressionIO, xs, ys, rows_per_call: int = 1024) -> list[float]:
    """Each task's mean squared error on its queries xs (T, Q, d), ys (T, Q), answered as `adapted` says: several
    tasks' queries in one batch (about rows_per_call rows), each after its task's prefix and through its task's
    adapters (folded_lora). One-token rows keep model.py's attention on its exact path."""
    T, Q = ys.shape
    per_call, errors = max(1, rows_per_call // Q), []
    for first in range(0, T, per_call):
        part = slice(first, first + per_call)
        n = len(ys[part])
        x_tokens = io.embed(xs[part].flatten(0, 1)[:, None], torch.zeros_like(ys[part]).flatten()[:, None])[:, :1]
        prefix = None if adapted.prefix_kv is None else [(k[part].repeat_interleave(Q, 0), v[part].repeat_interleave(
            Q, 0)) for k, v in adapted.prefix_kv]
        adapters = {name: a[part] for name, a in adapted.adapters.items()} if adapted.adapters else None
        with folded_lora(adapted.model, adapters):
            hidden = adapted.model.hidden_states(embeds=x_tokens, prefix_kv=prefix)
        errors += io.position_loss(hidden[:, 0], ys[part].flatten()).view(n, Q).mean(1).tolist()
    return errors


def regression_backbone(out: Path, preset: str, device, deadline: float = math.inf, compile: bool = False,
                        pretrained: str | None = None):
    """icl_regression.py's regression transformer of `preset`, pretrained into OUT/pretrain (or reused, or resumed
    from there), or the finished checkpoint folder `pretrained` (another run's, e.g. synthetic.py's rotary full
    backbone: the same RegressionConfig and seed; the caller checks it first, check_pretrained), frozen, on `device`
    -> (model, meta); None when the deadline came first."""
    if pretrained is None and not icl.pretrain(icl.REGRESSION_PRESETS[preset], out, device, deadline, compile=compile):
        return None
    reg, meta = icl.load_regression_model(Path(pretrained) if pretrained else out / "pretrain")
    return reg.to(device).eval().requires_grad_(False), meta


def backbone_identity(folder) -> dict | None:
    """What identifies the finished icl_regression checkpoint in `folder`: its settings, seed and final quality (and
    its path, for messages only); None when `folder` holds no finished checkpoint."""
    meta = icl.finished_meta(folder)
    if meta is None:
        return None
    return {"config": meta.get("config"), "seed": meta.get("seed"), "quality": meta.get("quality"), "path": str(folder)}


def check_pretrained(folder: str, preset: str):
    """A finished icl_regression checkpoint of `preset`'s settings (every RegressionConfig field, seed 0), else a
    ValueError naming the differences."""
    meta = icl.finished_meta(folder)
    if meta is None:
        raise ValueError(f"--pretrained {folder}: no finished icl_regression pretraining checkpoint")
    wanted = asdict(icl.REGRESSION_PRESETS[preset])
    stored = {key: meta.get("config", {}).get(key) for key in wanted}
    differ = [f"{key}={stored[key]!r} (preset {preset}: {value!r})" for key, value in wanted.items()
              if stored[key] != value and key != "preset"]
    if meta.get("seed") != 0:
        differ.append(f"seed={meta.get('seed')!r} (0)")
    if differ:
        raise ValueError(f"--pretrained {folder}: not the {preset} backbone: {', '.join(differ)}")


def quick_backbone(out: Path):
    """The CPU-sized backbone of `--quick`, pretrained into OUT/pretrain (or reused from there)."""
    found = regression_backbone(out, "quick", "cpu")
    if found is None:
        raise ValueError(f"{out}/pretrain: pretraining did not finish")
    return found
