"""The weight-sharing GLiT supernet (weight entanglement, as in AutoFormer and Once-for-All).

Every layer stores its largest tensor and a subnet uses slices of it:
- channel c of a block's input meets the same weights whatever the split: global channels are
  the prefix [0, dim*G/H), local channels the suffix [dim*G/H, dim);
- attention heads keep their identity: head h of q, k and v uses rows [h][0:width] of its section;
- expansion widths (e_v, e_c, mlp_ratio) are prefixes of the largest hidden width;
- a smaller depthwise kernel is the centre crop of the largest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from glit_deploy.nn.layers import LN_EPS, global_attention, init_vit_weights, locality
from glit_deploy.nn.model import GLiT, Stem
from glit_deploy.space import Arch, BlockGenes, SearchSpace


class SuperBlock(nn.Module):
    def __init__(self, space: SearchSpace, drop_path: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.space = space
        dim, heads = space.embed_dim, space.num_heads
        self.max_width = int(max(space.e_v) * space.head_dim)
        self.max_inner = max(space.e_c) * dim
        self.max_hidden = max(space.mlp_ratios) * dim
        self.max_kernel = max(space.kernel_sizes)

        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.qkv_w = nn.Parameter(torch.empty(3 * heads * self.max_width, dim))
        self.qkv_b = nn.Parameter(torch.zeros(3 * heads * self.max_width)) if qkv_bias else None
        self.proj_w = nn.Parameter(torch.empty(dim, heads * self.max_width))
        self.proj_b = nn.Parameter(torch.zeros(dim))
        self.pw1_w = nn.Parameter(torch.empty(2 * self.max_inner, dim))
        self.pw1_b = nn.Parameter(torch.zeros(2 * self.max_inner))
        self.dw_w = nn.Parameter(torch.empty(self.max_inner, 1, self.max_kernel))
        self.dw_b = nn.Parameter(torch.zeros(self.max_inner))
        self.bn = nn.BatchNorm1d(self.max_inner)
        self.pw2_w = nn.Parameter(torch.empty(dim, self.max_inner))
        self.pw2_b = nn.Parameter(torch.zeros(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1_w = nn.Parameter(torch.empty(self.max_hidden, dim))
        self.fc1_b = nn.Parameter(torch.zeros(self.max_hidden))
        self.fc2_w = nn.Parameter(torch.empty(dim, self.max_hidden))
        self.fc2_b = nn.Parameter(torch.zeros(dim))
        for w in (self.qkv_w, self.proj_w, self.pw1_w, self.pw2_w, self.fc1_w, self.fc2_w):
            trunc_normal_(w, std=0.02)
        # nn.Conv1d's default initialisation, for the largest depthwise kernel.
        nn.init.kaiming_uniform_(self.dw_w, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.max_kernel)
        nn.init.uniform_(self.dw_b, -bound, bound)

    def sliced(self, genes: BlockGenes) -> dict[str, Tensor]:
        """The weights of one block configuration, named as in the standalone `Block`."""
        space = self.space
        dim, heads = space.embed_dim, space.num_heads
        g = genes.global_heads
        gdim = space.global_dim(g)
        hidden = genes.mlp_ratio * dim
        p: dict[str, Tensor] = {
            "norm1.weight": self.norm1.weight, "norm1.bias": self.norm1.bias,
            "norm2.weight": self.norm2.weight, "norm2.bias": self.norm2.bias,
            "mlp.fc1.weight": self.fc1_w[:hidden], "mlp.fc1.bias": self.fc1_b[:hidden],
            "mlp.fc2.weight": self.fc2_w[:, :hidden], "mlp.fc2.bias": self.fc2_b,
        }
        if g > 0:
            width = int(genes.e_v * space.head_dim)
            qkv_w = self.qkv_w.view(3, heads, self.max_width, dim)[:, :g, :width, :gdim]
            p["mixer.attn.qkv.weight"] = qkv_w.reshape(3 * g * width, gdim)
            if self.qkv_b is not None:
                p["mixer.attn.qkv.bias"] = self.qkv_b.view(3, heads, self.max_width)[:, :g, :width].reshape(-1)
            proj_w = self.proj_w.view(dim, heads, self.max_width)[:gdim, :g, :width]
            p["mixer.attn.proj.weight"] = proj_w.reshape(gdim, g * width)
            p["mixer.attn.proj.bias"] = self.proj_b[:gdim]
        if g < heads:
            ldim = dim - gdim
            inner = genes.e_c * ldim
            crop = (self.max_kernel - genes.kernel) // 2
            p["mixer.local.pw1.weight"] = self.pw1_w.view(2, self.max_inner, dim)[:, :inner, gdim:].reshape(
                2 * inner, ldim)
            p["mixer.local.pw1.bias"] = self.pw1_b.view(2, self.max_inner)[:, :inner].reshape(-1)
            p["mixer.local.dw.weight"] = self.dw_w[:inner, :, crop: crop + genes.kernel]
            p["mixer.local.dw.bias"] = self.dw_b[:inner]
            p["mixer.local.bn.weight"] = self.bn.weight[:inner]
            p["mixer.local.bn.bias"] = self.bn.bias[:inner]
            p["mixer.local.bn.running_mean"] = self.bn.running_mean[:inner]
            p["mixer.local.bn.running_var"] = self.bn.running_var[:inner]
            p["mixer.local.bn.num_batches_tracked"] = self.bn.num_batches_tracked
            p["mixer.local.pw2.weight"] = self.pw2_w[gdim:, :inner]
            p["mixer.local.pw2.bias"] = self.pw2_b[gdim:]
        return p

    def _batch_norm(self, x: Tensor) -> Tensor:
        """BatchNorm over the active prefix of channels, updating the sliced running statistics."""
        bn, channels = self.bn, x.shape[1]
        factor = 0.0
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return F.batch_norm(x, bn.running_mean[:channels], bn.running_var[:channels], bn.weight[:channels],
                            bn.bias[:channels], self.training, factor, bn.eps)

    def forward(self, x: Tensor, genes: BlockGenes) -> Tensor:
        p = self.sliced(genes)
        g = genes.global_heads
        gdim = self.space.global_dim(g)
        h = self.norm1(x)
        parts = []
        if g > 0:
            parts.append(global_attention(h[..., :gdim] if g < self.space.num_heads else h,
                                          p["mixer.attn.qkv.weight"], p.get("mixer.attn.qkv.bias"),
                                          p["mixer.attn.proj.weight"], p["mixer.attn.proj.bias"], g))
        if g < self.space.num_heads:
            parts.append(locality(h[..., gdim:] if g > 0 else h,
                                  p["mixer.local.pw1.weight"], p["mixer.local.pw1.bias"],
                                  p["mixer.local.dw.weight"], p["mixer.local.dw.bias"], self._batch_norm,
                                  p["mixer.local.pw2.weight"], p["mixer.local.pw2.bias"]))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        x = x + self.drop_path(h)
        h = F.linear(F.gelu(F.linear(self.norm2(x), p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                     p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        return x + self.drop_path(h)


class Supernet(nn.Module):
    """All architectures of a SearchSpace in one set of weights; `forward(x, arch)` runs one."""

    def __init__(self, space: SearchSpace, num_classes: int, drop_path_rate: float = 0.0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.space = space
        self.num_classes = num_classes
        self.qkv_bias = qkv_bias
        self.stem = Stem(space)
        rates = [drop_path_rate * i / max(space.depth - 1, 1) for i in range(space.depth)]
        self.blocks = nn.ModuleList(SuperBlock(space, rate, qkv_bias) for rate in rates)
        self.norm = nn.LayerNorm(space.embed_dim, eps=LN_EPS)
        self.head = nn.Linear(space.embed_dim, num_classes)
        self.head.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"stem.pos_embed", "stem.cls_token"}

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        x = self.stem(x)
        for block, genes in zip(self.blocks, arch.blocks, strict=True):
            x = block(x, genes)
        return self.head(self.norm(x)[:, 0])

    def extract(self, arch: Arch) -> GLiT:
        """A standalone GLiT with copies of this arch's weights (and BN statistics)."""
        with torch.device("meta"):  # no initialisation work: every tensor is assigned below
            model = GLiT(arch, self.space, self.num_classes, qkv_bias=self.qkv_bias)
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("blocks.")}
        for i, (block, genes) in enumerate(zip(self.blocks, arch.blocks, strict=True)):
            for key, value in block.sliced(genes).items():
                state[f"blocks.{i}.{key}"] = value.detach().clone(memory_format=torch.contiguous_format)
        model.load_state_dict(state, strict=True, assign=True)
        return model.train(self.training)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor], forward: Callable[[Tensor], Any] | None = None
                   ) -> int:
    """Re-estimate BatchNorm statistics as a plain average over `batches` (in train mode).

    A subnet's BN statistics depend on the subnet, so they are recomputed before it is evaluated.
    Returns the number of batches used; the model is left in eval mode.
    """
    forward = forward or model
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    count = 0
    try:
        for x in batches:
            forward(x)
            count += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return count
