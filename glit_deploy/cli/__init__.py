"""The `glit` command line: thin commands that parse options and call the packages that do the work.

This module holds the app, the consoles, the option types and helpers the command modules share;
each group of commands lives in its own module and registers on `app` when imported (below).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from glit_deploy.errors import GlitError

app = typer.Typer(name="glit", help="GLiT architecture search under measured latency, export and serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

RunOpt = Annotated[Path, typer.Option("--run", help="Run directory (runs/NAME).")]
ArchOpt = Annotated[str, typer.Option(help="ARCH.json, largest, smallest, random:SEED or a named arch.")]
TargetOpt = Annotated[str, typer.Option(help="ort-cpu, ort-cuda, ort-trt, torch-cpu, torch-cuda or trt "
                                        "(default: ort-cuda with a GPU, else ort-cpu).")]
PrecisionOpt = Annotated[str, typer.Option(help="Precision the target deploys at: fp32, or int8 (ort-cpu, ort-trt, "
                                           "trt: onnxruntime's static QDQ quantization), fp16 (ort-trt, trt).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size the latency is measured at.")]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="Runtime threads (0: half the cores this process may use).")]
WarmupOpt = Annotated[int, typer.Option(min=0, help="Untimed runs before timing.")]
RoundsOpt = Annotated[int, typer.Option("--rounds", min=3, help="Timed rounds per latency-table entry (at least; "
                                        "each round lasts about 5 ms).")]


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


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def target_from_options(name: str, threads: int, precision: str = "fp32") -> Any:
    from glit_deploy.latency import default_target_name, get_target

    return get_target(name or default_target_name(), threads or None, precision or "fp32")


def table_protocol(warmup: int, rounds: int) -> Any:
    """The latency-table protocol with the user's warm-up and minimum rounds."""
    from dataclasses import replace

    from glit_deploy.latency.measure import TABLE

    return replace(TABLE, warmup=warmup, min_rounds=rounds, min_counted=min(TABLE.min_counted, rounds))


# Each group of commands lives in its own module, which registers on `app` when imported.
from glit_deploy.cli import (  # noqa: E402, F401
    export_cmds,
    latency_cmds,
    pipeline_cmds,
    search_cmds,
    serve_cmds,
    space_cmds,
    train_cmds,
)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `glit space show cifar | head`
        sys.exit(0)
