"""timm registration: `timm.create_model("glit_tiny_patch16_224")` builds the paper's GLiT-Tiny."""

from __future__ import annotations

from typing import Any

from timm.models import register_model

from glit_deploy.errors import GlitError
from glit_deploy.nn.model import GLiT
from glit_deploy.space import get_space, named_arch


def _build(space_name: str, arch_name: str, pretrained: bool, **kwargs: Any) -> GLiT:
    if pretrained:
        raise GlitError("no pretrained GLiT weights are available offline; create the model with pretrained=False")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return GLiT(named_arch(arch_name), get_space(space_name), **kwargs)


@register_model
def glit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GLiT:
    """GLiT-Tiny as released by the authors (7.26 M parameters with 1000 classes)."""
    return _build("glit-tiny", "glit-tiny-paper", pretrained, **kwargs)
