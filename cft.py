"""Contextual fine-tuning (Choi et al., ICLR 2025, "Teaching LLMs How to Learn with Contextual Fine-Tuning").

Continued pre-training on domain text where each text x is preceded by a contextual prompt c (no loss on c):
    L = - sum_k log P(x_k | c, x_<k)
and its baselines: CPT (no prompt), NEG-CFT (prompts of the same form without learning guidance), auto-CFT (the model
writes a prompt per document), each optionally mixed with instruction data (CFT+IFT, CPT+IFT) or general text, and
ProMoT (promot.py: a soft prompt trained first with the model frozen, then kept frozen while the model trains).

    torchrun --nproc_per_node 2 cft.py --model llama2-7b     # real weights: the fictional pharmacology, CFT beside CPT
    torchrun --nproc_per_node 8 cft.py --model llama2-7b --data medtext/ --out runs/cft-7b \
        --seq-len 4096 --batch-size 128 --micro-batch-size 1 --lr 2e-5     # the paper's setting (1 epoch)
    python cft.py                                  # random-init demo: a 0.9M-parameter model learns the fictional facts

Read top to bottom: config -> model (FSDP2) -> loss -> checkpoints -> training loop -> final model -> closed-book
evaluation -> main. The rows each method trains on are built in method_data.py, the run folder (lock, resume checks,
metrics) is run_folder.py. The loop is written out: no Trainer, accelerate or Lightning.
"""
import argparse
import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes
from torch.distributed.fsdp import register_fsdp_forward_method
from tqdm import tqdm

import data
from atomic import atomic_write, commit_folder, staging_folder, staging_path, write_text
from benchmark_data import Question
from config_flags import add_config_flags, config_from_args, option
from data import Rows, Tokenizer
from distributed import Dist, full_tensor, parallelize, reshard, setup_distributed, shutdown_distributed
from hf_checkpoint import MODEL_REPOS, checkpoint_dtype, load_weights, save_pretrained, write_tokenizer_files
from lora import apply_lora, merge_lora, save_peft_adapter
from method_data import TrainData, prepare_data
from model import PRECISIONS, AttentionMask, ModelConfig, Transformer, create_model
from promot import Selection, init_soft_prompt, select_every, set_soft_prompt, vocab_init_ids
from run_folder import (append_metrics, check_config, check_data, check_demo_folder, checkpoint_progress,
                        checkpoint_steps, claimed_folder, kill_point, latest_checkpoint, plan_start, read_metrics,
                        read_result, rewrite_metrics, write_config)
from run_inputs import DEMO_MODEL, Inputs, resolve_inputs
from scoring import encode_questions, predict, score_options
from training import NonFiniteState, load_training_state, lr_at, save_training_state

# ----------------------------------------------------------------------------------------------------------------------
# Config, and from it every flag (config_flags.py). Defaults are the paper's trainer prior (1 epoch, AdamW 2e-5, wd 0.1,
# betas (0.9, 0.95), cosine with 5% warm-up, clip 1.0, global batch 128, sequence 4096); ProMoT's are its paper's.


