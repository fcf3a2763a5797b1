"""The architecture evaluation: a found tree retrained from the anchor's weights or from scratch (its stage, its
checkpoint, where the tree comes from), the test loop with task metrics, and the task groupings with their
adjusted Rand index."""

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.synthetic import SyntheticRegressionDataModule
from dymu.anchor import AnchorNet, count_parameters
from dymu.baselines.base import load_baseline
from dymu.baselines.grouping import (
    adjusted_rand_index,
    deepest_shared_grouping,
    partition_labels,
    tree_groupings,
)
from dymu.baselines.ltb import found_architecture
from dymu.baselines.retrain import RetrainedTreeNet, tree_from_checkpoint
from dymu.checkpoint import META_KEY
from dymu.model import DynamicMultiTaskModel
from dymu.search_space import Architecture
from lightning_modules.retrain import TaskMetricsEvaluation, TreeRetraining
from stages.graph import STAGES, retrain_instances
from stages.pipeline import load_pipeline_config
from tests.small_scenes import INPUT, anchor_checkpoint, assert_outputs_equal, backbone, scenes
from tests.small_scenes import fit as fit_on

ROOT = Path(__file__).resolve().parent.parent

TASKS = ["semseg", "depth", "normals"]
TREE = Architecture(((1, 1, 1), (1, 1, 2)))  # semseg and depth share both blocks of stream 1, normals splits off
TREE_C1 = Architecture(((0, 0, 0), (0, 0, 0)))


def data(**kwargs):
    return scenes(TASKS, **{"num_test": 8, **kwargs})


def task_configs():
    return [t.to_config() for t in data().tasks]


def fit(module, root, steps, **kwargs):
    return fit_on(module, root, steps, data(), **kwargs)


def images(n=4):
    return data().dataset("val").tensors["image"][:n]


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def anchor_ckpt(tmp_path_factory):
    """A DYMU anchor trained two steps (its BatchNorm statistics moved away from the initial ones)."""
    return anchor_checkpoint(tmp_path_factory.mktemp("anchor"), data())


