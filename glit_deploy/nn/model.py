"""The standalone GLiT model: a DeiT-style isotropic ViT whose blocks follow an Arch."""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import Tensor, nn

from glit_deploy.nn.layers import LN_EPS, Block, init_vit_weights
from glit_deploy.space import Arch, SearchSpace


class Stem(nn.Module):
    """Patch embedding, cls token and learned position embedding (shared by GLiT and Supernet)."""

    def __init__(self, space: SearchSpace, drop: float = 0.0) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=space.image_size, patch_size=space.patch_size,
                                      in_chans=space.in_chans, embed_dim=space.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, space.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, space.num_tokens, space.embed_dim))
        self.pos_drop = nn.Dropout(drop)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)


class GLiT(nn.Module):
    """GLiT built from an Arch. No data-dependent control flow, so it exports as a static graph."""

    def __init__(self, arch: Arch, space: SearchSpace, num_classes: int = 1000, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        space.validate(arch)
        self.arch = arch
        self.space = space
        self.num_classes = num_classes
        self.num_features = self.embed_dim = space.embed_dim
        self.stem = Stem(space, drop_rate)
        rates = [drop_path_rate * i / max(space.depth - 1, 1) for i in range(space.depth)]
        self.blocks = nn.Sequential(*[
            Block(space, genes, drop_path=rate, drop=drop_rate, qkv_bias=qkv_bias)
            for genes, rate in zip(arch.blocks, rates, strict=True)
        ])
        self.norm = nn.LayerNorm(space.embed_dim, eps=LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(space.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.blocks.apply(init_vit_weights)
        self.head.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"stem.pos_embed", "stem.cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
