"""Processes and sharding: the torchrun process set-up, and FSDP2 applied to a model from outside it.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` runs as a single process without any process group.
gloo on CPU, nccl on GPU. `parallelize` composes the per-block wrappers in the order that works (torchtitan's):
activation checkpointing -> torch.compile -> fully_shard per block -> fully_shard of the root.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over processes (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str | None) -> Dist:
    """This process's place in the run; device None = cuda when available."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise SystemExit(f"error: --device {device}: expected cpu or cuda")
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


def parallelize(root: nn.Module, blocks, env: Dist, *, activation_checkpointing: bool = False,
                compile: bool = False, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Per block: activation checkpointing, then torch.compile, then (with several processes) FSDP2's fully_shard;
    finally fully_shard of the root, which then owns what is outside the blocks (embeddings, final norm, output
    projection, a soft prompt). Under FSDP2, compute runs in compute_dtype over fp32 master weights, and gradients
    are reduce-scattered in fp32. Parameter names, and so checkpoints, are unchanged by all three.
    FSDP2's default scheduling is kept: explicit prefetching (next block in forward, previous in backward, last block
    kept gathered) measured 45.0% MFU against the default's 51.0% for llama2-7b at micro-batch 2 on 2 x H200
    (BENCHMARKS.md)."""
    for block in blocks:
        if activation_checkpointing:
            # Recompute the block in backward instead of storing its activations. The instance's forward is replaced
            # (not the module wrapped) so that parameter names stay those of the checkpoint.
            block.forward = _checkpointed(block.forward)
        if compile:
            block.compile()  # fuses norms, rotary, SwiGLU and residual adds around the matmuls and attention
    if env.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        mesh = torch.distributed.device_mesh.init_device_mesh(env.device.type, (env.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint
    return lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


def reshard(root: nn.Module):
    """After a forward without backward (evaluation, generation) FSDP2 leaves parameters gathered (the root's),
    registered as plain tensors: shard every FSDP module again, to free the memory and so that an optimiser built next
    holds the sharded parameters that training updates. A no-op without FSDP."""
    for module in root.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_modules_to_forward_prefetch"):  # an FSDPModule
            module.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter (a collective: every rank calls it), or `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
