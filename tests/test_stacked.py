"""Streams as one (dymu.stacked): the stacked forwards equal the per-node ones, to 1e-5, in outputs, gradients
and BatchNorm running statistics.

Gradients are compared in float64: in float32 the per-node path's own backward on CPU differs from its float64
value by up to a few 1e-4 on the quickstart network (measured), which would hide a real error or fail a
correct one. Outputs and statistics are also compared in float32.
"""

import copy

import pytest
import torch
from torch import nn

import dymu.stacked
from dymu.anchor import AnchorNet, batchnorm_names
from dymu.backbones import ConvEncoderDecoder, MLPBackbone
from dymu.search_space import Architecture
from dymu.stacked import mix_stacked, stack_groups
from dymu.tasks import make_task
from tests.test_anchor import randomize_batchnorm

TOL = 1e-5


def conv_anchor(tasks=None):
    tasks = tasks or [make_task("semseg", out_channels=4), make_task("depth"), make_task("normals")]
    # the quickstart's backbone (configs/quickstart.yaml) at reduced widths
    return AnchorNet(ConvEncoderDecoder(channels=(6, 8, 10, 12), strides=(1, 2, 2, 1), decoder_width=8,
                                        low_level_block=1), tasks)


def mlp_anchor():
    tasks = [make_task("regression", name=f"t{i}", out_channels=2) for i in range(3)]
    return AnchorNet(MLPBackbone(input_dim=5, hidden=7, num_layers=3), tasks)


CASES = {"conv": (conv_anchor, (6, 3, 12, 12)), "mlp": (mlp_anchor, (8, 5))}


def make_pair(name, dtype=torch.float64, seed=0):
    """A per-node anchor and a stacked deep copy, with different weights and statistics in every stream."""
    make, shape = CASES[name]
    torch.manual_seed(seed)
    net = make()
    randomize_batchnorm(net)
    net = net.to(dtype)
    stacked = copy.deepcopy(net)
    stacked.stacked = True
    return net, stacked, torch.randn(*shape, dtype=dtype)


@pytest.fixture
def calls(monkeypatch):
    """Counts the stacked calls, so that a test cannot pass by running the per-node path twice."""
    count = {"n": 0}
    original = dymu.stacked.stacked_call

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(dymu.stacked, "stacked_call", counting)
    return count


def loss_of(outputs, seed=1):
    """A loss that weights every output element differently (a plain sum would hide permuted gradients)."""
    gen = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum() for v in outputs.values())


def assert_close(a, b, what):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: max error {err}"


def assert_same_state(net, stacked):
    for (name, a), b in zip(net.named_parameters(), stacked.parameters()):
        assert a.grad is not None and b.grad is not None, name
        assert_close(b.grad, a.grad, f"grad of {name}")
    for (name, a), b in zip(net.named_buffers(), stacked.buffers()):
        assert_close(b.double(), a.double(), f"buffer {name}")


@pytest.mark.parametrize("name", list(CASES))
def test_anchor_forward_train_mode_equals_per_node(name, calls):
    net, stacked, x = make_pair(name)
    before = {n: b.clone() for n, b in net.named_buffers()}
    out_ref, out = net.train()(x), stacked.train()(x)
    assert calls["n"] >= net.n_layers  # one stacked call per layer at least
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)
    loss_of(out_ref).backward()
    loss_of(out).backward()
    assert_same_state(net, stacked)
    # the statistics moved, each stream's by its own batch statistics (so equality above is not vacuous)
    for n, b in stacked.named_buffers():
        if n.endswith("running_mean"):
            assert not torch.allclose(b, before[n])
    means = [stacked.streams[t][0].get_submodule("body.0.1" if name == "conv" else "1").running_mean
             for t in range(stacked.n_tasks)]
    assert not torch.allclose(means[0], means[1])
    # the second step starts from the updated statistics
    out_ref, out = net(x * 0.5), stacked(x * 0.5)
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)


@pytest.mark.parametrize("name", list(CASES))
def test_anchor_forward_float32_outputs_and_statistics(name):
    net, stacked, x = make_pair(name, dtype=torch.float32)
    out_ref, out = net.train()(x), stacked.train()(x)
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)
    for (n, a), b in zip(net.named_buffers(), stacked.buffers()):
        assert_close(b.double(), a.double(), n)


