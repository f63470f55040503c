"""torch.distributed for QAT: the same command under torchrun trains one model on N
processes (DDP: gradients averaged, BN statistics of the global batch, rank-0 I/O)."""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

from lowbit.errors import LowbitError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def barrier() -> None:
    if active():
        dist.barrier()


def process_device(device: str) -> str:
    """The device this process trains on. Under torchrun with several processes each one
    drives the GPU of its LOCAL_RANK, so ``cuda`` becomes ``cuda:<LOCAL_RANK>``; a fixed
    index would put every process on one GPU, and is refused."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not device.startswith("cuda"):
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device != "cuda":
        raise LowbitError(f"--device {device} under torchrun with {os.environ['WORLD_SIZE']} processes would put "
                          f"every process on that one GPU; pass --device cuda: each process then uses the GPU "
                          f"of its LOCAL_RANK (this one: cuda:{local})")
    return f"cuda:{local}"


def init_from_env(device: str = "cpu") -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on
    GPU; returns the device this process is to use (``process_device``)."""
    device = process_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return device


def rank_seed(seed: int) -> int:
    """A seed of this process's own for draws that should differ between processes (dropout
    masks: each process holds other samples); rank 0, and a single process, keep ``seed``."""
    return (seed + rank() * 0x9E3779B97F4A7C15) % (2**63)


def all_ranks_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every process. One process stopping alone on a
    non-finite loss would leave the others waiting in the gradient all-reduce for ever; this
    makes them all stop at the same step with the same error."""
    ok = torch.isfinite(value.detach()).all()
    if not active():
        return bool(ok)
    flag = ok.to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Per-process running sums (loss, correct, seen) summed over processes, so every rank
    logs and checkpoints the global batch's metrics, not its own shard's."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # (nccl reduces only GPU tensors)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` when several processes train it (parameters and buffers are
    broadcast from rank 0 here, so every rank starts from rank 0's calibration)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def collect_wrapper() -> None:
    """Collect the DDP wrapper a finished (or failed) training loop let go of. DDP sits in
    reference cycles, so without this it lives until some later garbage collection, which
    may come after ``destroy_process_group`` (or at interpreter exit) and abort the process."""
    if active():
        gc.collect()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum that every process uses is the sum of
    every process's gradient, so the backward pass all-reduces too (torch's own
    torch.distributed.nn.functional.all_reduce does the same but is deprecated)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes, differentiable (BN's batch statistics of the global batch)."""
    return _AllReduceSum.apply(t) if active() else t
