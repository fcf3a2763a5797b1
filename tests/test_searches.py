"""The static architecture searches: Learning to Branch, BMTAS (its resource loss against enumeration) and feature
partitioning (masks from P, distillation search), their stage modules and checkpoints."""

import itertools

import pytest
import torch
from lightning.pytorch import Callback

from datamodules.base import holdout_indices
from dymu.anchor import batch_statistics, count_parameters
from dymu.baselines.base import load_baseline, shared_network
from dymu.baselines.bmtas import (
    BmtasNet,
    ExpectedCost,
    groupings,
    reassigned_groups,
    refines,
    routing_to_architecture,
    set_partitions,
)
from dymu.baselines.feature_partitioning import (
    FeaturePartitionNet,
    distillation_score,
    first_batches,
    masks_from_partition,
    partition_from_checkpoint,
    partition_of_masks,
    refine_partition,
    search_partition,
)
from dymu.baselines.ltb import LearnToBranchNet, found_architecture, ltb_temperature
from dymu.model import DynamicMultiTaskModel
from dymu.search_space import Architecture
from lightning_modules.bmtas import BmtasSearch, linear_temperature
from lightning_modules.feature_partitioning import FeaturePartitionTraining
from lightning_modules.ltb import LearnToBranchSearch
from tests.small_scenes import INPUT, anchor_checkpoint, assert_outputs_equal, backbone, scenes
from tests.small_scenes import fit as fit_on

TASKS = ["semseg", "depth", "normals"]


def data(**kwargs):
    return scenes(TASKS, **{"num_train": 20, **kwargs})


def task_objects():
    return data().tasks


def task_configs():
    return [t.to_config() for t in task_objects()]


def fit(module, root, steps, dm=None, callbacks=(), **kwargs):
    return fit_on(module, root, steps, dm or data(), callbacks, **kwargs)


def images(n=4):
    return data().dataset("val").tensors["image"][:n]


@pytest.fixture(scope="module")
def anchor_ckpt(tmp_path_factory):
    """A DYMU anchor (3 streams) trained two steps: the supergraph's initial weights and the teachers."""
    return anchor_checkpoint(tmp_path_factory.mktemp("anchor"), data())


# ------------------------------------------------------------------------------------------------- BMTAS


def test_groupings_are_the_set_partitions_and_their_number_is_the_bell_number():
    for n, bell in ((1, 1), (2, 2), (3, 5), (4, 15), (5, 52)):
        partitions = set_partitions(n)
        assert len(partitions) == len(set(partitions)) == bell
        assert all(sorted(t for block in p for t in block) == list(range(n)) for p in partitions)
    assert ExpectedCost(3, [1.0]).n_groupings == 5 and ExpectedCost(4, [1.0, 2.0]).n_groupings == 15
    assert refines(((0,), (1, 2)), ((0, 1, 2),)) and not refines(((0, 1), (2,)), ((0,), (1, 2)))
    # tasks share a layer's node only if their routings agree on every layer up to it
    assert groupings([[0, 0, 1], [2, 1, 1]]) == [((0, 1), (2,)), ((0,), (1,), (2,))]


def brute_force_cost(probs, cost_of):
    """``sum over every routing of P(routing) * cost_of(routing)`` and the total probability."""
    n_layers, n = probs.shape[0], probs.shape[1]
    expected, total = 0.0, 0.0
    for flat in itertools.product(range(n), repeat=n * n_layers):
        routing = [flat[k * n:(k + 1) * n] for k in range(n_layers)]
        p = 1.0
        for k in range(n_layers):
            for t in range(n):
                p *= float(probs[k, t, routing[k][t]])
        expected += p * cost_of(routing)
        total += p
    return expected, total


