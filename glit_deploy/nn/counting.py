"""Parameters and multiply-adds, counted (torch.utils.flop_counter), never from a hand formula.

Counting runs on the meta device: no memory, no arithmetic, and the attention kernel's FLOPs are
registered there (the CPU flash-attention kernel is not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from glit_deploy.nn.layers import Block
from glit_deploy.nn.model import GLiT
from glit_deploy.space import Arch, BlockGenes, SearchSpace


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass (FLOPs / 2) at `input_shape`, batch included."""
    with torch.device("meta"):
        x = torch.empty(input_shape)
    model = model.to("meta") if next(model.parameters()).device.type == "meta" else _meta_copy(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to("meta")


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


@functools.cache
def block_cost(space: SearchSpace, genes: BlockGenes) -> Cost:
    """Parameters and multiply-adds (batch 1, real token count) of one block configuration."""
    with torch.device("meta"):
        block = Block(space, genes)
    return Cost(count_params(block), count_macs(block, (1, space.num_tokens, space.embed_dim)))


@functools.cache
def _shell_cost(space: SearchSpace, num_classes: int) -> Cost:
    """Stem, final norm and head: the part of the model that every arch shares."""
    any_arch = space.with_split([space.num_heads] * space.depth)
    with torch.device("meta"):
        model = GLiT(any_arch, space, num_classes)
    total = Cost(count_params(model), count_macs(model, (1, space.in_chans, space.image_size, space.image_size)))
    blocks = [block_cost(space, b) for b in any_arch.blocks]
    return Cost(total.params - sum(b.params for b in blocks), total.macs - sum(b.macs for b in blocks))


def arch_cost(space: SearchSpace, arch: Arch, num_classes: int) -> Cost:
    """Cost of a whole model at batch 1: the shared shell plus its blocks (counted per block)."""
    shell = _shell_cost(space, num_classes)
    blocks = [block_cost(space, b) for b in arch.blocks]
    return Cost(shell.params + sum(b.params for b in blocks), shell.macs + sum(b.macs for b in blocks))


def extreme_arch(space: SearchSpace, largest: bool) -> Arch:
    """The arch with the most (or fewest) multiply-adds: blocks are independent, so per block."""
    choices = space.block_choices()
    pick = max if largest else min
    best = pick(choices, key=lambda b: (block_cost(space, b).macs, block_cost(space, b).params))
    return Arch(tuple(best for _ in range(space.depth)))


def describe_space(space: SearchSpace, num_classes: int) -> dict[str, object]:
    """Size of the space and the range of parameters and multiply-adds it spans (counted)."""
    small, large = extreme_arch(space, False), extreme_arch(space, True)
    costs = [block_cost(space, b) for b in space.block_choices()]
    shell = _shell_cost(space, num_classes)
    min_params = shell.params + space.depth * min(c.params for c in costs)
    max_params = shell.params + space.depth * max(c.params for c in costs)
    return {
        "space": space.to_dict(),
        "tokens": space.num_tokens,
        "block_configs": len(costs),
        "archs": space.size,
        "level1_splits": len(space.global_heads) ** space.depth,
        "num_classes": num_classes,
        "params": [min_params, max_params],
        "macs": [arch_cost(space, small, num_classes).macs, arch_cost(space, large, num_classes).macs],
        "smallest": small.to_dict(),
        "largest": large.to_dict(),
    }
