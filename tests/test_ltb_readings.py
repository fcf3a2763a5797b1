"""Learning to Branch's synthetic experiment, read several ways: the data's readings (noise as variance or
standard deviation, phi, the distribution of Z), its network (bias-only task layers, K child nodes per block)."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.datasets.synthetic import RegressionTasks, stream_generator
from datamodules.synthetic import SyntheticRegressionDataModule
from dymu.backbones import MLPBackbone
from dymu.baselines.ltb import LearnToBranchNet
from dymu.tasks import make_task


def family(**kwargs) -> RegressionTasks:
    options = {"activations": ["bent", "square"], "tasks_per_group": 2, "input_dim": 12, "output_dim": 3,
               "num_train": 50, "seed": 0}
    return RegressionTasks(**{**options, **kwargs})


def test_the_default_reading_is_the_variance_one_drawn_as_before():
    tasks = family()
    g = stream_generator(0, "parameters")
    base = math.sqrt(10.0) * torch.randn(3, 12, generator=g)
    first = base + math.sqrt(2.0) * torch.randn(3, 12, generator=g)
    assert torch.equal(tasks._mixing[0][0], first)
    assert tasks.phi == pytest.approx(math.sqrt(36))


def test_the_std_reading_scales_the_same_draws():
    variance, std = family(), family(noise_scale="std")
    g = stream_generator(0, "parameters")
    base = torch.randn(3, 12, generator=g)
    delta = torch.randn(3, 12, generator=g)
    assert torch.allclose(std._mixing[0][0], 10.0 * base + 2.0 * delta)
    assert torch.allclose(variance._mixing[0][0], math.sqrt(10.0) * base + math.sqrt(2.0) * delta)


def test_readings_change_how_related_a_group_is():
    """Two tasks of one activation: their arguments correlate 10 / 12 (variances) or 100 / 104 (std), so the
    std reading makes a group tighter; with phi = input_dim the activations act near their Taylor polynomials."""
    kw = {"activations": ["bent", "square", "sinc"], "tasks_per_group": 3, "input_dim": 40, "output_dim": 20}
    variance = family(**kw).correlation_summary(4000)
    std = family(**kw, noise_scale="std").correlation_summary(4000)
    assert std["bent"] > variance["bent"] + 0.05 and std["square"] > variance["square"] + 0.05
    assert variance["bent"] == pytest.approx(0.83, abs=0.05) and std["bent"] == pytest.approx(0.96, abs=0.03)
    paper_phi = family(**kw, phi="input_dim").correlation_summary(4000)
    assert paper_phi["square-sinc"] < -0.6  # sinc(x) ~ 1 - x^2 / 6: square's mirror image
    corr = family(**kw).correlations(500)
    assert corr.shape == (9, 9) and torch.allclose(corr.diagonal(), torch.ones(9), atol=1e-5)


def test_uniform_inputs_have_unit_variance_and_bad_readings_are_refused():
    z = family(input_distribution="uniform").inputs("train", 20000)
    assert z.abs().max() <= math.sqrt(3) + 1e-6 and z.var().item() == pytest.approx(1.0, abs=0.03)
    for bad, match in ((dict(noise_scale="sd"), "noise_scale"), (dict(input_distribution="gauss"), "input_distribution"),
                       (dict(phi="dim"), "phi")):
        with pytest.raises(ValueError, match=match):
            family(**bad)
    data = SyntheticRegressionDataModule(tasks_per_group=1, input_dim=8, output_dim=2, num_train=10, num_val=4,
                                         num_test=4, batch_size=5, phi="input_dim", noise_scale="std")
    assert data.phi == 8


def test_bias_heads_make_the_last_block_the_outputs():
    backbone = MLPBackbone(input_dim=5, hidden=4, num_layers=2, head="bias")
    task = make_task("regression", name="t", out_channels=4)
    blocks, head = backbone.make_blocks(), backbone.make_head(task)
    assert not any(isinstance(m, torch.nn.ReLU) for m in blocks[-1])
    with torch.no_grad():
        head.bias.copy_(torch.arange(4.0))
    feature = torch.randn(3, 4)
    assert torch.equal(head([torch.randn(3, 4), feature]), feature + torch.arange(4.0))
    with pytest.raises(ValueError, match="hidden=7"):
        backbone.make_head(make_task("regression", name="u", out_channels=7))
    assert "head" not in MLPBackbone().config()["init_args"]  # earlier configs keep their form
    assert MLPBackbone(head="bias").config()["init_args"]["head"] == "bias"


def test_k_child_nodes_per_block_confine_every_tree_to_them():
    tasks = [make_task("regression", name=f"t{i}", out_channels=4) for i in range(5)]
    net = LearnToBranchNet(MLPBackbone(input_dim=3, hidden=4, num_layers=3), tasks, (3,), nodes_per_layer=2)
    with torch.no_grad():
        net.logits.normal_()
        net.logits[..., 4] += 100.0  # would pick node 4 everywhere without the block's limit
    assert all(node < 2 for row in net.architecture().parents for node in row)
    probs = net.branching_probabilities()
    assert torch.all(probs[..., 2:] == 0) and torch.allclose(probs.sum(-1), torch.ones(3, 5))
    out = net.search_forward(torch.randn(6, 3), temperature=1.0)
    sum(o.pow(2).mean() for o in out.values()).backward()
    assert torch.isfinite(net.logits.grad).all() and torch.all(net.logits.grad[..., 2:] == 0)
    for used in net.architecture().used_nodes():
        assert used <= {0, 1}
    with pytest.raises(ValueError, match="nodes_per_layer"):
        LearnToBranchNet(MLPBackbone(input_dim=3, hidden=4, num_layers=3), tasks, (3,), nodes_per_layer=6)