@dataclass
class CFTConfig:
    method: str | None = option(None, "contextual prompts / none / negative prompts / model-written prompts (demo: "
                                      "cft and cpt)", choices=["cft", "cpt", "neg-cft", "auto-cft"])
    model: str | None = option(None, "model name (llama2-7b, llama3.1-8b, ...: its Hugging Face weights, found in "
                                     "--model-dir or the Hugging Face cache; never downloaded) or folder; with "
                                     "--random-init a model.py preset")
    model_dir: str | None = option(None, "folder of model folders where --model is looked up first")
    random_init: bool = option(False, "random weights of the --model preset (benchmarks), not its real weights")
    checkpoint: str | None = option(None, "Hugging Face Llama folder to start from (the same as --model FOLDER)")
    tokenizer: str | None = option(None, "tokenizer.model / tokenizer.json (default: the model's; random-init demo: "
                                         "its own)")
    data: str | None = option(None, "domain corpus: .jsonl/.json/.txt (gz ok) file or folder (default: built-in)")
    text_field: str = option("text", "JSONL field holding the text")
    prompts: str | None = option(None, "your contextual prompts: JSON list or one per line")
    pack: bool = option(True, "pack short documents into rows (no attention across documents)")
    instruct_data: str | None = option(None, "instruction JSONL (prompt, response); loss on the response only")
    instruct_ratio: float = option(0.0, "fraction of rows that are instruction examples; 0 = a second stage")
    general_data: str | None = option(None, "general text mixed in without prompts (a comparison arm)")
    general_ratio: float = option(0.1, "fraction of rows from --general-data")
    heldout_fraction: float = option(0.01, "documents held out for the held-out loss (and --promot-select)")
    out: str | None = option(None, "output folder (refused if it holds anything, unless --resume)")
    seq_len: int = option(4096, "tokens per row, prompt included")
    batch_size: int = option(128, "global batch in sequences per optimiser step")
    micro_batch_size: int = option(1, "sequences per forward/backward per process")
    lr: float = option(2e-5, "peak learning rate (ProMoT: of stage 2, the model)")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    warmup: float = option(0.05, "warm-up as a fraction of all steps (of each stage)")
    epochs: int = option(1, "passes over the data")
    max_steps: int | None = option(None, "optimiser steps (ProMoT: of stage 2; default: epochs over the data)")
    clip: float = option(1.0, "gradient-norm clip (0: none)")
    lora_rank: int = option(0, "train LoRA adapters of this rank (0 = full fine-tuning); final/ is a PEFT adapter")
    lora_alpha: float = option(16.0, "LoRA scale numerator (scale = alpha / rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input")
    rslora: bool = option(False, "rank-stabilised LoRA scale alpha / sqrt(rank)")
    merge_lora: bool = option(False, "final/: the merged full model instead of the PEFT adapter")
    save_dtype: str | None = option(None, "dtype of final/'s weights (default: the source checkpoint's; random init: "
                                          "fp32)", choices=list(PRECISIONS))
    memory_check: bool = option(True, "refuse a run whose estimated memory exceeds the device's, before allocating")
    promot_prompt_steps: int = option(0, "ProMoT stage 1: train a soft prompt this many steps, the model frozen "
                                         "(paper: 5000)")
    promot_prompt_len: int = option(100, "ProMoT: soft prompt length (paper: 100)")
    promot_lr: float = option(1e-3, "ProMoT stage 1: the soft prompt's peak learning rate (AdamW)")
    promot_init: str = option("vocab", "ProMoT: soft prompt from embeddings of tokens sampled from the 5,000 commonest "
                                       "of the corpus (Lester et al.), or of a contextual prompt",
                              choices=["vocab", "cft-prompt"])
    promot_one_shot: bool = option(False, "ProMoT + 1-shot: a natural-language example of the target data between "
                                          "the soft prompt and every input")
    promot_select: bool = option(False, "keep each stage's best state by held-out target loss (ProMoT's checkpoint "
                                        "selection; needs --heldout-fraction)")
    promot_select_prompt_every: int = option(0, "stage-1 evaluation interval (0: a fifth of the stage, as 1000 of "
                                                "5000)")
    promot_select_model_every: int = option(0, "stage-2 evaluation interval (0: a tenth of the stage, as 100 of 1000)")
    save_every: int = option(0, "training-state checkpoint every N steps (0: none; the final model is always saved)")
    stop_after: int | None = option(None, "stop with a checkpoint after this step (schedule unchanged)")
    resume: bool = option(False, "continue the run in --out where it stopped (a demo: each method)")
    eval_every: int = option(0, "held-out loss every N steps (0: only at the end)")
    seed: int = option(0, "seed of the initialisation, data order and held-out split")
    device: str | None = option(None, "cpu | cuda (default: cuda when available)")
    precision: str | None = option(None, "compute dtype over fp32 master weights (default: bf16 on CUDA, else fp32)",
                                   choices=list(PRECISIONS))
    activation_checkpointing: bool = option(False, "recompute each block in backward instead of storing activations")
    compile: bool = option(False, "torch.compile each block and the fused output projection + loss")
    peak_tflops: float = option(989.0, "per-device peak for MFU (H100 SXM dense bf16: 989)")
    cache_dir: str | None = option(None, "tokenization / tokenizer / auto-prompt cache (~/.cache/cft)")
    workers: int | None = option(None, "tokenization processes (default: all cores)")
    auto_prompt_tokens: int = option(48, "auto-CFT: max tokens per generated prompt")
    progress: bool = option(True, "progress bars")


# The built-in demo without real weights: run_inputs.DEMO_MODEL learns the fictional facts in about a minute on 2 CPU
# cores. With real weights (the experiment to run): the paper's learning rate, full fine-tuning, 10 passes over the
# 144 documents at 8 rows of 256 tokens (new facts need repeated exposures before a model recalls them closed-book).
DEMO_CFT_CONFIG = CFTConfig(seq_len=256, batch_size=8, micro_batch_size=4, lr=5e-3, max_steps=150, heldout_fraction=0.0)
DEMO_PRETRAINED_CONFIG = CFTConfig(seq_len=256, batch_size=8, micro_batch_size=4, lr=2e-5, epochs=10,
                                   heldout_fraction=0.0)