@pytest.mark.parametrize("name", list(CASES))
def test_anchor_forward_eval_mode_and_explicit_anchor_architecture(name, calls):
    net, stacked, x = make_pair(name)
    arch = Architecture.anchor(net.n_tasks, net.n_layers)
    with torch.no_grad():
        out_ref, out = net.eval()(x), stacked.eval()(x, architecture=arch.to_list())
    assert calls["n"] > 0
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sampled_forward_equals_per_node(name, per_sample, mode, calls):
    net, stacked, x = make_pair(name)
    net.train(mode == "train")
    stacked.train(mode == "train")
    n, n_layers = net.n_tasks, net.n_layers
    gen = torch.Generator().manual_seed(2)
    shape = (x.shape[0], n_layers, n, n) if per_sample else (n_layers, n, n)
    logits = torch.randn(shape, generator=gen, dtype=x.dtype)
    samples_ref = logits.softmax(-1).requires_grad_()
    samples = samples_ref.detach().clone().requires_grad_()
    out_ref, out = net(x, samples=samples_ref), stacked(x, samples=samples)
    assert calls["n"] >= n_layers
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)
    loss_of(out_ref).backward()
    loss_of(out).backward()
    assert_close(samples.grad, samples_ref.grad, "grad of the samples")
    assert samples.grad.abs().max() > 0
    assert_same_state(net, stacked)


@pytest.mark.parametrize("name", list(CASES))
def test_bn_deltas_on_the_anchor_architecture(name, calls):
    net, stacked, x = make_pair(name)
    gen = torch.Generator().manual_seed(4)
    deltas = {k: (torch.randn(c, generator=gen, dtype=x.dtype).requires_grad_(),
                  torch.randn(c, generator=gen, dtype=x.dtype).requires_grad_())
              for k, c in batchnorm_names(net).items()}
    deltas_ref = {k: tuple(t.detach().clone().requires_grad_() for t in v) for k, v in deltas.items()}
    net.eval()
    stacked.eval()
    out_ref, out = net(x, bn_deltas=deltas_ref), stacked(x, bn_deltas=deltas)
    assert calls["n"] > 0
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)
    loss_of(out_ref).backward()
    loss_of(out).backward()
    for k in deltas:
        for a, b in zip(deltas[k], deltas_ref[k]):
            assert_close(a.grad, b.grad, f"grad of the delta of {k}")


def test_trees_keep_the_per_node_path(calls):
    net, stacked, x = make_pair("conv")
    arch = Architecture.shared(net.n_tasks, net.n_layers)
    with torch.no_grad():
        out_ref, out = net.eval()(x, architecture=arch), stacked.eval()(x, architecture=arch)
    assert calls["n"] == 0
    for task in net.task_names:
        assert torch.equal(out[task], out_ref[task])


def test_heads_of_one_shape_stack_and_the_others_run_alone(calls):
    tasks = [make_task("semseg", name="a", out_channels=4), make_task("depth"),
             make_task("semseg", name="b", out_channels=4)]
    torch.manual_seed(0)
    net = conv_anchor(tasks).double()
    stacked = copy.deepcopy(net)
    stacked.stacked = True
    assert stack_groups(list(net.heads)) == [[0, 2], [1]]
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    out_ref, out = net.train()(x), stacked.train()(x)
    assert calls["n"] == net.n_layers + 1  # the layers and the one group of two heads
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)
    loss_of(out_ref).backward()
    loss_of(out).backward()
    assert_same_state(net, stacked)


def test_cumulative_batchnorm_runs_per_node(calls):
    net, stacked, x = make_pair("mlp")
    for m in [*net.modules(), *stacked.modules()]:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    out_ref, out = net.train()(x), stacked.train()(x)
    for task in net.task_names:
        assert_close(out[task], out_ref[task], task)
    for (n, a), b in zip(net.named_buffers(), stacked.buffers()):
        assert_close(b.double(), a.double(), n)
    assert calls["n"] == 1  # only the heads (no BatchNorm) stacked


def test_stack_groups_by_structure():
    mods = [nn.Linear(3, 4), nn.Linear(3, 4, bias=False), nn.Linear(3, 4), nn.Conv2d(3, 4, 1), nn.Linear(3, 5)]
    assert stack_groups(mods) == [[0, 2], [1], [3], [4]]


def test_mix_stacked_by_hand():
    stacked = torch.tensor([[1.0, 2.0], [10.0, 20.0]])  # (N=2, B=2)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    assert torch.allclose(mix_stacked(stacked, w), torch.tensor([[7.75, 15.5], [1.0, 2.0]]))
    per_sample = torch.stack([w, w.flip(0)])  # sample 1 swaps the children's mixes
    assert torch.allclose(mix_stacked(stacked, per_sample), torch.tensor([[7.75, 2.0], [1.0, 15.5]]))
