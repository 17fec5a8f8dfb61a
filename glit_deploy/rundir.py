"""The run directory: the contract between stages, and atomic file writes."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glit_deploy.errors import RunError
from glit_deploy.space import SearchSpace


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it into place.

    A process killed at any moment leaves either the old file or the new one, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def versions() -> dict[str, str]:
    import numpy
    import timm
    import torch

    from glit_deploy import __version__

    return {
        "glit_deploy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
    }


class RunDir:
    """`runs/NAME/`: run.json plus one folder per stage."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def supernet(self) -> Path:
        return self.path / "supernet"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def load_meta(self) -> dict[str, Any]:
        if not self.meta_path.exists():
            raise RunError(f"{self.path} is not a run directory (no run.json); train a supernet there first")
        try:
            return json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{self.meta_path} is corrupt: {exc.msg}") from None

    def save_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.meta_path, meta)

    def update_meta(self, **fields: Any) -> dict[str, Any]:
        meta = self.load_meta() if self.exists() else {}
        meta.update(fields)
        self.save_meta(meta)
        return meta

    def record_command(self, command: str, options: dict[str, Any]) -> None:
        """Append this invocation (argv, options, versions) to run.json's history."""
        meta = self.load_meta() if self.exists() else {}
        meta.setdefault("commands", []).append({
            "command": command,
            "argv": sys.argv,
            "options": options,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
        })
        self.save_meta(meta)

    def space(self) -> SearchSpace:
        meta = self.load_meta()
        if "space" not in meta:
            raise RunError(f"{self.meta_path} records no search space")
        return SearchSpace.from_dict(meta["space"])
