"""The dynamic and static baselines: PHN (chunked weight generation), PHN-BN (BatchNorm shifts over a frozen
shared network), static multi-task networks, their stage modules and checkpoints."""

import math

import pytest
import torch

from dymu.anchor import count_parameters, use_batch_statistics
from dymu.baselines.base import BaselineModel, load_baseline, shared_network
from dymu.baselines.phn import ParetoHypernet, chunk_size_for, phn_control_parameters
from dymu.baselines.phn_bn import PhnBnNet
from dymu.baselines.static import StaticMultiTaskNet
from dymu.evaluation import mean_task_losses
from dymu.model import DynamicMultiTaskModel
from dymu.tasks import task_losses
from lightning_modules.anchor import AnchorPretraining
from lightning_modules.phn import ParetoHypernetTraining
from lightning_modules.phn_bn import PhnBnTraining
from lightning_modules.shared_mtl import SharedMultiTaskTraining
from tests.small_scenes import INPUT, assert_outputs_equal, backbone, scenes
from tests.small_scenes import fit as fit_on

SIZES = dict(chunk_size=100, chunk_embed_dim=8, embed_dim=8, hidden=16)


def data(**kwargs):
    return scenes(["semseg", "depth"], **kwargs)


def task_configs():
    return [t.to_config() for t in data().tasks]


def fit(module, root, steps, dm=None, **kwargs):
    return fit_on(module, root, steps, dm or data(), **kwargs)


def save(trainer, path):
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def shared_ckpt(tmp_path_factory):
    """The shared network trained a few steps at the uniform preference (PHN-BN's parent)."""
    root = tmp_path_factory.mktemp("shared")
    torch.manual_seed(0)
    module = SharedMultiTaskTraining(backbone(), task_configs(), INPUT)
    return module, save(fit(module, root, steps=3), root / "shared.ckpt")


# ------------------------------------------------------------------------------------------------- PHN


def test_phn_generates_exactly_the_target_parameters_with_the_chunking_count():
    torch.manual_seed(0)
    tasks = data().tasks
    phn = ParetoHypernet(backbone(), tasks, INPUT, **SIZES)
    target = dict(shared_network(backbone(), tasks).named_parameters())
    weights = phn.generate(torch.tensor([0.3, 0.7]))
    assert list(weights) == list(target)
    assert all(weights[k].shape == target[k].shape for k in target)
    P = sum(v.numel() for v in target.values())
    assert phn.target_parameters == P and phn.n_chunks == math.ceil(P / 100)
    assert count_parameters(phn.target) == 0  # the target holds no weights of its own
    N, e, h, k, C = 2, 8, 16, 8, 100
    hand = (N + 1) * e + (e * h + h) + 2 * (h * h + h) + math.ceil(P / C) * k + (h + k) * C + C
    assert phn.control_parameters() == count_parameters(phn) == hand
    assert phn_control_parameters(P, N, C, k, e, h) == hand
    # every chunk of the flat vector is used, and the weights depend on the preference
    other = phn.generate(torch.tensor([0.9, 0.1]))
    assert all(not torch.equal(weights[k], other[k]) for k in target)


def test_chunk_size_for_matches_a_paper_control_parameter_count():
    # PASCAL-Context 5 tasks: the shared network has 2,151,505 parameters, PHN 21.50M control parameters
    size = chunk_size_for(21_500_000, 2_151_505, 5, 64)
    assert phn_control_parameters(2_151_505, 5, size, 64) <= 21_500_000 < phn_control_parameters(2_151_505, 5,
                                                                                                  size + 1, 64)
    assert phn_control_parameters(2_151_505, 5, size, 64) > 21_400_000
    with pytest.raises(ValueError, match="no chunk size"):
        chunk_size_for(1000, 2_151_505, 5, 64)