@pytest.fixture(scope="module")
def edge_ckpt(anchor_ckpt, tmp_path_factory):
    """A controllable model whose tree is TREE at c = 0 and TREE_C1 at c = 1 for every r: the edge hypernet's heads
    (affine in c) output fixed logits through their biases."""
    anchor = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt)
    model = DynamicMultiTaskModel.from_config({**anchor.config(), "edge": {"embed_dim": 8, "hidden": 16,
                                                                            "c_conditioning": "affine"}})
    model.anchor.load_state_dict(anchor.anchor.state_dict())
    at_c0, at_c1 = TREE.one_hot(), TREE_C1.one_hot()
    with torch.no_grad():
        for k in range(2):
            model.edge_hypernet.heads[k].bias.copy_(5 * at_c0[k].flatten())
            model.edge_hypernet.c_heads[k].bias.copy_(10 * (at_c1[k] - at_c0[k]).flatten())
    path = tmp_path_factory.mktemp("edge") / "edge.ckpt"
    torch.save({META_KEY: {"stage": "edge", "model": model.config()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


def search_ckpt(path, tree):
    """A tree search's checkpoint as far as the tree is concerned (its metadata)."""
    torch.save({META_KEY: {"stage": "ltb", "model": {"baseline": "ltb"}, "architecture": tree.to_list()},
                "state_dict": {}}, path)
    return str(path)


# ---------------------------------------------------------------------------------------------- the retrain stage


def test_retraining_from_the_anchor_starts_from_its_nodes_and_reloads(anchor_ckpt, tmp_path):
    torch.manual_seed(0)
    module = TreeRetraining(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), architecture=TREE.to_list(),
                            init="anchor")
    anchor = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor
    net = module.model.net
    assert sorted(net.blocks) == ["0_1", "1_1", "1_2"]  # only the tree's used nodes
    for key in net.blocks:  # node (l, s) starts as stream s's block l, BatchNorm statistics included
        layer, stream = map(int, key.split("_"))
        assert state_equal(net.node(layer, stream), anchor.node(layer, stream))
    assert state_equal(net.heads, anchor.heads)
    x = images()
    module.model.eval()
    with torch.no_grad():  # before training: the anchor's own pruned tree and its routed forward
        assert_outputs_equal(module.model(x), anchor.specialize(TREE)(x))
        assert_outputs_equal(module.model(x), anchor(x, architecture=TREE))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    module.model.train()

    trainer = fit(module, tmp_path, steps=4)  # one epoch, then validation
    assert any(not torch.equal(v, before[k]) for k, v in module.model.state_dict().items())
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp_path / "retrain.ckpt"
    trainer.save_checkpoint(path)
    assert found_architecture(path) == TREE == tree_from_checkpoint(path)
    loaded = load_baseline(path)
    assert isinstance(loaded, RetrainedTreeNet) and loaded.architecture() == TREE
    assert loaded.size_args()["source"]["init"] == "anchor"
    module.model.eval()
    with torch.no_grad():
        assert_outputs_equal(loaded(x, [1 / 3] * 3), module.model(x))
        assert_outputs_equal(loaded.inference_network()(x), loaded(x))
    # the parameters it counts are the tree's: used nodes and heads, as the anchor's node costs count them
    costs = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt)
    costs.input_shape = INPUT
    assert loaded.cost()["params"] == costs.node_costs().cost(TREE)["params"] == count_parameters(net)


def test_retraining_from_scratch_does_not_start_from_the_anchor(anchor_ckpt, tmp_path):
    torch.manual_seed(0)
    module = TreeRetraining(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), architecture=TREE.to_list(),
                            init="scratch")
    anchor = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor
    net = module.model.net
    for key in net.blocks:
        layer, stream = map(int, key.split("_"))
        assert not state_equal(net.node(layer, stream), anchor.node(layer, stream))
    torch.manual_seed(0)  # the backbone's own initialisation: a fresh anchor specialised to the tree
    fresh = AnchorNet(backbone(), data().tasks).specialize(TREE)
    assert state_equal(net, fresh)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit(module, tmp_path, steps=2)
    assert any(not torch.equal(v, before[k]) for k, v in module.model.state_dict().items())
    with pytest.raises(ValueError, match="init='anchor' needs anchor_checkpoint"):
        TreeRetraining(backbone(), task_configs(), INPUT, architecture=TREE.to_list())
    with pytest.raises(ValueError, match="init must be one of"):
        TreeRetraining(backbone(), task_configs(), INPUT, architecture=TREE.to_list(), init="imagenet")


def test_the_tree_comes_from_the_parent_checkpoint(anchor_ckpt, edge_ckpt, tmp_path):
    ltb = search_ckpt(tmp_path / "ltb.ckpt", TREE_C1)
    # ours at the uniform preference: the edge model's tree for c = 0 and for c = 1
    assert tree_from_checkpoint(edge_ckpt, c=0.0) == TREE and tree_from_checkpoint(edge_ckpt, c=1.0) == TREE_C1
    module = TreeRetraining(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), edge_checkpoint=edge_ckpt,
                            ltb_checkpoint=ltb, tree_from={"stage": "edge", "c": 1.0}, init="scratch")
    assert module.model.architecture() == TREE_C1
    assert module.model.source == {"stage": "edge", "c": 1.0, "checkpoint": edge_ckpt, "init": "scratch"}
    for tree_from, tree in (({"stage": "edge", "c": 0.0, "preference": [0.2, 0.3, 0.5]}, TREE),
                            ({"stage": "ltb"}, TREE_C1), ({"checkpoint": ltb}, TREE_C1)):
        module = TreeRetraining(anchor_checkpoint=anchor_ckpt, task_configs=task_configs(), edge_checkpoint=edge_ckpt,
                                ltb_checkpoint=ltb, tree_from=tree_from)
        assert module.model.architecture() == tree, tree_from
    with pytest.raises(ValueError, match="takes no preference"):
        tree_from_checkpoint(ltb, c=0.0)
    with pytest.raises(ValueError, match="give c"):
        tree_from_checkpoint(edge_ckpt)
    with pytest.raises(ValueError, match="defines no tree"):
        tree_from_checkpoint(anchor_ckpt, c=0.0)
    with pytest.raises(ValueError, match="bmtas_checkpoint is not set"):
        TreeRetraining(anchor_checkpoint=anchor_ckpt, tree_from={"stage": "bmtas"})
    with pytest.raises(ValueError, match="not both or neither"):
        TreeRetraining(anchor_checkpoint=anchor_ckpt, architecture=TREE.to_list(), tree_from={"stage": "ltb"},
                       ltb_checkpoint=ltb)


