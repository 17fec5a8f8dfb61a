"""GLiT layers, the standalone model, the weight-sharing supernet and timm registration."""

from glit_deploy.nn import registry as _registry  # noqa: F401  (registers the timm models)
from glit_deploy.nn.counting import Cost, arch_cost, block_cost, count_macs, count_params, extreme_arch
from glit_deploy.nn.model import GLiT
from glit_deploy.nn.supernet import Supernet, recalibrate_bn

__all__ = [
           "Cost",
           "GLiT",
           "Supernet",
           "arch_cost",
           "block_cost",
           "count_macs",
           "count_params",
           "extreme_arch",
           "recalibrate_bn",
]
