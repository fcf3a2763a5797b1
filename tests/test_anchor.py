"""AnchorNet routing, specialization and costs."""

import pytest
import torch
from torch import nn

from dymu.anchor import AnchorNet, batchnorm_names, cached_node_costs, count_flops, count_parameters, node_costs
from dymu.backbones import ConvEncoderDecoder, MLPBackbone
from dymu.search_space import Architecture
from dymu.tasks import make_task

DENSE_TASKS = [make_task("semseg", out_channels=4), make_task("depth"), make_task("normals")]


def dense_anchor(seed=0):
    torch.manual_seed(seed)
    net = AnchorNet(ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8), DENSE_TASKS)
    randomize_batchnorm(net)
    return net.eval()


def mlp_anchor(n=3, layers=3, seed=0):
    torch.manual_seed(seed)
    tasks = [make_task("regression", name=f"t{i}", out_channels=2) for i in range(n)]
    net = AnchorNet(MLPBackbone(input_dim=5, hidden=7, num_layers=layers), tasks)
    randomize_batchnorm(net)
    return net.eval()


def randomize_batchnorm(net):
    """Give every BN non-trivial statistics and affine parameters, so that mixing them up would show."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def random_deltas(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(c, generator=gen) * 0.3, torch.randn(c, generator=gen) * 0.3)
            for name, c in batchnorm_names(net).items()}


@pytest.mark.parametrize("make, shape", [(dense_anchor, (2, 3, 16, 16)), (mlp_anchor, (4, 5))])
@pytest.mark.parametrize("with_deltas", [False, True])
def test_specialize_equals_dynamic_forward(make, shape, with_deltas):
    net = make()
    x = torch.randn(*shape)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        arch = Architecture.random(net.n_tasks, net.n_layers, generator=gen)
        deltas = random_deltas(net) if with_deltas else None
        with torch.no_grad():
            dynamic = net(x, architecture=arch, bn_deltas=deltas)
            static = net.specialize(arch, deltas).eval()(x)
        assert set(static) == set(net.task_names)
        for name in net.task_names:
            torch.testing.assert_close(static[name], dynamic[name], atol=1e-5, rtol=1e-5)


def test_specialized_net_holds_only_used_nodes_and_is_independent():
    net = mlp_anchor()
    arch = Architecture(((0, 0, 2), (0, 0, 0), (0, 0, 0)))
    static = net.specialize(arch)
    assert sorted(static.blocks.keys()) == ["0_0", "1_0", "2_0"]
    with torch.no_grad():
        static.blocks["0_0"][0].weight.add_(1.0)
    assert not torch.equal(static.blocks["0_0"][0].weight, net.node(0, 0)[0].weight)


def test_bn_deltas_shift_the_affine_parameters():
    net = mlp_anchor()
    x = torch.randn(4, 5)
    name = "streams.1.0.1"
    bn = net.node(0, 1)[1]
    d_gamma, d_beta = torch.full((7,), 0.5), torch.full((7,), -0.25)
    with torch.no_grad():
        shifted = net(x, bn_deltas={name: (d_gamma, d_beta)})
        bn.weight.add_(d_gamma)
        bn.bias.add_(d_beta)
        manual = net(x)
        bn.weight.sub_(d_gamma)
        bn.bias.sub_(d_beta)
        plain = net(x)
    torch.testing.assert_close(shifted["t1"], manual["t1"])
    torch.testing.assert_close(shifted["t0"], plain["t0"])
    assert not torch.allclose(shifted["t1"], plain["t1"])


@pytest.mark.parametrize("make, shape", [(dense_anchor, (2, 3, 16, 16)), (mlp_anchor, (4, 5))])
def test_hard_samples_equal_fixed_architecture(make, shape):
    net = make()
    x = torch.randn(*shape)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        arch = Architecture.random(net.n_tasks, net.n_layers, generator=gen)
        with torch.no_grad():
            fixed = net(x, architecture=arch)
            sampled = net(x, samples=arch.one_hot())
        for name in net.task_names:
            torch.testing.assert_close(sampled[name], fixed[name], atol=1e-5, rtol=1e-5)


def test_soft_samples_mix_parent_outputs():
    net = mlp_anchor(n=2, layers=2)
    x = torch.randn(3, 5)
    samples = torch.tensor([[[0.25, 0.75], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    with torch.no_grad():
        out = net(x, samples=samples)
        y0, y1 = net.node(0, 0)(x), net.node(0, 1)(x)
        child0 = net.node(1, 0)(0.25 * y0 + 0.75 * y1)
        expected = net.heads[0]([x, 0.25 * y0 + 0.75 * y1, child0])
    torch.testing.assert_close(out["t0"], expected)


def test_straight_through_samples_carry_gradient_to_every_used_child():
    # Every parent's output is computed, so each child that lies on a task's path gets a gradient for
    # all of its parent logits, not only for the parent it picked.
    net = mlp_anchor()
    logits = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    soft = torch.softmax(logits, dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), 3).float() - soft.detach() + soft
    out = net(torch.randn(4, 5), samples=hard)
    sum(o.pow(2).sum() for o in out.values()).backward()
    arch = Architecture.from_logits(logits.detach())
    used = [*arch.used_nodes()[1:], frozenset(range(3))]  # the children of each layer that are used
    for k in range(3):
        for j in range(3):
            grad = logits.grad[k, j].abs().sum().item()
            assert (grad > 0) == (j in used[k]), (k, j, grad)


def test_parameter_counts_against_hand_counts():
    net = mlp_anchor(n=3, layers=3)
    # block 0: Linear 5 -> 7 (no bias) + BN(7): 35 + 14; blocks 1, 2: 49 + 14; head: 7 * 2 + 2
    block = [49, 63, 63]
    head = 16
    costs = node_costs(net, (5,))
    anchor_params = costs.cost(Architecture.anchor(3, 3))["params"]
    assert anchor_params == 3 * sum(block) + 3 * head == count_parameters(net)
    assert costs.cost(Architecture.shared(3, 3))["params"] == sum(block) + 3 * head
    # two branches after layer 0: nodes {0} at layer 0, {0, 2} at layers 1, 2
    arch = Architecture(((0, 0, 0), (0, 0, 2), (0, 0, 2)))
    assert costs.cost(arch)["params"] == 49 + 2 * 63 + 2 * 63 + 3 * head


def test_cached_node_costs_measure_once_per_input_shape():
    net = mlp_anchor(n=3, layers=3)
    first = cached_node_costs(net, [5])
    assert first == node_costs(net, (5,))
    assert cached_node_costs(net, (5,)) is first  # the same object: no second measurement
    assert "_node_costs_cache" not in net.state_dict() and not any("cache" in k for k in net.state_dict())
    with pytest.raises(RuntimeError, match="input_shape"):
        cached_node_costs(net, None)


def test_flops_of_node_sums_equal_flop_counter_on_the_pruned_model():
    net = dense_anchor()
    costs = node_costs(net, (3, 16, 16))
    gen = torch.Generator().manual_seed(7)
    for arch in [Architecture.anchor(3, 3), Architecture.shared(3, 3),
                 Architecture.random(3, 3, generator=gen)]:
        static = net.specialize(arch).eval()
        direct = count_flops(lambda s=static: s(torch.zeros(1, 3, 16, 16)))
        assert costs.cost(arch)["flops"] == direct > 0
        assert costs.cost(arch)["params"] == count_parameters(static)


def test_stream_features_and_architecture_mismatch():
    net = dense_anchor()
    feats = net.stream_features(torch.randn(2, 3, 16, 16))
    assert len(feats) == 3 and all(len(f) == 3 for f in feats)
    assert feats[0][1].shape == (2, 6, 8, 8)
    with pytest.raises(ValueError, match="architecture has 2 layers x 3 tasks, the anchor has 3 x 3"):
        net(torch.randn(1, 3, 16, 16), architecture=[[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match="edge samples must have shape"):
        net(torch.randn(1, 3, 16, 16), samples=torch.ones(2, 3, 3))


def test_recalibrated_batchnorm_holds_the_average_statistics_of_the_calibration_batches():
    from dymu.anchor import recalibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batches = [torch.randn(5, 3, 6, 6) * 2 + 1 for _ in range(3)]
    recalibrate_batchnorm(net, batches)
    assert not net.training
    feats = [net[0](x).detach() for x in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, atol=1e-5, rtol=1e-5)
    assert net[1].momentum == 0.1  # restored
    with pytest.raises(ValueError, match="no input batches"):
        recalibrate_batchnorm(net, [])