def test_retrain_instances_of_the_stage_table():
    quickstart = ROOT / "configs" / "quickstart.yaml"
    instances = retrain_instances(load_pipeline_config(quickstart, ["retrain=null"]))
    assert [folder for folder, _ in instances] == [
        f"retrain/{tree}_{init}" for tree in ("ours_c0", "ours_c1", "ltb", "bmtas") for init in ("anchor", "scratch")]
    args = dict(instances)
    assert args["retrain/ours_c1_scratch"] == {"tree_from": {"stage": "edge", "c": 1.0}, "init": "scratch"}
    assert args["retrain/bmtas_anchor"] == {"tree_from": {"stage": "bmtas"}, "init": "anchor"}
    half = load_pipeline_config(quickstart, ["retrain={trees: [ours_c0.5], inits: [anchor]}"])
    assert STAGES["retrain"].instances(half) == [
        ("retrain/ours_c0.5_anchor", {"tree_from": {"stage": "edge", "c": 0.5}, "init": "anchor"})]
    assert set(STAGES["retrain"].inputs) == {"anchor_checkpoint", "edge_checkpoint", "ltb_checkpoint",
                                             "bmtas_checkpoint"}
    for bad, message in (("trees: [phn]", "unknown tree"), ("trees: [ours_c2]", "c in"), ("trees: []", "not be empty")):
        with pytest.raises(ValueError, match=re.escape(message)):
            retrain_instances(load_pipeline_config(quickstart, [f"retrain={{{bad}}}"]))
    with pytest.raises(ValueError, match="key 'retrain.inits': expected one of 'anchor', 'scratch', got imagenet"):
        load_pipeline_config(quickstart, ["retrain.inits=[imagenet]"])


# ------------------------------------------------------------------------------------ the test loop with metrics


def test_task_metrics_evaluation_equals_the_metrics_computed_by_hand(anchor_ckpt):
    anchor = DynamicMultiTaskModel.from_checkpoint(anchor_ckpt).anchor.eval()
    networks = {"anchor": anchor, ("tree",): anchor.specialize(TREE).eval()}
    dm = data(batch_size=3)  # 8 test samples: batches of 3, 3 and 2
    module = TaskMetricsEvaluation(networks, dm.tasks)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False).test(module, datamodule=dm, verbose=False)
    dm.setup("test")
    for key, net in networks.items():
        metrics = {t.name: t.make_metric() for t in dm.tasks}
        with torch.no_grad():
            for batch in dm.test_dataloader():
                out = net(batch["image"])
                for t in dm.tasks:
                    t.update_metric(metrics[t.name], out[t.name], batch[t.name])
        expected = [float(metrics[t.name].compute()) for t in dm.tasks]
        assert module.metrics[key] == pytest.approx(expected, rel=1e-6), key
        assert len(module.losses[key]) == 3
    assert module.metrics["anchor"] != module.metrics[("tree",)]


# --------------------------------------------------------------------------------------------- groupings and ARI


