"""The captured edge step (issue 20, item 2; ``dymu.captured``, ``dymu.training.captured_edge_loss``, the edge
stage's ``compile_step``): the static-shape objective equals the eager one, ``compile_step: off`` is today's step
bit for bit, a compile error falls back to the eager step with one warning, and (slow: compiling takes minutes on
the shared CPU) the compiled step gives the eager loss and gradients to 1e-5 without recompiling when the
temperature changes."""

import json
import warnings

import pytest
import torch

import lightning_modules.edge as edge_module
from dymu.captured import CapturedStep, resolve_compile_step
from dymu.tasks import IGNORE_INDEX, make_task, task_scales
from dymu.training import captured_edge_loss, edge_search_loss, preference_tensors
from lightning_modules.edge import EdgeHypernetSearch
from tests.small_scenes import anchor_checkpoint, scenes
from tests.test_training import PREFS, REG, TASKS, batch_of, small_model

TOL = 1e-5


def _grads(module):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


# ------------------------------------------------------------------------------------------ the objective, eager


def _noise(groups, n_layers, seed=3):
    uniform = torch.rand(groups, n_layers, 3, 3, generator=torch.Generator().manual_seed(seed))
    return -torch.log(-torch.log(uniform))


@pytest.mark.parametrize("batch_size", [7, 2])  # groups of 3, 2 and 2 samples; fewer samples than preferences
@pytest.mark.parametrize("straight_through", [True, False])
def test_captured_objective_equals_the_eager_one(batch_size, straight_through):
    model = small_model()
    batch = batch_of(batch_size)
    batch["semseg"][0, :3] = IGNORE_INDEX  # invalid elements: masked in the captured losses, removed in the eager
    batch["depth"][1, 0, :2] = 0.0
    batch["normals"][0, :, 1] = 0.0
    noise = _noise(3, model.anchor.n_layers)
    scales, aff = task_scales(TASKS), torch.rand(3, 3, generator=torch.Generator().manual_seed(4))
    model.zero_grad()
    ref = edge_search_loss(model.anchor, model.edge_hypernet, TASKS, scales, batch, PREFS, 0.7, aff, REG, noise=noise,
                           straight_through=straight_through)
    ref["loss"].backward()
    ref_grads = _grads(model.edge_hypernet)
    model.zero_grad()
    r, c = preference_tensors(PREFS, "cpu")
    out = captured_edge_loss(model.anchor, model.edge_hypernet, TASKS, scales, batch, r, c, torch.tensor(0.7), aff,
                             REG, noise, straight_through)
    out["loss"].backward()
    assert out.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-6, rtol=1e-6)
    grads = _grads(model.edge_hypernet)
    assert len(grads) == len(ref_grads) > 0 and any(bool(g.abs().sum() > 0) for g in grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


KINDS = [("semseg", 4), ("depth", 1), ("normals", 3), ("edges", 1), ("saliency", 1), ("regression", 5),
         ("classification", 6)]


def _pred_target(kind, channels, gen):
    if kind == "regression":
        return torch.randn(4, channels, generator=gen), torch.randn(4, channels, generator=gen)
    if kind == "classification":
        target = torch.randint(0, channels, (4,), generator=gen)
        target[1] = IGNORE_INDEX
        return torch.randn(4, channels, generator=gen), target
    pred = torch.randn(4, channels, 5, 5, generator=gen)
    if kind == "semseg":
        target = torch.randint(0, channels, (4, 5, 5), generator=gen)
        target[0, :2] = IGNORE_INDEX
    elif kind == "depth":
        target = torch.rand(4, 1, 5, 5, generator=gen) + 0.1
        target[1, :, :3] = 0.0
    elif kind == "normals":
        target = torch.nn.functional.normalize(torch.randn(4, 3, 5, 5, generator=gen), dim=1)
        target[2, :, 1:3] = 0.0
    else:
        target = (torch.rand(4, 1, 5, 5, generator=gen) > 0.7).float()
        target[3, :, :2] = IGNORE_INDEX
    return pred, target


def _all_invalid(kind, target):
    if kind == "depth" or kind == "normals":
        return torch.zeros_like(target)
    return torch.full_like(target, IGNORE_INDEX)


@pytest.mark.parametrize("kind,channels", KINDS)
def test_static_losses_equal_the_losses(kind, channels):
    task = make_task(kind, kind, out_channels=channels)
    pred, target = _pred_target(kind, channels, torch.Generator().manual_seed(1))
    for tgt in (target, _all_invalid(kind, target) if kind != "regression" else target):
        p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
        eager, static = task.loss(p1, tgt), task.static_loss(p2, tgt)
        eager.backward()
        static.backward()
        torch.testing.assert_close(static, eager, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-7, rtol=1e-6)
        assert torch.isfinite(static) and torch.isfinite(p2.grad).all()


# --------------------------------------------------------------------------------------------------- the switch


def test_auto_resolves_per_device():
    assert resolve_compile_step("auto", "cuda") == "reduce-overhead"
    assert resolve_compile_step("auto", "cpu") == "off"  # measured: docs/performance.md, "A captured edge step"
    assert resolve_compile_step("default", "cpu") == "default"
    with pytest.raises(ValueError, match="compile_step must be one of"):
        resolve_compile_step("max-autotune", "cpu")


@pytest.fixture(scope="module")
def stage_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("captured")
    dm = scenes(["semseg", "depth", "normals"], batch_size=6)
    ckpt = anchor_checkpoint(root, dm)
    affinity = root / "affinity.json"
    affinity.write_text(json.dumps({"tasks": ["semseg", "depth", "normals"],
                                    "affinity": [[1.0, 0.4, 0.2], [0.4, 1.0, 0.6], [0.2, 0.6, 1.0]]}))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return ckpt, str(affinity), [t.to_config() for t in dm.tasks], batch


def edge_stage(stage_files, **kwargs):
    ckpt, affinity, tasks, _ = stage_files
    torch.manual_seed(0)  # the same fresh hypernet in every module
    module = EdgeHypernetSearch(ckpt, affinity, task_configs=tasks, tau=0.2, preference_groups=3, embed_dim=8,
                                hidden=16, search="gumbel", temperature_every=1, **kwargs)
    for head in module.model.edge_hypernet.heads:  # away from the uniform start, so that the trees differ
        torch.nn.init.normal_(head.weight, std=0.5)
    return module.train()


def step(module, batch, seed=None):
    """The training step's loss and the edge hypernet's gradients (``seed``: the global random state first)."""
    module.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: nothing to log to
        loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), _grads(module.model.edge_hypernet)


