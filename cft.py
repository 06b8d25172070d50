"""Contextual fine-tuning (Choi et al., ICLR 2025, "Teaching LLMs How to Learn with Contextual Fine-Tuning").

Continued pre-training on domain text where each text x is preceded by a contextual prompt c (no loss on c):
    L = - sum_k log P(x_k | c, x_<k)
and its baselines: CPT (no prompt), NEG-CFT (prompts of the same form without learning guidance), auto-CFT (the model
writes a prompt per document), each optionally mixed with instruction data (CFT+IFT, CPT+IFT) or general text, and
ProMoT (a soft prompt trained first with the model frozen, then kept frozen while the model trains).

    python cft.py                                     # built-in fictional pharmacology: CFT beside CPT, ~1-2 min CPU
    torchrun --nproc_per_node 8 cft.py --checkpoint llama2-7b-hf/ --data medtext/ --out runs/cft-7b \
        --seq-len 4096 --batch-size 128 --micro-batch-size 1 --lr 2e-5     # the paper's setting (1 epoch)

Read top to bottom: config -> model (FSDP2) -> data -> loss -> checkpoints -> training loop -> closed-book evaluation
-> auto-CFT prompts -> main. The loop is written out: no Trainer, accelerate or Lightning.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import data
from atomic import commit_folder, staging_folder, write_text
from benchmark_data import Question
from config_flags import add_config_flags, config_from_args, option
from data import Rows, Tokenizer
from distributed import Dist, full_tensor, parallelize, reshard, setup_distributed, shutdown_distributed
from hf_checkpoint import load_weights, save_pretrained
from lora import apply_lora, merge_lora
from model import PRECISIONS, AttentionMask, ModelConfig, Transformer, create_model, default_precision, generate
from pharmacology import builtin_domain
from scoring import encode_questions, predict, score_options
from training import NonFiniteState, load_training_state, lr_at, read_training_meta, save_training_state

# ----------------------------------------------------------------------------------------------------------------------
# Config, and from it every flag (config_flags.py). Defaults are the paper's trainer prior (1 epoch, AdamW 2e-5, wd 0.1,
# betas (0.9, 0.95), cosine with 5% warm-up, clip 1.0, global batch 128, sequence 4096).

AUTO_CFT_INSTRUCTION = ("Given the following text, generate a contextual prompt that encourages a reader to focus on "
                        "the main ideas and themes presented. The contextual prompt should be concise and help the "
                        "reader engage deeply with the content.")


@dataclass
class CFTConfig:
    method: str | None = option(None, "contextual prompts / none / negative prompts / model-written prompts (demo: "
                                      "cft and cpt)", choices=["cft", "cpt", "neg-cft", "auto-cft"])
    model: str | None = option(None, "model.py preset for a randomly initialised model (e.g. tiny, llama2-7b)")
    checkpoint: str | None = option(None, "Hugging Face Llama folder to start from")
    tokenizer: str | None = option(None, "sentencepiece tokenizer.model (default: the checkpoint's; demo: its own)")
    data: str | None = option(None, "domain corpus: .jsonl/.txt (gz ok) file or folder (default: built-in domain)")
    text_field: str = option("text", "JSONL field holding the text")
    prompts: str | None = option(None, "your contextual prompts: JSON list or one per line")
    pack: bool = option(True, "pack short documents into rows (no attention across documents)")
    instruct_data: str | None = option(None, "instruction JSONL (prompt, response); loss on the response only")
    instruct_ratio: float = option(0.0, "fraction of rows that are instruction examples; 0 = a second stage")
    general_data: str | None = option(None, "general text mixed in without prompts (protects in-context learning)")
    general_ratio: float = option(0.1, "fraction of rows from --general-data")
    heldout_fraction: float = option(0.01, "documents held out for the held-out loss")
    out: str | None = option(None, "output folder (refused if it exists, unless --resume)")
    seq_len: int = option(4096, "tokens per row, prompt included")
    batch_size: int = option(128, "global batch in sequences per optimiser step")
    micro_batch_size: int = option(1, "sequences per forward/backward per process")
    lr: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    warmup: float = option(0.05, "warm-up as a fraction of all steps")
    epochs: int = option(1, "passes over the data")
    max_steps: int | None = option(None, "optimiser steps (default: epochs over the data)")
    clip: float = option(1.0, "gradient-norm clip (0: none)")
    lora_rank: int = option(0, "train LoRA adapters of this rank (0 = full fine-tuning)")
    lora_alpha: float = option(16.0, "LoRA scale numerator (scale = alpha / rank)")
    promot_prompt_steps: int = option(0, "ProMoT: first train a soft prompt this many steps with the model frozen")
    promot_prompt_len: int = option(20, "ProMoT: soft prompt length")
    promot_lr: float = option(1e-3, "ProMoT: the soft prompt's peak learning rate")
    save_every: int = option(0, "training-state checkpoint every N steps (0: none; the final model is always saved)")
    stop_after: int | None = option(None, "stop with a checkpoint after this step (schedule unchanged)")
    resume: bool = option(False, "continue from the last checkpoint in --out")
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


# The built-in demo learns the fictional facts in about a minute on 2 CPU cores: its values for flags not given.
DEMO_MODEL = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=512)
DEMO_CFT_CONFIG = CFTConfig(seq_len=256, batch_size=8, micro_batch_size=4, lr=5e-3, max_steps=150, heldout_fraction=0.0)


def parse_cft_args(argv=None) -> CFTConfig:
    demo_values = {k: v for k, v in asdict(DEMO_CFT_CONFIG).items() if v != getattr(CFTConfig(), k)}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Without --data: the built-in "
                                     f"fictional pharmacology, CFT and CPT side by side: {demo_values}, {DEMO_MODEL}.")
    add_config_flags(parser, CFTConfig)
    args = parser.parse_args(argv)
    if getattr(args, "data", None) is not None:
        return config_from_args(CFTConfig, args)
    base = DEMO_CFT_CONFIG
    if getattr(args, "epochs", 1) != 1:  # the demo's step count stands for its one epoch; asked for epochs, count them
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
        """scoring.score_options on the Transformer, every question on this rank. Registered with FSDP2 as a forward
        of the root (build_language_model): scoring calls the blocks directly, but needs the root's parameters."""
        return score_options(self.model, encoded, reduction=reduction, rank=0, world=1, progress=False)