def test_bmtas_resource_loss_equals_the_expectation_over_every_routing():
    torch.manual_seed(0)
    model = BmtasNet(backbone(), task_objects(), INPUT)
    assert model.anchor.n_layers == 2 and model.n_tasks == 3
    with torch.no_grad():
        model.logits.copy_(2 * torch.randn(2, 3, 3))
    costs = model.node_costs()
    layer = [costs.node_flops[k][0] for k in range(2)]
    assert layer[0] != layer[1] and all(len(set(row)) == 1 for row in costs.node_flops)
    heads = sum(costs.head_flops)
    probs = model.candidate_probabilities().detach().double()
    probs = probs / probs.sum(dim=-1, keepdim=True)  # rows summing to 1 in double precision

    # the cost of a routing: the FLOPs of the found tree's used nodes, measured with the flop counter
    expected, total = brute_force_cost(probs, lambda r: costs.cost(routing_to_architecture(r))["flops"] - heads)
    # and counted by hand: one node per group of tasks with a common routing prefix
    by_hand, _ = brute_force_cost(probs, lambda r: sum(
        len({tuple(r[m][t] for m in range(k + 1)) for t in range(3)}) * layer[k] for k in range(2)))
    assert total == pytest.approx(1.0) and expected == pytest.approx(by_hand, rel=1e-12)

    assert float(model.expected_cost()(probs)) == pytest.approx(expected, rel=1e-12)
    loss = model.resource_loss()  # float32, relative to 3 separate encoders
    assert float(loss.detach()) * 3 * sum(layer) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert model.logits.grad.abs().sum() > 0
    grouping = model.expected_cost().grouping_probabilities(probs)
    torch.testing.assert_close(grouping.sum(dim=1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="outside 1..6"):
        ExpectedCost(7, [1.0])


def test_bmtas_tree_is_the_routing_and_specializes_to_the_same_outputs():
    torch.manual_seed(0)
    model = BmtasNet(backbone(), task_objects(), INPUT).eval()
    routing = [[0, 0, 2], [0, 1, 2]]  # tasks 0 and 1 share stream 0's first block, then split
    with torch.no_grad():
        model.logits.copy_(torch.nn.functional.one_hot(torch.tensor(routing), 3).float() * 5)
    tree = model.architecture()
    assert model.routing() == routing and reassigned_groups(routing) == 0
    assert [tree.path(t) for t in range(3)] == [[0, 0], [0, 1], [2, 2]]
    x = images()
    with torch.no_grad():
        dynamic = model.anchor(x, architecture=tree)
        assert_outputs_equal(model(x, [1 / 3] * 3), dynamic)
        assert_outputs_equal(model.anchor.specialize(tree)(x), dynamic)
        one_hot = torch.nn.functional.one_hot(torch.tensor(routing), 3).float()
        for t, name in enumerate(model.task_names):  # the search's forward with the routing's one-hot weights
            torch.testing.assert_close(model.task_forward(x, t, one_hot[:, t]), dynamic[name], rtol=0, atol=0)
    # two groups that chose one candidate: one moves to a free stream; one node per group and layer remains
    clash = [[0, 1, 2], [1, 1, 1]]
    arch = routing_to_architecture(clash)
    assert reassigned_groups(clash) == 2
    assert [len(u) for u in arch.used_nodes()] == [len(g) for g in groupings(clash)] == [3, 3]
    with pytest.raises(ValueError, match="must lie in 0..2"):
        routing_to_architecture([[0, 3, 1]])


# ----------------------------------------------------------------------------------------------- LTB


def test_ltb_tree_specializes_to_the_dynamic_forward_and_the_temperature_decays():
    torch.manual_seed(0)
    model = LearnToBranchNet(backbone(), task_objects(), INPUT).eval()
    with torch.no_grad():
        model.logits.copy_(3 * torch.randn(2, 3, 3))
    tree = model.architecture()
    assert tree == Architecture.from_logits(model.logits) and tree != Architecture.anchor(3, 2)
    x = images()
    with torch.no_grad():
        dynamic = model.anchor(x, architecture=tree)
        assert_outputs_equal(model(x, [1 / 3] * 3), dynamic)
        assert_outputs_equal(model.anchor.specialize(tree)(x), dynamic)
        # the search's sampled forward with noise that cannot move the argmax is the tree too
        assert_outputs_equal(model.search_forward(x, 1.0, noise=torch.zeros(2, 3, 3)), dynamic)
    assert model.cost()["params"] == count_parameters(model.anchor.specialize(tree))
    assert ltb_temperature(0, 5, 50.0) == ltb_temperature(5, 5, 50.0) == 50.0
    assert ltb_temperature(8, 5, 50.0) == pytest.approx(25.0)  # 50 / sqrt(4)
    assert ltb_temperature(7, 0, 10.0, power=1.0, every=2) == pytest.approx(2.5)  # 10 / (1 + 3)


def all_weights(module):
    return torch.cat([p.detach().flatten() for p in module.model.weight_parameters()])


class LogitHistory(Callback):
    def __init__(self):
        self.logits, self.weights = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logits.append(module.model.logits.detach().clone())
        self.weights.append(all_weights(module))


def test_ltb_warmup_leaves_the_branching_logits_bit_identical(tmp_path):
    torch.manual_seed(0)
    module = LearnToBranchSearch(backbone(), task_configs(), INPUT, init="scratch", warmup_steps=3,
                                 temperature=5.0, branching_lr=0.1)
    start = module.model.logits.detach().clone()
    weights = all_weights(module)
    history = LogitHistory()
    fit(module, tmp_path, steps=5, callbacks=[history], limit_val_batches=0)
    assert all(torch.equal(logits, start) for logits in history.logits[:3])  # warm-up: not one bit changed
    assert not torch.equal(history.weights[0], weights)  # while the weights trained from the first step
    assert not torch.equal(history.logits[3], start)  # the first step after the warm-up updates them
    with pytest.raises(ValueError, match="needs anchor_checkpoint"):
        LearnToBranchSearch(backbone(), task_configs(), INPUT)


def test_ltb_stage_starts_from_the_anchor_and_its_checkpoint_holds_the_tree(anchor_ckpt, tmp_path):
    torch.manual_seed(0)
    module = LearnToBranchSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), branching_lr=0.5)
    anchor = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor
    assert_outputs_equal(module.model.anchor.state_dict(), anchor.state_dict())
    trainer = fit(module, tmp_path, steps=3, log_every_n_steps=1)
    assert module.model.logits.abs().sum() > 0
    logged = trainer.callback_metrics  # the architecture distribution over training
    assert {"arch/layer1/child2/parent0", "arch/expected_used_fraction", "train/temperature"} <= set(logged)
    path = tmp_path / "ltb.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_baseline(path)
    assert isinstance(loaded, LearnToBranchNet)
    assert found_architecture(path) == loaded.architecture() == module.model.architecture()
    x = images()
    module.model.eval()
    with torch.no_grad():
        assert_outputs_equal(loaded(x, [1 / 3] * 3), module.model(x, [1 / 3] * 3))
    assert loaded.cost() == module.model.cost()


