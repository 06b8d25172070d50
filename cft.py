"""Contextual fine-tuning (Choi et al., ICLR 2025, "Teaching LLMs How to Learn with Contextual Fine-Tuning").

Continued pre-training on domain text where each text x is preceded by a contextual prompt c (no loss on c):
    L = - sum_k log P(x_k | c, x_<k)
and its baselines: CPT (no prompt), NEG-CFT (prompts of the same form without learning guidance), auto-CFT (the model
writes a prompt per document), each optionally mixed with instruction data (CFT+IFT, CPT+IFT) or general text, and
ProMoT (a soft prompt trained first with the model frozen, then kept frozen while the model trains).

    python cft.py                                     # built-in fictional pharmacology: CFT beside CPT, ~1-2 min CPU
    torchrun --nproc_per_node 8 cft.py --checkpoint llama2-7b-hf/ --data medtext/ --out runs/cft-7b \
        --seq-len 4096 --batch-size 128 --micro-batch-size 1 --lr 2e-5     # the paper's setting (1 epoch)

Read top to bottom: config -> distributed set-up -> model (FSDP2) -> data -> loss -> checkpoints -> training loop ->
closed-book evaluation -> auto-CFT prompts -> main. The loop is written out: no Trainer, accelerate or Lightning.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from data import Rows, Tokenizer
from model import AttentionMask, ModelConfig, Transformer, apply_lora, create_model, generate, load_weights, merge_lora

# ----------------------------------------------------------------------------------------------------------------------
# Config. Defaults are the paper's trainer prior (1 epoch, AdamW 2e-5, wd 0.1, betas (0.9, 0.95), cosine with 5%
# warm-up, clip 1.0, global batch 128, sequence 4096); the built-in demo replaces the size-dependent ones (DEMO).

AUTO_CFT_INSTRUCTION = ("Given the following text, generate a contextual prompt that encourages a reader to focus on the "
                        "main ideas and themes presented. The contextual prompt should be concise and help the reader "
                        "engage deeply with the content.")


@dataclass
class Config:
    method: str | None = None  # cft | cpt | neg-cft | auto-cft (demo: cft and cpt side by side)
    model: str | None = None  # a model.py preset, random init (demo: DEMO_MODEL)
    checkpoint: str | None = None  # a Hugging Face Llama folder
    tokenizer: str | None = None  # sentencepiece model (default: the checkpoint's tokenizer.model)
    data: str | None = None  # JSONL/.txt file or folder; none = the built-in fictional domain
    text_field: str = "text"
    prompts: str | None = None  # your own contextual prompts: JSON list or one per line
    pack: bool = True
    instruct_data: str | None = None  # JSONL with prompt/response
    instruct_ratio: float = 0.0  # fraction of training rows that are instruction examples (0 with data: second stage)
    general_data: str | None = None  # general text mixed in (no prompt) to protect in-context learning
    general_ratio: float = 0.1
    heldout_fraction: float = 0.01
    out: str | None = None
    seq_len: int = 4096
    batch_size: int = 128  # global sequences per optimiser step
    micro_batch_size: int = 1  # sequences per forward/backward on each process
    lr: float = 2e-5
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of all steps
    epochs: int = 1
    max_steps: int | None = None
    clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    promot_prompt_steps: int = 0
    promot_prompt_len: int = 20
    promot_lr: float = 1e-3
    save_every: int = 0
    stop_after: int | None = None  # stop (with a checkpoint) at this step without changing the schedule
    resume: bool = False
    eval_every: int = 0
    seed: int = 0
    device: str | None = None
    precision: str | None = None  # bf16 (CUDA default: bf16 compute, fp32 master weights) | fp32 (CPU default)
    activation_checkpointing: bool = False
    compile: bool = False
    peak_tflops: float = 989.0  # H100 SXM dense bf16, for MFU
    cache_dir: str | None = None
    workers: int | None = None  # tokenization processes
    auto_prompt_tokens: int = 48
    progress: bool = True


# The built-in demo: a model and schedule that learn the fictional facts in about a minute on 2 CPU cores.
DEMO_MODEL = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=512)
DEMO = dict(seq_len=256, batch_size=8, micro_batch_size=4, lr=5e-3, max_steps=150, heldout_fraction=0.0)
DEMO_VOCAB = 2048


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Without --data: the built-in fictional pharmacology with demo sizes "
                                       f"{DEMO} and model {DEMO_MODEL}, CFT and CPT side by side.")
    p.add_argument("--method", choices=["cft", "cpt", "neg-cft", "auto-cft"],
                   help="contextual prompts / none / negative prompts / model-written prompts (demo: cft and cpt)")
    p.add_argument("--model", help="model.py preset for a randomly initialised model (e.g. tiny, llama2-7b)")
    p.add_argument("--checkpoint", help="Hugging Face Llama folder to start from")
    p.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: the checkpoint's)")
    p.add_argument("--data", help="domain corpus: .jsonl/.txt (gz ok) file or folder (default: built-in domain)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--prompts", help="your contextual prompts: JSON list or one per line")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack short documents into rows (no attention across documents)")
    p.add_argument("--instruct-data", help="instruction JSONL (prompt, response); loss on the response only")
    p.add_argument("--instruct-ratio", type=float, default=0.0,
                   help="fraction of rows that are instruction examples; 0 = run them as a second stage")
    p.add_argument("--general-data", help="general text mixed in without prompts (protects in-context learning)")
    p.add_argument("--general-ratio", type=float, default=0.1, help="fraction of rows from --general-data")
    p.add_argument("--heldout-fraction", type=float, help="documents held out for the held-out loss (0.01)")
    p.add_argument("--out", help="output folder (refused if it exists, unless --resume)")
    p.add_argument("--seq-len", type=int, help="tokens per row, prompt included (4096)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences (128)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward per process (1)")
    p.add_argument("--lr", type=float, help="peak learning rate (2e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of all steps")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimiser steps (default: epochs over the data)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--promot-prompt-steps", type=int, default=0,
                   help="ProMoT: first train a soft prompt this many steps with the model frozen")
    p.add_argument("--promot-prompt-len", type=int, default=20)
    p.add_argument("--promot-lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=0,
                   help="training-state checkpoint every N steps (0: none; the final model is always saved)")
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint after this step (schedule unchanged)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="bf16 compute, fp32 master weights (CUDA default)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak for MFU (H100 bf16: 989)")
    p.add_argument("--cache-dir", help="tokenization / tokenizer / auto-prompt cache (~/.cache/cft)")
    p.add_argument("--workers", type=int, help="tokenization processes (default: all cores)")
    p.add_argument("--auto-prompt-tokens", type=int, default=48, help="auto-CFT: max tokens per generated prompt")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = vars(p.parse_args(argv))
    demo = args["data"] is None
    for key, default in dict(seq_len=4096, batch_size=128, micro_batch_size=1, lr=2e-5, heldout_fraction=0.01).items():
        if args[key] is None:
            args[key] = DEMO.get(key, default) if demo else default
    if demo and args["max_steps"] is None and args["epochs"] == 1:
        args["max_steps"] = DEMO["max_steps"]
    return Config(**args)


def fail(message: str):
    """Bad input: one clear line, non-zero exit (on every rank, so torchrun stops too)."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs as a single process without any
