"""The run directory: the contract between stages."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.errors import RunError
from glit_deploy.space import SearchSpace


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