def parse_cft_args(argv=None) -> CFTConfig:
    demo_values = {k: v for k, v in asdict(DEMO_CFT_CONFIG).items() if v != getattr(CFTConfig(), k)}
    pretrained = {k: v for k, v in asdict(DEMO_PRETRAINED_CONFIG).items() if v != getattr(CFTConfig(), k)}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Without --data: the built-in "
                                     f"fictional pharmacology, CFT and CPT side by side; real weights: {pretrained}; "
                                     f"random init: {demo_values}, {DEMO_MODEL}.")
    add_config_flags(parser, CFTConfig)
    args = parser.parse_args(argv)
    if getattr(args, "data", None) is not None:
        return config_from_args(CFTConfig, args)
    real = getattr(args, "checkpoint", None) or (getattr(args, "model", None) and not getattr(args, "random_init", 0))
    base = DEMO_PRETRAINED_CONFIG if real else DEMO_CFT_CONFIG
    if not real and getattr(args, "epochs", 1) != 1:  # the demo's steps stand for its one epoch; epochs asked: count
        base = replace(base, max_steps=None)
    return config_from_args(CFTConfig, args, base=base)


def fail(message: str):
    """Bad input: one clear line, non-zero exit (on every rank, so torchrun stops too)."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# The model. LanguageModel holds the Transformer and (ProMoT) the soft prompt, so that under FSDP2 the root module
# owns the embedding, final norm, output projection and soft prompt, and every block is its own FSDP unit
# (parameters all-gathered just before the block runs and freed after).


class LanguageModel(nn.Module):
    def __init__(self, transformer: Transformer, soft_prompt_len: int = 0, compile_loss: bool = False):
        super().__init__()
        self.model = transformer
        self.cfg = transformer.cfg
        self.soft_prompt = None
        if soft_prompt_len:
            self.soft_prompt = nn.Parameter(torch.empty(soft_prompt_len, transformer.cfg.dim,
                                                        device=transformer.embed_tokens.weight.device))
        # Compiled, the output projection and the cross-entropy fuse: the (tokens x vocab) fp32 logits are never
        # written out in full, which is a large share of a step's memory traffic at a 32k vocabulary.
        self.token_loss = torch.compile(transformer.loss) if compile_loss else transformer.loss

    def forward(self, tokens, *, soft=None, mask=None, targets=None, **kwargs):
        """Logits (B, T, vocab), or with targets the summed next-token loss. soft (B, T) bool marks runs of
        soft_prompt_len slots that take the soft prompt's vectors (ProMoT). kwargs: model.generate's KV cache."""
        if soft is None:
            hidden = self.model.hidden_states(tokens, mask=mask, **kwargs)
        else:
            embeds = self.model.embed_tokens(tokens)
            vectors = self.soft_prompt.to(embeds.dtype).repeat(int(soft.sum()) // len(self.soft_prompt), 1)
            embeds = embeds.masked_scatter(soft[..., None], vectors)
            hidden = self.model.hidden_states(embeds=embeds, mask=mask, **kwargs)
        return self.model.logits(hidden) if targets is None else self.token_loss(hidden, targets)

    def score_questions(self, encoded: list, reduction: str) -> list[list[float]]:
        """scoring.score_options on the Transformer alone (held-out questions: never the soft prompt), every question
        on this rank. Registered with FSDP2 as a forward of the root: it calls the blocks, but needs the root's."""
        return score_options(self.model, encoded, reduction=reduction, rank=0, world=1, progress=False)


def build_language_model(cfg: CFTConfig, model_cfg: ModelConfig, env: Dist, soft_prompt_len: int) -> LanguageModel:
    """Build -> (LoRA) -> parallelize -> load. With FSDP the model is built on the meta device and sharded before any
    memory is used; each rank then streams only its own rows of every checkpoint tensor (or initialises its shards)."""
    lora, fsdp = cfg.lora_rank > 0, env.world > 1

    def wrap(lm):  # activation checkpointing -> compile -> fully_shard per block -> root
        return parallelize(lm, lm.model.layers, env, activation_checkpointing=cfg.activation_checkpointing,
                           compile=cfg.compile, compute_dtype=PRECISIONS[cfg.precision])
    if fsdp and not lora and (cfg.checkpoint or env.device.type == "cuda"):
        with torch.device("meta"):
            lm = wrap(LanguageModel(Transformer(model_cfg), soft_prompt_len, cfg.compile))
        lm.to_empty(device=env.device)
        if cfg.checkpoint:
            load_weights(lm.model, cfg.checkpoint)  # DTensor-aware: reads only this rank's rows of each tensor
        else:  # random shards (e.g. benchmarks): values differ from a single-process init of the same seed
            torch.manual_seed(cfg.seed)
            lm.model.init_weights()
    else:
        # Built in full and identically on every rank (same seed), so N CPU processes start from the weights of
        # one; LoRA is applied to the loaded base weights before sharding.
        build_device = "cpu" if fsdp else env.device
        transformer = create_model(model_cfg, device=build_device, seed=cfg.seed)
        if cfg.checkpoint:
            load_weights(transformer, cfg.checkpoint)
        if lora:
            apply_lora(transformer, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       rslora=cfg.rslora)
        lm = wrap(LanguageModel(transformer, soft_prompt_len, cfg.compile).to(build_device))
    register_fsdp_forward_method(lm, "score_questions")  # a no-op without FSDP
    if soft_prompt_len:
        with torch.no_grad():
            lm.soft_prompt.zero_()  # real values set by init_prompt
    return lm


