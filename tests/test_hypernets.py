"""Hypernets, Gumbel samples and the user-facing DynamicMultiTaskModel."""

import pytest
import torch
from torch import nn

from dymu.anchor import batchnorm_names
from dymu.backbones import ConvEncoderDecoder, MLPBackbone
from dymu.hypernets import EdgeHypernet, WeightHypernet, gumbel_samples
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture
from dymu.tasks import make_task
from tests.test_anchor import randomize_batchnorm


def test_edge_hypernet_shapes_and_dependence_on_the_preference():
    torch.manual_seed(0)
    net = EdgeHypernet(n_tasks=3, n_layers=4)
    start = net(torch.tensor([1.0, 0.0, 0.0]), torch.tensor(0.0))
    assert torch.count_nonzero(start) == 0, "edge logits must start uniform"
    for head in net.heads:
        torch.nn.init.normal_(head.weight)
    a = net(torch.tensor([1.0, 0.0, 0.0]), torch.tensor(0.0))
    b = net(torch.tensor([0.0, 0.0, 1.0]), torch.tensor(1.0))
    assert a.shape == (4, 3, 3)
    assert not torch.allclose(a, b)
    # sizes of docs/method.md: embedding (3 + 1) x 32, MLP 32 -> 100 -> 100, 4 heads 100 -> 9
    expected = 4 * 32 + (32 * 100 + 100) + (100 * 100 + 100) + 4 * (100 * 9 + 9)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_affine_c_conditioning_is_affine_in_c_and_starts_uniform():
    torch.manual_seed(0)
    net = EdgeHypernet(n_tasks=3, n_layers=4, c_conditioning="affine")
    r = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    assert torch.count_nonzero(net(r, torch.tensor([0.3, 0.9]))) == 0  # every parent equally likely at start
    for p in net.parameters():
        nn.init.normal_(p)
    at0, at1 = net(r, torch.zeros(2)), net(r, torch.ones(2))
    assert not torch.allclose(at0, at1)
    c = torch.tensor([0.25, 0.7])
    expected = at0 + c[:, None, None, None] * (at1 - at0)
    torch.testing.assert_close(net(r, c), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(r[1], c[1]), expected[1], rtol=1e-5, atol=1e-5)  # one preference
    assert net.size_args["c_conditioning"] == "affine"
    rebuilt = EdgeHypernet(3, 4, **net.size_args)
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt(r, c), net(r, c))
    with pytest.raises(ValueError, match="c_conditioning"):
        EdgeHypernet(3, 4, c_conditioning="linear")


def test_weight_hypernet_starts_at_zero_and_covers_every_batchnorm():
    bns = {"streams.0.0.1": 5, "streams.1.0.1": 7}
    net = WeightHypernet(n_tasks=2, batchnorms=bns)
    deltas = net(torch.tensor([0.3, 0.7]), torch.tensor(0.5))
    assert set(deltas) == set(bns)
    for name, (d_gamma, d_beta) in deltas.items():
        assert d_gamma.shape == d_beta.shape == (bns[name],)
        assert torch.count_nonzero(d_gamma) == 0 and torch.count_nonzero(d_beta) == 0


def test_gumbel_samples_are_one_hot_with_soft_gradients():
    logits = torch.randn(2, 3, 3, requires_grad=True)
    hard, soft = gumbel_samples(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hard.detach().sum(-1), torch.ones(2, 3))
    assert torch.isfinite(soft).all()
    torch.testing.assert_close(hard.detach(), torch.nn.functional.one_hot(soft.argmax(-1), 3).float())
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))
    weights = torch.randn(2, 3, 3)
    (hard * weights).sum().backward()
    grad_hard = logits.grad.clone()
    logits.grad = None
    _, soft2 = gumbel_samples(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    (soft2 * weights).sum().backward()
    torch.testing.assert_close(grad_hard, logits.grad)


def test_gumbel_argmax_follows_the_softmax_of_the_logits():
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]]))
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(3)
    for _ in range(4000):
        hard, _ = gumbel_samples(logits, temperature=5.0, generator=gen)
        counts += hard[0, 0]
    torch.testing.assert_close(counts / 4000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def controllable_model(dense=False, bn_statistics="running"):
    torch.manual_seed(0)
    if dense:
        tasks = [make_task("semseg", out_channels=3), make_task("depth")]
        backbone, shape = ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 1), decoder_width=8), (3, 16, 16)
    else:
        tasks = [make_task("regression", name=f"t{i}", out_channels=2) for i in range(3)]
        backbone, shape = MLPBackbone(input_dim=5, hidden=6, num_layers=3), (5,)
    model = DynamicMultiTaskModel.build(backbone, tasks, edge={"embed_dim": 8, "hidden": 16},
                                        weight={"embed_dim": 8, "hidden": 16, "bn_statistics": bn_statistics},
                                        input_shape=shape)
    randomize_batchnorm(model.anchor)
    for head in model.weight_hypernet.heads:  # leave the zero start, so that the shifts matter
        nn.init.normal_(head.weight, std=0.2)
    return model.eval(), shape


