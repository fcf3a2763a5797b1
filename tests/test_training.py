"""The hypernet stages' objectives: several preferences per batch, the temperature schedule, the ablation
switches of the regularizer and pinned heads."""

import pytest
import torch

from dymu.backbones import ConvEncoderDecoder
from dymu.hypernets import EdgeHypernet
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.regularizer import layer_weights, omega, usage_probabilities
from dymu.search_space import Architecture
from dymu.tasks import make_task, task_scales
from dymu.training import edge_search_loss, group_slices, temperature_at, weight_adaptation_loss
from tests.test_anchor import randomize_batchnorm

TASKS = [make_task("semseg", "semseg", out_channels=3), make_task("depth", "depth"),
         make_task("normals", "normals")]
REG = {"tau": 0.2, "lambda_active": 1.0, "lambda_inactive": 0.1}


def small_model(seed=0):
    torch.manual_seed(seed)
    backbone = ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8)
    model = DynamicMultiTaskModel.build(backbone, TASKS, edge={"embed_dim": 8, "hidden": 16},
                                        weight={"embed_dim": 8, "hidden": 16}, input_shape=(3, 8, 8))
    randomize_batchnorm(model.anchor)
    for head in model.edge_hypernet.heads:
        torch.nn.init.normal_(head.weight, std=0.5)
    for head in model.weight_hypernet.heads:
        torch.nn.init.normal_(head.weight, std=0.05)
    return model.eval()


def batch_of(size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, 8, 8, generator=gen),
            "semseg": torch.randint(0, 3, (size, 8, 8), generator=gen),
            "depth": torch.rand(size, 1, 8, 8, generator=gen) + 0.5,
            "normals": torch.nn.functional.normalize(torch.randn(size, 3, 8, 8, generator=gen), dim=1)}


PREFS = [Preference.create([0.7, 0.2, 0.1], 0.3), Preference.create([0.1, 0.1, 0.8], 0.9),
         Preference.create([1 / 3, 1 / 3, 1 / 3], 1.0)]


