from __future__ import annotations

import itertools
import json
import random

import pytest

from glit_deploy.errors import ArchError, SpaceError
from glit_deploy.space import PRESETS, Arch, BlockGenes, get_space, named_arch, scaled_kernel_sizes


def test_presets_and_kernel_scaling() -> None:
    assert set(PRESETS) == {"glit-tiny", "glit-small", "glit-base", "cifar", "digits"}
    assert get_space("glit-tiny").kernel_sizes == (17, 31, 45)  # the paper's, at a 14-wide grid
    assert scaled_kernel_sizes(14) == (17, 31, 45)
    assert get_space("cifar").kernel_sizes == (9, 17, 25)
    assert get_space("digits").kernel_sizes == (5, 9, 13)
    assert get_space("glit-small").num_heads == 6 and get_space("glit-small").global_heads == tuple(range(7))
    assert get_space("glit-base").embed_dim == 768
    for space in PRESETS.values():
        assert space.size == len(space.block_choices()) ** space.depth


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(SpaceError, match=r"unknown search space 'tiny'.*glit-tiny"):
        get_space("tiny")


def test_block_choices_leave_out_irrelevant_genes() -> None:
    space = get_space("digits")
    choices = space.block_choices()
    assert len(choices) == len(set(choices)) == 198  # 27 local + 9 global + 2 * 81 mixed
    assert all(b.e_v is None for b in choices if b.global_heads == 0)
    assert all(b.e_c is None and b.kernel is None for b in choices if b.global_heads == 3)


def test_arch_json_round_trip_and_stable_digest(tmp_path) -> None:
    arch = named_arch("glit-tiny-paper")
    assert Arch.from_json(arch.to_json()) == arch
    path = tmp_path / "a.json"
    arch.save(path, space="glit-tiny")
    assert Arch.load(path) == arch
    assert json.loads(path.read_text())["space"] == "glit-tiny"
    # The digest is a pure function of the genes: fixed across processes and versions.
    assert arch.digest == Arch.from_dict(json.loads(arch.to_json())).digest
    assert arch.digest == "c933ce150f729ffb"
    assert hash(arch) == hash(Arch.from_json(arch.to_json()))


def test_validation_names_block_field_and_choices() -> None:
    space = get_space("glit-tiny")
    arch = named_arch("glit-tiny-paper")
    space.validate(arch)
    bad = space.with_block(arch, 4, BlockGenes(global_heads=0, mlp_ratio=4, e_c=3, kernel=31))
    with pytest.raises(ArchError, match=r"block 4: e_c=3 is not allowed .*choices: 1, 2, 4"):
        space.validate(bad)
    bad = space.with_block(arch, 2, BlockGenes(global_heads=1, mlp_ratio=4, e_v=1.0, e_c=2, kernel=30))
    with pytest.raises(ArchError, match=r"block 2: kernel=30 .*choices: 17, 31, 45"):
        space.validate(bad)
    bad = space.with_block(arch, 0, BlockGenes(global_heads=3, mlp_ratio=4, e_v=1.0, e_c=2, kernel=31))
    with pytest.raises(ArchError, match="block 0: e_c/kernel are given but all heads are global"):
        space.validate(bad)
    with pytest.raises(ArchError, match="has 12 blocks but space 'digits' has depth 4"):
        get_space("digits").validate(arch)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ('{"blocks": "x"}', "'blocks' list"),
    ('{"blocks": [{"global_heads": 1}]}', "block 0 is missing 'mlp_ratio'"),
    ('{"blocks": [{"global_heads": 1, "mlp_ratio": 4, "ev": 1}]}', "unknown field"),
    ('{"blocks": [{"global_heads": "1", "mlp_ratio": 4}]}', "must be a number"),
    ('{"blocks": [{"global_heads": 1.5, "mlp_ratio": 4}]}', "must be an integer"),
    ('{"blocks": []}', "empty"),
])
def test_malformed_arch_json(text: str, message: str) -> None:
    with pytest.raises(ArchError, match=message):
        Arch.from_json(text)


def test_missing_arch_file(tmp_path) -> None:
    with pytest.raises(ArchError, match="does not exist"):
        Arch.load(tmp_path / "nope.json")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sampling_mutation_crossover_stay_in_space(preset: str) -> None:
    space = get_space(preset)
    rng = random.Random(7)
    archs = [space.sample(rng) for _ in range(30)]
    assert len({a.digest for a in archs}) == 30
    for a, b in itertools.pairwise(archs):
        space.validate(space.mutate(a, rng, 0.3))
        space.validate(space.crossover(a, b, rng))
        child = space.mutate(a, rng, 1.0, level="details")
        space.validate(child)
        assert child.split == a.split
        split_child = space.mutate(space.with_split(a.split), rng, 0.5, level="split")
        space.validate(split_child)
        assert split_child == space.with_split(split_child.split)  # details stay at middle values
        crossed = space.crossover(a, b, rng)
        assert all(blk in (x, y) for blk, x, y in zip(crossed.blocks, a.blocks, b.blocks, strict=True))


def test_sampling_is_uniform_over_the_split() -> None:
    space = get_space("digits")
    rng = random.Random(0)
    counts = [0] * (space.num_heads + 1)
    for _ in range(2000):
        for g in space.sample(rng).split:
            counts[g] += 1
    assert min(counts) > 0.9 * 2000 and max(counts) < 1.1 * 2000  # 8000 draws over 4 values
    assert space.sample(random.Random(3)) == space.sample(random.Random(3))