# --------------------------------------------------------------------------------------------- BMTAS stage


def test_bmtas_stage_searches_on_its_split_and_its_checkpoint_reloads(anchor_ckpt, tmp_path):
    torch.manual_seed(0)
    module = BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), resource_weight=5.0,
                         arch_lr=0.5)
    dm = data()
    trainer = fit(module, tmp_path, steps=5, dm=dm, max_epochs=2, log_every_n_steps=1)
    weight_part, arch_part = holdout_indices(20, 0.2, 0)
    assert len(arch_part) == 4 and not set(weight_part) & set(arch_part)
    assert len(dm.train_dataloader().dataset) == 16  # the trainer's batches come from the weight split only
    assert module.arch_loader.dataset.indices == arch_part  # the data module's holdout: the architecture split
    assert dm.train_dataloader().dataset.indices == weight_part
    assert module.model.logits.abs().sum() > 0  # two architecture phases ran
    logged = trainer.callback_metrics
    assert {"arch/layer1/task2/stream0", "arch/resource_loss", "arch/expected_cost_fraction"} <= set(logged)
    path = tmp_path / "bmtas.ckpt"
    trainer.save_checkpoint(path)
    loaded = BmtasNet.from_checkpoint(path)
    assert found_architecture(path) == loaded.architecture() == module.model.architecture()
    meta = torch.load(path, weights_only=True)["dymu"]["bmtas"]
    assert routing_to_architecture(meta["routing"]) == loaded.architecture() and meta["routing"] == loaded.routing()
    x = images()
    module.model.eval()
    with torch.no_grad():
        assert_outputs_equal(loaded(x, [1 / 3] * 3), module.model(x, [1 / 3] * 3))
    assert linear_temperature(0, 100, 10) == 5.0 and linear_temperature(100, 100, 10) == pytest.approx(0.1)
    assert linear_temperature(55, 100, 10) == pytest.approx(2.55)
    with pytest.raises(ValueError, match="smaller than batch_size"):
        fit(BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs()), tmp_path, steps=1,
            dm=data(num_train=8))


