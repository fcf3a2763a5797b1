"""The stage modules' structure: one flat base (``StageModule``) with keyword-only settings, no stage more than two
levels below ``LightningModule``, no base method called past the MRO, the loss scales computed without touching
``self.model``, and the data module's ``holdout`` (BMTAS's architecture split)."""

import ast
import inspect
import textwrap

import lightning as L
import pytest
import torch
from torch.utils.data import RandomSampler

import lightning_modules.base as base
from datamodules.base import holdout_indices
from dymu.evaluation import mean_task_losses
from dymu.model import DynamicMultiTaskModel
from lightning_modules.base import FoundTreeMixin, FrozenAnchorMixin, PreferenceSampler, StageModule
from lightning_modules.shared_mtl import SharedMultiTaskTraining
from stages.graph import STAGES
from tests.small_scenes import INPUT, anchor_checkpoint, backbone, fit, scenes

TASKS = ["semseg", "depth"]
STAGE_CLASSES = sorted({spec.model_class() for spec in STAGES.values() if spec.trained}, key=lambda c: c.__name__)
MIXINS = (FrozenAnchorMixin, FoundTreeMixin)


def test_every_training_stage_is_a_stage_module():
    assert len(STAGE_CLASSES) == 10
    assert all(issubclass(cls, StageModule) for cls in STAGE_CLASSES)


def depth_below_lightning_module(cls: type) -> int:
    """The longest chain of LightningModule subclasses from ``cls`` up to ``LightningModule``."""
    if cls is L.LightningModule:
        return 0
    return 1 + max(depth_below_lightning_module(b) for b in cls.__bases__ if issubclass(b, L.LightningModule))


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_stages_are_at_most_two_levels_below_lightning_module(cls):
    assert depth_below_lightning_module(cls) <= 2
    assert [b for b in cls.__bases__ if issubclass(b, L.LightningModule)] == [StageModule]
    for mixin in set(cls.__mro__) & set(MIXINS):  # the mixins add methods only: no state of their own to build
        assert not issubclass(mixin, L.LightningModule) and "__init__" not in vars(mixin)


