"""GLiT layers: the global-local (GL) mixer and the block built around it.

The arithmetic lives in two functions (`global_attention`, `locality`) that both the standalone
modules here and the weight-sharing supernet call, so a subnet and its extracted model compute
exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

from glit_deploy.space import BlockGenes, SearchSpace

LN_EPS = 1e-6


def global_attention(x: Tensor, qkv_w: Tensor, qkv_b: Tensor | None, proj_w: Tensor, proj_b: Tensor | None,
                     num_heads: int) -> Tensor:
    """Multi-head self-attention over all tokens; qkv rows are laid out [q|k|v][head][width]."""
    batch, tokens, _ = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(batch, tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, -1), proj_w, proj_b)


def locality(x: Tensor, pw1_w: Tensor, pw1_b: Tensor, dw_w: Tensor, dw_b: Tensor,
             batch_norm: Callable[[Tensor], Tensor], pw2_w: Tensor, pw2_b: Tensor) -> Tensor:
    """Conformer-style convolution over the token sequence (raster order, cls token included).

    pointwise (as a Linear on B,N,C) -> GLU -> depthwise conv ("same") -> BN -> SiLU -> pointwise.
    """
    h = F.glu(F.linear(x, pw1_w, pw1_b), dim=-1).transpose(1, 2)
    kernel = dw_w.shape[-1]
    h = F.conv1d(h, dw_w, dw_b, padding=kernel // 2, groups=dw_w.shape[0])
    h = F.silu(batch_norm(h)).transpose(1, 2)
    return F.linear(h, pw2_w, pw2_b)


class GlobalAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_width: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_width, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return global_attention(x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.num_heads)


class LocalityModule(nn.Module):
    def __init__(self, dim: int, inner: int, kernel: int) -> None:
        super().__init__()
        self.pw1 = nn.Linear(dim, 2 * inner)
        self.dw = nn.Conv1d(inner, inner, kernel, padding=kernel // 2, groups=inner)
        self.bn = nn.BatchNorm1d(inner)
        self.pw2 = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        return locality(x, self.pw1.weight, self.pw1.bias, self.dw.weight, self.dw.bias, self.bn,
                        self.pw2.weight, self.pw2.bias)


class GLMixer(nn.Module):
    """Splits channels: the first dim*G/H go to attention, the rest to the locality module."""

    def __init__(self, space: SearchSpace, genes: BlockGenes, qkv_bias: bool = True) -> None:
        super().__init__()
        self.global_dim = space.global_dim(genes.global_heads)
        local_dim = space.embed_dim - self.global_dim
        self.attn = None
        self.local = None
        if genes.global_heads > 0:
            width = int(genes.e_v * space.head_dim)
            self.attn = GlobalAttention(self.global_dim, genes.global_heads, width, qkv_bias)
        if local_dim > 0:
            self.local = LocalityModule(local_dim, genes.e_c * local_dim, genes.kernel)

    def forward(self, x: Tensor) -> Tensor:
        if self.local is None:
            return self.attn(x)
        if self.attn is None:
            return self.local(x)
        return torch.cat([self.attn(x[..., : self.global_dim]), self.local(x[..., self.global_dim:])], dim=-1)


class Block(nn.Module):
    """Pre-norm residual block: x + GL(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, space: SearchSpace, genes: BlockGenes, drop_path: float = 0.0, drop: float = 0.0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        dim = space.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mixer = GLMixer(space, genes, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden_features=dim * genes.mlp_ratio, act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """DeiT initialisation: truncated normal (std .02) Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
