"""The hand-designed baseline of the evidence (issue 12): a standard timm CNN adapted to 32 px, scaled
until it fits the evolutionary winner's measured latency, on the same target.

Families, all built by timm's own factories (`timm.create_model`, no weights, nothing downloaded):
- `resnet`: timm's ResNet with BasicBlocks, `layers` per stage (1,1,1,1 as resnet10; 2,2,2,2 as
  resnet18), stage widths (w, 2w, 4w, 8w) and the deep 3x3 stem (as resnet18d); for 32 px, the
  CIFAR adaptation of He et al.: a stride-1 stem and no max-pool;
- `mobilenetv3`: timm's mobilenetv3_small (0.5, 0.75, 1.0) and _large (0.75, 1.0) variants, with a
  stride-1 stem for 32 px.

`--fit` times every candidate's deployable graph (the ONNX `glit export` would write, through the
same target and the same measurement as the search's winner) interleaved with the evolution winner's
(batch 1's JSON), and picks, per family, the candidate with the most multiply-adds whose 95 % upper
bound is at most the winner's median in the same run. (Timed one after the other, two fits of the
same candidates read up to 40 % apart here: sustained load moves whole measurements.) It writes the
candidates and the choice to `bench/evidence/cnn-fit.json`.

`--train FAMILY --seed N` then trains that family's chosen CNN on CIFAR-10 exactly as
`bench/evidence_retrain.py` retrains the GLiT archs: the same recipe (`evidence_retrain.recipe`),
the same data split and augmentation, through the same training loop
(`glit_deploy.retrain.train_classifier`), resumable from its per-epoch checkpoints. The trained model
is exported as the GLiT models are (the deployable graph, `onnx.checker`, parity with PyTorch on
validation images, the class names and normalisation in the metadata), timed on the target, and
published as `bench/models/cifar10/cnn-FAMILY-sN.onnx` + `.json` with role `cnn`.

    nice -n 5 /work/main/.venv/bin/python bench/cnn_baseline.py --fit
    nice -n 15 /work/main/.venv/bin/python bench/cnn_baseline.py --train resnet10 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from glit_deploy.latency.measure import DECISION  # noqa: E402
from glit_deploy.latency.targets import get_target  # noqa: E402

console = Console()
RESNET_WIDTHS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 64)  # even: the stem is half as wide
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


def winner_model(batch1: Path) -> tuple[nn.Module, str]:
    """The evolutionary winner of batch 1 (random weights: speed does not depend on them)."""
    from glit_deploy.nn import GLiT
    from glit_deploy.space import Arch, get_space

    winner = json.loads(batch1.read_text())["evolution"]["winner"]
    torch.manual_seed(0)
    return GLiT(Arch.from_dict(winner["arch"]), get_space("cifar"), 10).eval(), winner["digest"]


def fit(batch1: Path, target_name: str, threads: int) -> dict[str, Any]:
    """Each candidate timed interleaved, round by round, with the GLiT winner's deployable graph: it fits
    when its 95 % upper bound is at most the winner's median of the same run (a stretch of load on this
    shared machine moves both, not their ratio)."""
    from glit_deploy.latency.measure import time_interleaved

    target = get_target(target_name, threads)
    example = torch.zeros(1, 3, 32, 32)
    winner, digest = winner_model(batch1)
    winner_runner = target.runner(winner, example)
    rows = []
    for family, size in candidates():
        torch.manual_seed(0)
        model = cnn_model(family, size).eval()
        timings = time_interleaved({"winner": winner_runner, "cnn": target.runner(model, example)}, DECISION)
        cnn, glit = timings["cnn"], timings["winner"]
        bound = cnn.upper_ms.get("median", cnn.ci_high_ms)
        rows.append({"family": family, "size": size, "params": sum(p.numel() for p in model.parameters()),
                     "macs": macs(model, example), "median_ms": cnn.median_ms, "bound_ms": bound,
                     "winner_ms": glit.median_ms, "ratio": cnn.median_ms / glit.median_ms,
                     "fits": bound <= glit.median_ms, "disturbed_rounds": cnn.disturbed_rounds + glit.disturbed_rounds,
                     "rounds": cnn.rounds + glit.rounds})
        console.print(f"{family} {size}: {cnn.median_ms:.3f} ms vs winner {glit.median_ms:.3f} ms "
                      f"({rows[-1]['ratio']:.2f}x), {rows[-1]['macs'] / 1e6:.1f} M MACs")
    chosen = {}
    for family in sorted({r["family"] for r in rows}):
        fitting = [r for r in rows if r["family"] == family and r["fits"]]
        if fitting:
            chosen[family] = max(fitting, key=lambda r: r["macs"])
    return {"winner_digest": digest, "target": target_name, "threads": threads, "candidates": rows,
            "chosen": chosen, "load_average": os.getloadavg()}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, export, time and publish the chosen CNN of `args.train` (see the module docstring)."""
    import hashlib
    from dataclasses import asdict

    import onnx
    from evidence_retrain import recipe

    from glit_deploy import distributed
    from glit_deploy.atomic_io import atomic_write_json
    from glit_deploy.checkpoint import load_checkpoint
    from glit_deploy.data import load_recorded_data
    from glit_deploy.export.metadata import ModelMetadata, attach_metadata
    from glit_deploy.export.onnx import check_onnx, deployable_onnx
    from glit_deploy.export.parity import Thresholds, compare_logits, ort_runner, session_logits, torch_logits
    from glit_deploy.retrain import set_recipe_transform, train_classifier
    from glit_deploy.rundir import RunDir
    from glit_deploy.runtimes import ort_session

    chosen = json.loads(args.json_out.read_text())["chosen"].get(args.train)
    if chosen is None:
        raise SystemExit(f"{args.json_out} has no fitting {args.train}: run --fit first")
    name = f"cnn-{args.train}-s{args.seed}"
    out = args.models_dir / f"{name}.json"
    if out.exists():
        console.print(f"{out} exists: {name} is done")
        return json.loads(out.read_text())
    cfg = recipe(args.epochs, args.seed)
    record = RunDir(args.supernet_run).load_meta()["data"]
    bundle = load_recorded_data(record, 32)
    set_recipe_transform(bundle, cfg)
    stage = args.out / "retrain-runs" / name
    stage.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = cnn_model(args.train, chosen["size"], bundle.num_classes)
    checkpoint = load_checkpoint(stage)
    identity = {"cnn": {"family": args.train, "size": chosen["size"]}}
    if checkpoint is not None and (checkpoint.state.get("cnn") != identity["cnn"]
                                   or checkpoint.state.get("config") != asdict(cfg)):
        raise SystemExit(f"{stage} holds another CNN or recipe: move it away")
    ctx = distributed.DistContext(0, 1, 0, torch.device("cpu"))
    started = time.perf_counter()
    trained = train_classifier(model, bundle, cfg, stage, name, ctx, checkpoint, identity=identity)
    train_seconds = time.perf_counter() - started

    final = trained.model.cpu().eval()
    images = torch.stack([bundle.val[i][0] for i in range(min(args.parity_images, len(bundle.val)))])
    proto = onnx.load_from_string(deployable_onnx(final, images[:1]))
    meta = ModelMetadata(arch=identity, space={"name": "timm-cnn", "image_size": 32}, image_size=32,
                         mean=tuple(bundle.mean), std=tuple(bundle.std), class_names=tuple(bundle.class_names),
                         label=name, val_top1=trained.val_top1[trained.chosen])
    attach_metadata(proto, meta)
    graph = proto.SerializeToString()
    check_onnx(graph)
    parity = compare_logits(torch_logits(final, images), session_logits(ort_runner(ort_session(graph)), images),
                            Thresholds(), "onnxruntime CPU vs PyTorch eager (float32)")
    if not parity.passed:
        raise SystemExit(f"{name}: parity failed: {parity.failure()}")
    args.models_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.models_dir / f"{name}.onnx"
    onnx_path.write_bytes(graph)
    timing = get_target(args.target, args.threads).measure_file(onnx_path, 1)
    example = torch.zeros(1, 3, 32, 32)
    result = {
        "role": "cnn", "name": name, "seed": args.seed, "arch": identity, "digest": None, "split": [],
        "val_top1": trained.val_top1[trained.chosen], "val_top1_raw": trained.val_top1.get("raw"),
        "val_top1_ema": trained.val_top1.get("ema"), "weights": trained.chosen, "val_images": len(bundle.val),
        "data": record.get("spec"), "inherited_top1": None, "measured_ms": timing.median_ms,
        "ci_ms": [timing.ci_low_ms, timing.ci_high_ms], "p90_ms": timing.p90_ms, "p99_ms": timing.p99_ms,
        "timing": {"target": args.target, "threads": args.threads, "batch_size": 1, "file": str(onnx_path),
                   **timing.to_dict()},
        "epochs": cfg.epochs, "recipe": asdict(cfg), "params": sum(p.numel() for p in final.parameters()),
        "macs": macs(final, example), "onnx_file": onnx_path.name, "onnx_bytes": len(graph),
        "onnx_sha256": hashlib.sha256(graph).hexdigest(), "parity": parity.to_dict(),
        "exported_by": "bench/cnn_baseline.py (glit_deploy.export.onnx.deployable_onnx, onnx.checker, parity)",
        "fit": chosen, "train_seconds": round(train_seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out, result)
    console.print(f"[green]{name}: {result['val_top1']:.2f} %, {timing.median_ms:.3f} ms -> {out}[/green]")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="time the candidates and choose per family")
    parser.add_argument("--train", choices=[*RESNET_LAYERS, *MOBILENET_MULTIPLIERS],
                        help="train, export and publish this family's chosen CNN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="the evidence's schedule (as evidence_retrain.py)")
    parser.add_argument("--supernet-run", type=Path, default=REPO / "bench" / "evidence",
                        help="the run whose run.json records the dataset (default: batch 1's copy, the GLiT split)")
    parser.add_argument("--out", type=Path, default=Path("/work/evidence"))
    parser.add_argument("--models-dir", type=Path, default=REPO / "bench" / "models" / "cifar10")
    parser.add_argument("--parity-images", type=int, default=1024)
    parser.add_argument("--batch1", type=Path, default=REPO / "bench" / "evidence" / "cifar10-batch1.json")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "evidence" / "cnn-fit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.train:
        train(args)
        return
    if not args.fit:
        parser.error("nothing to do: --fit or --train FAMILY")
    result = fit(args.batch1, args.target, args.threads)
    table = Table(title=f"CNN baselines against the GLiT winner {result['winner_digest']} on {args.target} "
                  f"({args.threads} thread), interleaved; load average {result['load_average'][0]:.1f}")
    for column in ("family", "size", "params", "M MACs", "median ms", "95 % bound", "winner ms", "ratio", "fits",
                   "chosen"):
        table.add_column(column)
    for r in result["candidates"]:
        chosen = result["chosen"].get(r["family"]) == r
        table.add_row(r["family"], f"{r['size']:g}", f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}",
                      f"{r['median_ms']:.3f}", f"{r['bound_ms']:.3f}", f"{r['winner_ms']:.3f}", f"{r['ratio']:.2f}",
                      "yes" if r["fits"] else "no", "<-" if chosen else "")
    console.print(table)
    args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
