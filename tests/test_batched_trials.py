"""K trials of a hypernet stage in one process (dymu.batched_trials) equal K separate single-trial computations:
losses and gradients to 1e-5, and the parameters after several optimizer steps, for the edge stage's Gumbel
search and the weight stage, with different tau, lambdas, temperatures, learning rates and seeds per trial.

The references are the stages' own objectives (``dymu.training.edge_search_loss``, ``weight_adaptation_loss``)
on one hypernet each, with ``torch.optim.Adam`` and the stage modules' ``PreferenceSampler``. Everything runs in
float64 (see tests/test_stacked.py: float32 CPU backward passes differ by more than 1e-5 on their own). The
trials are made to differ in every setting, and ``test_mixing_trials_is_detected`` checks that a batching that
shared the noise, the preferences or the optimizer settings between trials would fail these comparisons.
"""

import copy

import pytest
import torch

import dymu.batched_trials as bt
from dymu.anchor import AnchorNet
from dymu.backbones import ConvEncoderDecoder
from dymu.batched_trials import (
    AdamSettings,
    BatchedEdgeTrials,
    BatchedWeightTrials,
    EdgeTrial,
    StackedAdam,
    StackedHypernets,
    WeightTrial,
    draw_preferences,
    gumbel_noise,
    noise_generator,
)
from dymu.hypernets import EdgeHypernet, WeightHypernet
from dymu.model import DynamicMultiTaskModel
from dymu.tasks import make_task, task_scales
from dymu.training import edge_search_loss, weight_adaptation_loss
from lightning_modules.base import PreferenceSampler
from tests.test_anchor import randomize_batchnorm

TOL = 1e-5
DTYPE = torch.float64
TASKS = [make_task("semseg", "semseg", out_channels=3), make_task("depth", "depth"),
         make_task("normals", "normals")]
GROUPS, BATCH, STEPS, TOTAL = 2, 4, 4, 40

EDGE_TRIALS = [
    EdgeTrial(seed=0, tau=0.2, lambda_active=1.0, lambda_inactive=0.1, temperature=5.0, preference_groups=GROUPS,
              optimizer=AdamSettings(lr=5e-3)),
    EdgeTrial(seed=1, tau=0.3, lambda_active=3.0, lambda_inactive=0.5, temperature=2.0, temperature_every=1,
              temperature_decay=0.8, preference_groups=GROUPS, optimizer=AdamSettings(lr=2e-2, weight_decay=1e-3)),
    EdgeTrial(seed=7, tau=0.1, lambda_active=0.3, lambda_inactive=0.0, temperature=1.0, dirichlet_eta=1.0,
              preference_groups=GROUPS, optimizer=AdamSettings(lr=1e-3, betas=(0.8, 0.99))),
]


def anchor_net(seed=0):
    torch.manual_seed(seed)
    # the quickstart's ConvEncoderDecoder (configs/quickstart.yaml) at reduced widths and depth
    anchor = AnchorNet(ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8), TASKS)
    randomize_batchnorm(anchor)
    return anchor.to(DTYPE).eval().requires_grad_(False)


def edge_hypernet(anchor, seed, zero_heads=False):
    torch.manual_seed(100 + seed)
    net = EdgeHypernet(anchor.n_tasks, anchor.n_layers, embed_dim=8, hidden=16)
    if not zero_heads:  # random heads: every trial and preference picks its own trees
        for head in net.heads:
            torch.nn.init.normal_(head.weight, std=0.5)
            torch.nn.init.normal_(head.bias, std=0.5)
    return net.to(DTYPE)


def weight_hypernet(anchor, seed):
    from dymu.anchor import batchnorm_names

    torch.manual_seed(200 + seed)
    net = WeightHypernet(anchor.n_tasks, batchnorm_names(anchor), embed_dim=8, hidden=16)
    for head in net.heads:
        torch.nn.init.normal_(head.weight, std=0.05)
    return net.to(DTYPE)


def batch_of(seed, size=BATCH):
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(size, 3, 8, 8, generator=gen, dtype=DTYPE),
            "semseg": torch.randint(0, 3, (size, 8, 8), generator=gen),
            "depth": torch.rand(size, 1, 8, 8, generator=gen, dtype=DTYPE) + 0.5,
            "normals": torch.nn.functional.normalize(torch.randn(size, 3, 8, 8, generator=gen, dtype=DTYPE), dim=1)}


def trial_batches(step):
    """Every trial its own batch at every step (trials with different seeds see different data)."""
    return [batch_of(1000 * step + k) for k in range(len(EDGE_TRIALS))]