@pytest.mark.parametrize("bn_statistics", ["batch", "running"])
def test_phn_functional_call_equals_the_target_loaded_with_the_generated_weights(bn_statistics):
    torch.manual_seed(0)
    tasks = data().tasks
    phn = ParetoHypernet(backbone(), tasks, INPUT, bn_statistics=bn_statistics, **SIZES)
    reference = shared_network(backbone(), tasks)
    if bn_statistics == "batch":
        use_batch_statistics(reference)
    r = torch.tensor([0.25, 0.75])
    x = torch.randn(4, *INPUT)
    with torch.no_grad():
        reference.load_state_dict({**phn.generate(r), **phn.target.state_dict()})
    for training in (True, False):  # train mode: batch statistics; running statistics updated in place
        phn.train(training)
        reference.train(training)
        got = phn(x, r)
        assert_outputs_equal(got, reference(x))
        assert_outputs_equal(dict(phn.target.named_buffers()), dict(reference.named_buffers()))  # same statistics
        assert_outputs_equal(phn.materialize(r)(x), got)
    if bn_statistics == "running":
        assert not torch.equal(phn.target.blocks["0_0"].body[0][1].running_mean, torch.zeros(4))
    phn.train()
    loss = sum(v.square().mean() for v in phn(x, [0.5, 0.5]).values())
    loss.backward()
    for name in ("output.weight", "chunk_embeddings", "body.0.weight", "embedding.task_embeddings"):
        assert phn.get_parameter(name).grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="must sum to 1"):
        phn(x, [0.5, 0.6])
    with pytest.raises(ValueError, match="2 tasks"):
        phn(x, [0.2, 0.3, 0.5])


def test_phn_stage_trains_and_its_checkpoint_loads_back(tmp_path):
    torch.manual_seed(0)
    module = ParetoHypernetTraining(backbone(), task_configs(), INPUT, preference_groups=2, val_preferences=1,
                                    **SIZES)
    before = module.model.output.weight.detach().clone()
    trainer = fit(module, tmp_path, steps=2)
    assert not torch.equal(before, module.model.output.weight)
    path = save(trainer, tmp_path / "phn.ckpt")
    loaded = ParetoHypernet.from_checkpoint(path)
    assert isinstance(load_baseline(path), ParetoHypernet)
    x = data().dataset("val").tensors["image"][:4]
    module.model.eval()
    for r in ([0.5, 0.5], [0.1, 0.9]):
        assert_outputs_equal(loaded(x, r), module.model(x, r))
    assert loaded.control_parameters() == module.model.control_parameters()
    with pytest.raises(ValueError, match="holds a 'phn' baseline, not 'static'"):
        StaticMultiTaskNet.from_checkpoint(path)


# ---------------------------------------------------------------------------------------------- PHN-BN


def test_phn_bn_changes_only_batchnorm_parameters(shared_ckpt, tmp_path):
    parent, path = shared_ckpt
    torch.manual_seed(0)
    module = PhnBnTraining(path, task_configs(), val_preferences=1)
    net_before = {k: v.clone() for k, v in module.model.net.state_dict().items()}
    assert_outputs_equal(net_before, parent.model.net.state_dict())  # the parent's weights and statistics
    x = data().dataset("val").tensors["image"][:4]
    parent.model.eval()
    module.model.eval()
    assert_outputs_equal(module.model(x, [0.3, 0.7]), parent.model(x))  # zero shifts: it starts at its parent
    hyper_before = {k: v.clone() for k, v in module.model.hypernet.state_dict().items()}

    trainer = fit(module, tmp_path, steps=3)

    assert_outputs_equal(module.model.net.state_dict(), net_before)  # every tensor of the network unchanged
    assert any(not torch.equal(v, hyper_before[k]) for k, v in module.model.hypernet.state_dict().items())
    frozen = dict(module.model.net.named_parameters())
    effective = module.model.effective_parameters([0.3, 0.7])
    changed = {k for k in frozen if not torch.equal(frozen[k], effective[k])}
    batchnorm = {f"{name}.{p}" for name in module.model.hypernet.bn_names for p in ("weight", "bias")}
    assert changed == batchnorm and len(batchnorm) == 20  # blocks' and heads' BatchNorms, nothing else
    a, b = module.model.bn_deltas([0.9, 0.1]), module.model.bn_deltas([0.1, 0.9])
    assert all(not torch.equal(a[k][1], b[k][1]) for k in a)

    ckpt = save(trainer, tmp_path / "phn_bn.ckpt")
    loaded = PhnBnNet.from_checkpoint(ckpt)
    module.model.eval()
    assert_outputs_equal(loaded(x, [0.2, 0.8]), module.model(x, [0.2, 0.8]))
    assert loaded.control_parameters() == count_parameters(module.model.hypernet)