# process group. gloo on CPU, nccl on GPU.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str | None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        fail(f"--device {device}: expected cpu or cuda")
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown_distributed(env: Dist, finished: bool):
    """Leave the process group; after a finished run on gloo (CPU), leave the process too.

    Why the exit: on torch 2.13 a gloo worker thread can still hold a completed collective (a barrier keeps the
    all-gathers it waited for) whose tensors have Python objects, and FSDP2/DTensor caches keep the group alive past
    destroy_process_group, so the thread may drop them while the interpreter is finalising; dropping needs the GIL,
    which is gone, and the process aborts ("terminate called without an active exception"; seen in ~1 of 15 two-
    process CPU runs on a loaded 2-core machine, core dump: ~AsyncBarrierWork -> decref_pyobject -> take_gil). Every
    file is closed and every result written by now, so skipping that teardown loses nothing."""
    if env.world == 1 or not dist.is_initialized():
        return
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if finished and gloo:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


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
        self.head_loss = torch.compile(head_loss) if compile_loss else head_loss

    def forward(self, tokens, *, soft=None, mask=None, targets=None, **kwargs):
        """Logits (B, T, vocab), or with targets the summed next-token loss. soft (B, T) bool marks runs of
        soft_prompt_len slots that take the soft prompt's vectors (ProMoT)."""
        if soft is None:
            h = self.model.hidden_states(tokens, mask=mask, **kwargs)
        else:
            embeds = self.model.embed_tokens(tokens)
            vectors = self.soft_prompt.to(embeds.dtype).repeat(int(soft.sum()) // len(self.soft_prompt), 1)
            h = self.model.hidden_states(embeds=embeds.masked_scatter(soft[..., None], vectors), mask=mask, **kwargs)
        head = self.model.embed_tokens if self.model.lm_head is None else self.model.lm_head  # tied or not
        if targets is None:
            return F.linear(h, head.weight)
        return self.head_loss(h, head.weight, targets)


def head_loss(h, weight, targets):
    """Summed cross-entropy of the next-token targets (-100 = no loss), computed in fp32."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def init_soft_prompt(lm: LanguageModel, tokenizer: Tokenizer, text: str):
    """ProMoT/prompt-tuning init: the embeddings of a real text's tokens (cycled), which trains more stably than noise.
    Under FSDP both tables are sharded DTensors: gather the embedding rows, then shard the values like the prompt."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    ids = torch.tensor(tokenizer.encode(text))
    ids = ids[torch.arange(len(lm.soft_prompt)) % len(ids)]
    table = lm.model.embed_tokens.weight
    with torch.no_grad():
        values = (table.full_tensor() if isinstance(table, DTensor) else table)[ids.to(table.device)].float()
        if isinstance(lm.soft_prompt, DTensor):
            values = distribute_tensor(values, lm.soft_prompt.device_mesh, lm.soft_prompt.placements)
        lm.soft_prompt.copy_(values)


def build_model(cfg: Config, model_cfg: ModelConfig, env: Dist, soft_prompt_len: int) -> LanguageModel:
    """Build -> (LoRA) -> shard -> load. With FSDP the model is built on the meta device and sharded before any memory
    is used; each rank then streams only its own rows of every checkpoint tensor (or initialises its shards)."""
    lora = cfg.lora_rank > 0
    fsdp = env.world > 1
    if fsdp and not lora and (cfg.checkpoint or env.device.type == "cuda"):
        with torch.device("meta"):
            lm = LanguageModel(Transformer(model_cfg), soft_prompt_len, cfg.compile)
        shard(lm, cfg, env)
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
            for p in transformer.parameters():
                p.requires_grad_(False)
            apply_lora(transformer, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        lm = LanguageModel(transformer, soft_prompt_len, cfg.compile).to(build_device)
        if fsdp:
            shard(lm, cfg, env)
    if soft_prompt_len:
        with torch.no_grad():
            lm.soft_prompt.zero_()  # real values set by init_soft_prompt
    for block in lm.model.layers:
        if cfg.activation_checkpointing:
            # Recompute the block in backward instead of storing its activations. Patch the instance's forward
            # (instead of wrapping the module) so that parameter names, and so checkpoints, stay unchanged.
            block.forward = _checkpointed(block.forward)
        if cfg.compile:
            block.compile()  # fuses norms, rotary, SwiGLU and residual adds around the matmuls and attention
    return lm


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint
    return lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shard(lm: LanguageModel, cfg: Config, env: Dist):
    """FSDP2: each block, then the root. bf16 compute with fp32 master weights and fp32 gradient reduce-scatter."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    compute = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    mesh = torch.distributed.device_mesh.init_device_mesh(env.device.type, (env.world,))
    for block in lm.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(lm, mesh=mesh, mp_policy=mp)


def autocast(cfg: Config, env: Dist):
    """Single-process bf16: fp32 weights, bf16 matmuls (under FSDP the MixedPrecisionPolicy does the cast)."""
    if cfg.precision == "bf16" and env.world == 1:
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reshard(lm: LanguageModel):
    """After a forward without backward (evaluation, generation) FSDP2 leaves the root's parameters gathered, and
    registered as plain tensors: shard them again, to free the memory and so that an optimiser built next holds the
    sharded parameters that training updates."""
    if hasattr(lm, "reshard"):
        lm.reshard()


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
        texts = data.NEGATIVE_PROMPTS
    else:
        texts = data.load_prompts(prompts_file) if prompts_file else list(data.CONTEXTUAL_PROMPTS.values())
    return [tokenizer.encode(t) for t in texts]


def tokenize(texts, tokenizer, cfg: Config, env: Dist):
    """Token ids of texts; on a single rank first so the cache is filled once and the other ranks read it."""
    if env.main:
        tokens = data.tokenize_texts(texts, tokenizer.path, cfg.cache_dir, cfg.workers, cfg.progress)
    env.barrier()
    if not env.main:
        tokens = data.tokenize_texts(texts, tokenizer.path, cfg.cache_dir, cfg.workers, progress=False)
    return tokens


def prepare_data(cfg: Config, method: str, texts: list[str], tokenizer: Tokenizer, lm: LanguageModel | None,
                 env: Dist, n_soft: int) -> TrainData:
    docs = tokenize(texts, tokenizer, cfg, env)
    # Held-out documents: a seeded choice, never trained on; their loss is measured with the method's own prompts.
    n_heldout = int(len(docs) * cfg.heldout_fraction)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(docs))
    heldout_ids, train_ids = order[:n_heldout], np.sort(order[n_heldout:])
    prompts = method_prompts("cft" if method == "auto-cft" else method, tokenizer, cfg.prompts)
    doc_prompts = None
    if method == "auto-cft":
        doc_prompts = auto_prompts(lm, tokenizer, texts, cfg, env)
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
        general, stats = data.read_corpus(cfg.general_data, cfg.text_field)
        general_rows = data.domain_rows(tokenize(general, tokenizer, cfg, env), [[]], seed=cfg.seed + 2, **common)
        rows = data.mix_rows(rows, general_rows, cfg.general_ratio, cfg.seed)
    segments = [len(rows)]
    if cfg.instruct_data:
        pairs = data.read_instructions(cfg.instruct_data)
        examples = [data.instruction_example(tokenizer.encode(p), tokenizer.encode(r), tokenizer.bos_id,
                                             tokenizer.eos_id, n_soft) for p, r in pairs]
        fits = [e for e in examples if len(e.tokens) <= cfg.seq_len + 1]
        if len(fits) < len(examples) and env.main:
            print(f"warning: {cfg.instruct_data}: skipped {len(examples) - len(fits)} instruction examples longer "
                  f"than --seq-len {cfg.seq_len}", file=sys.stderr)
        if not fits:
            fail(f"{cfg.instruct_data}: no instruction example fits --seq-len {cfg.seq_len}")
        instruct = data.make_rows(fits, cfg.seq_len + 1, tokenizer.pad_id, cfg.pack)
        if cfg.instruct_ratio > 0:
            rows = data.mix_rows(rows, instruct, cfg.instruct_ratio, cfg.seed + 3)
            segments = [len(rows)]
        else:  # second stage: all instruction rows after the domain rows
            rows = Rows.concat([rows, instruct])
            segments = [segments[0], len(instruct)]
    return TrainData(rows, segments, heldout)


# ----------------------------------------------------------------------------------------------------------------------
# Loss. A global batch is split over ranks and micro-batches; every micro-batch's summed token loss is divided by the
# number of target tokens in the *global* batch, so the accumulated gradient is exactly that of the token-weighted
# mean over the global batch, however it is split.


def loss_sum(lm: LanguageModel, batch: dict) -> torch.Tensor:
    mask = AttentionMask(doc_ids=batch["doc_ids"]) if batch["doc_ids"] is not None else None
    return lm(batch["tokens"], soft=batch["soft"], mask=mask, targets=batch["targets"])


def train_step(lm, optimizer, rows: Rows, index: np.ndarray, n_targets: int, cfg: Config, env: Dist,
               params: list) -> tuple[float, float]:
    """One optimiser step on this rank's rows `index` of a global batch with n_targets target tokens in total.
    Returns (global mean loss, gradient norm before clipping)."""
    micro = [index[i:i + cfg.micro_batch_size] for i in range(0, len(index), cfg.micro_batch_size)]
    local_sum = torch.zeros((), device=env.device)
    for i, part in enumerate(micro):
        if env.world > 1:  # FSDP2: reduce-scatter gradients only after the last micro-batch
            lm.set_requires_gradient_sync(i == len(micro) - 1)
        with autocast(cfg, env):
            loss = loss_sum(lm, data.to_batch(rows, part, env.device))
        # FSDP averages gradients over ranks; scaling by world size turns that average into the global sum.
        (loss * (env.world / n_targets)).backward()
        local_sum += loss.detach()  # no .item() here: a host sync per micro-batch would stall the GPU queue
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return env.sum([local_sum.item()])[0] / n_targets, float(grad_norm)


@torch.no_grad()
def heldout_loss(lm, rows: Rows, cfg: Config, env: Dist) -> float:
    lm.eval()
    mine = np.arange(env.rank, len(rows), env.world)
    # Every rank runs the same number of forwards (FSDP all-gathers in lockstep); extra ones are empty.
    n_batches = math.ceil(math.ceil(len(rows) / env.world) / cfg.micro_batch_size)
    total, count = 0.0, 0
    for b in range(n_batches):
        part = mine[b * cfg.micro_batch_size:(b + 1) * cfg.micro_batch_size]
        if len(part) == 0:
            part = mine[:1] if len(mine) else np.arange(1)
            weight = 0.0
        else:
            weight = 1.0
        batch = data.to_batch(rows, part, env.device)
        with autocast(cfg, env):
            total += weight * loss_sum(lm, batch).item()
        count += weight * int((batch["targets"] != -100).sum())
    lm.train()
    reshard(lm)
    total, count = env.sum([total, count])
    return total / max(count, 1)


def lr_at(step: int, peak: float, warmup: int, total: int, final_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to final_fraction * peak (1: constant after warm-up).
    The one schedule of the project: cft.py, synthetic.py and context_tuning.py all use it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(lm: LanguageModel, stage: str, cfg: Config, env: Dist):
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
    lr = cfg.promot_lr if stage == "prompt" else cfg.lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = env.device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), fused=fused), decay + no_decay


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (each rank writes its own shards) into DIR/checkpoints/.step-N.tmp, then a
# rename to step-N: a crash during a save leaves the previous checkpoint intact. Only then is the older one removed.


def checkpoint_state(lm, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(lm), "optim": get_optimizer_state_dict(lm, optimizer)}


def save_checkpoint(out: Path, step: int, stage: str, lm, optimizer, env: Dist):
    import torch.distributed.checkpoint as dcp
    ckpt_dir = out / "checkpoints"
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f".step-{step}.tmp"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from a crash, never a finished checkpoint
        tmp.mkdir(parents=True)
    env.barrier()
    with _quiet_dcp():
        dcp.save(checkpoint_state(lm, optimizer), checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(env.device)
    torch.save(rng, tmp / f"rng-rank{env.rank}.pt")
    env.barrier()
    if env.main:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "stage": stage}))
        os.replace(tmp, final)
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    env.barrier()


@contextlib.contextmanager
def _quiet_dcp():
    """Without a process group DCP runs as one process (our intent) but warns about it on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def load_checkpoint(path: Path, lm, optimizer, env: Dist):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = checkpoint_state(lm, optimizer)
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(lm, state["model"])
    set_optimizer_state_dict(lm, optimizer, state["optim"])
    rng_file = path / f"rng-rank{env.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], env.device)


# ----------------------------------------------------------------------------------------------------------------------
# The training loop.


def train(lm: LanguageModel, train_data: TrainData, cfg: Config, env: Dist, out: Path, label: str = "") -> list[dict]:
    """Train (ProMoT stage 1, then the model), with checkpoints and metrics. Returns the metrics records."""
    from tqdm import tqdm
    sampler = data.GlobalBatchSampler(train_data.segments, cfg.batch_size, cfg.seed)
    steps_per_epoch = len(sampler)
    model_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    prompt_steps = cfg.promot_prompt_steps
    total = prompt_steps + model_steps
    start, records = 0, []
    stage = "prompt" if prompt_steps else "model"
    optimizer, params = make_optimizer(lm, stage, cfg, env)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        progress = json.loads((ckpt / "progress.json").read_text())
        start, stage = progress["step"], progress["stage"]
        if stage != ("prompt" if start < prompt_steps else "model"):
            stage = "prompt" if start < prompt_steps else "model"
        optimizer, params = make_optimizer(lm, stage, cfg, env)
        load_checkpoint(ckpt, lm, optimizer, env)
        records = [r for r in read_metrics(out) if r["step"] <= start]
        if env.main:
            print(f"resumed from {ckpt} at step {start}")
    if env.main:
        data.atomic_write(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)
                                                                   .encode()))
    flops = lm.cfg.flops_per_token(cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=total, initial=start, desc=label or "train", disable=not (env.main and cfg.progress),
               dynamic_ncols=True)
    order_epoch, order = None, None
    tic = time.perf_counter()
    for step in range(start, total):
        if step == prompt_steps and stage == "prompt":  # ProMoT stage 2: the soft prompt freezes, the model trains
            stage = "model"
            optimizer, params = make_optimizer(lm, stage, cfg, env)
        stage_step, stage_total = (step, prompt_steps) if stage == "prompt" else (step - prompt_steps, model_steps)
        epoch, in_epoch = divmod(stage_step, steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = sampler.order(), epoch
        global_index = sampler.batch(in_epoch, order=order)
        n_targets = int(train_data.rows.loss[global_index, 1:].sum())
        index = sampler.batch(in_epoch, env.rank, env.world, order=order)
        lr = lr_at(stage_step, cfg.promot_lr if stage == "prompt" else cfg.lr, max(1, round(cfg.warmup * stage_total)),
                   stage_total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(lm, optimizer, train_data.rows, index, max(n_targets, 1), cfg, env, params)
        if not math.isfinite(loss):
            last = latest_checkpoint(out)
            fail(f"loss is {loss} at step {step + 1}; stopping (last good checkpoint: {last or 'none'})")
        elapsed = time.perf_counter() - tic
        tic = time.perf_counter()
        tokens_per_s = tokens_per_step / elapsed
        mfu = tokens_per_s * flops / (cfg.peak_tflops * 1e12 * env.world)
        record = {"step": step + 1, "stage": stage, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "mfu": mfu}
        done = step + 1 == total
        if train_data.heldout is not None and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            record["heldout_loss"] = heldout_loss(lm, train_data.heldout, cfg, env)
        records.append(record)
        if env.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}",
                            refresh=False)
            bar.update()
        stopping = cfg.stop_after is not None and step + 1 == cfg.stop_after
        if (cfg.save_every and (step + 1) % cfg.save_every == 0 and not done) or stopping:
            save_checkpoint(out, step + 1, stage, lm, optimizer, env)
        if stopping:
            break
    bar.close()
    return records


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def has_lora(lm: LanguageModel) -> bool:
    return any("lora_" in name for name, _ in lm.model.named_parameters())