def init_soft_prompt(lm: LanguageModel, tokenizer: Tokenizer, text: str):
    """ProMoT/prompt-tuning init: the embeddings of a real text's tokens (cycled), which trains more stably than noise.
    Under FSDP both tables are sharded DTensors: gather the embedding rows, then shard the values like the prompt."""
    ids = torch.tensor(tokenizer.encode(text))
    ids = ids[torch.arange(len(lm.soft_prompt)) % len(ids)]
    with torch.no_grad():
        table = full_tensor(lm.model.embed_tokens.weight)
        values = table[ids.to(table.device)].float()
        if isinstance(lm.soft_prompt, DTensor):
            values = distribute_tensor(values, lm.soft_prompt.device_mesh, lm.soft_prompt.placements)
        lm.soft_prompt.copy_(values)


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
            apply_lora(transformer, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        lm = wrap(LanguageModel(transformer, soft_prompt_len, cfg.compile).to(build_device))
    register_fsdp_forward_method(lm, "score_questions")  # a no-op without FSDP
    if soft_prompt_len:
        with torch.no_grad():
            lm.soft_prompt.zero_()  # real values set by init_soft_prompt
    return lm


def mixed_precision(cfg: CFTConfig, env: Dist):
    """Single-process bf16: fp32 weights, bf16 matmuls (under FSDP the MixedPrecisionPolicy does the cast)."""
    if cfg.precision != "fp32" and env.world == 1:
        return torch.autocast(env.device.type, dtype=PRECISIONS[cfg.precision])
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# Data: corpus -> token ids (cached) -> rows with the method's prompts. Every rank builds the same rows (seeded), and
# the sampler gives each rank its share of every global batch.


@dataclass
class TrainData:
    rows: Rows
    segments: list[int]  # row counts of the stages (domain [+ instruction second stage])
    heldout: Rows | None


def method_prompts(method: str, tokenizer: Tokenizer, prompts_file: str | None) -> list[list[int]]:
    if method == "cpt":
        return [[]]
    if method == "neg-cft":
        return [tokenizer.encode(t) for t in data.NEGATIVE_PROMPTS]
    texts = data.load_prompts(prompts_file) if prompts_file else list(data.CONTEXTUAL_PROMPTS.values())
    return [tokenizer.encode(t) for t in texts]


def tokenize_documents(texts, tokenizer, cfg: CFTConfig, env: Dist):
    """Token ids of texts; on a single rank first so the cache is filled once and the other ranks read it."""
    if env.is_main:
        tokens = data.tokenize_texts(texts, tokenizer.path, cfg.cache_dir, cfg.workers, cfg.progress)
    env.barrier()
    if not env.is_main:
        tokens = data.tokenize_texts(texts, tokenizer.path, cfg.cache_dir, cfg.workers, progress=False)
    return tokens


def prepare_data(cfg: CFTConfig, method: str, texts: list[str], tokenizer: Tokenizer, lm: LanguageModel | None,
                 env: Dist, n_soft: int) -> TrainData:
    docs = tokenize_documents(texts, tokenizer, cfg, env)
    # Held-out documents: a seeded choice, never trained on; their loss is measured with the method's own prompts.
    n_heldout = int(len(docs) * cfg.heldout_fraction)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(docs))
    heldout_ids, train_ids = order[:n_heldout], np.sort(order[n_heldout:])
    prompts = method_prompts("cft" if method == "auto-cft" else method, tokenizer, cfg.prompts)
    doc_prompts = auto_prompts(lm, tokenizer, texts, cfg, env) if method == "auto-cft" else None
    common = dict(seq_len=cfg.seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                  pack=cfg.pack, n_soft=n_soft)
    pick = lambda ids, xs: None if xs is None else [xs[i] for i in ids]
    try:
        rows = data.domain_rows([docs[i] for i in train_ids], prompts, seed=cfg.seed,
                                doc_prompts=pick(train_ids, doc_prompts), **common)
        heldout = data.domain_rows([docs[i] for i in heldout_ids], prompts, seed=cfg.seed + 1,
                                   doc_prompts=pick(heldout_ids, doc_prompts), **common) if n_heldout else None
    except ValueError as e:
        fail(str(e))
    if cfg.general_data:
        general = tokenize_documents(data.read_corpus(cfg.general_data, cfg.text_field)[0], tokenizer, cfg, env)
        general_rows = data.domain_rows(general, [[]], seed=cfg.seed + 2, **common)
        rows = data.mix_rows(rows, general_rows, cfg.general_ratio, cfg.seed)
    segments = [len(rows)]
    if cfg.instruct_data:
        instruct = instruction_rows(cfg, tokenizer, env, n_soft)
        if cfg.instruct_ratio > 0:
            rows = data.mix_rows(rows, instruct, cfg.instruct_ratio, cfg.seed + 3)
            segments = [len(rows)]
        else:  # second stage: all instruction rows after the domain rows
            rows = Rows.concat([rows, instruct])
            segments = [segments[0], len(instruct)]
    return TrainData(rows, segments, heldout)