def test_phn_bn_batch_statistics_and_a_wrong_parent(shared_ckpt, tmp_path):
    _, path = shared_ckpt
    module = PhnBnTraining(path, task_configs(), bn_statistics="batch", modulate_heads=False)
    assert all(n.startswith("blocks.") for n in module.model.hypernet.bn_names)
    assert not any("running_mean" in k for k in module.model.net.state_dict())
    phn_ckpt = tmp_path / "phn.ckpt"
    fit(ParetoHypernetTraining(backbone(), task_configs(), INPUT, **SIZES), tmp_path, steps=1,
        limit_val_batches=0).save_checkpoint(phn_ckpt)
    with pytest.raises(ValueError, match="holds no shared multi-task network"):
        PhnBnTraining(str(phn_ckpt), task_configs())


# ----------------------------------------------------------------------------------------------- static


def batch_losses(model, batch, tasks):
    model.train()  # batch statistics, so that the comparison is not about calibrated running statistics
    with torch.no_grad():
        return task_losses(tasks, model(batch["image"]), batch)


def test_a_static_network_favours_the_task_its_preference_weights(tmp_path):
    dm = data(num_train=32, batch_size=8)
    dm.setup("fit")
    batch = dm.dataset("val").tensors
    drops = {}
    for favoured, r in ((0, [1.0, 0.0]), (1, [0.0, 1.0])):
        torch.manual_seed(0)
        module = SharedMultiTaskTraining(backbone(), task_configs(), INPUT, preference=r,
                                         optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        start = batch_losses(module.model, batch, module.tasks)
        fit(module, tmp_path, steps=30, dm=dm, limit_val_batches=0)
        drops[favoured] = (start - batch_losses(module.model, batch, module.tasks)) / start
        assert drops[favoured][favoured] > drops[favoured][1 - favoured] + 0.1, drops[favoured]
    assert drops[0][0] > drops[1][0] and drops[1][1] > drops[0][1]  # each run helps its own task more


def test_shared_stage_checkpoint_loads_back_with_its_preference_and_cost(shared_ckpt):
    module, path = shared_ckpt
    loaded = load_baseline(path)
    assert isinstance(loaded, StaticMultiTaskNet) and loaded.trained_preference.r == (0.5, 0.5)
    x = data().dataset("val").tensors["image"][:4]
    module.model.eval()
    assert_outputs_equal(loaded(x, [0.9, 0.1]), module.model(x))
    net = shared_network(backbone(), data().tasks)
    cost = loaded.cost()
    assert cost["params"] == count_parameters(net) and cost["flops"] > 0 and loaded.control_parameters() == 0
    phn = ParetoHypernet(backbone(), data().tasks, INPUT, **SIZES)
    bn = PhnBnNet(backbone(), data().tasks, INPUT)
    assert phn.cost() == cost == bn.cost()  # one network, whatever sets its weights
    with pytest.raises(ValueError, match="must sum to 1"):
        SharedMultiTaskTraining(backbone(), task_configs(), INPUT, preference=[0.5, 0.6])


def test_loss_scales_from_an_anchor(tmp_path):
    torch.manual_seed(0)
    dm = data()
    anchor = AnchorPretraining(backbone(), task_configs=task_configs(), input_shape=INPUT)
    anchor_ckpt = save(fit(anchor, tmp_path, steps=1, limit_val_batches=0), tmp_path / "anchor.ckpt")
    with pytest.raises(ValueError, match="needs anchor_checkpoint"):
        SharedMultiTaskTraining(backbone(), task_configs(), INPUT, loss_scales="anchor")
    module = SharedMultiTaskTraining(backbone(), task_configs(), INPUT, loss_scales="anchor",
                                     anchor_checkpoint=anchor_ckpt)
    trainer = fit(module, tmp_path, steps=1, dm=dm, limit_val_batches=0)
    reference = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor
    losses = mean_task_losses(lambda x: reference(x), dm.val_dataloader(), module.tasks)
    torch.testing.assert_close(module.scales, 1.0 / losses)
    assert isinstance(module.model, BaselineModel)  # the anchor is an argument of the calibration, not swapped in
    path = save(trainer, tmp_path / "scaled.ckpt")
    meta = torch.load(path, weights_only=True)["dymu"]
    assert meta["loss_scales_from"] == anchor_ckpt
    torch.testing.assert_close(torch.tensor(meta["loss_scales"]), 1.0 / losses)
