"""The `glit` command line: thin commands that parse options and call the packages that do the work."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glit_deploy.errors import GlitError

app = typer.Typer(name="glit", help="GLiT architecture search under measured latency, export and serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
space_app = typer.Typer(help="Inspect the search spaces.", no_args_is_help=True)
app.add_typer(space_app, name="space")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

RunOpt = Annotated[Path, typer.Option("--run", help="Run directory (runs/NAME).")]


def user_errors(fn: F) -> F:
    """Turn errors a user can cause into one line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GlitError as exc:
            err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
    return wrapper  # type: ignore[return-value]


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command("train-supernet")
@user_errors
def train_supernet_cmd(
    run: RunOpt,
    space: Annotated[str, typer.Option(help="Search-space preset: digits, cifar, glit-tiny, glit-small, glit-base.")]
    = "digits",
    data: Annotated[str, typer.Option(help="digits | cifar10:DIR | image-folder DIR.")] = "digits",
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: Annotated[int, typer.Option(min=0)] = 2,
    sandwich: Annotated[bool, typer.Option(help="Sandwich rule with in-place distillation.")] = False,
    seed: int = 0,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader worker processes.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate largest/smallest every N epochs.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the run's latest checkpoint.")] = False,
) -> None:
    """Train the weight-sharing supernet (one sampled arch per step; DDP under torchrun)."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.space import get_space
    from glit_deploy.train import TrainConfig, train_supernet

    _set_threads(threads)
    search_space = get_space(space)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, sandwich=sandwich, seed=seed, workers=workers,
                      eval_every=eval_every)
    result = train_supernet(RunDir(run), search_space, data, cfg, resume=resume, device=device)
    if result.get("rank", 0) == 0:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "rank"}))


@app.command("eval-subnet")
@user_errors
def eval_subnet_cmd(
    run: RunOpt,
    arch: Annotated[str, typer.Option(help="ARCH.json, largest, smallest, random:SEED or a named arch.")],
    calib_batches: Annotated[int, typer.Option(min=1, help="Training batches for BN recalibration.")] = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    threads: Annotated[int, typer.Option(min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Validation top-1 of a subnet with inherited supernet weights, after BN recalibration."""
    from glit_deploy.archs import resolve_arch
    from glit_deploy.rundir import RunDir
    from glit_deploy.train import eval_subnet

    _set_threads(threads)
    rundir = RunDir(run)
    space = rundir.space()
    result = eval_subnet(rundir, resolve_arch(arch, space), calib_batches, batch_size)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"subnet {result['digest']}", show_header=False)
    table.add_row("arch", resolve_arch(arch, space).describe(space.num_heads))
    table.add_row("params", f"{result['params'] / 1e6:.3f} M")
    table.add_row("multiply-adds", f"{result['macs'] / 1e6:.2f} M")
    table.add_row("val top-1", f"{result['val_top1']:.2f} % of {result['val_images']} images")
    out.print(table)


@space_app.command("show")
@user_errors
def space_show_cmd(
    preset: Annotated[str, typer.Argument(help="digits, cifar, glit-tiny, glit-small or glit-base.")],
    num_classes: Annotated[int, typer.Option(help="Classes for counting the head (default: 1000 for glit-*, "
                                             "10 otherwise).")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The space's dimensions and choices, its size, and the parameters and multiply-adds it spans."""
    from glit_deploy.nn.counting import describe_space
    from glit_deploy.space import get_space

    space = get_space(preset)
    info = describe_space(space, num_classes or (1000 if preset.startswith("glit-") else 10))
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"search space '{space.name}'", show_header=False)
    s = info["space"]
    table.add_row("input", f"{s['image_size']} px, patch {s['patch_size']}, {info['tokens']} tokens")
    table.add_row("width / depth / heads", f"{s['embed_dim']} / {s['depth']} / {s['num_heads']}")
    table.add_row("global heads G", ", ".join(map(str, s["global_heads"])))
    table.add_row("e_v", ", ".join(f"{v:g}" for v in s["e_v"]))
    table.add_row("e_c", ", ".join(map(str, s["e_c"])))
    table.add_row("kernel sizes", ", ".join(map(str, s["kernel_sizes"])))
    table.add_row("mlp ratios", ", ".join(map(str, s["mlp_ratios"])))
    table.add_row("block configurations", str(info["block_configs"]))
    table.add_row("level-1 splits", f"{info['level1_splits']:,}")
    table.add_row("architectures", f"{info['archs']:.3e}")
    p, m = info["params"], info["macs"]
    table.add_row(f"parameters ({info['num_classes']} classes)", f"{p[0] / 1e6:.3f} M .. {p[1] / 1e6:.3f} M")
    table.add_row("multiply-adds", f"{m[0] / 1e6:.1f} M .. {m[1] / 1e6:.1f} M")
    out.print(table)


@space_app.command("sample")
@user_errors
def space_sample_cmd(
    preset: Annotated[str, typer.Argument(help="Search-space preset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Write the arch JSON here.")],
    seed: int = 0,
) -> None:
    """Write a uniformly sampled arch of a space as JSON (a starting point for --arch files)."""
    import random

    from glit_deploy.space import get_space

    space = get_space(preset)
    arch = space.sample(random.Random(seed))
    arch.save(output, space=space.name)
    out.print(f"wrote {output}: {arch.describe(space.num_heads)}")


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `glit space show cifar | head`
        sys.exit(0)