@pytest.mark.parametrize("bn_statistics", ["running", "batch"])
@pytest.mark.parametrize("dense", [False, True])
def test_specialize_matches_the_dynamic_model_for_many_preferences(dense, bn_statistics):
    model, shape = controllable_model(dense, bn_statistics)
    x = torch.randn(3, *shape)
    gen = torch.Generator().manual_seed(0)
    archs = set()
    for _ in range(8):
        r = torch.distributions.Dirichlet(torch.full((model.n_tasks,), 0.5)).sample()
        r = (r / r.sum()).tolist()
        c = float(torch.rand((), generator=gen))
        with torch.no_grad():
            dynamic = model(x, r, c)
            static = model.specialize(r, c)(x)
        archs.add(model.architecture(r, c))
        assert static.keys() == dynamic.keys() == set(model.tasks)
        for name in model.tasks:
            torch.testing.assert_close(static[name], dynamic[name], atol=1e-5, rtol=1e-5)
        assert model.cost(r, c)["params"] == sum(p.numel() for p in model.specialize(r, c).parameters())


def test_architecture_is_the_argmax_of_the_edge_logits():
    model, _ = controllable_model()
    pref = Preference((0.2, 0.5, 0.3), 0.4)
    logits = model.edge_logits(pref)
    assert model.architecture(pref) == Architecture.from_logits(logits)
    assert model.architecture(pref.r, pref.c) == model.architecture(pref)


@pytest.mark.parametrize("r, c, message", [
    ([0.5, 0.5], 0.5, "2 entries but the model has 3 tasks"),
    ([0.5, 0.6, -0.1], 0.5, "negative"),
    ([0.2, 0.2, 0.2], 0.5, "sum to 1"),
    ([0.2, 0.3, 0.5], 1.5, r"\[0, 1\]"),
    ([0.2, 0.3, 0.5], float("nan"), "finite"),
])
def test_bad_preferences_are_refused_everywhere(r, c, message):
    model, shape = controllable_model()
    for call in (lambda: model.architecture(r, c), lambda: model.specialize(r, c), lambda: model.cost(r, c),
                 lambda: model(torch.randn(2, *shape), r, c)):
        with pytest.raises(ValueError, match=message):
            call()


def test_missing_cost_preference_is_a_clear_error():
    model, _ = controllable_model()
    with pytest.raises(ValueError, match="cost preference c is missing"):
        model.architecture([0.2, 0.3, 0.5])


def test_config_round_trip_rebuilds_the_same_model():
    model, shape = controllable_model(dense=True)
    clone = DynamicMultiTaskModel.from_config(model.config())
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        a, b = model(x, [0.3, 0.7], 0.2), clone(x, [0.3, 0.7], 0.2)
    for name in model.tasks:
        torch.testing.assert_close(a[name], b[name])
    assert len(batchnorm_names(clone.anchor)) == len(clone.weight_hypernet.heads)
    assert model.control_parameters() == clone.control_parameters() > 0


def test_batch_statistics_normalise_with_the_batch_and_restore_the_running_ones():
    model, shape = controllable_model(dense=False, bn_statistics="batch")
    running, _ = controllable_model(dense=False, bn_statistics="running")
    bn = model.anchor.node(0, 0)[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(16, *shape)
    with torch.no_grad():
        out_batch = model(x, [0.3, 0.3, 0.4], 0.5)
        out_running = running(x, [0.3, 0.3, 0.4], 0.5)
        # by hand: block 0 of the stream the tree uses for task 0, with batch statistics
        arch = model.architecture([0.3, 0.3, 0.4], 0.5)
        deltas = model.bn_deltas(Preference((0.3, 0.3, 0.4), 0.5))
        stream = arch.path(0)[0]
        block = model.anchor.node(0, stream)
        d_gamma, d_beta = deltas[f"streams.{stream}.0.1"]
        h = block[0](x)
        expected = torch.relu(torch.nn.functional.batch_norm(h, None, None, block[1].weight + d_gamma,
                                                             block[1].bias + d_beta, training=True))
        static = model.specialize([0.3, 0.3, 0.4], 0.5).eval()
        got = static.node(0, stream)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_batch["t0"], out_running["t0"])
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    with pytest.raises(ValueError, match="bn_statistics must be"):
        WeightHypernet(2, {"a": 3}, bn_statistics="instance")
