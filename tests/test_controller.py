"""The measured controller and budgeted search (dymu.controller), against brute force and hand values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dymu.anchor import AnchorNet, NodeCosts
from dymu.controller import (
    EXACT_TREE_LIMIT,
    CostModel,
    MeasuredController,
    Trees,
    as_parents,
    calibrate_trade_off,
    count_trees,
    enumerate_trees,
    lagrangian_path,
    local_search,
    measure_path_losses,
    minimize_tree,
    most_probable_tree,
    path_index,
    same_tree,
    search_starts,
)
from dymu.evaluation import mean_task_losses
from dymu.model import DynamicMultiTaskModel
from dymu.search_space import Architecture
from tests.small_scenes import INPUT, backbone, scenes


def all_assignments(n: int, n_layers: int) -> list[Architecture]:
    """Every parent table, duplicates of one tree included (the brute force)."""
    return [Architecture(tuple(tuple(flat[k * n:(k + 1) * n]) for k in range(n_layers)))
            for flat in itertools.product(range(n), repeat=n * n_layers)]


def canonical(arch: Architecture) -> tuple:
    return (tuple(arch.used_nodes()), tuple(tuple(arch.path(t)) for t in range(arch.n_tasks)))


def hand_costs(n: int, n_layers: int, seed: int = 0) -> NodeCosts:
    g = torch.Generator().manual_seed(seed)
    per_layer = torch.randint(10, 100, (n_layers,), generator=g).tolist()  # homogeneous streams, like a backbone
    params = tuple(tuple([p] * n) for p in per_layer)
    flops = tuple(tuple([3 * p + k] * n) for k, p in enumerate(per_layer))
    return NodeCosts(params, flops, tuple([7] * n), tuple([11] * n))


@pytest.mark.parametrize("n, n_layers", [(1, 3), (2, 2), (2, 3), (3, 2), (3, 3)])
def test_tree_count_and_enumeration_match_brute_force(n, n_layers):
    distinct = {canonical(a) for a in all_assignments(n, n_layers)}
    assert count_trees(n, n_layers) == len(distinct)
    trees = enumerate_trees(n, n_layers)
    enumerated = [canonical(Architecture(tuple(map(tuple, t.tolist())))) for t in trees]
    assert len(enumerated) == len(set(enumerated)) == len(distinct)
    assert set(enumerated) == distinct


def test_vectorised_paths_used_nodes_and_costs_equal_architecture():
    n, n_layers = 3, 3
    costs = hand_costs(n, n_layers)
    model = CostModel.create(costs, "params")
    anchor_params = costs.cost(Architecture.anchor(n, n_layers))["params"]
    trees = Trees(enumerate_trees(n, n_layers))
    for i in range(0, len(trees), 37):
        arch = Architecture(tuple(map(tuple, trees[i].tolist())))
        assert trees.paths[i].tolist() == [path_index(arch.path(t), n) for t in range(n)]
        assert [set(torch.nonzero(row)[:, 0].tolist()) for row in trees.used[i]] == [set(u) for u in arch.used_nodes()]
        assert math.isclose(float(model(Trees(trees[i:i + 1]))[0]), costs.cost(arch)["params"] / anchor_params)


def test_path_losses_give_every_tree_its_loss():
    """The loss of a tree (no adaptation) is each task's loss of its own path: the measured table predicts
    every tree's validation losses exactly."""
    torch.manual_seed(0)
    dm = scenes(["semseg", "depth", "normals"], num_val=8)
    dm.setup("fit")
    anchor = AnchorNet(backbone(), dm.tasks).eval()
    for module in anchor.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    sums, support = measure_path_losses(anchor, dm.tasks, dm.val_dataloader())
    table = sums / support
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        arch = Architecture.random(3, anchor.n_layers, generator=g)
        with torch.no_grad():
            direct = mean_task_losses(lambda x, a=arch: anchor(x, architecture=a), dm.val_dataloader(), dm.tasks)
        predicted = torch.stack([table[path_index(arch.path(t), 3), t] for t in range(3)])
        torch.testing.assert_close(predicted.float(), direct, rtol=1e-5, atol=1e-6)


def controller_with(table: torch.Tensor, n: int, n_layers: int, gamma: float = 0.1, search: str = "auto",
                    trade_off: float = 1.0) -> MeasuredController:
    ctrl = MeasuredController(n, n_layers, base_frugality=gamma, search=search)
    ctrl.set_measurement(table.double(), torch.ones(n, dtype=torch.float64))
    ctrl.trade_off.fill_(trade_off)
    return ctrl


