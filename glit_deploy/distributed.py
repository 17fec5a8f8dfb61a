"""torchrun/DDP plumbing: one process per device, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world_size, local_rank, dev)


def teardown(ctx: DistContext) -> None:
    # A group destroyed without a barrier sometimes aborts at exit under gloo.
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_same(ctx: DistContext, value: int) -> bool:
    """True when every rank passes the same integer (used to check that ranks agree on the arch)."""
    if not ctx.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(t[1]) == -value


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's `value` on every rank (what rank 0 decided, so that ranks never decide apart)."""
    if not ctx.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decided_on_main(ctx: DistContext, decide: Callable[[], Any]) -> Any:
    """Run `decide` on rank 0 only and share its result; a GlitError raised there is raised on every
    rank, with the same message, instead of leaving the other ranks waiting in a collective."""
    from glit_deploy.errors import GlitError

    outcome: tuple[str, Any] = ("ok", None)
    if ctx.is_main:
        try:
            outcome = ("ok", decide())
        except GlitError as exc:
            outcome = ("error", (type(exc), str(exc)))
    kind, value = broadcast_object(ctx, outcome)
    if kind == "error":
        error_type, message = value
        raise error_type(message)
    return value
