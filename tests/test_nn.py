from __future__ import annotations

import random

import pytest
import timm
import torch

import glit_deploy.nn  # noqa: F401  (registers the timm models)
from glit_deploy.nn import Supernet, arch_cost, count_macs, count_params, extreme_arch, recalibrate_bn
from glit_deploy.nn.model import GLiT
from glit_deploy.space import PRESETS, get_space, named_arch


def test_timm_glit_tiny_matches_the_paper() -> None:
    model = timm.create_model("glit_tiny_patch16_224")
    assert count_params(model) == 7_264_456
    macs = count_macs(model, (1, 3, 224, 224))
    assert 1.46e9 < macs < 1.48e9  # the paper's 1.33 G forgets the GLU doubling
    assert arch_cost(get_space("glit-tiny"), named_arch("glit-tiny-paper"), 1000).macs == macs
    assert timm.create_model("glit_tiny_patch16_224", num_classes=10).head.out_features == 10
    with pytest.raises(Exception, match="no pretrained"):
        timm.create_model("glit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_supernet_and_extracted_model_agree(preset: str) -> None:
    """20 random archs per preset: eval outputs equal to 1e-5 after BN recalibration."""
    torch.manual_seed(0)
    space = get_space(preset)
    net = Supernet(space, num_classes=10)
    rng = random.Random(1)
    batch = 4 if space.image_size <= 32 else 1
    x = torch.randn(batch, 3, space.image_size, space.image_size)
    calib = [torch.randn(batch * 2, 3, space.image_size, space.image_size)]
    worst = 0.0
    for _ in range(20):
        arch = space.sample(rng)
        recalibrate_bn(net, calib, lambda t, a=arch: net(t, a))
        model = net.extract(arch).eval()
        assert not net.training and count_params(model) == arch_cost(space, arch, 10).params
        with torch.no_grad():
            worst = max(worst, (net(x, arch) - model(x)).abs().max().item())
    assert worst < 1e-5


def test_training_mode_outputs_and_gradients_agree() -> None:
    torch.manual_seed(0)
    space = get_space("cifar")
    net = Supernet(space, num_classes=10).train()
    arch = space.sample(random.Random(5))
    model = net.extract(arch).train()
    x = torch.randn(8, 3, 32, 32)
    y_net, y_model = net(x, arch), model(x)
    assert (y_net - y_model).abs().max() < 1e-5
    y_net.square().sum().backward()
    y_model.square().sum().backward()
    # The supernet's gradient of a sliced weight lands in that slice and nowhere else.
    block = next(i for i, b in enumerate(arch.blocks) if b.global_heads < space.num_heads)
    grad = net.blocks[block].fc1_w.grad
    hidden = arch.blocks[block].mlp_ratio * space.embed_dim
    assert torch.allclose(grad[:hidden], model.blocks[block].mlp.fc1.weight.grad, atol=1e-5)
    assert grad[hidden:].abs().sum() == 0


def test_recalibration_updates_sliced_statistics() -> None:
    space = get_space("digits")
    net = Supernet(space, num_classes=10)
    arch = extreme_arch(space, largest=True)  # all-local: every block has a BatchNorm
    calib = [torch.randn(16, 3, 8, 8) * 3 + 1 for _ in range(3)]
    used = recalibrate_bn(net, calib, lambda t: net(t, arch))
    assert used == 3 and not net.training
    bn = net.blocks[0].bn
    assert int(bn.num_batches_tracked) == 3
    inner = arch.blocks[0].e_c * space.embed_dim
    assert not torch.allclose(bn.running_var[:inner], torch.ones(inner))
    # Statistics equal those of the extracted model recalibrated on the same batches.
    model = net.extract(arch)
    recalibrate_bn(model, calib)
    assert torch.allclose(model.blocks[0].mixer.local.bn.running_mean, bn.running_mean[:inner], atol=1e-6)


@pytest.mark.parametrize("preset", ["digits", "cifar"])
def test_extreme_archs_bound_the_space(preset: str) -> None:
    space = get_space(preset)
    largest, smallest = extreme_arch(space, True), extreme_arch(space, False)
    lo, hi = arch_cost(space, smallest, 10).macs, arch_cost(space, largest, 10).macs
    rng = random.Random(0)
    for _ in range(50):
        macs = arch_cost(space, space.sample(rng), 10).macs
        assert lo <= macs <= hi


def test_counting_matches_a_real_forward() -> None:
    space = get_space("cifar")
    arch = space.sample(random.Random(2))
    model = GLiT(arch, space, num_classes=10)
    assert count_macs(model, (1, 3, 32, 32)) == arch_cost(space, arch, 10).macs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert next(model.parameters()).device.type == "cpu"  # counting left the model where it was
