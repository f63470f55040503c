"""torch.distributed for QAT: the same command under torchrun trains one model on N
processes (DDP: gradients averaged, BN statistics of the global batch, rank-0 I/O)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def barrier() -> None:
    if active():
        dist.barrier()


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on
    GPU; returns whether this process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return active()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return active()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` when several processes train it (parameters and buffers are
    broadcast from rank 0 here, so every rank starts from rank 0's calibration)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


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
