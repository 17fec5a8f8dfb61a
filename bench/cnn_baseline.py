"""The hand-designed baseline of the evidence (issue 12): a standard timm CNN adapted to 32 px, scaled
until it fits the evolutionary winner's measured latency, on the same target.

Families, all built by timm's own factories (`timm.create_model`, no weights, nothing downloaded):
- `resnet`: timm's ResNet with BasicBlocks, `layers` per stage (1,1,1,1 as resnet10; 2,2,2,2 as
  resnet18), stage widths (w, 2w, 4w, 8w) and the deep 3x3 stem (as resnet18d); for 32 px, the
  CIFAR adaptation of He et al.: a stride-1 stem and no max-pool;
- `mobilenetv3`: timm's mobilenetv3_small (0.5, 0.75, 1.0) and _large (0.75, 1.0) variants, with a
  stride-1 stem for 32 px.

`--fit` times every candidate's deployable graph (the ONNX `glit export` would write, through the
same target and the same measurement as the search's winner) and picks, per family, the candidate
with the most multiply-adds whose 95 % upper bound of the median is within the budget (default: the
evolution winner's measured median, from the batch-1 JSON). It writes the candidates and the choice
to a JSON that `bench/evidence_retrain.py` reads for its `cnn` role.

    nice -n 5 /work/main/.venv/bin/python bench/cnn_baseline.py --fit --json-out bench/evidence/cnn-fit.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glit_deploy.latency.measure import DECISION  # noqa: E402
from glit_deploy.latency.targets import get_target  # noqa: E402

console = Console()
RESNET_WIDTHS = (8, 12, 16, 20, 24, 32, 40, 48, 64)  # even: the stem is half as wide
RESNET_LAYERS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}
MOBILENET_MULTIPLIERS = {"mobilenetv3_small": (0.5, 0.75, 1.0), "mobilenetv3_large": (0.75, 1.0)}  # timm's variants


def cnn_model(family: str, size: float, num_classes: int = 10) -> nn.Module:
    """A timm CNN for 32 px inputs. `family`: resnet10, resnet18, mobilenetv3_small or mobilenetv3_large;
    `size`: the base width (ResNets) or the width multiplier (MobileNetV3)."""
    import timm

    if family in RESNET_LAYERS:
        width = int(size)
        # timm's deep stem (three 3x3 convs, as resnet18d) is the one whose width follows `stem_width`
        # (stem_width * 2 = the first stage's width); its first conv at stride 1 and no max-pool keep
        # 32x32 inputs at 32x32 into the first stage.
        model = timm.create_model("resnet18", num_classes=num_classes, layers=RESNET_LAYERS[family],
                                  channels=(width, 2 * width, 4 * width, 8 * width), stem_type="deep",
                                  stem_width=width // 2)
        model.conv1[0].stride = (1, 1)
        model.maxpool = nn.Identity()
        return model
    if family in ("mobilenetv3_small", "mobilenetv3_large"):
        model = timm.create_model(f"{family}_{round(100 * size):03d}", num_classes=num_classes)
        stem = model.conv_stem
        model.conv_stem = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1,
                                    bias=False)
        return model
    raise ValueError(f"unknown CNN family '{family}'")


def candidates() -> list[tuple[str, float]]:
    return ([(f, w) for f in RESNET_LAYERS for w in RESNET_WIDTHS]
            + [(f, m) for f, sizes in MOBILENET_MULTIPLIERS.items() for m in sizes])


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of convolutions and linear layers, counted by forward hooks."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += out.numel() * kernel

    def linear_hook(module: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * module.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.eval()(example)
    for h in hooks:
        h.remove()
    return total


def fit(budget_ms: float, target_name: str, threads: int) -> dict[str, Any]:
    target = get_target(target_name, threads)
    example = torch.zeros(1, 3, 32, 32)
    rows = []
    for family, size in candidates():
        torch.manual_seed(0)
        model = cnn_model(family, size).eval()
        timing = target.measure(model, example, DECISION)
        rows.append({"family": family, "size": size, "params": sum(p.numel() for p in model.parameters()),
                     "macs": macs(model, example), "median_ms": timing.median_ms,
                     "bound_ms": timing.upper_ms.get("median", timing.ci_high_ms),
                     "disturbed_rounds": timing.disturbed_rounds, "rounds": timing.rounds})
        console.print(f"{family} {size}: {timing.median_ms:.3f} ms, {rows[-1]['macs'] / 1e6:.1f} M MACs")
    chosen = {}
    for family in {r["family"] for r in rows}:
        fitting = [r for r in rows if r["family"] == family and r["bound_ms"] <= budget_ms]
        if fitting:
            chosen[family] = max(fitting, key=lambda r: r["macs"])
    return {"budget_ms": budget_ms, "target": target_name, "threads": threads, "candidates": rows,
            "chosen": chosen, "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="time the candidates and choose per family")
    parser.add_argument("--batch1", type=Path, default=REPO / "bench" / "evidence" / "cifar10-batch1.json")
    parser.add_argument("--budget-ms", type=float, help="default: the evolution winner's measured median")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "evidence" / "cnn-fit.json")
    args = parser.parse_args()
    if not args.fit:
        parser.error("nothing to do: --fit")
    budget = args.budget_ms or json.loads(args.batch1.read_text())["evolution"]["winner"]["measured_ms"]
    result = fit(budget, args.target, args.threads)
    table = Table(title=f"CNN baselines within {budget:.4f} ms on {args.target} ({args.threads} thread), "
                  f"load average {result['load_average'][0]:.1f}")
    for column in ("family", "size", "params", "M MACs", "median ms", "95 % bound", "fits", "chosen"):
        table.add_column(column)
    for r in result["candidates"]:
        chosen = result["chosen"].get(r["family"]) == r
        table.add_row(r["family"], f"{r['size']:g}", f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}",
                      f"{r['median_ms']:.3f}", f"{r['bound_ms']:.3f}", "yes" if r["bound_ms"] <= budget else "no",
                      "<-" if chosen else "")
    console.print(table)
    args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