def init_prompt(lm: LanguageModel, tokenizer: Tokenizer, train_data: TrainData, cfg: CFTConfig) -> None:
    """The soft prompt's first values (promot.py): sampled vocabulary embeddings, or a contextual prompt's."""
    if cfg.promot_init == "cft-prompt":
        init_soft_prompt(lm, tokenizer, data.CONTEXTUAL_PROMPTS["Focus on Key Concepts"])
    else:
        set_soft_prompt(lm, vocab_init_ids(train_data.docs, len(lm.soft_prompt), cfg.seed))


def mixed_precision(cfg: CFTConfig, env: Dist):
    """Single-process bf16: fp32 weights, bf16 matmuls (under FSDP the MixedPrecisionPolicy does the cast)."""
    if cfg.precision != "fp32" and env.world == 1:
        return torch.autocast(env.device.type, dtype=PRECISIONS[cfg.precision])
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# Loss. A global batch is split over ranks and micro-batches; every micro-batch's summed token loss is divided by the
# number of target tokens in the *global* batch, so the accumulated gradient is exactly that of the token-weighted
# mean over the global batch, however it is split.


def loss_sum(lm: LanguageModel, batch: dict) -> torch.Tensor:
    mask = AttentionMask(doc_ids=batch["doc_ids"]) if batch["doc_ids"] is not None else None
    return lm(batch["tokens"], soft=batch["soft"], mask=mask, targets=batch["targets"])


def train_step(lm, optimizer, rows: Rows, index: np.ndarray, n_targets: int, cfg: CFTConfig, env: Dist,
               params: list) -> tuple[float, float]:
    """One optimiser step on this rank's rows `index` of a global batch with n_targets target tokens in total.
    Returns (global mean loss, gradient norm before clipping)."""
    micro = [index[i:i + cfg.micro_batch_size] for i in range(0, len(index), cfg.micro_batch_size)]
    local_sum = torch.zeros((), device=env.device)
    for i, part in enumerate(micro):
        if env.world > 1:  # FSDP2: reduce-scatter gradients only after the last micro-batch
            lm.set_requires_gradient_sync(i == len(micro) - 1)
        with mixed_precision(cfg, env):
            loss = loss_sum(lm, data.to_batch(rows, part, env.device))
        # FSDP averages gradients over ranks; scaling by world size turns that average into the global sum.
        (loss * (env.world / n_targets)).backward()
        local_sum += loss.detach()  # no .item() here: a host sync per micro-batch would stall the GPU queue
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return env.sum([local_sum.item()])[0] / n_targets, float(grad_norm)


@torch.no_grad()
def heldout_loss(lm, rows: Rows, cfg: CFTConfig, env: Dist, limit: int | None = None) -> float:
    """Mean token loss of the held-out rows (or their first `limit`); rank r takes rows r, r + world, ... FSDP needs
    the same number of forwards on every rank, so shorter lists are padded with copies of row 0 without targets
    (-100): no loss, no tokens."""
    lm.eval()
    n = len(rows) if limit is None else min(limit, len(rows))
    mine = np.arange(env.rank, n, env.world)
    per_rank = math.ceil(n / env.world)
    padded = np.concatenate([mine, np.zeros(per_rank - len(mine), dtype=mine.dtype)])
    total, count = 0.0, 0
    for start in range(0, per_rank, cfg.micro_batch_size):
        batch = data.to_batch(rows, padded[start:start + cfg.micro_batch_size], env.device)
        batch["targets"][max(0, len(mine) - start):] = -100  # the padding rows of this batch, if any
        with mixed_precision(cfg, env):
            total += loss_sum(lm, batch).item()
        count += int((batch["targets"] != -100).sum())
    lm.train()
    reshard(lm)
    total, count = env.sum([total, count])
    return total / max(count, 1)