def test_group_slices_cover_the_batch_in_order():
    assert group_slices(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    parts = group_slices(7, 3)
    assert [p.stop - p.start for p in parts] == [2, 3, 2] and parts[0].start == 0 and parts[-1].stop == 7
    assert group_slices(2, 5) == [slice(0, 1), slice(1, 2)]  # fewer samples than groups
    with pytest.raises(ValueError, match="preference_groups must be >= 1"):
        group_slices(4, 0)


def _grads(module):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_grouped_edge_loss_equals_separate_single_preference_steps():
    model = small_model()
    batch = batch_of(7)
    noise = -torch.log(-torch.log(torch.rand(3, model.anchor.n_layers, 3, 3, generator=torch.Generator()
                                             .manual_seed(3))))
    scales, aff = task_scales(TASKS), torch.rand(3, 3, generator=torch.Generator().manual_seed(4))
    model.zero_grad()
    grouped = edge_search_loss(model.anchor, model.edge_hypernet, TASKS, scales, batch, PREFS, 0.7, aff, REG,
                               noise=noise)
    grouped["loss"].backward()
    grouped_grads = _grads(model.edge_hypernet)

    model.zero_grad()
    separate = []
    for g, part in enumerate(group_slices(7, 3)):
        sub = {k: v[part] for k, v in batch.items()}
        out = edge_search_loss(model.anchor, model.edge_hypernet, TASKS, scales, sub, [PREFS[g]], 0.7, aff,
                               REG, noise=noise[g:g + 1])
        (out["loss"] / 3).backward()
        separate.append(out)
    for key in ("loss", "task_loss", "omega", "active", "inactive"):
        expected = torch.stack([o[key] for o in separate]).mean()
        torch.testing.assert_close(grouped[key], expected, atol=1e-5, rtol=1e-5)
    assert grouped["omega"] > 0 and grouped["task_loss"] > 0
    grads = _grads(model.edge_hypernet)
    assert len(grads) == len(grouped_grads) > 0
    for a, b in zip(grouped_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def hand_task_loss(outputs, batch, pref):
    """``sum_t r_t w_t L_t`` written out, for comparison with the objective."""
    losses = torch.stack([t.loss(outputs[t.name], batch[t.name]) for t in TASKS])
    return (pref.r_tensor() * task_scales(TASKS) * losses).sum()


def test_single_group_is_the_one_preference_step():
    # G = 1 on the whole batch: the task loss of the hard sample's tree plus Omega of the soft sample
    model = small_model(1)
    batch = batch_of(4, seed=1)
    noise = torch.zeros(1, model.anchor.n_layers, 3, 3)
    pref = PREFS[0]
    out = edge_search_loss(model.anchor, model.edge_hypernet, TASKS, task_scales(TASKS), batch, [pref], 0.5,
                           torch.ones(3, 3), REG, noise=noise)
    with torch.no_grad():
        logits = model.edge_logits(pref)
        tree = Architecture.from_logits(logits)
        expected_task = hand_task_loss(model.anchor(batch["image"], architecture=tree), batch, pref)
        expected_reg = omega(torch.softmax(logits / 0.5, -1), pref.r_tensor(), pref.c, torch.ones(3, 3), **REG)
    torch.testing.assert_close(out["task_loss"], expected_task, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["omega"], expected_reg["omega"], atol=1e-6, rtol=1e-5)


def test_grouped_weight_loss_equals_separate_steps():
    model = small_model(2)
    batch = batch_of(6, seed=2)
    scales = task_scales(TASKS)
    model.zero_grad()
    grouped = weight_adaptation_loss(model, TASKS, scales, batch, PREFS)
    grouped["loss"].backward()
    grouped_grads = _grads(model.weight_hypernet)
    model.zero_grad()
    total = 0.0
    for pref, part in zip(PREFS, group_slices(6, 3)):
        out = weight_adaptation_loss(model, TASKS, scales, {k: v[part] for k, v in batch.items()}, [pref])
        (out["loss"] / 3).backward()
        total += out["loss"].item() / 3
    assert grouped["loss"].item() == pytest.approx(total, rel=1e-5)
    separate_grads = _grads(model.weight_hypernet)
    assert len(grouped_grads) == len(separate_grads) > 0
    for a, b in zip(grouped_grads, separate_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert model.edge_hypernet.heads[0].weight.grad is None  # the edge hypernet stays frozen in its role


def test_per_sample_samples_equal_per_group_forwards():
    anchor = small_model(3).anchor
    x = batch_of(4, seed=3)["image"]
    gen = torch.Generator().manual_seed(5)
    trees = [Architecture.random(3, anchor.n_layers, gen) for _ in range(4)]
    per_sample = torch.stack([t.one_hot() for t in trees])
    out = anchor(x, samples=per_sample)
    for i, tree in enumerate(trees):
        ref = anchor(x[i:i + 1], architecture=tree)
        for name in ref:
            torch.testing.assert_close(out[name][i:i + 1], ref[name], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="edge samples must have shape"):
        anchor(x, samples=per_sample[:3])


def test_temperature_schedule_tied_to_the_budget():
    # the paper: 30K steps, x0.97 every 300 -> 5 * 0.97^100 at the end
    assert temperature_at(30_000, 30_000) == pytest.approx(5 * 0.97 ** 100)
    assert temperature_at(3_000, 3_000) == pytest.approx(5 * 0.97 ** 100)
    assert temperature_at(1_499, 3_000) == pytest.approx(5 * 0.97 ** 49)
    assert temperature_at(0, 3_000) == 5.0
    assert temperature_at(900, 3_000, every=90) == pytest.approx(5 * 0.97 ** 10)


def test_layer_weights_readings():
    assert layer_weights(4, "paper") == [0.75, 0.5, 0.25, 0.0]
    assert layer_weights(4, "all") == [1.0, 0.75, 0.5, 0.25]
    assert layer_weights(4, "none") == [1.0] * 4
    with pytest.raises(ValueError, match="layer_weighting must be one of"):
        layer_weights(4, "linear")


def _terms(nu, r, c=1.0, **switches):
    aff = torch.tensor([[1.0, 0.2, 0.6], [0.4, 1.0, 0.1], [0.9, 0.3, 1.0]], dtype=torch.float64)
    return omega(nu, r, c, aff, tau=0.2, lambda_active=1.0, lambda_inactive=0.1, **switches)


@pytest.fixture
def nu():
    gen = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(3, 3, 3, generator=gen, dtype=torch.float64) * 2, dim=-1)


def test_each_ablation_switch_changes_exactly_its_term(nu):
    r = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)  # tasks 0, 1 active; task 2 inactive
    base = _terms(nu, r)
    assert base["active"] > 0 and base["inactive"] > 0
    no_inactive = _terms(nu, r, use_inactive=False)
    assert no_inactive["inactive"] == 0 and torch.equal(no_inactive["active"], base["active"])
    for switch in ({"layer_weighting": "none"}, {"layer_weighting": "all"}, {"use_affinity": False}):
        changed = _terms(nu, r, **switch)
        assert torch.equal(changed["inactive"], base["inactive"]), switch
        assert not torch.isclose(changed["active"], base["active"]), switch
    # no affinity: every pair weighs 1 (by hand: the affinity-free active loss of the two active tasks)
    usage = usage_probabilities(nu)
    w = layer_weights(3, "paper")
    hand = sum(w[k] * 2 * usage[k + 1, 0] * usage[k + 1, 1] * ((nu[k, 0] - nu[k, 1]) ** 2).sum() for k in range(3))
    torch.testing.assert_close(_terms(nu, r, use_affinity=False)["active"], hand)
    # no dichotomy: task 2 becomes active (its pairs enter the active term) and nothing is inactive
    no_dichotomy = _terms(nu, r, task_dichotomy=False)
    all_active = _terms(nu, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert no_dichotomy["inactive"] == 0
    torch.testing.assert_close(no_dichotomy["active"], all_active["active"])


def test_pinned_heads_keep_their_own_stream():
    torch.manual_seed(0)
    net = EdgeHypernet(3, 4, embed_dim=8, hidden=16, pin_heads=True)
    for head in net.heads:
        torch.nn.init.normal_(head.weight, std=3.0)
    logits = net(torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]), torch.tensor([0.1, 0.9]))
    assert logits.shape == (2, 4, 3, 3)
    for g in range(2):
        assert Architecture.from_logits(logits[g]).parents[-1] == (0, 1, 2)
    assert net.size_args["pin_heads"] is True
    model = DynamicMultiTaskModel.from_config({
        "backbone": ConvEncoderDecoder(channels=(4, 6), strides=(1, 2), decoder_width=8).config(),
        "tasks": [t.to_config() for t in TASKS], "edge": net.size_args, "weight": None, "input_shape": None})
    assert model.edge_hypernet.pin_heads


