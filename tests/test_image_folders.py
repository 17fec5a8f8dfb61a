"""Image-folder datasets as people keep them (issue 11): nested class folders, every format and colour
mode, undecodable files, the layout errors, and a dataset changed under the same path."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from glit_deploy.cli import app
from glit_deploy.data import canonical_spec, load_data, load_recorded_data, load_run_data
from glit_deploy.errors import DataError
from glit_deploy.images import Normaliser, model_input, open_image_file

RNG = np.random.default_rng(0)


def _pixels(width: int, height: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 9), **params: object) -> Path:
    """An image of `mode` at `path` (the format from the extension, in any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    rgb = Image.fromarray(_pixels(width, height))
    if mode == "I;16":
        image = Image.fromarray((RNG.integers(0, 65536, (height, width))).astype(np.uint16))
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        params.setdefault("transparency", 0)
    else:
        image = rgb.convert(mode)
    image.save(path, **params)
    return path


# (relative path under a class folder, mode): every format and mode of the issue, nested, extensions in any case
MIXED = [("a.jpg", "RGB"), ("b.JPEG", "L"), ("part0/c.png", "RGBA"), ("part0/d.PNG", "LA"), ("part1/e.webp", "RGB"),
         ("part1/deeper/f.bmp", "RGB"), ("part1/g.tif", "CMYK"), ("h.TIFF", "I;16"), ("i.gif", "P"),
         ("part2/j.png", "I;16"), ("k.jpeg", "CMYK"), ("l.png", "P")]


def mixed_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog", "bird"), val: bool = False) -> Path:
    for c, name in enumerate(classes):
        for i, (relative, mode) in enumerate(MIXED[: 8 + c]):
            save(root / "train" / name / relative, mode, size=(8 + 3 * i, 40 - 2 * i))
        if val:
            for relative, mode in MIXED[:2]:
                save(root / "val" / name / "v" / relative, mode, size=(17, 11))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0")
    save(root / "train" / "dog" / ".hidden" / "x.png")  # hidden folders are skipped
    return root


def test_nested_tree_with_mixed_formats_and_modes(tmp_path: Path) -> None:
    root = mixed_tree(tmp_path / "ds")
    bundle = load_data(str(root), 16, report=False)
    assert bundle.class_names == ["bird", "cat", "dog"]  # first-level folders, never the nested part0/part1
    assert bundle.identity["counts"] == {"train": {"bird": 10, "cat": 8, "dog": 9}}
    assert len(bundle.train) + len(bundle.val) == 27 and len(bundle.val) == 3  # 10 % of each class held out
    assert bundle.identity["other_files"] == 1 and bundle.identity["skipped"] == []
    assert bundle.identity["path"] == str(root.resolve()) and bundle.identity["spec"] == str(root.resolve())
    for dataset in (bundle.val, bundle.calib):
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == (3, 16, 16) and x.dtype.is_floating_point and 0 <= y < 3
    x, _ = bundle.train[0]  # timm's training augmentation on the same decoded RGB image
    assert x.shape == (3, 16, 16)


def test_evaluation_items_are_the_one_preprocessing(tmp_path: Path) -> None:
    """An image-folder evaluation item is exactly what `glit predict`/`glit serve` compute for the file."""
    root = mixed_tree(tmp_path / "ds", val=True)
    bundle = load_data(str(root), 16, report=False)
    assert bundle.identity["counts"]["val"] == {"bird": 2, "cat": 2, "dog": 2}
    assert (len(bundle.train), len(bundle.val)) == (27, 6)
    normaliser = Normaliser(bundle.mean, bundle.std)
    for dataset in (bundle.val, bundle.calib):
        for i in range(len(dataset)):
            expected = model_input(open_image_file(dataset.paths[i]), 16, normaliser)
            np.testing.assert_array_equal(dataset[i][0].numpy(), expected)


def test_class_order_is_natural_and_deterministic(tmp_path: Path) -> None:
    for name in ("class10", "class2", "Class1"):
        save(tmp_path / "ds" / name / "0.png")
    bundle = load_data(str(tmp_path / "ds"), 8, report=False)  # no train/: the root's folders are the classes
    assert bundle.class_names == ["Class1", "class2", "class10"]


def test_undecodable_files_are_counted_named_and_skippable(tmp_path: Path) -> None:
    root = mixed_tree(tmp_path / "ds")
    good = (root / "train" / "cat" / "a.jpg").read_bytes()
    (root / "train" / "cat" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated: verify() misses it
    (root / "train" / "dog" / "part0" / "text.png").write_bytes(b"hello")
    with pytest.raises(DataError, match=r"2 of 29 image files .* do not decode: .*broken\.jpg.*text\.png.*"
                                        r"--skip-bad-images"):
        load_data(str(root), 16, report=False)
    bundle = load_data(str(root), 16, skip_bad_images=True, report=False)
    assert bundle.identity["skipped"] == ["train/cat/broken.jpg", "train/dog/part0/text.png"]
    assert bundle.identity["counts"]["train"] == {"bird": 10, "cat": 8, "dog": 9}


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


@pytest.mark.parametrize("layout,message", [
    ("flat", "flat folder of 3 images without class folders"),
    ("flat-train", "flat folder of 3 images without class folders"),
    ("single", r"single class folder \(cat\)"),
    ("no-images", "holds no images"),
    ("empty-val", "holds no images"),
    ("unknown-val", "class folders that .* lacks: fox"),
    ("val-only", "val/ folder but no train/"),
    ("loose", "2 images lie directly in"),
    ("bad", "1 of 5 image files"),
])
def test_layout_errors_are_one_line_exit_2(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "ds"
    two_classes = {"cat": 2, "dog": 2}
    train = root / "train"
    if layout == "flat":
        for i in range(3):
            save(root / f"{i}.jpg")
    elif layout == "flat-train":
        for i in range(3):
            save(train / f"{i}.png")
    elif layout == "single":
        save(train / "cat" / "0.png")
    elif layout == "no-images":
        (train / "cat").mkdir(parents=True)
        (train / "dog").mkdir()
        (train / "dog" / "labels.csv").write_text("x")
    else:
        for name, count in two_classes.items():
            for i in range(count):
                save(train / name / f"{i}.png")
        if layout == "empty-val":
            (root / "val" / "cat").mkdir(parents=True)
        elif layout == "unknown-val":
            save(root / "val" / "cat" / "0.png")
            save(root / "val" / "fox" / "0.png")
        elif layout == "val-only":
            train.rename(root / "val")
        elif layout == "loose":
            save(train / "stray.png")
            save(train / "stray2.webp")
        elif layout == "bad":
            (train / "dog" / "bad.webp").write_bytes(b"RIFF....WEBP")
    code, stderr = run_cli("train-supernet", "--run", str(tmp_path / "run"), "--space", "digits", "--data",
                           str(root), "--epochs", "1")
    assert code == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ")
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "run").exists()  # nothing written for a refused dataset


def record(tmp_path: Path, root: Path, skip_bad_images: bool = False) -> dict:
    """What train-supernet records in run.json, without training."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.space import get_space
    from glit_deploy.train import prepare_run

    run = RunDir(tmp_path / "run")
    space = get_space("digits")
    prepare_run(run, space, str(root), load_data(str(root), space.image_size, skip_bad_images, report=False),
                resume=False)
    return run.load_meta()["data"]


def test_run_records_the_dataset_absolutely_and_detects_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.chdir(tmp_path)
    root = mixed_tree(tmp_path / "ds")
    data = record(tmp_path, Path("ds"))  # given relative
    assert data["spec"] == str(root.resolve()) and data["given"] == "ds" and data["kind"] == "image-folder"
    assert data["class_names"] == ["bird", "cat", "dog"] and len(data["fingerprint"]) == 32
    assert data["counts"]["train"] == {"bird": 10, "cat": 8, "dog": 9}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # later stages work from any directory
    assert load_recorded_data(data, 8).class_names == ["bird", "cat", "dog"]

    save(root / "train" / "cat" / "new" / "0.png")
    with pytest.raises(DataError, match=r"changed since this run recorded it: train images per class changed: "
                                        r"cat 8 -> 9; restore it, or pass --allow-data-change"):
        load_recorded_data(data, 8)
    assert load_recorded_data(data, 8, allow_change=True).identity["counts"]["train"]["cat"] == 9

    (root / "train" / "cat" / "new" / "0.png").unlink()
    touched = root / "train" / "dog" / "a.jpg"
    os.utime(touched, ns=(1, 1))  # a copy or a restore: new modification times, the same bytes
    assert load_recorded_data(data, 8).identity["fingerprint"] != data["fingerprint"]
    with pytest.raises(DataError, match=r"same classes and counts, but files were replaced or modified .*"
                                        r"this run recorded no digest of their contents"):
        load_recorded_data({k: v for k, v in data.items() if k != "content_sha256"}, 8)  # a record from before
    bitmap = root / "train" / "dog" / "part1" / "deeper" / "f.bmp"  # uncompressed: any pixel byte decodes
    raw = bytearray(bitmap.read_bytes())
    raw[-3] ^= 0xFF  # the same size, one pixel different
    bitmap.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="same classes and counts, but the files' contents changed; restore it"):
        load_recorded_data(data, 8)

    save(root / "train" / "eel" / "0.png")
    with pytest.raises(DataError, match="classes added: eel; the run's models predict the recorded classes"):
        load_recorded_data(data, 8, allow_change=True)


def test_a_run_records_its_dataset_as_accepted_so_later_stages_agree(tmp_path: Path) -> None:
    """load_run_data, which every stage reading a run's data calls: a copy (same bytes) and an allowed
    change are written back to run.json, so that a later stage without --allow-data-change (export's
    int8 calibration, keep_best_model) goes on instead of refusing what the user already accepted."""
    from glit_deploy.rundir import RunDir

    root = mixed_tree(tmp_path / "ds")
    first = record(tmp_path, root)
    run = RunDir(tmp_path / "run")
    os.utime(root / "train" / "cat" / "a.jpg", ns=(1, 1))  # restored from a backup: new mtime, same bytes
    load_run_data(run, 8)
    after_copy = run.load_meta()["data"]
    assert after_copy["fingerprint"] != first["fingerprint"] and after_copy["content_sha256"] == first["content_sha256"]
    assert after_copy["given"] == first["given"]

    save(root / "train" / "cat" / "new" / "0.png")
    with pytest.raises(DataError, match="cat 8 -> 9; restore it, or pass --allow-data-change"):
        load_run_data(run, 8)
    assert run.load_meta()["data"] == after_copy  # a refusal records nothing
    load_run_data(run, 8, allow_change=True, update_record=False)  # not the main process: nothing written
    assert run.load_meta()["data"] == after_copy
    load_run_data(run, 8, allow_change=True)
    assert run.load_meta()["data"]["counts"]["train"]["cat"] == 9
    assert load_run_data(run, 8).identity["counts"]["train"]["cat"] == 9  # the next stage: no flag needed


def test_skipped_files_are_recorded_and_not_decoded_again(tmp_path: Path) -> None:
    root = mixed_tree(tmp_path / "ds")
    (root / "train" / "bird" / "bad.png").write_bytes(b"\x89PNG not really")
    data = record(tmp_path, root, skip_bad_images=True)
    assert data["skip_bad_images"] and data["skipped"] == ["train/bird/bad.png"]
    bundle = load_recorded_data(data, 8)  # the record says to skip: no --skip-bad-images needed again
    assert bundle.identity["skipped"] == ["train/bird/bad.png"] and len(bundle.train) + len(bundle.val) == 27


def test_old_records_with_a_relative_spec_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mixed_tree(tmp_path / "ds")
    old = {"spec": "ds", "name": "ds", "num_classes": 3, "class_names": ["bird", "cat", "dog"], "image_size": 8,
           "train_size": 24, "val_size": 3}
    assert load_recorded_data(old, 8).num_classes == 3
    assert load_recorded_data({"spec": "digits", "class_names": [str(i) for i in range(10)]}, 8).name == "digits"
    with pytest.raises(DataError, match="classes removed: ant"):
        load_recorded_data({**old, "class_names": ["ant", "bird", "cat", "dog"]}, 8)


def test_canonical_specs() -> None:
    assert canonical_spec("digits") == "digits"
    assert canonical_spec("cifar10:rel/dir") == f"cifar10:{Path('rel/dir').resolve()}"
    assert canonical_spec("~/x") == str(Path("~/x").expanduser().resolve())


def test_resume_with_a_changed_dataset_is_refused_by_the_cli(tmp_path: Path) -> None:
    root = mixed_tree(tmp_path / "ds")
    record(tmp_path, root)
    save(root / "train" / "dog" / "more.png")
    code, stderr = run_cli("train-supernet", "--run", str(tmp_path / "run"), "--space", "digits", "--data",
                           str(root), "--epochs", "1", "--resume")
    assert code == 2 and "dog 9 -> 10; restore it, or pass --allow-data-change" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_train_skip_bad_images_then_evaluate_from_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path through the CLI on a tiny tree (one short epoch): train with an undecodable file
    left out, evaluate from another directory, refuse the changed dataset, allow it when asked."""
    import json

    root = mixed_tree(tmp_path / "ds")
    (root / "train" / "dog" / "broken.gif").write_bytes(b"GIF89a")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train-supernet", "--run", "run", "--space", "digits", "--data", "ds",
                                      "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0",
                                      "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert "left out 1 undecodable files (train/dog/broken.gif)" in result.stderr
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["spec"] == str(root.resolve()) and data["skipped"] == ["train/dog/broken.gif"]

    monkeypatch.chdir(tmp_path / "ds")  # any working directory
    evaluate = ["eval-subnet", "--run", str(run), "--arch", "smallest", "--calib-batches", "1", "--json"]
    result = CliRunner().invoke(app, evaluate)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["val_images"] == 3

    save(root / "train" / "bird" / "late" / "0.png")
    code, stderr = run_cli(*evaluate)
    assert code == 2 and "bird 10 -> 11" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    result = CliRunner().invoke(app, [*evaluate, "--allow-data-change"])
    assert result.exit_code == 0 and "allowed by --allow-data-change" in result.stderr, result.output