def make_optimizer(lm: LanguageModel, stage: str, cfg: CFTConfig, env: Dist):
    """AdamW; no weight decay on norms, embeddings (and the soft prompt), as in the Llama/GPT recipes.
    stage 'prompt' (ProMoT stage 1) trains only the soft prompt; 'model' trains the model (or LoRA), prompt frozen."""
    reshard(lm)
    for name, p in lm.named_parameters():
        if stage == "prompt":
            p.requires_grad_(name == "soft_prompt")
        else:  # with LoRA only the adapters train; the base weights stay frozen
            p.requires_grad_(name != "soft_prompt" and (cfg.lora_rank == 0 or "lora_" in name))
    decay, no_decay = [], []
    for name, p in lm.named_parameters():
        if p.requires_grad:
            is_matrix = p.ndim == 2 and "embed_tokens" not in name and name != "soft_prompt"
            (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.promot_lr if stage == "prompt" else cfg.lr,
                                  betas=(0.9, 0.95), fused=env.device.type == "cuda")
    return optimizer, decay + no_decay


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: training.py's training state in DIR/checkpoints/step-N (whole or absent, never pickle); then the older
# one goes. A checkpoint is written only of a state that trains on: its weights are finite and give a finite loss.


@dataclass
class LoopState:
    step: int
    stage: str  # "prompt" (ProMoT stage 1) or "model"
    optimizer: torch.optim.Optimizer
    params: list
    records: list[dict]
    selection: Selection | None  # --promot-select


def save_checkpoint(out: Path, step: int, state: LoopState, lm, train_data: TrainData, index, cfg: CFTConfig,
                    env: Dist):
    step_dir = out / "checkpoints" / f"step-{step}"
    last = latest_checkpoint(out) or "none (lower --lr and start a new --out)"
    probe = heldout_loss(lm, train_data.rows.take(index), cfg, env, limit=cfg.micro_batch_size)
    if not math.isfinite(probe):  # finite weights can still be past saving (|w| ~ 1e30): the next step would NaN
        fail(f"loss is {probe} with the weights after step {step}: not saving them as a checkpoint; stopping "
             f"(last good checkpoint: {last})")
    meta = {"step": step, "stage": state.stage, "data": train_data.info}
    if state.selection is not None:
        meta["selection"] = state.selection.best
    kill_point("checkpoint-begin")
    try:
        save_training_state(step_dir, lm, state.optimizer, meta, env)
    except NonFiniteState as e:
        fail(f"step {step}: not saving a checkpoint, {e} (last good checkpoint: {last})")
    except OSError as e:  # a full disk: the half-written staging folder goes, the last checkpoint stays
        if env.is_main:
            shutil.rmtree(staging_path(step_dir), ignore_errors=True)
        fail(f"step {step}: could not write the checkpoint {step_dir} ({e.strerror or e}); nothing of it was kept "
             f"(last good checkpoint: {last}); free space and --resume")
    kill_point("checkpoint-written")
    if env.is_main:
        for _, old in checkpoint_steps(out):
            if old != step_dir:
                shutil.rmtree(old)
                kill_point("checkpoint-rotated")
    if state.selection is not None:
        state.selection.checkpointed(env)
    env.barrier()


def start_or_resume(lm: LanguageModel, cfg: CFTConfig, env: Dist, out: Path, train_data: TrainData,
                    ckpt: Path | None) -> LoopState:
    """Step 0, or `ckpt` in its saved stage (at the ProMoT boundary: the prompt stage's optimiser, then the loop
    switches as an unbroken run). Refuses a checkpoint of other training data."""
    try:
        prompt_stage = "prompt" if cfg.promot_prompt_steps else "model"
        progress = checkpoint_progress(ckpt) if ckpt else {"step": 0, "stage": prompt_stage}
        if ckpt is not None:
            check_data(progress, train_data.info, ckpt)
        optimizer, params = make_optimizer(lm, progress["stage"], cfg, env)
        if ckpt is not None:
            load_training_state(ckpt, lm, optimizer, env)
        records = [r for r in read_metrics(out) if r.get("step", 0) <= progress["step"]] if ckpt else []
    except ValueError as e:
        fail(str(e) if str(e).startswith("--resume") else f"--resume: {e}")
    best = progress.get("selection")
    selection = Selection(out, best, best) if cfg.promot_select else None
    if env.is_main:
        if ckpt is not None:
            print(f"resumed from {ckpt} at step {progress['step']}")
        rewrite_metrics(out, records)
    return LoopState(progress["step"], progress["stage"], optimizer, params, records, selection)


# ----------------------------------------------------------------------------------------------------------------------
# The training loop. Steps are numbered over both ProMoT stages: steps [0, promot_prompt_steps) train the soft prompt,
# the rest the model; each stage has its own optimiser, learning rate and schedule (and, with --promot-select, keeps
# its best state on held-out target data).


