"""Serving a preference: folded lean networks, export, `dymu show`, `dymu predict`, and their errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dymu.anchor import AnchorNet, batchnorm_names
from dymu.backbones import ConvEncoderDecoder, DeepLabMobileNetV2, DeepLabResNet34, MLPBackbone, ResNet9
from dymu.deploy import LeanNet, count_batchnorms, fold_batchnorms
from dymu.search_space import Architecture
from dymu.tasks import make_task

DENSE_TASKS = [make_task("semseg", out_channels=4), make_task("depth"), make_task("normals")]


def randomize_batchnorm(net, seed=0):
    """Non-trivial running statistics and affine parameters in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return net


def random_deltas(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(c, generator=gen) * 0.3, torch.randn(c, generator=gen) * 0.3)
            for name, c in batchnorm_names(net).items()}


def assert_folded_equals_dynamic(net, x, archs, deltas=None, tol=1e-5):
    """Folded lean net = the dynamic anchor (eval mode), no BatchNorm or buffer left, the expected size."""
    for arch in archs:
        with torch.no_grad():
            dynamic = net(x, architecture=arch, bn_deltas=deltas)
            specialized = net.specialize(arch, deltas).eval()
            lean = LeanNet.create(specialized, fold_bn=True)
            folded = lean(x)
        assert count_batchnorms(lean) == 0, "a BatchNorm was left unfolded"
        assert set(folded) == set(net.task_names)
        for name in net.task_names:  # to tol of the output's scale (deep random nets reach |y| ~ 1e3)
            scale = max(1.0, float(dynamic[name].abs().max()))
            torch.testing.assert_close(folded[name], dynamic[name], atol=tol * scale, rtol=0)
        bn_features = sum(m.num_features for m in specialized.modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm))
        # every BN's gamma and beta go, one bias per channel comes (the convs before them have none)
        assert sum(p.numel() for p in lean.parameters()) == sum(p.numel() for p in specialized.parameters()) - \
            bn_features
        assert not list(lean.buffers())


@pytest.mark.parametrize("with_deltas", [False, True])
def test_folding_equals_the_dynamic_model_on_the_quickstart_backbone(with_deltas):
    torch.manual_seed(0)
    net = randomize_batchnorm(AnchorNet(ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8),
                                        DENSE_TASKS)).eval()
    gen = torch.Generator().manual_seed(3)
    archs = [Architecture.anchor(3, 3), Architecture.shared(3, 3)] + [Architecture.random(3, 3, generator=gen)
                                                                       for _ in range(4)]
    assert_folded_equals_dynamic(net, torch.randn(2, 3, 16, 16), archs, random_deltas(net) if with_deltas else None)


def test_folding_equals_the_dynamic_model_on_the_mlp_backbone():
    torch.manual_seed(0)
    tasks = [make_task("regression", name=f"t{i}", out_channels=2) for i in range(3)]
    net = randomize_batchnorm(AnchorNet(MLPBackbone(input_dim=5, hidden=7, num_layers=3), tasks)).eval()
    gen = torch.Generator().manual_seed(5)
    archs = [Architecture.random(3, 3, generator=gen) for _ in range(4)]
    assert_folded_equals_dynamic(net, torch.randn(4, 5), archs, random_deltas(net))


@pytest.mark.parametrize("backbone, shape", [
    (DeepLabMobileNetV2(aspp_channels=32), (2, 3, 48, 48)),
    (DeepLabResNet34(aspp_channels=32, aspp_rates=(2,)), (2, 3, 48, 48)),
    (ResNet9(width=0.25), (2, 3, 32, 32)),
])
def test_folding_equals_the_dynamic_model_on_the_paper_networks(backbone, shape):
    torch.manual_seed(0)
    dense = not isinstance(backbone, ResNet9)
    tasks = ([make_task("semseg", out_channels=5), make_task("depth")] if dense else
             [make_task("classification", name=f"c{i}", out_channels=5) for i in range(2)])
    net = randomize_batchnorm(AnchorNet(backbone, tasks)).eval()
    gen = torch.Generator().manual_seed(4)
    arch = Architecture.random(2, net.n_layers, generator=gen)
    assert_folded_equals_dynamic(net, torch.randn(*shape), [arch], random_deltas(net))


def test_fold_batchnorms_leaves_batch_statistics_and_unpaired_batchnorms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    randomize_batchnorm(net[3:])
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        assert fold_batchnorms(net) == 1  # only the last conv-BN pair
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert [type(m).__name__ for m in net] == ["Conv2d", "BatchNorm2d", "ReLU", "BatchNorm2d", "Conv2d", "Identity"]