def random_table(n: int, n_layers: int, seed: int) -> torch.Tensor:
    """Path losses that grow with every step away from the task's own stream (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.empty(n ** n_layers, n, dtype=torch.float64)
    for streams in itertools.product(range(n), repeat=n_layers):
        for t in range(n):
            away = sum(1 for s in streams if s != t)
            table[path_index(streams, n), t] = 1.0 + 0.3 * away + 0.2 * float(torch.rand((), generator=g))
    for t in range(n):  # the anchor's own path is the best one
        table[path_index([t] * n_layers, n), t] = 1.0
    return table


def brute_force_controller(ctrl, costs, r, c, budget=None, metric="params"):
    """The controller's objective minimised over every parent table, from the Architecture API alone."""
    n, n_layers = ctrl.n_tasks, ctrl.n_layers
    scaled = ctrl.scaled_losses()
    anchor = costs.cost(Architecture.anchor(n, n_layers))
    best = None
    for arch in all_assignments(n, n_layers):
        cost = costs.cost(arch)
        frac, bfrac = cost[ctrl.cost_metric] / anchor[ctrl.cost_metric], cost[metric] / anchor[metric]
        if budget is not None and bfrac > budget + 1e-12:
            continue
        loss = sum(float(r[t]) * float(scaled[path_index(arch.path(t), n), t]) for t in range(n))
        value = loss + ctrl.frugality(c) * frac
        if best is None or value < best[0] - 1e-9:
            best = (value, frac, arch)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_controller_and_budgets_equal_brute_force_on_three_tasks_three_layers(seed):
    n, n_layers = 3, 3
    ctrl = controller_with(random_table(n, n_layers, seed), n, n_layers, trade_off=0.8)
    costs = hand_costs(n, n_layers, seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        r = torch.distributions.Dirichlet(torch.ones(n)).sample().double()
        c = float(torch.rand((), generator=g))
        for budget, metric in [(None, "params"), (0.8, "params"), (0.6, "flops"), (0.45, "params")]:
            if budget is not None and budget < CostModel.create(costs, metric).floor():
                continue
            value, _, expected = brute_force_controller(ctrl, costs, r, c, budget, metric)
            found = ctrl.solve(r, c, costs, budget, metric)
            anchor = costs.cost(Architecture.anchor(n, n_layers))[metric]
            if budget is not None:
                assert costs.cost(found)[metric] / anchor <= budget + 1e-9
            got = brute_force_value(ctrl, costs, r, c, found)
            assert got == pytest.approx(value, abs=1e-9)


def brute_force_value(ctrl, costs, r, c, arch):
    n, n_layers = ctrl.n_tasks, ctrl.n_layers
    scaled = ctrl.scaled_losses()
    anchor = costs.cost(Architecture.anchor(n, n_layers))[ctrl.cost_metric]
    loss = sum(float(r[t]) * float(scaled[path_index(arch.path(t), n), t]) for t in range(n))
    return loss + ctrl.frugality(c) * costs.cost(arch)[ctrl.cost_metric] / anchor


def test_most_probable_tree_within_budget_equals_brute_force():
    n, n_layers = 3, 3
    costs = hand_costs(n, n_layers, 4)
    anchor = costs.cost(Architecture.anchor(n, n_layers))["params"]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = 2.0 * torch.randn(n_layers, n, n, generator=g)
        logits[:, range(n), range(n)] += 1.5  # the anchor likely, so budgets bind
        probs = torch.softmax(logits.double(), dim=-1)

        def probability(arch, probs=probs):
            used = [set(u) for u in arch.used_nodes()]
            value = 1.0
            for k in range(n_layers):
                children = range(n) if k == n_layers - 1 else used[k + 1]
                for j in children:
                    value *= float(probs[k, j, arch.parents[k][j]])
            return value

        archs = all_assignments(n, n_layers)
        assert probability(most_probable_tree(logits, costs)) == pytest.approx(max(map(probability, archs)))
        for budget in (0.9, 0.7, 0.5):
            feasible = [a for a in archs if costs.cost(a)["params"] / anchor <= budget + 1e-12]
            if not feasible:
                continue
            found = most_probable_tree(logits, costs, budget)
            assert costs.cost(found)["params"] / anchor <= budget + 1e-9
            assert probability(found) == pytest.approx(max(map(probability, feasible)), rel=1e-9)


def test_local_search_reaches_the_exact_optimum_on_small_spaces():
    """The heuristic for spaces too large to enumerate, against enumeration (its measured gap)."""
    n, n_layers = 3, 3
    hits, total = 0, 0
    for seed in range(3):
        ctrl = controller_with(random_table(n, n_layers, seed), n, n_layers, trade_off=0.8)
        costs = hand_costs(n, n_layers, seed)
        model = CostModel.create(costs)
        for c in (0.0, 0.3, 0.7, 1.0):
            for r in ([1 / 3] * 3, [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]):
                r = torch.tensor(r, dtype=torch.float64)
                task = ctrl.task_objective(r)
                mu = ctrl.frugality(c)
                def objective(t, task=task, mu=mu, model=model):
                    return task(t) + mu * model(t)

                exact = minimize_tree(objective, model, n, n_layers, None, "exact")
                local = minimize_tree(objective, model, n, n_layers, None, "local")
                v_exact = brute_force_value(ctrl, costs, r, c, exact)
                v_local = brute_force_value(ctrl, costs, r, c, local)
                assert v_local >= v_exact - 1e-9
                hits += v_local <= v_exact + 1e-9
                total += 1
    assert hits / total >= 0.9, f"local search found the optimum in {hits}/{total}"


def test_local_search_keeps_the_budget():
    n, n_layers = 3, 3
    costs = CostModel.create(hand_costs(n, n_layers))
    objective = lambda t: -costs(t)  # noqa: E731  (wants the most expensive tree)
    best = local_search(objective, costs, search_starts(n, n_layers), budget=0.7)
    assert float(costs(Trees(best.unsqueeze(0)))[0]) <= 0.7


def test_calibration_recovers_a_hand_computed_break_even():
    """N = 2, one layer: trees are the anchor (cost 1), or both heads on stream 0 or on stream 1 (cost s).
    Task 1 on stream 0 loses a, task 0 on stream 1 loses b > a: the uniform preference's only step, to stream 0,
    pays from mu = (a / 2) / (1 - s)."""
    a, b, s_node, heads = 0.4, 0.9, 30, 10
    costs = NodeCosts(((s_node, s_node),), ((s_node, s_node),), (heads, heads), (heads, heads))
    table = torch.tensor([[1.0, 1.0 + a], [1.0 + b, 1.0]], dtype=torch.float64)  # rows: path (0,), (1,)
    saving = s_node / (2 * s_node + 2 * heads)
    gamma = 0.1
    record = calibrate_trade_off(table, CostModel.create(costs), gamma, floor_break_even=0.8)
    lam = record["trade_off"]
    uniform_mu = (a / 2) / saving
    assert lam == pytest.approx(uniform_mu / (gamma + (1 - gamma) * 0.8))
    (uniform_c,) = record["uniform_break_even_c"]
    assert uniform_c == pytest.approx(0.8) and record["rule"] == "uniform floor"
    ctrl = controller_with(table, 2, 1, gamma=gamma, trade_off=lam)
    anchor, shared = Architecture.anchor(2, 1), Architecture.shared(2, 1, 0)
    r = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert same_tree(ctrl.solve(r, uniform_c - 1e-3, costs), anchor)
    assert same_tree(ctrl.solve(r, uniform_c + 1e-3, costs), shared)
    # no sharing step for the uniform preference (its best tree is already the cheapest): the median rule
    flat = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="no preference gains"):
        calibrate_trade_off(flat, CostModel.create(costs), gamma)