def instruction_rows(cfg: CFTConfig, tokenizer: Tokenizer, env: Dist, n_soft: int) -> Rows:
    """--instruct-data as rows: loss on the response only; examples longer than a row are skipped (with a warning)."""
    pairs = data.read_instructions(cfg.instruct_data)
    examples = [data.instruction_example(tokenizer.encode(p), tokenizer.encode(r), tokenizer.bos_id,
                                         tokenizer.eos_id, n_soft) for p, r in pairs]
    fits = [e for e in examples if len(e.tokens) <= cfg.seq_len + 1]
    if len(fits) < len(examples) and env.is_main:
        print(f"warning: {cfg.instruct_data}: skipped {len(examples) - len(fits)} instruction examples longer "
              f"than --seq-len {cfg.seq_len}", file=sys.stderr)
    if not fits:
        fail(f"{cfg.instruct_data}: no instruction example fits --seq-len {cfg.seq_len}")
    return data.make_rows(fits, cfg.seq_len + 1, tokenizer.pad_id, cfg.pack)


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
def heldout_loss(lm, rows: Rows, cfg: CFTConfig, env: Dist) -> float:
    """Mean token loss of the held-out rows; rank r takes rows r, r + world, ... FSDP needs the same number of forwards
    on every rank, so shorter lists are padded with copies of row 0 without targets (-100): no loss, no tokens."""
    lm.eval()
    mine = np.arange(env.rank, len(rows), env.world)
    per_rank = math.ceil(len(rows) / env.world)
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
# Checkpoints: training.py's training state in DIR/checkpoints/step-N (whole or absent); then the older one goes.


