"""Resolve the architecture a user names on the command line."""

from __future__ import annotations

import random
from pathlib import Path

from glit_deploy.errors import ArchError
from glit_deploy.space import NAMED_ARCHS, Arch, SearchSpace


def resolve_arch(spec: str, space: SearchSpace) -> Arch:
    """`largest`, `smallest`, `random:SEED`, a named arch (e.g. glit-tiny-paper) or a JSON file."""
    if spec in ("largest", "smallest"):
        from glit_deploy.nn.counting import extreme_arch

        return extreme_arch(space, spec == "largest")
    if spec.startswith("random:"):
        try:
            seed = int(spec.split(":", 1)[1])
        except ValueError:
            raise ArchError(f"'{spec}': expected random:SEED with an integer seed") from None
        return space.sample(random.Random(seed))
    if spec in NAMED_ARCHS:
        space_name, arch = NAMED_ARCHS[spec]
        return space.validate(arch, source=f"{spec} (an arch of space '{space_name}')")
    path = Path(spec)
    if not path.exists():
        raise ArchError(f"arch '{spec}' is neither a file nor one of: largest, smallest, random:SEED, "
                        f"{', '.join(NAMED_ARCHS)}")
    return space.validate(Arch.load(path), source=str(path))
