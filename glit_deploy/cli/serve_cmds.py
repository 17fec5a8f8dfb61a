"""`glit` commands: predict and serve (an exported ONNX model; preprocessing from its own metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from glit_deploy.cli import app, err, out, user_errors
from glit_deploy.errors import GlitError

ModelOpt = Annotated[Path | None, typer.Option("--model", help="Exported model (PATH.onnx).")]
RunModelOpt = Annotated[Path | None, typer.Option("--run", help="Run directory: serve runs/NAME/export/model.onnx.")]
ProviderOpt = Annotated[str, typer.Option(help="auto (CUDA when onnxruntime offers it, else CPU), cpu, cuda or trt.")]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="onnxruntime intra-op threads (0: onnxruntime's default).")]


def _image_files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to classify (folders expand to their image files, sorted) and per-path errors."""
    from PIL import Image

    extensions = set(Image.registered_extensions())
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                errors.append((path, "folder holds no image files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append((path, "does not exist"))
    return files, errors


@app.command("predict")
@user_errors
def predict_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    model: ModelOpt = None,
    run: RunModelOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes to show per image.")] = 5,
    provider: ProviderOpt = "auto",
    threads: ThreadsOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per inference call.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Classify images with an exported model: top-k class names and softmax probabilities.

    Each image is decoded to RGB, its shorter side resized to the model's input size (bilinear),
    centre-cropped, scaled to 0..1 and normalised with the mean/std stored in the model. Files that
    are not usable images get one error line each, and the exit status is then 1.
    """
    import numpy as np

    from glit_deploy.serve import ImageRejected, Predictor, resolve_model_path

    predictor = Predictor.load(resolve_model_path(model, run), provider, threads or None)
    if predictor.note:
        err.print(f"[yellow]warning:[/] {escape(predictor.note)}", soft_wrap=True)
    files, errors = _image_files(images)
    inputs: list[tuple[Path, Any]] = []
    for path in files:
        try:
            inputs.append((path, predictor.image_to_input(path.read_bytes())))
        except ImageRejected as exc:
            errors.append((path, str(exc)))
        except OSError as exc:
            errors.append((path, f"cannot read ({exc.strerror or exc})"))
    results: list[tuple[Path, Any]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        logits = predictor.logits(np.stack([x for _, x in chunk]))
        results.extend(zip([p for p, _ in chunk], predictor.top_k(logits, top_k), strict=True))

    for path, message in errors:
        err.print(Text.assemble(("error: ", "bold red"), f"{path}: {message}"), soft_wrap=True)
    if as_json:
        out.print_json(json.dumps({
            "model": predictor.source, "providers": predictor.providers,
            "predictions": [{"image": str(p), "top_k": pred.to_list()} for p, pred in results],
            "errors": [{"image": str(p), "error": m} for p, m in errors]}))
    elif results:
        shown = min(top_k, predictor.meta.num_classes)
        table = Table(title=escape(f"{predictor.source} ({', '.join(predictor.providers)})"))
        table.add_column("image", overflow="fold")
        for rank in range(1, shown + 1):
            table.add_column(f"#{rank}")
        for path, pred in results:
            # Paths and class names are shown literally: a class named "[bold]" is not markup.
            table.add_row(Text(str(path)), *(Text(f"{c} ({100 * p:.1f} %)") for c, p in zip(
                pred.classes, pred.probabilities, strict=True)))
        out.print(table)
    if errors:
        raise typer.Exit(1)


@app.command("serve")
@user_errors
def serve_cmd(
    model: ModelOpt = None,
    run: RunModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    provider: ProviderOpt = "auto",
    threads: ThreadsOpt = 0,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most images per inference batch.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="Longest wait after a batch's first image for "
                                               "more images.")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Images allowed to wait for inference; beyond it "
                                           "requests get 429.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body (413 beyond).")] = 8 * 2**20,
    max_bytes_in_flight: Annotated[int, typer.Option(min=1, help="Request-body bytes /predict may hold at once "
                                                     "while receiving and decoding (each body counted at its "
                                                     "Content-Length, or --max-body-bytes without one); a request "
                                                     "beyond it gets 429 before its body is read.")] = 256 * 2**20,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image (width x height) decoded.")]
    = 4096 * 4096,
    max_images_per_request: Annotated[int, typer.Option(min=1, help="Most images in one /predict request.")] = 64,
    graceful_timeout: Annotated[float, typer.Option(min=0.0, help="Seconds SIGTERM waits for in-flight "
                                                    "requests.")] = 30.0,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request (costs throughput).")] = False,
) -> None:
    """Serve an exported model over HTTP: /predict with dynamic micro-batching, /healthz, /readyz,
    /metadata and Prometheus /metrics. SIGTERM drains in-flight requests, then exits 0."""
    from glit_deploy.serve import Predictor, resolve_model_path
    from glit_deploy.serve.app import ServeSettings, create_app
    from glit_deploy.serve.server import run_server

    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise GlitError(f"--log-level {log_level}: use critical, error, warning, info or debug")
    if max_bytes_in_flight < max_body_bytes:
        raise GlitError(f"--max-bytes-in-flight {max_bytes_in_flight} is below --max-body-bytes {max_body_bytes}: "
                        "a body of the largest allowed size could never be received")
    if max_images_per_request > max_queue:
        raise GlitError(f"--max-images-per-request {max_images_per_request} exceeds --max-queue {max_queue}: "
                        "such a request could never be queued")
    predictor = Predictor.load(resolve_model_path(model, run), provider, threads or None)
    if predictor.note:
        err.print(f"[yellow]warning:[/] {escape(predictor.note)}", soft_wrap=True)
    settings = ServeSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_body_bytes=max_body_bytes, max_bytes_in_flight=max_bytes_in_flight,
                             max_image_pixels=max_image_pixels,
                             max_images_per_request=max_images_per_request)
    asgi_app, state = create_app(predictor, settings)
    meta = predictor.meta
    err.print(Text(f"serving {predictor.source} ({meta.label or 'model'}, {meta.num_classes} classes, "
                   f"{meta.image_size} px) on http://{host}:{port} with {', '.join(predictor.providers)}; "
                   f"batches of up to {max_batch_size}, waiting at most {max_wait_ms:g} ms"), soft_wrap=True)
    run_server(asgi_app, state, host=host, port=port, graceful_timeout_s=graceful_timeout, log_level=log_level,
               access_log=access_log)