def test_bmtas_resource_weight_shrinks_the_expected_cost(anchor_ckpt, tmp_path):
    fractions = {}
    for weight in (0.0, 20.0):
        torch.manual_seed(0)
        module = BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), resource_weight=weight,
                             arch_lr=0.2)
        # the resource gradient vanishes at the uniform start (symmetry): several architecture steps
        fit(module, tmp_path, steps=-1, dm=data(num_train=40), max_epochs=3, limit_train_batches=2,
            limit_val_batches=0)
        fractions[weight] = float(module.model.resource_loss().detach())
    assert fractions[20.0] < fractions[0.0] - 0.02, fractions


@pytest.mark.parametrize("reset", [True, False])
def test_bmtas_architecture_adam_is_reset_per_phase_or_kept(anchor_ckpt, tmp_path, reset):
    """The authors' code resets the routing logits' Adam at every architecture phase; reset_arch_optimizer=False
    keeps its moments across phases (docs/results.md, BMTAS on the held-out grouping)."""
    torch.manual_seed(0)
    module = BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), arch_lr=0.2,
                         reset_arch_optimizer=reset)
    phase_optimizers = []
    original = module.architecture_phase

    def recording_phase():
        original()
        phase_optimizers.append(module.arch_optimizer)

    module.architecture_phase = recording_phase
    fit(module, tmp_path, steps=-1, dm=data(num_train=40), max_epochs=3, limit_train_batches=2, limit_val_batches=0)
    per_phase = len(module.arch_loader)
    assert len(phase_optimizers) == 3 and per_phase >= 1
    steps = int(module.arch_optimizer.state[module.model.logits]["step"])
    assert steps == (per_phase if reset else 3 * per_phase)
    assert (len({id(o) for o in phase_optimizers}) == 3) is reset


def test_bmtas_phase_options_count_samples_steps_and_ramp(anchor_ckpt, tmp_path):
    """arch_samples draws that many Gumbel samples per architecture batch, arch_step="phase" takes one routing step
    per phase on the phase's mean gradient, resource_ramp raises lambda linearly from 0 after the warm-up."""
    torch.manual_seed(0)
    module = BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), arch_lr=0.2, arch_samples=3,
                         arch_step="phase", reset_arch_optimizer=False, resource_ramp=0.5, warmup_steps=2)
    calls = []
    original = module.model.search_forward

    def counting_forward(*args, **kwargs):
        calls.append(module.model.training)
        return original(*args, **kwargs)

    module.model.search_forward = counting_forward
    weights = []
    original_phase = module.architecture_phase

    def recording_phase():
        weights.append((module.global_step, module.current_resource_weight()))
        original_phase()

    module.architecture_phase = recording_phase
    fit(module, tmp_path, steps=-1, dm=data(num_train=40), max_epochs=4, limit_train_batches=2, limit_val_batches=0)
    per_phase = len(module.arch_loader)
    phases = len(weights)
    assert phases == 3 and per_phase >= 2  # epochs 1-3: the first two steps are the warm-up
    assert int(module.arch_optimizer.state[module.model.logits]["step"]) == phases  # one step per phase
    weight_steps = 8 - 2
    assert len(calls) == phases * per_phase * 3 + weight_steps
    # lambda: 0 at the first search step (step 2), 2/3 of it two steps later, all of it from step 5 on
    assert [w for _, w in weights] == pytest.approx([0.0, 0.5 * 2 / 3, 0.5])
    with pytest.raises(ValueError, match="arch_samples >= 1"):
        BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), arch_samples=0)
    with pytest.raises(ValueError, match="arch_step in"):
        BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), arch_step="epoch")
    with pytest.raises(ValueError, match="weight_uniform_share in"):
        BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), weight_uniform_share=1.5)


