"""One decoding and preprocessing from training to serving (issue 11, item 2): EXIF orientation, colour
modes, the JPEG draft, the in-memory datasets' evaluation path, and a real server on 127.0.0.1."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glit_deploy.data import EvalTransform, ImageFileDataset, load_digits_bundle
from glit_deploy.images import Normaliser, load_rgb, model_input, open_image, open_image_file, preprocess, to_rgb
from tests.test_serve import Server, digits_onnx, multipart, softmax  # noqa: F401

ORIENTATION_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
EXIF_CASES = [((37, 53), 3), ((37, 53), 6), ((101, 64), 8), ((101, 64), 6), ((53, 37), 1)]


def exif_jpeg(path: Path, size: tuple[int, int], orientation: int, seed: int = 0) -> Path:
    """A real JPEG of an odd size whose EXIF says how to turn it upright (tag 0x0112)."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    image = coarse.resize((width, height), Image.Resampling.BICUBIC)  # smooth, like a photo
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("size,orientation", EXIF_CASES)
def test_exif_orientation_is_applied(tmp_path: Path, size: tuple[int, int], orientation: int) -> None:
    path = exif_jpeg(tmp_path / "photo.jpg", size, orientation)
    upright = load_rgb(open_image_file(path), None)
    with Image.open(path) as raw:
        stored = raw.convert("RGB")
    expected = stored.transpose(ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else stored
    assert upright.size == expected.size
    assert upright.size == (size[::-1] if orientation in (6, 8) else size)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(expected))


def test_jpeg_draft_acts_the_same_in_every_stage(tmp_path: Path) -> None:
    """A JPEG 8x larger than the input decodes at 1/8 scale, in the dataset as in predict/serve."""
    path = exif_jpeg(tmp_path / "big.jpg", (200, 150), 6)
    assert load_rgb(open_image_file(path), 16).size == (19, 25)  # ceil(150/8) x ceil(200/8), then turned upright
    normaliser = Normaliser([0.5] * 3, [0.25] * 3)
    dataset = ImageFileDataset([path], [0], 16, EvalTransform(16, [0.5] * 3, [0.25] * 3))
    np.testing.assert_array_equal(dataset[0][0].numpy(), model_input(open_image(path.read_bytes()), 16, normaliser))
    decoded_for_training = ImageFileDataset([path], [0], 16, lambda image: image)[0][0]
    assert np.array_equal(np.asarray(decoded_for_training), np.asarray(load_rgb(open_image_file(path), 16)))


def test_colour_modes_become_rgb_by_one_rule() -> None:
    sixteen = Image.fromarray(np.array([[0, 255, 256, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 0, 1, 255]  # scaled, not clipped at 255
    rgba = Image.fromarray(np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8))
    assert np.asarray(to_rgb(rgba))[0].tolist() == [[200, 100, 50], [0, 0, 0], [100, 50, 25]]  # on black
    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], np.uint8), mode="LA")
    assert np.asarray(to_rgb(la))[0].tolist() == [[90, 90, 90], [0, 0, 0]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    decoded = load_rgb(open_image(buffer.getvalue()), None)
    assert np.asarray(decoded)[0].tolist() == [[0, 0, 0], [0, 255, 0]]  # the transparent colour is composited
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    gray = Image.fromarray(np.array([[7, 200]], np.uint8))
    assert np.asarray(to_rgb(gray))[0].tolist() == [[7, 7, 7], [200, 200, 200]]


def test_in_memory_eval_path_equals_the_one_preprocessing() -> None:
    """digits/CIFAR-10 evaluate from tensors; for the same pixels that is exactly `preprocess`."""
    bundle = load_digits_bundle()
    normaliser = Normaliser(bundle.mean, bundle.std)
    for i in range(0, len(bundle.val), 37):
        pixels = bundle.val.images[i].permute(1, 2, 0).numpy()
        expected = preprocess(Image.fromarray(pixels), bundle.image_size, normaliser)
        np.testing.assert_allclose(bundle.val[i][0].numpy(), expected, rtol=0, atol=1e-6)


def test_server_logits_equal_the_evaluation_transform_on_exif_jpegs(digits_onnx: Path, tmp_path: Path  # noqa: F811
                                                                    ) -> None:
    """A real `glit serve` on 127.0.0.1: JPEGs of odd sizes with EXIF orientations give the logits of the
    evaluation transform of image-folder training (onnxruntime on the same exported model).

    The server answers softmax probabilities, not logits: with top_k = all classes they determine the
    logits up to the softmax's shift, so centred log-probabilities are compared with centred logits."""
    import onnxruntime

    from glit_deploy.export.metadata import session_metadata

    session = onnxruntime.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    meta = session_metadata(session)
    paths = [exif_jpeg(tmp_path / f"{i}.jpg", size, orientation, seed=i)
             for i, (size, orientation) in enumerate(EXIF_CASES)]
    evaluation = ImageFileDataset(paths, [0] * len(paths), meta.image_size,
                                  EvalTransform(meta.image_size, meta.mean, meta.std))
    inputs = np.stack([evaluation[i][0].numpy() for i in range(len(paths))])
    logits = session.run([meta.output_name], {meta.input_name: inputs})[0].astype(np.float64)

    server = Server(digits_onnx, tmp_path / "server.log")
    try:
        body, content_type = multipart([(p.name, p.read_bytes()) for p in paths])
        status, _, answer = server.request("POST", f"/predict?top_k={meta.num_classes}", body,
                                           {"Content-Type": content_type})
    finally:
        assert server.stop() == 0, server.log.read_text()
    assert status == 200, answer
    probabilities = np.zeros_like(logits)
    for row, prediction in enumerate(answer["predictions"]):
        for p in prediction["top_k"]:
            probabilities[row, p["index"]] = p["probability"]
    np.testing.assert_allclose(probabilities, softmax(logits), rtol=0, atol=1e-6)
    served = np.log(probabilities)
    served -= served.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(served, logits - logits.mean(axis=1, keepdims=True), rtol=0, atol=1e-4)