def test_the_base_takes_keyword_only_settings():
    parameters = list(inspect.signature(StageModule.__init__).parameters.values())[1:]
    assert parameters and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def super_init_calls(cls: type) -> list[ast.Call]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "__init__" and isinstance(node.func.value, ast.Call)
            and getattr(node.func.value.func, "id", None) == "super"]


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_no_stage_passes_positional_arguments_to_its_base(cls):
    calls = super_init_calls(cls)
    assert len(calls) == 1, f"{cls.__name__}.__init__ calls super().__init__ {len(calls)} times"
    assert not calls[0].args, f"{cls.__name__} passes positional arguments to StageModule"
    given = {k.arg for k in calls[0].keywords}
    assert given <= set(inspect.signature(StageModule.__init__).parameters)


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_no_stage_calls_a_base_method_past_the_mro(cls):
    """``super()`` only: no ``SomeBase.method(self, ...)`` that skips a class in between."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = {c.__name__ for c in inspect.getmro(cls)[1:]}
    explicit = [ast.unparse(node) for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in names]
    assert not explicit, explicit


ARGUMENTS = {  # every stage's constructor arguments before the flat base: the config keys of configs/*.yaml
    "AnchorPretraining": ["backbone", "task_configs", "input_shape", "optimizer", "lr_scheduler",
                          "single_task_checkpoints", "stream_init", "pretrained", "shared_warmup_steps",
                          "random_tree_weight"],
    "EdgeHypernetSearch": ["anchor_checkpoint", "affinity", "task_configs", "backbone", "tau", "lambda_active",
                           "lambda_inactive", "temperature", "temperature_decay", "temperature_every", "dirichlet_eta",
                           "preference_groups", "loss_scales", "layer_weighting", "pin_heads", "c_conditioning",
                           "use_affinity", "task_dichotomy", "use_inactive", "straight_through", "embed_dim", "hidden",
                           "optimizer", "lr_scheduler", "seed", "val_preferences", "search", "base_frugality",
                           "cost_metric", "floor_break_even", "seeded_sampling"],
    "WeightHypernetAdaptation": ["edge_checkpoint", "task_configs", "backbone", "dirichlet_eta", "preference_groups",
                                 "loss_scales", "embed_dim", "hidden", "bn_statistics", "optimizer", "lr_scheduler",
                                 "seed", "val_preferences", "seeded_sampling"],
    "SharedMultiTaskTraining": ["backbone", "task_configs", "input_shape", "preference", "loss_scales",
                                "anchor_checkpoint", "optimizer", "lr_scheduler", "seed"],
    "ParetoHypernetTraining": ["backbone", "task_configs", "input_shape", "chunk_size", "chunk_embed_dim", "embed_dim",
                               "hidden", "bn_statistics", "dirichlet_eta", "preference_groups", "loss_scales",
                               "anchor_checkpoint", "optimizer", "lr_scheduler", "seed", "val_preferences"],
    "PhnBnTraining": ["shared_checkpoint", "task_configs", "backbone", "embed_dim", "hidden", "bn_statistics",
                      "modulate_heads", "dirichlet_eta", "preference_groups", "loss_scales", "anchor_checkpoint",
                      "optimizer", "lr_scheduler", "seed", "val_preferences"],
    "LearnToBranchSearch": ["backbone", "task_configs", "input_shape", "anchor_checkpoint", "init", "warmup_steps",
                            "temperature", "temperature_power", "temperature_every", "branching_lr", "loss_scales",
                            "optimizer", "lr_scheduler", "seed"],
    "BmtasSearch": ["backbone", "task_configs", "input_shape", "anchor_checkpoint", "init", "resource_weight",
                    "resource", "warmup_steps", "temperature_start", "temperature_end", "arch_fraction", "arch_lr",
                    "arch_weight_decay", "loss_scales", "optimizer", "lr_scheduler", "seed", "reset_arch_optimizer"],
    "FeaturePartitionTraining": ["backbone", "task_configs", "input_shape", "partition", "anchor_checkpoint",
                                 "search_method", "search_budget", "diag_penalty", "es_directions", "es_step_size",
                                 "es_noise", "distill_steps", "distill_lr", "distill_layers", "search_batches",
                                 "score_batches", "loss_scales", "optimizer", "lr_scheduler", "seed"],
    "TreeRetraining": ["backbone", "task_configs", "input_shape", "architecture", "tree_from", "init",
                       "anchor_checkpoint", "edge_checkpoint", "weight_checkpoint", "ltb_checkpoint", "bmtas_checkpoint",
                       "loss_scales", "optimizer", "lr_scheduler", "seed"],
}


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_no_public_argument_was_renamed_removed_or_moved(cls):
    """Config keys and positional calls keep working: the arguments above come first, in order (new ones may
    follow)."""
    names = list(inspect.signature(cls.__init__).parameters)[1:]
    assert names[:len(ARGUMENTS[cls.__name__])] == ARGUMENTS[cls.__name__]


# ------------------------------------------------------------------------------------------------ loss scales


def test_anchor_loss_scales_is_one_over_the_mean_losses():
    torch.manual_seed(0)
    dm = scenes(TASKS)
    dm.setup("fit")
    anchor = DynamicMultiTaskModel.build(backbone(), dm.tasks).anchor.eval()

    class Strategy:
        def reduce(self, value, reduce_op):
            assert reduce_op == "sum"
            return value

    scales = base.anchor_loss_scales(anchor, dm.val_dataloader(), dm.tasks, torch.device("cpu"), Strategy())
    torch.testing.assert_close(scales, 1.0 / mean_task_losses(lambda x: anchor(x), dm.val_dataloader(), dm.tasks))


def test_loss_scales_from_an_anchor_checkpoint_leave_the_model_in_place(tmp_path, monkeypatch):
    dm = scenes(TASKS)
    anchor_ckpt = anchor_checkpoint(tmp_path, dm)
    torch.manual_seed(0)
    module = SharedMultiTaskTraining(backbone(), [t.to_config() for t in dm.tasks], INPUT, loss_scales="anchor",
                                     anchor_checkpoint=anchor_ckpt)
    own, children = module.model, dict(module.named_children())
    seen = []

    def recording(anchor, *args, **kwargs):
        seen.append((module.model is own, anchor is not own and anchor not in list(own.modules()),
                     dict(module.named_children()) == children))
        return real(anchor, *args, **kwargs)

    real = base.anchor_loss_scales
    monkeypatch.setattr(base, "anchor_loss_scales", recording)
    fit(module, tmp_path, steps=1, dm=dm, limit_val_batches=0)
    assert seen == [(True, True, True)]  # called once; self.model and the children untouched meanwhile
    assert module.model is own and dict(module.named_children()) == children
    reference = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor
    torch.testing.assert_close(module.scales, 1.0 / mean_task_losses(lambda x: reference(x), dm.val_dataloader(),
                                                                      module.tasks))


def test_the_preference_sampler_is_seeded_by_the_step():
    sampler = PreferenceSampler(0.2, groups=3, seed=5)
    first = sampler.draw(4, step=7)
    assert len(first) == 3 and [p.r for p in first] == [p.r for p in sampler.draw(4, step=7)]
    assert [p.r for p in first] != [p.r for p in sampler.draw(4, step=8)]
    with pytest.raises(ValueError, match="dirichlet_eta must be > 0"):
        PreferenceSampler(0.0)
    with pytest.raises(ValueError, match="preference_groups must be >= 1"):
        PreferenceSampler(0.2, groups=0)


# ---------------------------------------------------------------------------------------------------- holdout


def indices(loader) -> list[int]:
    return list(loader.dataset.indices)


def test_holdout_splits_the_training_set_disjointly_and_deterministically():
    dm = scenes(TASKS, num_train=20)
    held = dm.holdout(0.25, seed=3)
    kept = dm.train_dataloader()
    assert len(indices(held)) == 5 and len(indices(kept)) == 15
    assert not set(indices(held)) & set(indices(kept)) and sorted(indices(held) + indices(kept)) == list(range(20))
    assert (indices(kept), indices(held)) == holdout_indices(20, 0.25, 3)
    assert held.dataset.dataset is dm.dataset("train") is kept.dataset.dataset  # the augmented training samples
    for loader in (held, kept):  # built like the training loader: shuffled, no incomplete batch
        assert isinstance(loader.sampler, RandomSampler) and loader.drop_last and loader.batch_size == dm.batch_size
    again = scenes(TASKS, num_train=20)
    assert indices(again.holdout(0.25, seed=3)) == indices(held) and indices(again.train_dataloader()) == indices(kept)
    other = scenes(TASKS, num_train=20).holdout(0.25, seed=4)
    assert indices(other) != indices(held)
    replaced = dm.holdout(0.25, seed=4)  # a second holdout replaces the first: a split of the whole training set
    assert indices(replaced) == indices(other)
    assert sorted(indices(dm.train_dataloader()) + indices(replaced)) == list(range(20))


def test_holdout_refuses_a_bad_fraction_or_a_part_smaller_than_a_batch():
    dm = scenes(TASKS, num_train=20)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="must lie in \\(0, 1\\)"):
            dm.holdout(fraction, seed=0)
    with pytest.raises(ValueError, match="smaller than batch_size"):
        dm.holdout(0.1, seed=0)  # 2 held-out samples, batches of 4
    assert len(dm.train_dataloader().dataset) == 20  # a refused holdout changes nothing