def test_bmtas_architecture_step_follows_the_mean_of_its_samples(anchor_ckpt, tmp_path, monkeypatch):
    """The routing step's gradient is the mean of the ``arch_samples`` samples' task-loss gradients plus lambda
    times the resource loss's, recomputed here from the recorded Gumbel noise on a fresh supergraph."""
    samples, weight = 3, 0.7
    draws, steps = [], []
    real_adam = torch.optim.Adam

    class RecordingAdam(real_adam):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.dim() == 3:  # the routing logits (L, N, N)
                        steps.append((p.detach().clone(), p.grad.detach().clone()))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    torch.manual_seed(0)
    module = BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), arch_samples=samples,
                         resource_weight=weight, warmup_steps=0)
    original = module.model.search_forward

    def recording_forward(x, temperature, noise=None, **kwargs):
        exponential = (-torch.log(torch.rand_like(module.model.logits).clamp_min(1e-10))).clamp_min(1e-10)
        noise = -torch.log(exponential)  # standard Gumbel, kept to recompute the step
        draws.append((x.detach().clone(), temperature, noise))
        return original(x, temperature, noise=noise, **kwargs)

    module.model.search_forward = recording_forward
    batches, objective = [], module.task_objective

    def recording_objective(outputs, batch):
        batches.append(batch)
        return objective(outputs, batch)

    module.task_objective = recording_objective
    fit(module, tmp_path, steps=1, dm=data(num_train=40), limit_val_batches=0)
    logits_before, grad = steps[0]  # the first routing step: the first architecture batch, before any weight step
    assert torch.equal(logits_before, torch.zeros_like(logits_before))
    fresh = BmtasSearch(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), resource_weight=weight)
    logits = fresh.model.logits
    expected = torch.autograd.grad(weight * fresh.model.resource_loss(), [logits])[0]
    batch = batches[0]
    for (x, temperature, noise), sample_batch in zip(draws[:samples], batches[:samples]):
        assert torch.equal(x, batch["image"]) and sample_batch is batch and temperature == 5.0
        with batch_statistics(fresh.model.anchor):
            loss, _ = fresh.task_objective(fresh.model.search_forward(x, temperature, noise=noise), batch)
        expected = expected + torch.autograd.grad(loss / samples, [logits])[0]
    torch.testing.assert_close(grad, expected)
    single = torch.autograd.grad(weight * fresh.model.resource_loss(), [logits])[0]
    assert not torch.allclose(grad, single)  # the task loss's part is there


def test_bmtas_uniform_share_mixes_every_candidate_into_every_task():
    torch.manual_seed(0)
    model = BmtasNet(backbone(), task_objects(), INPUT).eval()
    with torch.no_grad():
        model.logits.normal_(0, 3)
    x, noise = images(), torch.zeros_like(model.logits)
    uniform = torch.full((model.anchor.n_layers, model.n_tasks), 1 / model.n_tasks)
    with torch.no_grad():
        mixed = model.search_forward(x, 1.0, noise=noise, uniform_share=1.0)  # the uniform mixture only
        for t, name in enumerate(model.task_names):
            torch.testing.assert_close(mixed[name], model.task_forward(x, t, uniform))
        half = model.search_forward(x, 1.0, noise=noise, uniform_share=0.5)
        soft = model.logits.softmax(dim=-1)
        for t, name in enumerate(model.task_names):
            torch.testing.assert_close(half[name], model.task_forward(x, t, 0.5 * soft[:, t] + 0.5 * uniform))


# ---------------------------------------------------------------------------------------- feature partitioning


def test_refined_partition_keeps_overlaps_between_what_the_shares_allow():
    raw = torch.tensor([[0.7, 0.0, 1.0], [0.0, 0.6, 0.5], [1.0, 0.5, 0.2]])
    p = refine_partition(raw)
    torch.testing.assert_close(torch.diagonal(p), torch.diagonal(raw).double())
    assert float(p[0, 1]) == pytest.approx(0.3)  # raw 0: the least overlap, 0.7 + 0.6 - 1
    assert float(p[0, 2]) == pytest.approx(0.2)  # raw 1: the most, min(0.7, 0.2)
    assert float(p[1, 2]) == pytest.approx(0.1)  # halfway between 0 and 0.2
    with pytest.raises(ValueError, match="symmetric"):
        refine_partition([[0.5, 0.1], [0.2, 0.5]])


@pytest.mark.parametrize("n", [3, 4])
def test_masks_realise_a_feasible_partition_within_one_channel(n):
    generator = torch.Generator().manual_seed(n)
    for channels in (16, 37):
        target = torch.rand(n, channels, generator=generator) < torch.rand(n, 1, generator=generator)
        p = partition_of_masks(target)
        masks = masks_from_partition(p, channels)
        assert masks.shape == (n, channels) and masks.dtype == torch.bool
        error = (partition_of_masks(masks) - p).abs() * channels
        assert float(error.max()) <= 1.0 + 1e-9