def test_lagrangian_path_is_the_lower_hull():
    loss = torch.tensor([1.0, 1.1, 1.5, 1.05, 3.0], dtype=torch.float64)
    cost = torch.tensor([1.0, 0.7, 0.4, 0.9, 0.4], dtype=torch.float64)
    path, breaks = lagrangian_path(loss, cost)
    assert path == [0, 1, 2]  # index 3 lies above the hull, index 4 is dominated
    assert breaks == pytest.approx([0.1 / 0.3, 0.4 / 0.3])


def test_cost_follows_c_and_ties_go_to_the_cheaper_tree():
    n, n_layers = 3, 3
    ctrl = controller_with(random_table(n, n_layers, 0), n, n_layers, trade_off=1.0)
    costs = hand_costs(n, n_layers)
    model = CostModel.create(costs)
    for r in ([1 / 3] * 3, [0.6, 0.3, 0.1]):
        r = torch.tensor(r, dtype=torch.float64)
        values = [float(model(Trees(as_parents(ctrl.solve(r, c, costs)).unsqueeze(0)))[0])
                  for c in torch.linspace(0, 1, 11).tolist()]
        assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), values
    # two streams identical for every task: the one-stream trees tie, the cheaper is kept
    flat = torch.ones(n ** n_layers, n, dtype=torch.float64)
    tied = controller_with(flat, n, n_layers, trade_off=1e-9)
    assert same_tree(tied.solve(torch.tensor([1 / 3] * 3), 0.0, costs), Architecture.shared(n, n_layers, 0))


