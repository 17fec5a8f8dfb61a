"""The GLiT search space and the architectures (gene sets) it contains.

A block's level-1 gene is its number of global heads G (the remaining H - G heads are local).
Its level-2 genes are e_v (global value expansion), e_c (locality expansion), the depthwise
kernel size and the FFN ratio. A gene that the split makes irrelevant is absent (None):
G = 0 has no e_v, G = H has no e_c and no kernel.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from glit_deploy.errors import ArchError, SpaceError

Level = Literal["split", "details", "all"]


def scaled_kernel_sizes(grid: int, rows: Sequence[float] = (1.2, 2.2, 3.2)) -> tuple[int, ...]:
    """Depthwise kernel choices that span about 1.2, 2.2 and 3.2 token-grid rows (odd sizes).

    At 224 px / patch 16 (a 14-wide grid) this gives the paper's 17, 31 and 45.
    """
    sizes = []
    for r in rows:
        k = 2 * round((r * grid - 1) / 2) + 1
        sizes.append(max(3, k))
    return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class BlockGenes:
    """The genes of one block. Genes that the split makes irrelevant are None."""

    global_heads: int
    mlp_ratio: int
    e_v: float | None = None
    e_c: int | None = None
    kernel: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self, num_heads: int) -> str:
        parts = [f"{self.global_heads}/{num_heads - self.global_heads}"]
        if self.e_v is not None:
            parts.append(f"ev{self.e_v:g}")
        if self.kernel is not None:
            parts.append(f"k{self.kernel}")
        if self.e_c is not None:
            parts.append(f"ec{self.e_c}")
        parts.append(f"r{self.mlp_ratio}")
        return " ".join(parts)


_BLOCK_KEYS = {f.name for f in fields(BlockGenes)}


@dataclass(frozen=True)
class Arch:
    """One gene set per block. Immutable and hashable; `digest` is stable across runs."""

    blocks: tuple[BlockGenes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def split(self) -> tuple[int, ...]:
        return tuple(b.global_heads for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [b.to_dict() for b in self.blocks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def describe(self, num_heads: int) -> str:
        return " | ".join(f"{i}: {b.describe(num_heads)}" for i, b in enumerate(self.blocks))

    def gene_distance(self, other: Arch) -> int:
        """How many genes differ between two archs of one depth, block by block (a gene the split makes
        irrelevant in a block counts as a value of its own)."""
        if other.depth != self.depth:
            raise ValueError(f"archs of depth {self.depth} and {other.depth} have no gene distance")
        return sum(getattr(a, f.name) != getattr(b, f.name)
                   for a, b in zip(self.blocks, other.blocks, strict=True) for f in fields(BlockGenes))

    @classmethod
    def from_dict(cls, data: Any, source: str = "arch") -> Arch:
        if not isinstance(data, dict) or not isinstance(data.get("blocks"), list):
            raise ArchError(f"{source}: expected an object with a 'blocks' list")
        blocks = []
        for i, raw in enumerate(data["blocks"]):
            if not isinstance(raw, dict):
                raise ArchError(f"{source}: block {i} must be an object, got {type(raw).__name__}")
            unknown = sorted(set(raw) - _BLOCK_KEYS)
            if unknown:
                raise ArchError(
                    f"{source}: block {i} has unknown field(s) {', '.join(unknown)} "
                    f"(fields: {', '.join(sorted(_BLOCK_KEYS))})"
                )
            for key in ("global_heads", "mlp_ratio"):
                if key not in raw:
                    raise ArchError(f"{source}: block {i} is missing '{key}'")
            for key, value in raw.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                    raise ArchError(f"{source}: block {i} field '{key}' must be a number, got {value!r}")
            try:
                blocks.append(
                    BlockGenes(
                        global_heads=_as_int(raw["global_heads"], i, "global_heads", source),
                        mlp_ratio=_as_int(raw["mlp_ratio"], i, "mlp_ratio", source),
                        e_v=None if raw.get("e_v") is None else float(raw["e_v"]),
                        e_c=None if raw.get("e_c") is None else _as_int(raw["e_c"], i, "e_c", source),
                        kernel=None if raw.get("kernel") is None else _as_int(raw["kernel"], i, "kernel", source),
                    )
                )
            except (TypeError, ValueError) as exc:  # pragma: no cover - guarded above
                raise ArchError(f"{source}: block {i}: {exc}") from None
        if not blocks:
            raise ArchError(f"{source}: 'blocks' is empty")
        return cls(tuple(blocks))

    @classmethod
    def from_json(cls, text: str, source: str = "arch") -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArchError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        # Files written by the search carry the arch under "arch" next to its scores.
        if isinstance(data, dict) and "blocks" not in data and isinstance(data.get("arch"), dict):
            data = data["arch"]
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Arch:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ArchError(f"arch file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ArchError(f"arch file {path} cannot be read: {exc}") from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path, **extra: Any) -> None:
        from glit_deploy.atomic_io import atomic_write_text

        payload = {**extra, **self.to_dict()}
        atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def _as_int(value: Any, block: int, key: str, source: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ArchError(f"{source}: block {block} field '{key}' must be an integer, got {value}")
    return int(value)


@dataclass(frozen=True)
class SearchSpace:
    """Model dimensions and the gene choices of every block."""

    name: str
    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    kernel_sizes: tuple[int, ...]
    e_v: tuple[float, ...] = (0.5, 1.0, 2.0)
    e_c: tuple[int, ...] = (1, 2, 4)
    mlp_ratios: tuple[int, ...] = (2, 4, 6)
    global_heads: tuple[int, ...] = field(default=())
    in_chans: int = 3

    def __post_init__(self) -> None:
        if not self.global_heads:
            object.__setattr__(self, "global_heads", tuple(range(self.num_heads + 1)))
        for name in ("kernel_sizes", "e_v", "e_c", "mlp_ratios", "global_heads"):
            values = tuple(sorted(getattr(self, name)))
            if not values:
                raise SpaceError(f"space {self.name}: '{name}' has no choices")
            object.__setattr__(self, name, values)
        if self.image_size % self.patch_size:
            raise SpaceError(f"space {self.name}: image_size {self.image_size} is not a multiple of patch_size")
        if self.embed_dim % self.num_heads:
            raise SpaceError(f"space {self.name}: {self.num_heads} heads do not divide embed_dim {self.embed_dim}")
        for ev in self.e_v:
            if not (ev * self.head_dim).is_integer():
                raise SpaceError(f"space {self.name}: e_v {ev} gives a fractional head width")
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise SpaceError(f"space {self.name}: kernel sizes must be odd, got {self.kernel_sizes}")
        if any(g < 0 or g > self.num_heads for g in self.global_heads):
            raise SpaceError(f"space {self.name}: global_heads must lie in 0..{self.num_heads}")

    # geometry -----------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def global_dim(self, global_heads: int) -> int:
        return self.head_dim * global_heads

    # serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        try:
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
            return cls(**kwargs)
        except TypeError as exc:
            raise SpaceError(f"malformed search space: {exc}") from None

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    # genes --------------------------------------------------------------------------------
    def middle(self, choices: Sequence[Any]) -> Any:
        return choices[(len(choices) - 1) // 2]

    def make_block(
        self,
        global_heads: int,
        mlp_ratio: int,
        e_v: float | None = None,
        e_c: int | None = None,
        kernel: int | None = None,
    ) -> BlockGenes:
        """A block with the genes its split needs; missing relevant genes take middle values."""
        has_global = global_heads > 0
        has_local = global_heads < self.num_heads
        return BlockGenes(
            global_heads=global_heads,
            mlp_ratio=mlp_ratio,
            e_v=(e_v if e_v is not None else self.middle(self.e_v)) if has_global else None,
            e_c=(e_c if e_c is not None else self.middle(self.e_c)) if has_local else None,
            kernel=(kernel if kernel is not None else self.middle(self.kernel_sizes)) if has_local else None,
        )

    def block_choices(self, global_heads: int | None = None) -> list[BlockGenes]:
        """Every distinct block configuration (optionally for one split)."""
        out = []
        splits = self.global_heads if global_heads is None else (global_heads,)
        for g in splits:
            evs = self.e_v if g > 0 else (None,)
            local = g < self.num_heads
            ecs = self.e_c if local else (None,)
            ks = self.kernel_sizes if local else (None,)
            for ev, ec, k, r in itertools.product(evs, ecs, ks, self.mlp_ratios):
                out.append(BlockGenes(global_heads=g, mlp_ratio=r, e_v=ev, e_c=ec, kernel=k))
        return out

    @property
    def size(self) -> int:
        """Number of distinct architectures."""
        return len(self.block_choices()) ** self.depth

    def validate(self, arch: Arch, source: str = "arch") -> Arch:
        """Raise ArchError naming the block, the field and the allowed values."""
        if arch.depth != self.depth:
            raise ArchError(f"{source}: has {arch.depth} blocks but space '{self.name}' has depth {self.depth}")

        def check(i: int, key: str, value: Any, allowed: Sequence[Any]) -> None:
            if value not in allowed:
                shown = ", ".join(f"{a:g}" if isinstance(a, float) else str(a) for a in allowed)
                raise ArchError(
                    f"{source}: block {i}: {key}={value!r} is not allowed in space '{self.name}' (choices: {shown})"
                )

        for i, b in enumerate(arch.blocks):
            check(i, "global_heads", b.global_heads, self.global_heads)
            check(i, "mlp_ratio", b.mlp_ratio, self.mlp_ratios)
            if b.global_heads > 0:
                if b.e_v is None:
                    raise ArchError(f"{source}: block {i}: has {b.global_heads} global heads but no e_v")
                check(i, "e_v", b.e_v, self.e_v)
            elif b.e_v is not None:
                raise ArchError(f"{source}: block {i}: e_v is given but the block has no global heads")
            if b.global_heads < self.num_heads:
                if b.e_c is None or b.kernel is None:
                    raise ArchError(f"{source}: block {i}: has local heads but no e_c/kernel")
                check(i, "e_c", b.e_c, self.e_c)
                check(i, "kernel", b.kernel, self.kernel_sizes)
            elif b.e_c is not None or b.kernel is not None:
                raise ArchError(f"{source}: block {i}: e_c/kernel are given but all heads are global")
        return arch

    # sampling and evolution ------------------------------------------------------------------
    def sample_block(self, rng: random.Random, global_heads: int | None = None) -> BlockGenes:
        g = rng.choice(self.global_heads) if global_heads is None else global_heads
        return self.make_block(
            g,
            mlp_ratio=rng.choice(self.mlp_ratios),
            e_v=rng.choice(self.e_v),
            e_c=rng.choice(self.e_c),
            kernel=rng.choice(self.kernel_sizes),
        )

    def sample(self, rng: random.Random, split: Sequence[int] | None = None) -> Arch:
        """Uniform over every gene; with `split`, the global heads of each block are fixed."""
        if split is None:
            return Arch(tuple(self.sample_block(rng) for _ in range(self.depth)))
        return Arch(tuple(self.sample_block(rng, g) for g in split))

    def with_split(self, split: Sequence[int]) -> Arch:
        """Level-1 candidate: the given split with every detail gene at its middle value."""
        if len(split) != self.depth:
            raise ArchError(f"split has {len(split)} blocks, space '{self.name}' has {self.depth}")
        return Arch(tuple(self.make_block(g, self.middle(self.mlp_ratios)) for g in split))

    def mutate(self, arch: Arch, rng: random.Random, prob: float, level: Level = "all") -> Arch:
        """Resample each gene with probability `prob`; `level` limits which genes may change."""
        blocks = []
        for b in arch.blocks:
            g = b.global_heads
            if level in ("split", "all") and rng.random() < prob:
                g = rng.choice(self.global_heads)
            if level == "split":
                blocks.append(self.make_block(g, self.middle(self.mlp_ratios)))
                continue
            new = {}
            for key, choices in (("e_v", self.e_v), ("e_c", self.e_c), ("kernel", self.kernel_sizes),
                                 ("mlp_ratio", self.mlp_ratios)):
                current = getattr(b, key)
                if current is None or rng.random() < prob:
                    current = rng.choice(choices)
                new[key] = current
            blocks.append(self.make_block(g, **new))
        return Arch(tuple(blocks))

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Uniform crossover block by block (a block's genes travel together)."""
        return Arch(tuple(x if rng.random() < 0.5 else y for x, y in zip(a.blocks, b.blocks, strict=True)))

    def with_block(self, arch: Arch, index: int, block: BlockGenes) -> Arch:
        blocks = list(arch.blocks)
        blocks[index] = block
        return replace(arch, blocks=tuple(blocks))

    def all_splits(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(self.global_heads, repeat=self.depth)


# presets -------------------------------------------------------------------------------------

def _paper_space(name: str, embed_dim: int, num_heads: int) -> SearchSpace:
    return SearchSpace(name=name, image_size=224, patch_size=16, embed_dim=embed_dim, depth=12,
                       num_heads=num_heads, kernel_sizes=(17, 31, 45),
                       global_heads=tuple(range(num_heads + 1)))


def _presets() -> dict[str, SearchSpace]:
    return {
        "glit-tiny": _paper_space("glit-tiny", 192, 3),
        "glit-small": _paper_space("glit-small", 384, 6),
        "glit-base": _paper_space("glit-base", 768, 12),
        # 32 px / patch 4: an 8x8 grid (65 tokens); width 96 and 6 blocks keep a supernet epoch
        # over 45,000 CIFAR-10 images within a few minutes on two CPU cores.
        "cifar": SearchSpace(name="cifar", image_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                             kernel_sizes=scaled_kernel_sizes(8)),
        # 8 px digits / patch 2: a 4x4 grid (17 tokens); the fast built-in default.
        "digits": SearchSpace(name="digits", image_size=8, patch_size=2, embed_dim=48, depth=4, num_heads=3,
                              kernel_sizes=scaled_kernel_sizes(4)),
    }


PRESETS: dict[str, SearchSpace] = _presets()


def get_space(name: str) -> SearchSpace:
    try:
        return PRESETS[name]
    except KeyError:
        raise SpaceError(f"unknown search space '{name}' (presets: {', '.join(PRESETS)})") from None


# The released GLiT-Tiny, block by block: (global heads, e_v, e_c, kernel, mlp_ratio).
_GLIT_TINY_PAPER = [
    (3, 0.5, None, None, 4), (0, None, 2, 31, 4), (1, 1.0, 4, 31, 6), (3, 1.0, None, None, 4),
    (0, None, 4, 45, 4), (1, 1.0, 4, 31, 6), (3, 1.0, None, None, 2), (1, 1.0, 4, 31, 2),
    (0, None, 4, 45, 4), (3, 1.0, None, None, 4), (0, None, 4, 31, 4), (3, 2.0, None, None, 6),
]

NAMED_ARCHS: dict[str, tuple[str, Arch]] = {
    "glit-tiny-paper": (
        "glit-tiny",
        Arch(tuple(BlockGenes(global_heads=g, e_v=ev, e_c=ec, kernel=k, mlp_ratio=r)
                   for g, ev, ec, k, r in _GLIT_TINY_PAPER)),
    ),
}


def named_arch(name: str) -> Arch:
    try:
        return NAMED_ARCHS[name][1]
    except KeyError:
        raise ArchError(f"unknown named architecture '{name}' (known: {', '.join(NAMED_ARCHS)})") from None