def test_masks_of_random_two_task_partitions_are_within_one_channel():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b, overlap = torch.rand(3, generator=generator).tolist()
        p = refine_partition([[a, overlap], [overlap, b]])
        error = (partition_of_masks(masks_from_partition(p, 25)) - p).abs() * 25
        assert float(error.max()) <= 1.0 + 1e-9


def test_masked_channels_do_not_reach_their_task():
    torch.manual_seed(0)
    model = FeaturePartitionNet(backbone(), task_objects()[:2], INPUT, partition=[[0.5, 0.0], [0.0, 0.5]]).eval()
    masks = model.masks(1)  # the last block's output: 6 channels, 3 for each task, none shared
    assert masks.sum(dim=1).tolist() == [3.0, 3.0] and float((masks[0] * masks[1]).sum()) == 0
    x = images()
    with torch.no_grad():
        before = model(x)
        conv = model.net.node(1, 0).body[1][0]  # the conv that produces the last block's output
        conv.weight[masks[0] == 0] += 1.0  # change only the channels task 0 does not use
        after = model(x)
    torch.testing.assert_close(after["semseg"], before["semseg"], rtol=0, atol=0)
    assert not torch.equal(after["depth"], before["depth"])
    full = FeaturePartitionNet(backbone(), task_objects(), INPUT)  # P = 1: every task uses every channel
    assert full.cost()["params"] == count_parameters(shared_network(backbone(), task_objects()))
    assert model.cost()["flops"] < full.cost()["flops"]


def test_es_search_lowers_the_objective_with_its_diagonal_penalty():
    # a score that prefers task 0 to use 0.8 of the channels and everything else at 0.3
    target = torch.full((3, 3), 0.3, dtype=torch.float64)
    target[0, 0] = 0.8

    def score(p):
        return float(((p - target) ** 2).sum())

    result = search_partition(score, 3, budget=320, method="es", diag_penalty=0.0, directions=8, step_size=0.1,
                              noise=0.05, seed=0)
    assert len(result.history) == 320
    assert result.objective < result.history[0]["objective"] / 10
    assert float(result.partition[0, 0]) > float(result.partition[1, 1]) + 0.3
    heavy = search_partition(score, 3, budget=320, method="es", diag_penalty=2.0, directions=8, step_size=0.1,
                             noise=0.05, seed=0)
    assert float(torch.diagonal(heavy.partition).mean()) < float(torch.diagonal(result.partition).mean())
    random = search_partition(score, 3, budget=5, method="random", seed=0)
    assert len(random.history) == 5 and random.objective == min(r["objective"] for r in random.history)


def test_feature_partitioning_stage_searches_trains_and_reloads(anchor_ckpt, tmp_path):
    torch.manual_seed(0)
    module = FeaturePartitionTraining(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(),
                                      search_method="es", search_budget=4, es_directions=2, distill_steps=3,
                                      search_batches=2, score_batches=1)
    before = {k: v.clone() for k, v in module.model.net.state_dict().items()}
    trainer = fit(module, tmp_path, steps=2)
    assert bool(module.searched) and module.model.partition != [[1.0] * 3] * 3
    assert "arch/P_0_1" in trainer.callback_metrics
    assert any(not torch.equal(v, before[k]) for k, v in module.model.net.state_dict().items())
    path = tmp_path / "fp.ckpt"
    trainer.save_checkpoint(path)
    saved = partition_from_checkpoint(path)
    assert saved["partition"] == module.model.partition and saved["searched"]
    loaded = load_baseline(path)
    assert isinstance(loaded, FeaturePartitionNet)
    for layer in range(2):
        assert torch.equal(loaded.masks(layer), module.model.masks(layer))
    x = images()
    module.model.eval()
    with torch.no_grad():
        assert_outputs_equal(loaded(x), module.model(x))
    assert loaded.cost() == module.model.cost()
    with pytest.raises(ValueError, match="give anchor_checkpoint"):
        FeaturePartitionTraining(backbone(), task_configs(), INPUT)