def train_language_model(lm: LanguageModel, train_data: TrainData, cfg: CFTConfig, env: Dist, out: Path,
                         label: str = "", resume_from: Path | None = None) -> list[dict]:
    """Train (ProMoT stage 1, then the model), with checkpoints and metrics. Returns the metrics records."""
    sampler = data.GlobalBatchSampler(train_data.segments, cfg.batch_size, cfg.seed)
    steps_per_epoch = len(sampler)
    prompt_steps = cfg.promot_prompt_steps
    model_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    total = prompt_steps + model_steps
    state = start_or_resume(lm, cfg, env, out, train_data, resume_from)
    bar = tqdm(total=total, initial=state.step, desc=label or "train", disable=not (env.is_main and cfg.progress),
               dynamic_ncols=True)
    order_epoch, order = None, None
    flops_per_token, tic = lm.cfg.flops_per_token(cfg.seq_len), time.perf_counter()
    for step in range(state.step, total):
        if step == prompt_steps and state.stage == "prompt":  # ProMoT stage 2: the prompt freezes, the model trains
            end_stage(lm, state, env)
            state.stage = "model"
            state.optimizer, state.params = make_optimizer(lm, state.stage, cfg, env)
        stage_step, stage_total = (step, prompt_steps) if state.stage == "prompt" else (step - prompt_steps,
                                                                                         model_steps)
        epoch, in_epoch = divmod(stage_step, steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = sampler.order(), epoch
        n_targets = int(train_data.rows.loss[sampler.batch(in_epoch, order=order), 1:].sum())
        index = sampler.batch(in_epoch, env.rank, env.world, order=order)
        lr = lr_at(stage_step, cfg.promot_lr if state.stage == "prompt" else cfg.lr,
                   max(1, round(cfg.warmup * stage_total)), stage_total)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(lm, state.optimizer, train_data.rows, index, max(n_targets, 1), cfg, env,
                                     state.params)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            fail(f"{what} at step {step + 1}; stopping (last good checkpoint: {latest_checkpoint(out) or 'none'}; "
                 f"lower --lr and start a new --out)")
        tokens_per_s, tic = cfg.batch_size * cfg.seq_len / (time.perf_counter() - tic), time.perf_counter()
        mfu = tokens_per_s * flops_per_token / (cfg.peak_tflops * 1e12 * env.world)  # per device
        record = dict(step=step + 1, stage=state.stage, loss=loss, lr=lr, grad_norm=grad_norm,
                      tokens_per_s=tokens_per_s, mfu=mfu)
        if env.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        if after_step(lm, state, record, train_data, cfg, env, out, index, (stage_step, stage_total, total)):
            bar.close()
            return state.records  # stopped (--stop-after) with a checkpoint
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{record['mfu']:.1%}",
                        refresh=False)
    bar.close()
    end_stage(lm, state, env)  # the last stage's best state (--promot-select), e.g. stage 1 alone (prompt tuning)
    return state.records


def after_step(lm, state: LoopState, record: dict, train_data: TrainData, cfg: CFTConfig, env: Dist, out: Path,
               index, steps: tuple[int, int, int]) -> bool:
    """Held-out loss, selection, metrics and checkpoint after a step; whether the run stops here (--stop-after)."""
    stage_step, stage_total, total = steps
    done = record["step"] == total
    if train_data.heldout is not None and (done or (cfg.eval_every and record["step"] % cfg.eval_every == 0)):
        record["heldout_loss"] = heldout_loss(lm, train_data.heldout, cfg, env)
    every = select_every(state.stage, stage_total, cfg.promot_select_prompt_every, cfg.promot_select_model_every)
    if state.selection is not None and (stage_step + 1 == stage_total or (stage_step + 1) % every == 0):
        if "heldout_loss" not in record:
            record["heldout_loss"] = heldout_loss(lm, train_data.heldout, cfg, env)
        record["selected"] = state.selection.consider(lm, state.stage, record["step"], record["heldout_loss"], env)
    state.records.append(record)
    if env.is_main:
        append_metrics(out, record)
    stopping = cfg.stop_after is not None and record["step"] == cfg.stop_after
    if (cfg.save_every and record["step"] % cfg.save_every == 0 and not done) or stopping:
        save_checkpoint(out, record["step"], state, lm, train_data, index, cfg, env)
    return stopping


def end_stage(lm: LanguageModel, state: LoopState, env: Dist) -> None:
    """A stage is over: with --promot-select its best state replaces the last one (promot.Selection)."""
    if state.selection is None:
        return
    best = state.selection.restore(lm, state.stage, env)
    if best is not None and env.is_main:
        print(f"{state.stage} stage: keeping the state of step {best['step']} (held-out loss {best['loss']:.4f})")


# ----------------------------------------------------------------------------------------------------------------------
# The final model: DIR/final is a Hugging Face folder (weights in the source checkpoint's dtype, tokenizer files) or,
# with --lora-rank, a PEFT adapter folder (--merge-lora: the merged full model); ProMoT adds soft_prompt.safetensors,
# and result.json the accuracies. All of it is written into a staging folder and renamed once.