def test_batched_hypernet_equals_one_preference_at_a_time():
    torch.manual_seed(1)
    net = EdgeHypernet(3, 2, embed_dim=8, hidden=16)
    for head in net.heads:
        torch.nn.init.normal_(head.weight)
    r = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    c = torch.tensor([0.1, 0.9])
    batched = net(r, c)
    for g in range(2):
        torch.testing.assert_close(batched[g], net(r[g], c[g]))


def test_batched_regularizer_equals_one_preference_at_a_time():
    gen = torch.Generator().manual_seed(7)
    nu = torch.softmax(torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2, dim=-1)
    r = torch.tensor([[0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.05, 0.85], [0.4, 0.4, 0.1, 0.1],
                      [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    c = torch.tensor([0.0, 0.3, 1.0, 0.5, 0.9], dtype=torch.float64)
    aff = torch.rand(4, 4, generator=gen, dtype=torch.float64)
    cases = [({}, 0.15), ({"layer_weighting": "all"}, 0.15), ({"task_dichotomy": False}, 0.15),
             ({"use_inactive": False}, 0.15), ({}, 0.3)]  # tau 0.3: the uniform r has no active task
    for switches, tau in cases:
        batched = omega(nu, r, c, aff, tau=tau, lambda_active=1.0, lambda_inactive=0.1, **switches)
        if tau == 0.3:
            assert batched["inactive"][0] == 0 and batched["active"][0] == 0
        for g in range(5):
            single = omega(nu[g], r[g], c[g], aff, tau=tau, lambda_active=1.0, lambda_inactive=0.1, **switches)
            for key in ("omega", "active", "inactive", "usage"):
                torch.testing.assert_close(batched[key][g], single[key])


def test_relaxed_task_loss_uses_the_soft_mixture():
    model = small_model(4)
    batch = batch_of(4, seed=4)
    noise = torch.zeros(1, model.anchor.n_layers, 3, 3)
    pref = PREFS[1]
    out = edge_search_loss(model.anchor, model.edge_hypernet, TASKS, task_scales(TASKS), batch, [pref], 2.0,
                           torch.ones(3, 3), REG, noise=noise, straight_through=False)
    with torch.no_grad():
        soft = torch.softmax(model.edge_logits(pref) / 2.0, dim=-1)
        expected_task = hand_task_loss(model.anchor(batch["image"], samples=soft), batch, pref)
    torch.testing.assert_close(out["task_loss"], expected_task, atol=1e-5, rtol=1e-5)


def test_anchor_random_tree_term_adds_the_weighted_loss_of_the_steps_random_tree():
    """``random_tree_weight``: after the warm-up, the anchor's loss is its streams' own plus w times a random
    tree's, the tree fixed by the step (the same on every process and after resuming)."""
    from lightning_modules.anchor import AnchorPretraining
    from tests.small_scenes import INPUT, backbone, scenes

    dm = scenes(["semseg", "depth", "normals"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tasks = [t.to_config() for t in dm.tasks]
    torch.manual_seed(0)
    plain = AnchorPretraining(backbone(), task_configs=tasks, input_shape=INPUT, shared_warmup_steps=2)
    torch.manual_seed(0)
    mixed = AnchorPretraining(backbone(), task_configs=tasks, input_shape=INPUT, shared_warmup_steps=2,
                              random_tree_weight=0.25)
    for module in (plain, mixed):
        module.log = lambda *a, **k: None  # noqa: E731  (no trainer attached)
        module.log_task_losses = lambda *a, **k: None  # noqa: E731
    step = {"value": 0}
    for module in (plain, mixed):
        type(module).global_step = property(lambda self: step["value"])
    try:
        # during the warm-up both train the shared backbone only
        assert torch.equal(plain.training_step(batch, 0), mixed.training_step(batch, 0))
        step["value"] = 5
        tree = mixed.random_tree()
        assert tree == mixed.random_tree() and tree != Architecture.anchor(3, 2)
        own = (mixed.scales * mixed.losses(mixed.model.anchor(batch["image"]), batch)).sum()
        on_tree = (mixed.scales * mixed.losses(mixed.model.anchor(batch["image"], architecture=tree), batch)).sum()
        torch.testing.assert_close(mixed.training_step(batch, 0), own + 0.25 * on_tree)
        torch.testing.assert_close(plain.training_step(batch, 0), own)
        step["value"] = 6
        assert mixed.random_tree() != tree
    finally:
        del type(plain).global_step
    with pytest.raises(ValueError, match="random_tree_weight"):
        AnchorPretraining(backbone(), task_configs=tasks, input_shape=INPUT, random_tree_weight=-1.0)