def test_distillation_scores_are_reproducible_and_depend_on_the_partition(anchor_ckpt):
    teachers = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor
    dm = data()
    dm.setup("fit")
    train = [b["image"] for b in first_batches(dm.train_dataloader(), 2)]
    scored = first_batches(dm.val_dataloader(), 1)
    scales = torch.tensor([t.scale for t in task_objects()])

    def score(p):
        return distillation_score(teachers, backbone(), torch.tensor(p), train, scored, task_objects(), scales,
                                  steps=4, seed=0)

    full = [[1.0] * 3] * 3
    assert score(full) == score(full)  # every candidate's student starts from the same weights
    assert score(full) != score([[0.2, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.2]])
    with pytest.raises(ValueError, match="distill_layers must be in 1..2"):
        distillation_score(teachers, backbone(), torch.tensor(full), train, scored, task_objects(), scales,
                           distill_layers=3)


def test_bmtas_restarts_keep_the_search_whose_tree_has_the_smallest_objective(tmp_path):
    """restarts=3 trains three independent supergraphs (from scratch: their own initial weights) and keeps the one
    whose found tree has the smallest task loss + lambda * resource loss on the architecture split, recomputed here
    with every task's one-hot routing through ``task_forward`` and the resource loss from the tree's groupings."""
    torch.manual_seed(0)
    weight = 0.3
    module = BmtasSearch(backbone=backbone(), task_configs=task_configs(), input_shape=INPUT, init="scratch",
                         resource_weight=weight, arch_lr=0.5, warmup_steps=2, restarts=3)
    models = module.searches()
    assert len(models) == 3 and len(module.restart_models) == 2
    initial = [[p.detach().clone() for p in m.weight_parameters()] for m in models]
    assert not torch.equal(initial[0][0], initial[1][0])  # from scratch: each restart its own weights
    trainer = fit(module, tmp_path, steps=-1, dm=data(num_train=40), max_epochs=4, limit_train_batches=2,
                  limit_val_batches=0)
    for model, before in zip(module.searches(), initial):  # every restart trained, weights and routing logits
        assert all(not torch.equal(p, b) for p, b in zip(model.weight_parameters(), before))
        assert model.logits.abs().sum() > 0
    record = module.restart_selection
    assert record is not None and len(record["objectives"]) == 3
    best = record["selected"]
    assert record["objectives"][best] == min(record["objectives"])
    assert module.model.routing() == record["routings"][best]  # the kept search is now ``model``

    def objective(model, routing):
        n, layers = model.n_tasks, len(routing)
        total, batches = 0.0, 0
        with torch.no_grad(), batch_statistics(model.anchor):
            for batch in module.selection_loader():  # the architecture split, fixed order, no augmentation
                outputs = {name: model.task_forward(batch["image"], t, torch.nn.functional.one_hot(
                    torch.tensor([routing[k][t] for k in range(layers)]), n).float())
                    for t, name in enumerate(model.task_names)}
                total, batches = total + float(module.task_objective(outputs, batch)[0]), batches + 1
        costs = model.layer_costs()
        resource = sum(len(g) * c for g, c in zip(groupings(routing), costs)) / (n * sum(costs))
        return total / batches + weight * resource

    # the states were swapped: restart ``best``'s supergraph is ``model``, restart 0's took its place
    order = list(range(3))
    order[0], order[best] = best, 0
    for index, model in zip(order, module.searches()):
        assert model.routing() == record["routings"][index]
        assert objective(model, record["routings"][index]) == pytest.approx(record["objectives"][index], rel=1e-5)
    path = tmp_path / "bmtas.ckpt"
    trainer.save_checkpoint(path)
    meta = torch.load(path, weights_only=True)["dymu"]["bmtas"]
    assert meta["restarts"]["selected"] == best and meta["routing"] == record["routings"][best]
    assert BmtasNet.from_checkpoint(path).routing() == record["routings"][best]
    assert found_architecture(path) == routing_to_architecture(record["routings"][best])
    module.select_restart()  # once only
    assert module.restart_selection is record and module.model.routing() == record["routings"][best]
    # a later restart with the smallest objective: its whole state becomes ``model``'s, restart 0's takes its place
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in module.searches()]
    module.restart_selection = None
    module.found_objectives = lambda: [2.0, 3.0, 1.0]
    module.select_restart(log=False)
    assert module.restart_selection["selected"] == 2
    for model, state in zip(module.searches(), [states[2], states[1], states[0]]):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="restarts .* at least 1"):
        BmtasSearch(backbone=backbone(), task_configs=task_configs(), input_shape=INPUT, init="scratch", restarts=0)