def save_final(lm: LanguageModel, tokenizer: Tokenizer, out: Path, env: Dist, cfg: CFTConfig, result: dict):
    """Every rank takes part (FSDP gathers each tensor); rank 0 writes."""
    final = out / "final"
    staged = staging_folder(final) if env.is_main else final  # other ranks only gather; they write nothing
    try:
        if cfg.lora_rank and not cfg.merge_lora:
            save_peft_adapter(lm.model, staged, base_model_name_or_path=base_model_id(cfg))
            if env.is_main:
                write_tokenizer_files(staged, tokenizer.path, lm.cfg.max_seq_len)
        else:
            if cfg.lora_rank:
                merge_lora(lm.model)  # the HF layout has no adapters: fold them into the weights
            save_pretrained(lm.model, staged, final_dtype(cfg), tokenizer=tokenizer, source=cfg.checkpoint)
        kill_point("final-weights")
        soft = None if lm.soft_prompt is None else full_tensor(lm.soft_prompt)  # gathered by every rank
        if env.is_main:
            if soft is not None:  # through atomic_write: the file follows the umask (save_file makes it 0600)
                tensors = {"soft_prompt": soft.detach().float().cpu().contiguous()}
                atomic_write(staged / "soft_prompt.safetensors", lambda f: f.write(safetensors_bytes(tensors)))
            write_text(staged / "result.json", json.dumps(result, indent=1))
            kill_point("final-staged")
            commit_folder(final)
    except OSError as e:
        if env.is_main:
            shutil.rmtree(staging_path(final), ignore_errors=True)
        fail(f"could not write {final} ({e.strerror or e}); free space and --resume (training restarts from the "
             f"last checkpoint: {latest_checkpoint(out) or 'none'})")
    env.barrier()
    kill_point("final-committed")


def final_dtype(cfg: CFTConfig) -> torch.dtype | None:
    """--save-dtype, else the source checkpoint's (bf16 in, bf16 out), else the trained fp32 weights'."""
    if cfg.save_dtype:
        return PRECISIONS[cfg.save_dtype]
    return checkpoint_dtype(cfg.checkpoint) if cfg.checkpoint else None


def base_model_id(cfg: CFTConfig) -> str | None:
    """adapter_config.json's base model: the Hugging Face repository of a --model name, else the folder."""
    if cfg.model and not cfg.random_init and cfg.model in MODEL_REPOS:
        return MODEL_REPOS[cfg.model]
    return cfg.checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# Closed-book multiple-choice accuracy, scored as lm-evaluation-harness's acc_norm (scoring.py, reduction "chars"):
# the option whose continuation of the cloze stem has the highest log-likelihood per character wins. The questions
# are a held-out task: scored without the soft prompt (ProMoT removes it for everything but the target format).


@torch.no_grad()
def mcq_accuracy(lm: LanguageModel, tokenizer: Tokenizer, questions: list[dict], cfg: CFTConfig, env: Dist) -> float:
    """Every rank scores every question: under FSDP identical work keeps the all-gathers in lockstep."""
    cloze = [Question("pharmacology", "", q["stem"], q["options"], q["answer"]) for q in questions]  # context: stem
    encoded = encode_questions(tokenizer, cloze)
    lm.eval()
    with mixed_precision(cfg, env):
        scores = lm.score_questions(encoded, reduction="chars")
    lm.train()
    reshard(lm)  # the root's parameters stay gathered after a forward without backward
    return float(np.mean([p == q["answer"] for p, q in zip(predict(scores), questions)]))


# ----------------------------------------------------------------------------------------------------------------------
# Main: resolve inputs (with clear errors, before anything is written), then per method: build, evaluate, train, save.


def run_methods(cfg: CFTConfig, env: Dist, inputs: Inputs, out: Path) -> tuple[list[dict], list[Path]]:
    """Claim --out (one process per folder), check what it holds, and run each method in its folder."""
    demo = len(inputs.methods) > 1
    outs = [out / m for m in inputs.methods] if demo else [out]
    if cfg.resume and not out.is_dir():
        fail(f"--resume: {out} does not exist; leave out --resume to start a new run there")
    check = lambda: check_demo_folder(out, outs, cfg.resume) if demo else plan_start(out, cfg.resume)
    try:
        check()  # before taking the lock, which creates the folder: a refused run leaves nothing behind
    except ValueError as e:
        fail(str(e))
    env.barrier()  # every rank looks at the folder before rank 0 changes it, so all decide alike
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(claimed_folder(out, env))
            plan = check()  # again, holding the lock: another run may have started meanwhile
        except ValueError as e:
            fail(str(e))
        env.barrier()
        results = [run_method(m, cfg, env, inputs, o, None if demo else plan) for m, o in zip(inputs.methods, outs)]
    return results, outs