def save_final(lm: LanguageModel, tokenizer: Tokenizer, out: Path, env: Dist):
    """DIR/final: a Hugging Face folder (+ tokenizer.model, + soft_prompt.safetensors for ProMoT)."""
    from model import save_pretrained
    from safetensors.torch import save_file
    if has_lora(lm):
        merge_lora(lm.model)  # the HF layout has no adapters: fold them into the weights
    save_pretrained(lm.model, out / "final")
    if lm.soft_prompt is not None:
        soft = lm.soft_prompt
        soft = soft.full_tensor() if hasattr(soft, "full_tensor") else soft
        if env.main:
            save_file({"soft_prompt": soft.detach().float().cpu().contiguous()}, out / "final" / "soft_prompt.safetensors")
    if env.main:
        shutil.copy(tokenizer.path, out / "final" / "tokenizer.model")
    env.barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Closed-book multiple-choice accuracy, scored as lm-evaluation-harness's acc_norm: the option whose continuation of
# the cloze stem has the highest log-likelihood per character wins. Every rank scores everything (FSDP lockstep).


@torch.no_grad()
def mcq_accuracy(lm, tokenizer: Tokenizer, questions: list[dict], cfg: Config, env: Dist, batch_size: int = 64) -> float:
    lm.eval()
    items = []  # (question index, tokens, number of continuation tokens, continuation characters)
    for qi, q in enumerate(questions):
        stem = tokenizer.encode(q["stem"], bos=True)
        for choice in q["choices"]:
            full = tokenizer.encode(q["stem"] + choice, bos=True)
            cont = full[len(stem):] if full[:len(stem)] == stem else tokenizer.encode(choice)
            items.append((qi, stem + cont, len(cont), len(choice)))
    scores = []
    for b in range(0, len(items), batch_size):
        part = items[b:b + batch_size]
        width = max(len(t) for _, t, _, _ in part)
        tokens = torch.full((len(part), width), tokenizer.pad_id, dtype=torch.long)
        for i, (_, t, _, _) in enumerate(part):
            tokens[i, :len(t)] = torch.tensor(t)
        tokens = tokens.to(env.device)
        with autocast(cfg, env):
            logp = F.log_softmax(lm(tokens[:, :-1]).float(), -1)
        token_logp = logp.gather(-1, tokens[:, 1:, None])[..., 0]
        for i, (_, t, n_cont, n_chars) in enumerate(part):
            scores.append(token_logp[i, len(t) - 1 - n_cont:len(t) - 1].sum().item() / n_chars)
    lm.train()
    reshard(lm)
    correct = 0
    for qi, q in enumerate(questions):
        mine = scores[qi * len(q["choices"]):(qi + 1) * len(q["choices"])]
        correct += int(np.argmax(mine) == q["answer"])
    return correct / len(questions)


