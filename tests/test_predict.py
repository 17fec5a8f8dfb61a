"""`glit predict` and the preprocessing it shares with `glit serve`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from glit_deploy.serve.images import ImageRejected, Normaliser, decode_image, open_image, preprocess
from tests.conftest import glit
from tests.test_serve import digit_images, digits_onnx, header_only_png, png_bytes, softmax  # noqa: F401


@pytest.fixture
def digit_folder(digit_images: Any, tmp_path: Path) -> Path:  # noqa: F811
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, png in enumerate(digit_images[0][:12]):
        (folder / f"{i:02d}.png").write_bytes(png)
    (folder / "notes.txt").write_text("not an image, and not an image extension: skipped")
    return folder


def test_predict_json_matches_onnxruntime_on_training_preprocessing(digits_onnx: Path, digit_images: Any,  # noqa: F811
                                                                    digit_folder: Path) -> None:
    import onnxruntime

    _, labels, reference_inputs = digit_images
    proc = glit("predict", "--model", str(digits_onnx), str(digit_folder), "--top-k", "10", "--json")
    result = json.loads(proc.stdout)
    assert result["errors"] == [] and result["providers"] == ["CPUExecutionProvider"]
    assert [Path(p["image"]).name for p in result["predictions"]] == [f"{i:02d}.png" for i in range(12)]
    session = onnxruntime.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    expected = softmax(session.run(["output"], {"input": reference_inputs[:12]})[0])
    got = np.zeros((12, 10))
    for row, prediction in enumerate(result["predictions"]):
        probabilities = [p["probability"] for p in prediction["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)
        for p in prediction["top_k"]:
            got[row, p["index"]] = p["probability"]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(1) == labels[:12]).mean() >= 0.75  # a trained model on real digits


def test_predict_table_from_run_dir(digits_onnx: Path, digit_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "runs" / "digits"
    (run / "export").mkdir(parents=True)
    shutil.copy(digits_onnx, run / "export" / "model.onnx")
    proc = glit("predict", "--run", str(run), str(digit_folder / "00.png"), str(digit_folder / "01.png"),
                "--top-k", "3", env={"COLUMNS": "200"})
    assert "#1" in proc.stdout and "#3" in proc.stdout and "#4" not in proc.stdout
    assert "00.png" in proc.stdout and "01.png" in proc.stdout and " %)" in proc.stdout


def test_predict_bad_files_get_one_error_line_each(digits_onnx: Path, digit_folder: Path) -> None:  # noqa: F811
    (digit_folder / "broken.png").write_bytes(b"definitely not a PNG")
    (digit_folder / "cut.png").write_bytes((digit_folder / "00.png").read_bytes()[:40])
    missing = digit_folder / "missing.png"
    proc = glit("predict", "--model", str(digits_onnx), str(digit_folder), str(missing), "--json", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 3, proc.stderr
    assert any("broken.png" in line and "not an image" in line for line in error_lines)
    assert any("cut.png" in line for line in error_lines)
    assert any("missing.png" in line and "does not exist" in line for line in error_lines)
    result = json.loads(proc.stdout)
    assert len(result["predictions"]) == 12 and len(result["errors"]) == 3  # the good images still classified


def test_predict_user_errors_exit_2(digits_onnx: Path, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    for args, message in [
        (["--model", str(tmp_path / "nope.onnx")], "does not exist"),
        (["--run", str(tmp_path / "runs" / "none")], "glit export"),
        (["--model", str(digits_onnx), "--run", str(tmp_path)], "exactly one"),
        (["--model", str(digits_onnx), "--provider", "tpu"], "unknown provider"),
    ]:
        proc = glit("predict", *args, str(image), check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- preprocessing and decoding


@pytest.mark.parametrize("width,height", [(8, 8), (20, 14), (14, 20), (9, 8), (37, 64), (5, 5), (300, 200)])
def test_preprocess_matches_torchvision_resize_crop_normalise(width: int, height: int) -> None:
    """The documented policy: shorter side to the input size (bilinear), centre crop, /255, (x-mean)/std."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    image = Image.fromarray(np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8))
    reference = v2.Compose([v2.Resize(8, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(8),
                            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    np.testing.assert_allclose(preprocess(image, 8, Normaliser(mean, std)), reference(image).numpy(), atol=1e-5)


def test_decode_converts_modes_to_rgb() -> None:
    import io

    from PIL import Image

    for mode in ("L", "RGBA", "P", "CMYK"):
        buffer = io.BytesIO()
        Image.new(mode, (10, 6)).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
        decoded = decode_image(buffer.getvalue())
        assert decoded.mode == "RGB" and decoded.size == (10, 6)


@pytest.mark.parametrize("data,status,message", [
    (b"", 400, "empty"),
    (png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))[:2000], 400, "truncated"),
    (b"hello world", 415, "not an image"),
    (header_only_png(100_000, 100_000), 413, "decompression bomb"),
    (header_only_png(3000, 3000), 413, "over the limit"),
])
def test_decode_refuses_bad_images(data: bytes, status: int, message: str) -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, max_pixels=1_000_000)
    assert info.value.status == status and message in str(info.value)


def test_pixel_limit_is_checked_before_decoding() -> None:
    image = open_image(header_only_png(900, 900), max_pixels=1_000_000)  # header only: no pixel data read
    assert image.size == (900, 900)
    with pytest.raises(ImageRejected, match="truncated"):
        decode_image(header_only_png(900, 900), max_pixels=1_000_000)


def test_predict_prints_class_names_and_paths_literally(digits_onnx: Path, digit_folder: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    """Class names and paths that look like Rich markup are shown as they are, never read as markup."""
    import dataclasses

    import onnx

    from glit_deploy.export.metadata import attach_metadata, read_metadata

    meta = read_metadata(digits_onnx)
    names = ["[/]", "[bold]one", *meta.class_names[2:]]
    model = onnx.load(str(digits_onnx))
    attach_metadata(model, dataclasses.replace(meta, class_names=tuple(names)))
    odd = tmp_path / "[red]model.onnx"
    onnx.save(model, str(odd))
    image = tmp_path / "[b]img.png"
    shutil.copy(digit_folder / "00.png", image)
    proc = glit("predict", "--model", str(odd), str(image), "--top-k", "10", env={"COLUMNS": "400"})
    assert "[/]" in proc.stdout and "[bold]one" in proc.stdout and "[b]img.png" in proc.stdout
