"""The fine-tuned fitness: a short fine-tune of a candidate from its inherited weights (search.fitness)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from glit_deploy.data import make_loader
from glit_deploy.errors import RunError
from glit_deploy.rundir import RunDir
from glit_deploy.search.fitness import FinetuneConfig, finetuned_top1
from glit_deploy.train import evaluate_subnet, load_supernet


def test_finetuned_fitness_starts_at_the_inherited_score_and_leaves_the_supernet_alone(
        trained_digits_run: Path) -> None:
    supernet, bundle = load_supernet(RunDir(trained_digits_run))
    arch = supernet.space.sample(random.Random(3))
    device = torch.device("cpu")
    val = make_loader(bundle.val, 64, shuffle=False)
    cfg = FinetuneConfig(steps=6, batch_size=32, lr=1e-3, warmup_steps=2)
    params = {k: v.clone() for k, v in supernet.named_parameters()}
    torch.manual_seed(123)
    caller_state = torch.random.get_rng_state()

    scores = finetuned_top1(supernet, arch, bundle, cfg, 64, 2, device, val, eval_at=(0, 3, 99))
    assert sorted(scores) == [0, 3, 6]  # a step count past the end is not a checkpoint
    assert torch.equal(torch.random.get_rng_state(), caller_state)  # the caller's random stream is untouched
    assert all(torch.equal(params[k], v) for k, v in supernet.named_parameters())
    # Step 0 is the search's own inherited score: the same BN recalibration, the same validation images.
    assert scores[0] == evaluate_subnet(supernet, arch, bundle, 64, 2, device, val_loader=val)
    # Every candidate sees the same batches in the same order: the score is a function of the arch.
    assert finetuned_top1(supernet, arch, bundle, cfg, 64, 2, device, val, eval_at=(0, 3)) == scores
    with pytest.raises(RunError, match="at least one step"):
        FinetuneConfig(steps=0)
    with pytest.raises(RunError, match="larger than the training split"):
        finetuned_top1(supernet, arch, bundle, FinetuneConfig(steps=1, batch_size=10 ** 6), 64, 2, device, val)
