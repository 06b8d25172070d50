"""ProMoT (Wang et al., ICLR 2024, arXiv 2211.00635, "Two-stage LLM Fine-tuning with Less Specialization and More
Generalization"): stage 1 trains a soft prompt with the model frozen; stage 2 trains the model with that prompt frozen
and attached. The prompt belongs to the target task's format: it is used only there and removed for every held-out
evaluation (cft.py's closed-book questions are held-out), so the model itself need not specialise to the format.

Here: the soft prompt's first values (sampled vocabulary embeddings, as Lester et al. 2021 and the paper; or a
contextual prompt's tokens), the ProMoT + 1-shot variant's examples (a natural-language example between the soft
prompt and the input), and the paper's best-checkpoint selection per stage on held-out target data: the training
loop (cft.py) steps through the stages, with each stage's step count and learning rate.
"""
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from distributed import full_tensor
from training import load_training_state, save_training_state

COMMON_TOKENS = 5000  # Lester et al.: the soft prompt starts as embeddings of tokens sampled from the 5,000 commonest


# ----------------------------------------------------------------------------------------------------------------------
# The soft prompt's first values


def frequent_tokens(docs: list[np.ndarray], limit: int = COMMON_TOKENS) -> np.ndarray:
    """The `limit` token ids that occur most often in the documents (ties: the lower id), commonest first."""
    counts = np.bincount(np.concatenate(docs).astype(np.int64)) if docs else np.zeros(0, np.int64)
    seen = np.flatnonzero(counts)
    return seen[np.lexsort((seen, -counts[seen]))][:limit]


def vocab_init_ids(docs: list[np.ndarray], length: int, seed: int) -> np.ndarray:
    """`length` token ids sampled (seeded) from the commonest tokens of the target documents."""
    common = frequent_tokens(docs)
    if not len(common):
        raise ValueError("--promot-init vocab: the training documents hold no tokens")
    rng = np.random.default_rng([seed, 11])
    return rng.choice(common, size=length, replace=len(common) < length)


def set_soft_prompt(lm: nn.Module, ids) -> None:
    """The soft prompt := the input embeddings of `ids` (cycled to its length). Under FSDP both tables are sharded
    DTensors: gather the embedding rows, then shard the values like the prompt."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    ids = ids[torch.arange(len(lm.soft_prompt)) % len(ids)]
    with torch.no_grad():
        table = full_tensor(lm.model.embed_tokens.weight)
        values = table[ids.to(table.device)].float()
        if isinstance(lm.soft_prompt, DTensor):
            values = distribute_tensor(values, lm.soft_prompt.device_mesh, lm.soft_prompt.placements)
        lm.soft_prompt.copy_(values)


def init_soft_prompt(lm: nn.Module, tokenizer, text: str) -> None:
    """--promot-init cft-prompt: the embeddings of a real text's tokens (a contextual prompt), cycled."""
    set_soft_prompt(lm, tokenizer.encode(text))


# ----------------------------------------------------------------------------------------------------------------------
# ProMoT + 1-shot: a natural-language example of the target task between the soft prompt and every input (the paper
# prepends it in training; its "Prompt Tuning + 1-shot" row suggests stage 1 too, which is what happens here).


def document_shots(docs: list[np.ndarray], tokenizer, seed: int, count: int = 8,
                   max_tokens: int = 64) -> list[list[int]]:
    """Example prefixes for domain text: the opening `max_tokens` tokens of `count` training documents (seeded choice),
    each followed by a blank line."""
    rng = np.random.default_rng([seed, 13])
    chosen = rng.choice(len(docs), size=min(count, len(docs)), replace=False)
    gap = tokenizer.encode("\n\n")
    return [[int(t) for t in docs[i][:max_tokens]] + gap for i in sorted(chosen)]