def run_method(method: str, cfg: CFTConfig, env: Dist, inputs: Inputs, out: Path, plan) -> dict:
    """One method in its folder: skipped when finished, resumed where it stopped, else trained from the start."""
    with contextlib.ExitStack() as held:
        if plan is None:  # a method folder of the demo: its own lock, and its own state
            try:
                held.enter_context(claimed_folder(out, env))
                plan = plan_start(out, cfg.resume)
            except ValueError as e:
                fail(str(e))
            env.barrier()
        if plan == "finished":
            if env.is_main:
                print(f"{method}: finished earlier ({out / 'final'})")
            try:
                return read_result(out, method)
            except ValueError as e:
                fail(str(e))
        return train_method(method, cfg, env, inputs, out, plan)


def train_method(method: str, cfg: CFTConfig, env: Dist, inputs: Inputs, out: Path, plan) -> dict:
    started = time.perf_counter()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)  # the demo's second method: its own peak
    record = asdict(replace(cfg, method=method))
    if plan != "start":
        try:
            check_config(out, record, defaults=asdict(CFTConfig()))
        except ValueError as e:
            fail(str(e))
    n_soft = cfg.promot_prompt_len if cfg.promot_prompt_steps else 0
    lm = build_language_model(cfg, inputs.model_cfg, env, n_soft)
    try:
        train_data = prepare_data(cfg, method, inputs.texts, inputs.tokenizer, lm, env, n_soft, inputs.extra)
    except ValueError as e:
        fail(str(e))
    if len(train_data.rows) < cfg.batch_size:
        fail(f"only {len(train_data.rows)} training rows of {cfg.seq_len} tokens for a global batch of "
             f"{cfg.batch_size}: lower --batch-size (or --seq-len, or --heldout-fraction) or add data")
    if n_soft:
        init_prompt(lm, inputs.tokenizer, train_data, cfg)
    result = {"method": method}
    if inputs.questions is not None:
        result["before"] = mcq_accuracy(lm, inputs.tokenizer, inputs.questions, cfg, env)
    if env.is_main:
        print(f"{method}: {len(train_data.rows)} rows of {cfg.seq_len} tokens, {int(train_data.rows.loss.sum()):,} "
              f"trained tokens, {lm.cfg.num_params() / 1e6:.1f}M parameters, {env.world} process(es) on "
              f"{env.device.type}")
        if plan == "start":  # written only now, so that a run refused over bad input leaves no folder behind
            write_config(out, record)
        elif plan == "restart":
            print(f"{method}: no checkpoint in {out / 'checkpoints'} (the run stopped before its first one): "
                  f"starting again from step 0")
    env.barrier()
    records = train_language_model(lm, train_data, cfg, env, out, label=method,
                                   resume_from=plan if isinstance(plan, Path) else None)
    result["loss"] = records[-1]["loss"] if records else float("nan")
    if cfg.stop_after is not None and records and records[-1]["step"] == cfg.stop_after:
        result["stopped"] = cfg.stop_after
        return result
    if inputs.questions is not None:
        result["after"] = mcq_accuracy(lm, inputs.tokenizer, inputs.questions, cfg, env)
    result["seconds"] = round(time.perf_counter() - started, 1)  # build, evaluations and training; not the save
    if env.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2)
    save_final(lm, inputs.tokenizer, out, env, cfg, result)
    if env.is_main:
        shutil.rmtree(out / "selected", ignore_errors=True)  # --promot-select snapshots: final/ holds the best
    return result


def main(argv=None):
    cfg = parse_cft_args(argv)
    env = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    if cfg.data is None and env.device.type == "cpu":
        # The demo model is so small that a second thread barely helps, and on a busy machine threads that wait for
        # each other cost several times the work itself.
        torch.set_num_threads(1)
    finished = False
    try:
        torch.manual_seed(cfg.seed)
        try:
            inputs = resolve_inputs(cfg, env)
        except ValueError as e:
            fail(str(e))
        results, outs = run_methods(cfg, env, inputs, Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"))
        if env.is_main:
            report(results, inputs.questions, outs)
        finished = True
    except OSError as e:  # e.g. a full disk while writing metrics: one line naming the file, not a traceback
        fail(f"{e.filename or 'writing the run'}: {e.strerror or e}")
    finally:
        torch.set_num_threads(threads)
        shutdown_distributed(env, finished)


def report(results: list[dict], questions, outs):
    if questions is not None:
        chance = 1 / len(questions[0]["options"])
        print(f"\nclosed-book accuracy on {len(questions)} fictional-fact questions (chance {chance:.0%}):")
        print(f"{'method':<10}{'before':>8}{'after':>8}{'final loss':>12}")
        for r in results:
            if "after" in r:
                print(f"{r['method']:<10}{r['before']:>8.1%}{r['after']:>8.1%}{r['loss']:>12.4f}")
    for r, o in zip(results, outs):
        where = f"stopped at step {r['stopped']}" if "stopped" in r else f"model in {o / 'final'}"
        print(f"{r['method']}: {where} (metrics: {o / 'metrics.jsonl'})")


if __name__ == "__main__":
    main()