# ----------------------------------------------------------------------------------------------------------------------
# auto-CFT: the model writes one contextual prompt per document (greedy, batched), cached on disk. Ranks split the
# documents; generation runs a fixed number of tokens (no early stop) so that FSDP ranks stay in lockstep.


def auto_prompts(lm: LanguageModel, tokenizer: Tokenizer, texts: list[str], cfg: Config, env: Dist,
                 batch_size: int = 16, excerpt_tokens: int = 512) -> list[list[int]]:
    cache = None
    if cfg.cache_dir:
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
    from tqdm import tqdm
    lm.eval()
    for b in tqdm(range(n_batches), desc="auto-cft prompts", disable=not (env.main and cfg.progress)):
        part = mine[b * batch_size:(b + 1) * batch_size] or mine[:1] or [0]
        # Autocast also under FSDP: generate's KV cache takes the dtype of the (fp32, sharded) parameters while
        # FSDP computes in bf16; autocast makes attention read both in bf16.
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = generate(lm, [inputs[i] for i in part], cfg.auto_prompt_tokens, pad_id=tokenizer.pad_id)
        for i, ids in zip(part, out):
            cut = next((k for k, t in enumerate(ids) if t == tokenizer.eos_id or t in newline), len(ids))
            results[i] = ids[:cut]
    lm.train()
    reshard(lm)
    if env.world > 1:  # every rank gets every prompt: a (documents, tokens) table, -1 where a prompt has ended
        table = torch.full((len(texts), cfg.auto_prompt_tokens), -1, dtype=torch.long)
        for i, ids in results.items():
            table[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        table = table.to(env.device)
        dist.all_reduce(table, op=dist.ReduceOp.MAX)  # each row is filled on exactly one rank
        results = {i: [t for t in row if t >= 0] for i, row in enumerate(table.tolist())}
    prompts = [results[i] for i in range(len(texts))]
    if cache is not None and env.main:
        data.atomic_write(cache, lambda f: f.write(json.dumps(prompts).encode()))
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# Main: resolve inputs (with clear errors), then per method: build, evaluate, train, save, evaluate.


def builtin_domain(cache_dir: Path, seed: int):
    """The fictional pharmacology: documents, questions, and a tokenizer trained on the texts the model will read
    (documents with and without prompts), cached by content."""
    world = data.make_world(seed)
    texts = data.world_documents(world, seed)
    questions = data.world_questions(world, seed)
    prompts = list(data.CONTEXTUAL_PROMPTS.values()) + data.NEGATIVE_PROMPTS
    rng = np.random.default_rng(seed)
    corpus = texts + [prompts[rng.integers(len(prompts))] + " " + t for t in texts]
    key = data.corpus_key(corpus + [str(DEMO_VOCAB)], __file__)
    path = cache_dir / f"tokenizer-{key[:12]}.model"
    if not path.is_file():
        data.train_tokenizer(corpus, path, DEMO_VOCAB)
    return texts, questions, Tokenizer(path)


def resolve(cfg: Config, env: Dist):
    """Check every input before any training starts: returns (texts, questions, tokenizer, model config, methods)."""
    cfg.cache_dir = cfg.cache_dir or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cft")
    cfg.precision = cfg.precision or ("bf16" if env.device.type == "cuda" else "fp32")
    if cfg.batch_size % (env.world * cfg.micro_batch_size):
        fail(f"--batch-size {cfg.batch_size} must be a multiple of processes ({env.world}) x --micro-batch-size "
             f"({cfg.micro_batch_size})")
    if cfg.method == "auto-cft" and not (cfg.checkpoint or cfg.model):
        fail("--method auto-cft needs a model that can write prompts: pass --checkpoint (or --model)")
    if cfg.checkpoint and cfg.model:
        fail("pass either --checkpoint (pretrained) or --model (random init), not both")
    questions = None
    if cfg.data is None:
        if env.main:
            Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
            builtin_domain(Path(cfg.cache_dir), cfg.seed)
        env.barrier()
        texts, questions, tokenizer = builtin_domain(Path(cfg.cache_dir), cfg.seed)
        if cfg.tokenizer:
            tokenizer = Tokenizer(cfg.tokenizer)
    else:
        try:
            texts, stats = data.read_corpus(cfg.data, cfg.text_field)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        if env.main:
            print(f"corpus {cfg.data}: {stats.summary()}")
        tokenizer_path = cfg.tokenizer or (Path(cfg.checkpoint) / "tokenizer.model" if cfg.checkpoint else None)
        if tokenizer_path is None:
            fail("--tokenizer is required with --data and no --checkpoint")
        try:
            tokenizer = Tokenizer(tokenizer_path)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
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


def prepare_out(cfg: Config, methods: list[str], env: Dist) -> list[Path]:
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


def check_same_run(cfg: Config, out: Path):
    saved = json.loads((out / "config.json").read_text())
    for key, value in asdict(cfg).items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            fail(f"--resume: --{key.replace('_', '-')} is {value!r} but the run in {out} used {saved.get(key)!r}")


def run_method(method: str, cfg: Config, env: Dist, texts, questions, tokenizer, model_cfg, out: Path) -> dict:
    if cfg.resume and (out / "final").exists():
        fail(f"{out / 'final'} exists: this run already finished")
    n_soft = cfg.promot_prompt_len if cfg.promot_prompt_steps else 0
    lm = build_model(cfg, model_cfg, env, n_soft)
    if n_soft:
        init_soft_prompt(lm, tokenizer, data.CONTEXTUAL_PROMPTS["Focus on Key Concepts"])
    result = {"method": method}
    if questions is not None:
        result["before"] = mcq_accuracy(lm, tokenizer, questions, cfg, env)
    train_data = prepare_data(cfg, method, texts, tokenizer, lm, env, n_soft)
    if env.main:
        n_tokens = int(train_data.rows.loss.sum())
        print(f"{method}: {len(train_data.rows)} rows of {cfg.seq_len} tokens, {n_tokens:,} trained tokens, "
              f"{lm.cfg.num_params() / 1e6:.1f}M parameters, {env.world} process(es) on {env.device.type}")
    if cfg.resume:
        check_same_run(cfg, out)
    elif env.main:  # created only now, so that a run refused over bad input leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    env.barrier()
    records = train(lm, train_data, cfg, env, out, label=method)
    result["loss"] = records[-1]["loss"] if records else float("nan")
    if cfg.stop_after is not None and records and records[-1]["step"] == cfg.stop_after:
        result["stopped"] = cfg.stop_after
        return result
    if questions is not None:
        result["after"] = mcq_accuracy(lm, tokenizer, questions, cfg, env)
    save_final(lm, tokenizer, out, env)
    return result


def main(argv=None):
    cfg = parse_args(argv)
    env = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    if cfg.data is None and env.device.type == "cpu":
        # The demo model is so small that a second thread barely helps, and on a busy machine threads that wait for
        # each other cost several times the work itself.
        torch.set_num_threads(1)
    finished = False
    try:
        torch.manual_seed(cfg.seed)
        texts, questions, tokenizer, model_cfg, methods = resolve(cfg, env)
        outs = prepare_out(cfg, methods, env)
        results = [run_method(m, cfg, env, texts, questions, tokenizer, model_cfg, o) for m, o in zip(methods, outs)]
        if env.main:
            report(results, questions, outs)
        finished = True
    finally:
        torch.set_num_threads(threads)
        shutdown_distributed(env, finished)


def report(results: list[dict], questions, outs):
    if questions is not None:
        chance = 1 / len(questions[0]["choices"])
        print(f"\nclosed-book accuracy on {len(questions)} fictional-fact questions (chance {chance:.0%}):")
        print(f"{'method':<10}{'before':>8}{'after':>8}{'final loss':>12}")
        for r in results:
            if "after" in r:
                print(f"{r['method']:<10}{r['before']:>8.1%}{r['after']:>8.1%}{r['loss']:>12.4f}")
    for r, o in zip(results, outs):
        print(f"{r['method']}: {'stopped at step ' + str(r['stopped']) if 'stopped' in r else 'model in ' + str(o / 'final')}"
              f" (metrics: {o / 'metrics.jsonl'})")


if __name__ == "__main__":
    main()