@pytest.mark.parametrize("seeded", [True, False])
def test_off_is_todays_step_bit_for_bit(stage_files, seeded):
    batch = stage_files[3]
    module = edge_stage(stage_files, seeded_sampling=seeded)
    assert module.compile_step == "off"  # the default
    loss, grads = step(module, batch, seed=5)
    assert module.captured is None  # nothing compiled
    module.zero_grad()
    torch.manual_seed(5)
    ref = edge_search_loss(module.model.anchor, module.model.edge_hypernet, module.tasks, module.scales, batch,
                           module.training_preferences(), module.temperature(), module.affinity, module.regularizer,
                           noise=module.step_noise(), straight_through=module.straight_through)["loss"]
    ref.backward()
    assert torch.equal(loss, ref.detach())
    ref_grads = _grads(module.model.edge_hypernet)
    assert len(grads) == len(ref_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_a_compile_error_falls_back_to_the_eager_step_with_one_warning(stage_files, monkeypatch):
    batch = stage_files[3]

    def uncapturable(*args, **kwargs):  # a branch on data: a graph break, which fullgraph refuses
        out = captured_edge_loss(*args, **kwargs)
        if out["loss"].item() > -1.0:
            return out
        return out

    monkeypatch.setattr(edge_module, "captured_edge_loss", uncapturable)
    module = edge_stage(stage_files, seeded_sampling=True, compile_step="default")
    with pytest.warns(RuntimeWarning, match=r"edge: compile_step='default' could not compile the step") as caught:
        loss, grads = step(module, batch)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert module.captured is not None and module.captured.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no second warning
        again, _ = step(module, batch)
    off_loss, off_grads = step(edge_stage(stage_files, seeded_sampling=True), batch)
    assert torch.equal(loss, off_loss) and torch.equal(again, off_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, off_grads))


def test_captured_step_refuses_modes_it_does_not_compile():
    with pytest.raises(ValueError, match="'default' or 'reduce-overhead'"):
        CapturedStep(captured_edge_loss, "off", "edge")


# ------------------------------------------------------------------------------------------ compiled (slow)


@pytest.mark.slow  # compiling the forward and backward graphs: about 2 minutes on the shared 2-core CPU
def test_compiled_step_equals_the_eager_step(stage_files):
    from torch._dynamo.utils import counters

    batch = stage_files[3]
    eager = edge_stage(stage_files, seeded_sampling=True)
    compiled = edge_stage(stage_files, seeded_sampling=True, compile_step="default")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn: the step must compile
        for round_ in range(2):  # the second step: another temperature, other noise and preferences, no recompiling
            eager.temperature0 = compiled.temperature0 = 5.0 / (round_ + 1)
            eager.seed = compiled.seed = round_
            eager.sampler = compiled.sampler = type(eager.sampler)(0.2, 3, round_)
            ref_loss, ref_grads = step(eager, batch)
            graphs = counters["stats"]["unique_graphs"]
            loss, grads = step(compiled, batch)
            if round_ == 1:
                assert counters["stats"]["unique_graphs"] == graphs, "the step recompiled"
            torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=TOL)
            assert len(grads) == len(ref_grads) > 0
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    assert compiled.captured is not None and not compiled.captured.failed