AFFINITY = torch.tensor([[1.0, 0.6, 0.2], [0.6, 1.0, 0.4], [0.2, 0.4, 1.0]], dtype=DTYPE)
SCALES = task_scales(TASKS).to(DTYPE) * torch.tensor([1.0, 0.7, 1.3], dtype=DTYPE)


def assert_close(a, b, what):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: max error {err}"


def max_rel_error(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------- the references


def edge_reference(anchor, net, trial, batch, step):
    """One trial alone: the edge stage's objective with the stage's preference sampler and the trial's noise."""
    n = anchor.n_tasks
    prefs = PreferenceSampler(trial.dirichlet_eta, trial.preference_groups, trial.seed).draw(n, step)
    noise = gumbel_noise((trial.preference_groups, anchor.n_layers, n, n), noise_generator(trial.seed, step),
                         dtype=DTYPE)
    return edge_search_loss(anchor, net, TASKS, SCALES, batch, prefs, trial.temperature_at(step, TOTAL), AFFINITY,
                            trial.regularizer(n), noise=noise, straight_through=trial.straight_through)


def adam(net, settings):
    return torch.optim.Adam(net.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay)


def separate_edge_runs(anchor, nets, trials, steps):
    """Each trial trained alone for ``steps`` steps; returns its hypernets and every step's losses."""
    nets = [copy.deepcopy(n) for n in nets]
    losses = []
    for k, (net, trial) in enumerate(zip(nets, trials)):
        opt = adam(net, trial.optimizer)
        per_step = []
        for step in range(steps):
            opt.zero_grad()
            out = edge_reference(anchor, net, trial, trial_batches(step)[k], step)
            out["loss"].backward()
            opt.step()
            per_step.append(out["loss"].detach())
        losses.append(torch.stack(per_step))
    return nets, torch.stack(losses)


def batched_edge_run(anchor, nets, trials, steps):
    batched = BatchedEdgeTrials(anchor, [copy.deepcopy(n) for n in nets], trials, TASKS, AFFINITY, SCALES, TOTAL)
    losses = [batched.step(trial_batches(step))["loss"] for step in range(steps)]
    return batched, torch.stack(losses, dim=1)


# -------------------------------------------------------------------------------------------------- the tests


def test_preferences_and_noise_are_each_trials_own():
    a = PreferenceSampler(0.2, 3, 5).draw(3, 11)
    assert draw_preferences(3, 11, 0.2, 3, 5) == a
    assert draw_preferences(3, 11, 0.2, 3, 6) != a
    g1, g2 = noise_generator(0, 3), noise_generator(0, 3)
    x = gumbel_noise((4, 3), g1)
    assert torch.equal(x, gumbel_noise((4, 3), g2))  # a function of (seed, step) only
    assert not torch.equal(x, gumbel_noise((4, 3), noise_generator(1, 3)))
    assert not torch.equal(x, gumbel_noise((4, 3), noise_generator(0, 4)))


def test_stacked_hypernets_equal_each_hypernet():
    anchor = anchor_net()
    nets = [edge_hypernet(anchor, k) for k in range(3)]
    stacked = StackedHypernets(nets)
    r = torch.softmax(torch.randn(3, 2, 3, dtype=DTYPE), -1)
    c = torch.rand(3, 2, dtype=DTYPE)
    out = stacked(r, c)
    for k, net in enumerate(nets):
        assert_close(out[k], net(r[k], c[k]), f"trial {k}")
        for name, p in net.named_parameters():
            assert torch.equal(stacked.unstacked(k).state_dict()[name], p.detach())
    with pytest.raises(ValueError, match="one hypernet structure"):
        StackedHypernets([nets[0], EdgeHypernet(3, anchor.n_layers, embed_dim=8, hidden=12).to(DTYPE)])


def test_stacked_adam_equals_torch_adam_per_trial():
    torch.manual_seed(0)
    settings = [AdamSettings(lr=1e-2), AdamSettings(lr=3e-3, weight_decay=1e-2, betas=(0.5, 0.9)),
                AdamSettings(lr=0.1, eps=1e-3)]
    params = torch.randn(3, 4, 5, dtype=DTYPE, requires_grad=True)
    singles = [params[k].detach().clone().requires_grad_(True) for k in range(3)]
    ours = StackedAdam([params], settings)
    theirs = [torch.optim.Adam([p], lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
              for p, s in zip(singles, settings)]
    for step in range(5):
        grads = torch.randn(3, 4, 5, dtype=DTYPE)
        params.grad = grads.clone()
        ours.step()
        for k, (p, opt) in enumerate(zip(singles, theirs)):
            p.grad = grads[k].clone()
            opt.step()
            assert_close(params[k].detach(), p.detach(), f"step {step}, trial {k}")


def test_batched_edge_losses_and_gradients_equal_separate_trials():
    anchor = anchor_net()
    nets = [edge_hypernet(anchor, k) for k in range(3)]
    batched = BatchedEdgeTrials(anchor, [copy.deepcopy(n) for n in nets], EDGE_TRIALS, TASKS, AFFINITY, SCALES,
                                TOTAL)
    step = 3  # a step where the trials' temperatures already follow their own schedules
    out = batched.loss(trial_batches(step), step=step)
    out["loss"].sum().backward()
    refs = []
    for k, (net, trial) in enumerate(zip(nets, EDGE_TRIALS)):
        ref = edge_reference(anchor, net, trial, trial_batches(step)[k], step)
        ref["loss"].backward()
        refs.append(ref)
        for key in ("loss", "task_loss", "omega", "active", "inactive", "expected_used_fraction"):
            assert_close(out[key][k], ref[key].detach(), f"trial {k} {key}")
        for name, p in zip(batched.hypernets.names, batched.hypernets.stacked):
            assert_close(p.grad[k], dict(net.named_parameters())[name].grad, f"trial {k} gradient of {name}")
    # the trials really differ (so that a batching that mixed them could not pass)
    losses = [r["loss"].item() for r in refs]
    assert len({round(v, 6) for v in losses}) == 3, losses
    assert all(r["omega"].item() > 0 for r in refs[:2])


def test_batched_edge_training_equals_separate_training():
    anchor = anchor_net()
    nets = [edge_hypernet(anchor, k) for k in range(3)]
    separate, ref_losses = separate_edge_runs(anchor, nets, EDGE_TRIALS, STEPS)
    batched, losses = batched_edge_run(anchor, nets, EDGE_TRIALS, STEPS)
    assert_close(losses, ref_losses, "losses of every step")
    for k, net in enumerate(separate):
        trained = batched.hypernets.unstacked(k)
        for (name, p), q in zip(net.named_parameters(), trained.parameters()):
            assert_close(q.detach(), p.detach(), f"trial {k} {name} after {STEPS} steps")
            moved = (p.detach() - dict(nets[k].named_parameters())[name].detach()).abs().max().item()
            assert moved > 1e-4, f"trial {k} {name} did not train"


@pytest.mark.parametrize("mix", ["shared noise", "shared preferences", "shared optimizer settings"])
def test_mixing_trials_is_detected(monkeypatch, mix):
    """Break the batching in one way that mixes trials: the comparison with separate training must fail."""
    anchor = anchor_net()
    nets = [edge_hypernet(anchor, k) for k in range(3)]
    separate, ref_losses = separate_edge_runs(anchor, nets, EDGE_TRIALS, 2)
    if mix == "shared noise":
        original = bt.noise_generator
        monkeypatch.setattr(bt, "noise_generator", lambda seed, step, device="cpu": original(0, step, device))
        trials = EDGE_TRIALS
    elif mix == "shared preferences":
        original_draw = bt.draw_preferences
        monkeypatch.setattr(bt, "draw_preferences", lambda n, step, eta, groups, seed: original_draw(
            n, step, eta, groups, 0))
        trials = EDGE_TRIALS
    else:
        trials = [EdgeTrial(**{**t.__dict__, "optimizer": EDGE_TRIALS[0].optimizer}) for t in EDGE_TRIALS]
    batched, losses = batched_edge_run(anchor, nets, trials, 2)
    errors = [max_rel_error(q.detach(), p.detach()) for k, net in enumerate(separate)
              for p, q in zip(net.parameters(), batched.hypernets.unstacked(k).parameters())]
    errors.append(max_rel_error(losses, ref_losses))
    assert max(errors) > 100 * TOL, f"{mix}: the batched run still matched the separate runs"


# ------------------------------------------------------------------------------------------------- weight stage

WEIGHT_TRIALS = [WeightTrial(seed=0, preference_groups=GROUPS, optimizer=AdamSettings(lr=1e-3)),
                 WeightTrial(seed=4, dirichlet_eta=1.0, preference_groups=GROUPS, optimizer=AdamSettings(lr=5e-3)),
                 WeightTrial(seed=9, preference_groups=GROUPS, optimizer=AdamSettings(lr=2e-3, weight_decay=1e-2))]


def weight_models(anchor, bn_statistics="running"):
    """Each trial's own edge-stage model (its own frozen edge hypernet; trials 0 and 1 zero heads, so their
    groups share one tree and run as one vmap) with a fresh weight hypernet; one anchor."""
    models = []
    for k in range(3):
        weight = weight_hypernet(anchor, k)
        weight.bn_statistics = bn_statistics
        edge = edge_hypernet(anchor, k, zero_heads=k < 2).requires_grad_(False)
        for head in edge.heads if k == 2 else []:  # trees that follow the preference
            head.weight.mul_(4.0)
            head.bias.zero_()
        models.append(DynamicMultiTaskModel(anchor, edge, weight, input_shape=(3, 8, 8)))
    return models


def test_weight_trials_share_trees_across_trials():
    anchor = anchor_net()
    models = weight_models(anchor)
    trees = {models[k].architecture(p) for k in range(2) for s in range(STEPS)
             for p in WEIGHT_TRIALS[k].preferences(3, s)}
    assert len(trees) == 1  # the vmap path runs (several jobs of one tree)
    assert len({models[2].architecture(p) for s in range(STEPS) for p in WEIGHT_TRIALS[2].preferences(3, s)}) > 1


@pytest.mark.parametrize("bn_statistics,vmap_trees", [("running", False), ("running", True), ("batch", False)])
def test_batched_weight_training_equals_separate_training(bn_statistics, vmap_trees):
    anchor = anchor_net()
    models = weight_models(anchor, bn_statistics)
    initial = [copy.deepcopy(m.weight_hypernet) for m in models]
    batched = BatchedWeightTrials(anchor, initial, [m.architecture for m in models], WEIGHT_TRIALS, TASKS, SCALES,
                                  bn_statistics=bn_statistics, vmap_trees=vmap_trees)
    # step 0: losses and gradients
    out = batched.loss(trial_batches(0), step=0)
    out["loss"].sum().backward()
    for k, (model, trial) in enumerate(zip(models, WEIGHT_TRIALS)):
        prefs = PreferenceSampler(trial.dirichlet_eta, trial.preference_groups, trial.seed).draw(3, 0)
        ref = weight_adaptation_loss(model, TASKS, SCALES, trial_batches(0)[k], prefs)
        ref["loss"].backward()
        assert_close(out["loss"][k], ref["loss"].detach(), f"trial {k} loss")
        assert_close(out["losses"][k], ref["losses"].detach(), f"trial {k} task losses")
        for i, (name, p) in enumerate(zip(batched.hypernets.names, batched.hypernets.stacked)):
            grad = dict(model.weight_hypernet.named_parameters())[name].grad
            # a head whose BatchNorm no tree of the step uses gets no gradient alone, and is not active batched
            assert (grad is not None) == bool(batched.active(out["active_heads"])[i][k]), f"trial {k} {name}"
            ours = torch.zeros_like(p[k]) if p.grad is None else p.grad[k]  # no trial used this head
            assert_close(ours, torch.zeros_like(ours) if grad is None else grad, f"trial {k} gradient of {name}")
    # a few optimizer steps: each trial alone against the batched trials
    batched.optimizer.zero_grad()
    models = weight_models(anchor, bn_statistics)  # fresh copies of the same initial hypernets
    for k, (model, trial) in enumerate(zip(models, WEIGHT_TRIALS)):
        opt = adam(model.weight_hypernet, trial.optimizer)
        for step in range(STEPS):
            opt.zero_grad()
            prefs = PreferenceSampler(trial.dirichlet_eta, trial.preference_groups, trial.seed).draw(3, step)
            weight_adaptation_loss(model, TASKS, SCALES, trial_batches(step)[k], prefs)["loss"].backward()
            opt.step()
    for step in range(STEPS):
        batched.step(trial_batches(step))
    for k, model in enumerate(models):
        for (name, p), q in zip(model.weight_hypernet.named_parameters(), batched.hypernets.unstacked(k).parameters()):
            assert_close(q.detach(), p.detach(), f"trial {k} {name} after {STEPS} steps")
        moved = max((p.detach() - q.detach()).abs().max().item()
                    for p, q in zip(model.weight_hypernet.parameters(), initial[k].parameters()))
        assert moved > 1e-4


def test_batched_trials_refuse_what_they_cannot_stack():
    anchor = anchor_net()
    nets = [edge_hypernet(anchor, k) for k in range(2)]
    with pytest.raises(ValueError, match="one preference_groups"):
        BatchedEdgeTrials(anchor, nets, [EdgeTrial(preference_groups=1), EdgeTrial(preference_groups=2)], TASKS,
                          AFFINITY, SCALES, TOTAL)
    with pytest.raises(ValueError, match="torch.optim.Adam only"):
        AdamSettings.from_spec({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}})
    assert AdamSettings.from_spec({"class_path": "torch.optim.Adam", "init_args": {"lr": 0.005}}).lr == 0.005
