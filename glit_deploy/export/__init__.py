"""Export of GLiT models: ONNX (checked against PyTorch), then TensorRT and Triton built on it.

Run-level entry points (what `glit export`, `glit bench` and `glit pipeline` call). They import
lazily, so `glit_deploy.export.metadata` stays importable without torch:

    export_onnx(run)                  runs/NAME/export/model.onnx + model.json (onnx_export.export_run_onnx)
    build_engine_for_run(run, opts)   export/model.engine + model.engine.json (tensorrt.build_run_engine)
    write_triton(run)                 export/triton/ (triton.write_triton_repository)
    bench_formats(run, [1, 8, 32])    export/bench.csv (bench.bench_run)
"""

from __future__ import annotations

from typing import Any


def export_onnx(run: Any, label: str | None = None, options: Any = None, force: bool = False,
                report: Any = None) -> Any:
    """Export (or reuse) the run's retrained model as export/model.onnx; see onnx_export.export_run_onnx."""
    from glit_deploy.export.onnx_export import export_run_onnx
    from glit_deploy.rundir import RunDir

    return export_run_onnx(run if isinstance(run, RunDir) else RunDir(run), label, options, force, report)


def build_engine_for_run(run: Any, options: Any = None, label: str | None = None, report: Any = None
                         ) -> dict[str, Any]:
    """Build export/model.engine (TensorRT) from the run's ONNX export; see tensorrt.build_run_engine."""
    from glit_deploy.export.tensorrt import EngineOptions, build_run_engine
    from glit_deploy.rundir import RunDir

    return build_run_engine(run if isinstance(run, RunDir) else RunDir(run), options or EngineOptions(), report,
                            label)


def write_triton(run: Any, max_batch: int = 32, label: str | None = None) -> dict[str, Any]:
    """Write the Triton model repository export/triton/; see triton.write_triton_repository."""
    from glit_deploy.export.triton import write_triton_repository
    from glit_deploy.rundir import RunDir

    return write_triton_repository(run if isinstance(run, RunDir) else RunDir(run), max_batch, label)


def bench_formats(run: Any, batch_sizes: list[int], threads: int | None = None, protocol: Any = None
                  ) -> tuple[list[Any], list[str]]:
    """Time the exported model on every available runtime; write export/bench.csv. See bench.bench_run."""
    from glit_deploy.export.bench import bench_run
    from glit_deploy.rundir import RunDir

    return bench_run(run if isinstance(run, RunDir) else RunDir(run), list(batch_sizes), threads, protocol)
