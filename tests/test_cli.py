"""Errors a user can cause end in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import glit


def _fails_cleanly(*args: str, match: str) -> str:
    proc = glit(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert match in proc.stderr, proc.stderr
    return proc.stderr


def test_space_show_and_sample(tmp_path: Path) -> None:
    info = json.loads(glit("space", "show", "glit-tiny", "--json").stdout)
    assert info["block_configs"] == 198 and info["level1_splits"] == 4 ** 12
    assert info["params"][0] < 7_264_456 < info["params"][1]
    assert info["macs"][0] < 1.473e9 < info["macs"][1]
    assert "multiply-adds" in glit("space", "show", "cifar").stdout
    glit("space", "sample", "digits", "-o", str(tmp_path / "a.json"), "--seed", "4")
    assert len(json.loads((tmp_path / "a.json").read_text())["blocks"]) == 4


def test_unknown_preset() -> None:
    _fails_cleanly("space", "show", "glit-huge", match="unknown search space 'glit-huge'")
    _fails_cleanly("train-supernet", "--run", "unused", "--space", "nope", match="unknown search space")
    _fails_cleanly("train-supernet", "--run", "unused", "--no-distill", match="it needs --sandwich")


def test_missing_dataset(tmp_path: Path) -> None:
    _fails_cleanly("train-supernet", "--run", str(tmp_path / "r"), "--data", str(tmp_path / "nothing"),
                   match="not found")
    _fails_cleanly("train-supernet", "--run", str(tmp_path / "r"), "--space", "cifar",
                   "--data", f"cifar10:{tmp_path}", match="no train_*.npz")


def test_bad_arch_files(run_copy: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    _fails_cleanly("eval-subnet", "--run", str(run_copy), "--arch", str(broken), match="not valid JSON")
    wrong = tmp_path / "wrong.json"
    blocks = [{"global_heads": 1, "e_v": 1, "e_c": 2, "kernel": 31, "mlp_ratio": 4}] * 4
    wrong.write_text(json.dumps({"blocks": blocks}))
    _fails_cleanly("eval-subnet", "--run", str(run_copy), "--arch", str(wrong),
                   match="block 0: kernel=31 is not allowed in space 'digits' (choices: 5, 9, 13)")
    _fails_cleanly("eval-subnet", "--run", str(run_copy), "--arch", "glit-tiny-paper", match="depth 4")
    _fails_cleanly("eval-subnet", "--run", str(run_copy), "--arch", str(tmp_path / "none.json"),
                   match="neither a file")


def test_corrupt_checkpoint(run_copy: Path) -> None:
    pointer = json.loads((run_copy / "supernet" / "latest.json").read_text())
    weights = run_copy / "supernet" / pointer["dir"] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _fails_cleanly("eval-subnet", "--run", str(run_copy), "--arch", "largest", match="corrupt")
    weights.write_bytes(b"\x00" * 64)
    _fails_cleanly("eval-subnet", "--run", str(run_copy), "--arch", "largest", match="corrupt")


def test_corrupt_training_state_refuses_resume(run_copy: Path) -> None:
    pointer = json.loads((run_copy / "supernet" / "latest.json").read_text())
    (run_copy / "supernet" / pointer["dir"] / "state.pt").write_bytes(b"garbage")
    _fails_cleanly("train-supernet", "--run", str(run_copy), "--epochs", "21", "--resume", match="corrupt")


def test_not_a_run_directory(tmp_path: Path) -> None:
    _fails_cleanly("eval-subnet", "--run", str(tmp_path), "--arch", "largest", match="not a run directory")


@pytest.mark.parametrize("arch", ["random:3", "smallest"])
def test_eval_subnet_table(run_copy: Path, arch: str) -> None:
    proc = glit("eval-subnet", "--run", str(run_copy), "--arch", arch)
    assert "val top-1" in proc.stdout and "multiply-adds" in proc.stdout