def test_solve_many_equals_solve():
    n, n_layers = 3, 3
    ctrl = controller_with(random_table(n, n_layers, 2), n, n_layers, trade_off=0.7)
    costs = hand_costs(n, n_layers)
    r = torch.distributions.Dirichlet(torch.ones(n)).sample((16,)).double()
    c = torch.linspace(0, 1, 16, dtype=torch.float64)
    many = ctrl.solve_many(r, c, costs)
    for ri, ci, parents in zip(r, c, many):
        one = ctrl.solve(ri, float(ci), costs)
        assert same_tree(one, Architecture(tuple(map(tuple, parents.tolist()))))


@pytest.mark.parametrize("budget, message", [
    (0.1, "below the cheapest tree"), (1.5, "in (0, 1]"), (0.0, "in (0, 1]"), (float("nan"), "must be a number"),
    (True, "must be a number"), ("0.5", "must be a number")])
def test_bad_budgets_are_clear_errors(budget, message):
    n, n_layers = 3, 3
    ctrl = controller_with(random_table(n, n_layers, 0), n, n_layers)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ctrl.solve(torch.tensor([1 / 3] * 3), 0.5, hand_costs(n, n_layers), budget)


def test_bad_budget_metric_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match="budget_metric must be one of"):
        CostModel.create(hand_costs(3, 3), "latency")
    with pytest.raises(ValueError, match="base_frugality"):
        MeasuredController(3, 3, base_frugality=1.0)
    with pytest.raises(ValueError, match="N \\*\\* L"):
        MeasuredController(5, 18)
    assert count_trees(4, 4) > EXACT_TREE_LIMIT  # such spaces are searched locally


def test_model_with_controller_round_trips_and_keeps_budgets(tmp_path):
    torch.manual_seed(0)
    dm = scenes(["semseg", "depth", "normals"], num_val=8)
    dm.setup("fit")
    model = DynamicMultiTaskModel.build(backbone(), dm.tasks, edge={"embed_dim": 8, "hidden": 16},
                                        input_shape=INPUT, controller={"base_frugality": 0.2})
    model.eval()
    sums, support = measure_path_losses(model.anchor, dm.tasks, dm.val_dataloader())
    model.controller.set_measurement(sums, support)
    record = model.controller.calibrate(model.node_costs())
    assert record["trade_off"] > 0
    restored = DynamicMultiTaskModel.from_config(model.config())
    restored.load_state_dict(model.state_dict())
    restored.eval()
    x = torch.randn(2, *INPUT)
    anchor = model.node_costs().cost(Architecture.anchor(3, model.anchor.n_layers))["params"]
    floor = CostModel.create(model.node_costs()).floor()
    for r in ([1 / 3] * 3, [0.8, 0.1, 0.1], [0.2, 0.5, 0.3]):
        for c in (0.0, 0.5, 1.0):
            assert restored.architecture(r, c) == model.architecture(r, c)
            for budget in (1.0, 0.8, floor + 0.05):
                assert model.cost(r, c, budget=budget)["params"] <= budget * anchor + 1e-6
                static = model.specialize(r, c, budget=budget)
                dynamic = model(x, r, c, budget=budget)
                for key, value in static(x).items():
                    torch.testing.assert_close(value, dynamic[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="below the cheapest tree"):
        model.architecture([1 / 3] * 3, 0.0, budget=floor / 2)
    no_edge = DynamicMultiTaskModel.build(backbone(), dm.tasks, input_shape=INPUT)
    with pytest.raises(ValueError, match="no edge hypernet"):
        no_edge.architecture([1 / 3] * 3, 0.0, budget=0.8)