def test_groupings_of_a_hand_made_tree():
    # layer 0: every task on node 1; layer 1: {0, 1} on node 0, {2, 3} on node 2; layer 2: {0, 1}, {2}, {3}
    tree = Architecture(((1, 1, 1, 1), (0, 0, 2, 2), (0, 0, 2, 3)))
    assert [tree.path(t) for t in range(4)] == [[1, 0, 0], [1, 0, 0], [1, 2, 2], [1, 2, 3]]
    assert tree_groupings(tree) == [((0, 1, 2, 3),), ((0, 1), (2, 3)), ((0, 1), (2,), (3,))]
    assert deepest_shared_grouping(tree) == (2, ((0, 1), (2,), (3,)))
    # only the first layer shared
    assert deepest_shared_grouping(Architecture(((0, 0, 0), (0, 1, 2)))) == (0, ((0, 1, 2),))
    assert deepest_shared_grouping(Architecture.anchor(3, 2)) == (None, ((0,), (1,), (2,)))
    assert partition_labels(((0, 1), (2,), (3,))) == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="not a partition"):
        partition_labels(((0, 1), (1, 2)))


def test_adjusted_rand_index_against_hand_counts():
    # contingency (0,0): 2, (1,1): 1, (1,2): 1 -> index 1; sizes C(2,2) * 2 = 2 and 1; expected 2 * 1 / C(4,2) = 1/3;
    # max (2 + 1) / 2 = 3/2; ARI = (1 - 1/3) / (3/2 - 1/3) = 4/7 (scikit-learn's documented 0.57)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3]) == 1.0  # the labels' names do not matter
    # every cell 1: index 0, expected 2 * 2 / 6 = 2/3, max 2: (0 - 2/3) / (2 - 2/3) = -1/2
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert adjusted_rand_index([0, 1, 2], [2, 1, 0]) == 1.0  # both all singletons
    with pytest.raises(ValueError, match="label 2 and 3"):
        adjusted_rand_index([0, 1], [0, 1, 2])


def test_grouping_of_the_regression_tasks_scores_one_when_it_finds_the_activations():
    dm = SyntheticRegressionDataModule(num_train=100, num_val=10, num_test=10)
    names = dm.task_names
    truth = [next(g for g, group in enumerate(dm.groups) if name in group) for name in names]
    assert truth == [0, 0, 1, 1, 2, 2]
    # three branches, one per activation, at the last layer (whatever streams they use)
    found = Architecture(((0,) * 6, (0, 1, 0, 1, 0, 1), (0, 0, 0, 0, 1, 1), (3, 3, 0, 0, 4, 4)))
    layer, grouping = deepest_shared_grouping(found)
    assert layer == 3 and adjusted_rand_index(truth, partition_labels(grouping, 6)) == 1.0
    merged = Architecture(((0,) * 6, (0,) * 6, (0,) * 6, (0, 0, 0, 0, 4, 4)))  # bent and square in one branch
    _, grouping = deepest_shared_grouping(merged)
    assert adjusted_rand_index(truth, partition_labels(grouping, 6)) < 1.0


def test_the_searches_run_on_the_regression_mlp_and_their_trees_are_scored(tmp_path):
    """BMTAS's architecture phase on BatchNorm1d blocks (the MLP): its cost table is measured at batch 1 before
    the BatchNorms switch to batch statistics, which refuse a single value per channel."""
    from dymu.backbones import MLPBackbone
    from lightning_modules.bmtas import BmtasSearch
    from lightning_modules.ltb import LearnToBranchSearch

    dm = SyntheticRegressionDataModule(activations=["bent", "sinc"], input_dim=8, output_dim=2, num_train=40,
                                       num_val=8, num_test=8, batch_size=8)
    configs = [t.to_config() for t in dm.tasks]
    truth = [0, 0, 1, 1]
    for cls, kwargs in ((BmtasSearch, {"warmup_steps": 1}), (LearnToBranchSearch, {"warmup_steps": 1})):
        torch.manual_seed(0)
        module = cls(MLPBackbone(input_dim=8, hidden=8, num_layers=2), configs, (8,), init="scratch", **kwargs)
        Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                limit_val_batches=0).fit(module, dm)
        layer, grouping = deepest_shared_grouping(module.model.architecture())
        assert -1.0 <= adjusted_rand_index(truth, partition_labels(grouping, 4)) <= 1.0