def save_checkpoint(out: Path, step: int, stage: str, lm, optimizer, env: Dist):
    step_dir = out / "checkpoints" / f"step-{step}"
    try:
        save_training_state(step_dir, lm, optimizer, {"step": step, "stage": stage}, env)
    except NonFiniteState as e:
        fail(f"step {step}: not saving a checkpoint, {e} (last good checkpoint: {latest_checkpoint(out) or 'none'})")
    if env.is_main:
        for old in step_dir.parent.glob("step-*"):
            if old != step_dir:
                shutil.rmtree(old)
    env.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------------------------
# The training loop. Steps are numbered over both ProMoT stages: steps [0, promot_prompt_steps) train the soft prompt,
# the rest the model; each stage has its own optimiser and schedule.


def train_language_model(lm: LanguageModel, train_data: TrainData, cfg: CFTConfig, env: Dist, out: Path,
                         label: str = "") -> list[dict]:
    """Train (ProMoT stage 1, then the model), with checkpoints and metrics. Returns the metrics records."""
    sampler = data.GlobalBatchSampler(train_data.segments, cfg.batch_size, cfg.seed)
    steps_per_epoch = len(sampler)
    prompt_steps, model_steps = cfg.promot_prompt_steps, cfg.max_steps or cfg.epochs * steps_per_epoch
    total = prompt_steps + model_steps
    start, stage, optimizer, params, records = start_or_resume(lm, cfg, env, out, prompt_steps)
    bar = tqdm(total=total, initial=start, desc=label or "train", disable=not (env.is_main and cfg.progress),
               dynamic_ncols=True)
    order_epoch, order = None, None
    flops_per_token, tic = lm.cfg.flops_per_token(cfg.seq_len), time.perf_counter()
    for step in range(start, total):
        if step == prompt_steps and stage == "prompt":  # ProMoT stage 2: the soft prompt freezes, the model trains
            stage = "model"
            optimizer, params = make_optimizer(lm, stage, cfg, env)
        stage_step, stage_total = (step, prompt_steps) if stage == "prompt" else (step - prompt_steps, model_steps)
        epoch, in_epoch = divmod(stage_step, steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = sampler.order(), epoch
        n_targets = int(train_data.rows.loss[sampler.batch(in_epoch, order=order), 1:].sum())
        index = sampler.batch(in_epoch, env.rank, env.world, order=order)
        lr = lr_at(stage_step, cfg.promot_lr if stage == "prompt" else cfg.lr, max(1, round(cfg.warmup * stage_total)),
                   stage_total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(lm, optimizer, train_data.rows, index, max(n_targets, 1), cfg, env, params)
        if not math.isfinite(loss):
            last = latest_checkpoint(out) or "none"
            fail(f"loss is {loss} at step {step + 1}; stopping (last good checkpoint: {last})")
        tokens_per_s, tic = cfg.batch_size * cfg.seq_len / (time.perf_counter() - tic), time.perf_counter()
        record = dict(step=step + 1, stage=stage, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                      mfu=tokens_per_s * flops_per_token / (cfg.peak_tflops * 1e12 * env.world))  # MFU per device
        done = step + 1 == total
        if train_data.heldout is not None and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            record["heldout_loss"] = heldout_loss(lm, train_data.heldout, cfg, env)
        records.append(record)
        if env.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            mfu=f"{record['mfu']:.1%}", refresh=False)
            bar.update()
        stopping = cfg.stop_after is not None and step + 1 == cfg.stop_after
        if (cfg.save_every and (step + 1) % cfg.save_every == 0 and not done) or stopping:
            save_checkpoint(out, step + 1, stage, lm, optimizer, env)
        if stopping:
            break
    bar.close()
    return records


def start_or_resume(lm: LanguageModel, cfg: CFTConfig, env: Dist, out: Path, prompt_steps: int):
    """(first step, stage, optimiser, its parameters, metrics so far): step 0, or --resume's last checkpoint in its
    saved stage (at the ProMoT boundary: the prompt stage's optimiser, then the loop switches as an unbroken run)."""
    ckpt = latest_checkpoint(out) if cfg.resume else None
    try:
        progress = read_training_meta(ckpt) if ckpt else {"step": 0, "stage": "prompt" if prompt_steps else "model"}
        optimizer, params = make_optimizer(lm, progress["stage"], cfg, env)
        if ckpt is not None:
            load_training_state(ckpt, lm, optimizer, env)
    except ValueError as e:
        fail(f"--resume: {e}")
    records = [r for r in read_metrics(out) if r["step"] <= progress["step"]] if ckpt else []
    if env.is_main:
        if ckpt is not None:
            print(f"resumed from {ckpt} at step {progress['step']}")
        write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return progress["step"], progress["stage"], optimizer, params, records


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [record for _, record in data.read_jsonl(path)] if path.is_file() else []


def save_final(lm: LanguageModel, tokenizer: Tokenizer, out: Path, env: Dist, source: str | None):
    """DIR/final: a Hugging Face folder with the tokenizer's files (+ soft_prompt.safetensors for ProMoT), written into
    a staging folder and renamed when complete. Every rank takes part (FSDP gathers each tensor); rank 0 writes.
    source: the checkpoint trained from, whose generation_config.json is kept."""
    if any("lora_" in name for name, _ in lm.model.named_parameters()):
        merge_lora(lm.model)  # the HF layout has no adapters: fold them into the weights
    final = out / "final"
    staged = staging_folder(final) if env.is_main else final  # other ranks only gather; they write nothing
    save_pretrained(lm.model, staged, tokenizer=tokenizer, source=source)
    soft = None if lm.soft_prompt is None else full_tensor(lm.soft_prompt)  # gathered by every rank
    if env.is_main:
        if soft is not None:
            save_file({"soft_prompt": soft.detach().float().cpu().contiguous()}, staged / "soft_prompt.safetensors")
        commit_folder(final)
    env.barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Closed-book multiple-choice accuracy, scored as lm-evaluation-harness's acc_norm (scoring.py, reduction "chars"):
# the option whose continuation of the cloze stem has the highest log-likelihood per character wins.


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
# auto-CFT: the model writes one contextual prompt per document (greedy, batched), cached on disk. Ranks split the
# documents; generation runs a fixed number of tokens (no early stop) so that FSDP ranks stay in lockstep.


def auto_prompts(lm: LanguageModel, tokenizer: Tokenizer, texts: list[str], cfg: CFTConfig, env: Dist,
                 batch_size: int = 16, excerpt_tokens: int = 512) -> list[list[int]]:
    key = data.corpus_key(texts + [str(cfg.checkpoint), str(cfg.model), str(cfg.seed), str(cfg.auto_prompt_tokens)],
                          tokenizer.path)
    cache = Path(cfg.cache_dir) / f"auto-prompts-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    head = tokenizer.encode(AUTO_CFT_INSTRUCTION + "\n\nText:", bos=True)
    tail = tokenizer.encode("\n\nContextual prompt:")
    inputs = [head + tokenizer.encode(t)[:excerpt_tokens] + tail for t in texts]
    mine = list(range(env.rank, len(texts), env.world))
    n_batches = math.ceil(math.ceil(len(texts) / env.world) / batch_size)
    newline = {i for i in tokenizer.encode("a\nb") if "\n" in tokenizer.decode([i])}  # a prompt ends at a line end
    results = {}
    lm.eval()
    for b in tqdm(range(n_batches), desc="auto-cft prompts", disable=not (env.is_main and cfg.progress)):
        # A rank out of documents generates for document 0 and keeps nothing: FSDP needs every rank's forwards.
        part = mine[b * batch_size:(b + 1) * batch_size]
        # Autocast also under FSDP: generate's KV cache takes the dtype of the (fp32, sharded) parameters while
        # FSDP computes in bf16; autocast makes attention read both in bf16.
        with torch.autocast(env.device.type, dtype=PRECISIONS[cfg.precision], enabled=cfg.precision != "fp32"):
            out = generate(lm, [inputs[i] for i in part or [0]], cfg.auto_prompt_tokens, pad_id=tokenizer.pad_id)
        for i, ids in zip(part, out):
            cut = next((k for k, t in enumerate(ids) if t == tokenizer.eos_id or t in newline), len(ids))
            results[i] = ids[:cut]
    lm.train()
    reshard(lm)
    if env.world > 1:  # every rank gets every prompt: rows of -1 after a prompt's end, each filled on one rank only
        table = torch.full((len(texts), cfg.auto_prompt_tokens), -1, dtype=torch.long)
        for i, ids in results.items():
            table[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        table = table.to(env.device)
        dist.all_reduce(table, op=dist.ReduceOp.MAX)
        results = {i: [t for t in row if t >= 0] for i, row in enumerate(table.tolist())}
    prompts = [results[i] for i in range(len(texts))]
    if env.is_main:
        write_text(cache, json.dumps(prompts))
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# Main: resolve inputs (with clear errors), then per method: build, evaluate, train, save, evaluate.


def resolve_inputs(cfg: CFTConfig, env: Dist):
    """Check every input before any training starts: returns (texts, questions, tokenizer, model config, methods)."""
    cfg.cache_dir = cfg.cache_dir or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cft")
    cfg.precision = cfg.precision or default_precision(env.device)
    if cfg.precision == "fp16":
        fail("--precision fp16: training in fp16 needs loss scaling, which cft.py does not do; use bf16 or fp32")
    if cfg.batch_size % (env.world * cfg.micro_batch_size):
        fail(f"--batch-size {cfg.batch_size} must be a multiple of processes ({env.world}) x --micro-batch-size "
             f"({cfg.micro_batch_size})")
    if cfg.method == "auto-cft" and not (cfg.checkpoint or cfg.model):
        fail("--method auto-cft needs a model that can write prompts: pass --checkpoint (or --model)")
    if cfg.checkpoint and cfg.model:
        fail("pass either --checkpoint (pretrained) or --model (random init), not both")
    texts, questions, tokenizer = load_domain(cfg, env)
    try:
        if cfg.checkpoint:
            model_cfg = ModelConfig.from_hf(cfg.checkpoint)
        elif cfg.model:
            model_cfg = ModelConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size)
        else:
            model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **DEMO_MODEL)
        tokenizer.check_vocab(model_cfg.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if cfg.seq_len + cfg.promot_prompt_len * (cfg.promot_prompt_steps > 0) > model_cfg.max_seq_len:
        fail(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    methods = [cfg.method] if cfg.method else (["cft", "cpt"] if cfg.data is None else ["cft"])
    return texts, questions, tokenizer, model_cfg, methods


def load_domain(cfg: CFTConfig, env: Dist):
    """(texts, questions or None, tokenizer): the built-in pharmacology (its own tokenizer unless --tokenizer) or
    --data (the tokenizer rule: --tokenizer, else the checkpoint's tokenizer.model)."""
    try:
        if cfg.data is None:
            if env.is_main:  # trains and caches the demo tokenizer once; the other ranks read it
                Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
                builtin_domain(Path(cfg.cache_dir), cfg.seed)
            env.barrier()
            texts, questions, tokenizer = builtin_domain(Path(cfg.cache_dir), cfg.seed)
            return texts, questions, Tokenizer.resolve(cfg.tokenizer) if cfg.tokenizer else tokenizer
        texts, stats = data.read_corpus(cfg.data, cfg.text_field)
        if env.is_main:
            print(f"corpus {cfg.data}: {stats.summary()}")
        return texts, None, Tokenizer.resolve(cfg.tokenizer, cfg.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def prepare_out(cfg: CFTConfig, methods: list[str], env: Dist) -> list[Path]:
    out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    outs = [out / m for m in methods] if len(methods) > 1 else [out]
    if not cfg.resume and out.exists() and any(out.iterdir()):
        fail(f"--out {out} exists and is not empty; pass --resume to continue it or choose a new folder")
    if cfg.resume and latest_checkpoint(outs[0]) is None and not (outs[0] / "final").exists():
        fail(f"--resume: no checkpoint in {outs[0] / 'checkpoints'}")
    env.barrier()
    return outs


# Settings that may change between a run and its --resume: they do not change the trajectory.
RESUMABLE_CHANGES = {"resume", "stop_after", "save_every", "eval_every", "progress", "workers", "cache_dir", "out",
                     "device"}


def check_same_run(cfg: CFTConfig, out: Path):
    saved = json.loads((out / "config.json").read_text())
    for key, value in asdict(cfg).items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            fail(f"--resume: --{key.replace('_', '-')} is {value!r} but the run in {out} used {saved.get(key)!r}")


def run_method(method: str, cfg: CFTConfig, env: Dist, texts, questions, tokenizer, model_cfg, out: Path) -> dict:
    if cfg.resume and (out / "final").exists():
        fail(f"{out / 'final'} exists: this run already finished")
    n_soft = cfg.promot_prompt_len if cfg.promot_prompt_steps else 0
    lm = build_language_model(cfg, model_cfg, env, n_soft)
    if n_soft:
        init_soft_prompt(lm, tokenizer, data.CONTEXTUAL_PROMPTS["Focus on Key Concepts"])
    result = {"method": method}
    if questions is not None:
        result["before"] = mcq_accuracy(lm, tokenizer, questions, cfg, env)
    train_data = prepare_data(cfg, method, texts, tokenizer, lm, env, n_soft)
    if env.is_main:
        print(f"{method}: {len(train_data.rows)} rows of {cfg.seq_len} tokens, {int(train_data.rows.loss.sum()):,} "
              f"trained tokens, {lm.cfg.num_params() / 1e6:.1f}M parameters, {env.world} process(es) on "
              f"{env.device.type}")
    if cfg.resume:
        check_same_run(cfg, out)
    elif env.is_main:  # created only now, so that a run refused over bad input leaves no folder behind
        write_text(out / "config.json", json.dumps(asdict(cfg), indent=1))
    env.barrier()
    records = train_language_model(lm, train_data, cfg, env, out, label=method)
    result["loss"] = records[-1]["loss"] if records else float("nan")
    if cfg.stop_after is not None and records and records[-1]["step"] == cfg.stop_after:
        result["stopped"] = cfg.stop_after
        return result
    if questions is not None:
        result["after"] = mcq_accuracy(lm, tokenizer, questions, cfg, env)
    save_final(lm, tokenizer, out, env, source=cfg.checkpoint)
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
        texts, questions, tokenizer, model_cfg, methods = resolve_inputs(cfg, env)
        outs = prepare_out(cfg, methods, env)
        results = [run_method(m, cfg, env, texts, questions, tokenizer, model_cfg, o) for m, o in zip(methods, outs)]
        if env.is_main:
            report(results, questions, outs)
        finished = True
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
