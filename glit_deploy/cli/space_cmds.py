"""`glit space`: inspect the search spaces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from glit_deploy.cli import app, out, user_errors

space_app = typer.Typer(help="Inspect the search spaces.", no_args_is_help=True)
app.add_typer(space_app, name="space")


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