def instruction_shots(pairs: list[tuple[str, str]], tokenizer, seed: int, count: int = 8) -> dict[int, list[int]]:
    """Example prefixes for instruction data: {pair index: tokens} of `count` whole (prompt, response) examples,
    each then a blank line."""
    rng = np.random.default_rng([seed, 17])
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return {int(i): tokenizer.encode(pairs[i][0] + pairs[i][1] + "\n\n") for i in sorted(chosen)}


def with_shots(prompts: list[list[int]], shots: list[list[int]]) -> list[list[int]]:
    """Every (example, prompt) pair as one prefix, example first: rows sample among them per chunk."""
    return [shot + prompt for shot in shots for prompt in prompts]


# ----------------------------------------------------------------------------------------------------------------------
# Best-checkpoint selection per stage (--promot-select). The paper checkpoints stage 1 every 1,000 of 5,000 steps and
# stage 2 every 100 of 1,000 and keeps the best of each on the target task; here the measure is the held-out target
# loss (the prompt attached: the target format), taken every `every` steps of a stage and at its end.


class _NoOptimizer:
    """An optimiser without parameters: a selection snapshot holds weights, not optimiser state."""
    param_groups: list = []
    state: dict = {}

    def load_state_dict(self, state):
        pass


class _StageParameters(nn.Module):
    """The parameters a stage trains (the same Parameter objects), so that a snapshot writes and reads only them."""

    def __init__(self, named):
        super().__init__()
        for name, p in named:
            self.register_parameter(name.replace(".", "/"), p)


def select_every(stage: str, stage_total: int, prompt_every: int, model_every: int) -> int:
    """Steps between evaluations: the flag, else the paper's cadence (a fifth of stage 1, a tenth of stage 2)."""
    every, parts = (prompt_every, 5) if stage == "prompt" else (model_every, 10)
    return every or max(1, stage_total // parts)


@dataclass
class Selection:
    out: Path
    best: dict | None = None  # {"stage", "step", "loss"}: the best state of the current stage so far
    saved: dict | None = field(default=None)  # the best named by the latest checkpoint: kept on disk for --resume

    def folder(self, record: dict) -> Path:
        return self.out / "selected" / f"{record['stage']}-step-{record['step']}"

    def consider(self, lm: nn.Module, stage: str, step: int, loss: float, env) -> bool:
        """Keep the current state if its held-out loss is the stage's best so far; whether it was."""
        if self.best is not None and self.best["stage"] == stage and not loss < self.best["loss"]:
            return False
        record = {"stage": stage, "step": step, "loss": loss}
        target = self.folder(record)
        if env.is_main and target.exists():  # a resumed run passing the same step again: the same state
            shutil.rmtree(target)
        env.barrier()
        save_training_state(target, _StageParameters(stage_parameters(lm)), _NoOptimizer(), dict(record), env)
        self.best = record
        self.prune(env)
        return True

    def restore(self, lm: nn.Module, stage: str, env) -> dict | None:
        """At a stage's end: load the stage's best state into `lm` (RNG untouched); the record, or None."""
        best = self.best if self.best is not None and self.best["stage"] == stage else None
        if best is not None:
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None)
            load_training_state(self.folder(best), _StageParameters(stage_parameters(lm)), _NoOptimizer(), env)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], env.device)
        self.best = None
        return best

    def checkpointed(self, env) -> None:
        """A checkpoint now names the current best: older snapshots can go."""
        self.saved = self.best
        self.prune(env)

    def prune(self, env) -> None:
        keep = {self.folder(r).name for r in (self.best, self.saved) if r is not None}
        if env.is_main:
            for path in (self.out / "selected").glob("*-step-*"):
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)
        env.barrier()

    def discard(self, env) -> None:
        """The run is finished: no snapshot is needed any more."""
        if env.is_main:
            shutil.rmtree(self.out / "selected", ignore_errors=True)
        env.barrier()


def stage_parameters(lm: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the current stage trains (the optimiser sets requires_grad per stage)."""
    return [(name, p) for name, p in lm.named_parameters() if p.requires_grad]
