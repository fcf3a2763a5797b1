"""Serving a preference: folded lean networks, export, `dymu show`, `dymu predict`, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from dymu import DynamicMultiTaskModel
from dymu.anchor import AnchorNet, batchnorm_names
from dymu.backbones import ConvEncoderDecoder, DeepLabMobileNetV2, DeepLabResNet34, MLPBackbone, ResNet9
from dymu.checkpoint import META_KEY
from dymu.deploy import ExportedModel, LeanNet, count_batchnorms, fold_batchnorms
from dymu.search_space import Architecture
from dymu.tasks import make_task
from dymu.treeview import draw_tree, render_text, tree_drawing
from stages.cli import entry_point
from stages.serve import colour_map, preference_grid, write_output

DENSE_TASKS = [make_task("semseg", out_channels=4), make_task("depth"), make_task("normals")]


def randomize_batchnorm(net, seed=0):
    """Non-trivial running statistics and affine parameters in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return net


def random_deltas(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(c, generator=gen) * 0.3, torch.randn(c, generator=gen) * 0.3)
            for name, c in batchnorm_names(net).items()}


def assert_folded_equals_dynamic(net, x, archs, deltas=None, tol=1e-5):
    """Folded lean net = the dynamic anchor (eval mode), no BatchNorm or buffer left, the expected size."""
    for arch in archs:
        with torch.no_grad():
            dynamic = net(x, architecture=arch, bn_deltas=deltas)
            specialized = net.specialize(arch, deltas).eval()
            lean = LeanNet.create(specialized, fold_bn=True)
            folded = lean(x)
        assert count_batchnorms(lean) == 0, "a BatchNorm was left unfolded"
        assert set(folded) == set(net.task_names)
        for name in net.task_names:  # to tol of the output's scale (deep random nets reach |y| ~ 1e3)
            scale = max(1.0, float(dynamic[name].abs().max()))
            torch.testing.assert_close(folded[name], dynamic[name], atol=tol * scale, rtol=0)
        bn_features = sum(m.num_features for m in specialized.modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm))
        # every BN's gamma and beta go, one bias per channel comes (the convs before them have none)
        assert sum(p.numel() for p in lean.parameters()) == sum(p.numel() for p in specialized.parameters()) - \
            bn_features
        assert not list(lean.buffers())


@pytest.mark.parametrize("with_deltas", [False, True])
def test_folding_equals_the_dynamic_model_on_the_quickstart_backbone(with_deltas):
    torch.manual_seed(0)
    net = randomize_batchnorm(AnchorNet(ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8),
                                        DENSE_TASKS)).eval()
    gen = torch.Generator().manual_seed(3)
    archs = [Architecture.anchor(3, 3), Architecture.shared(3, 3)] + [Architecture.random(3, 3, generator=gen)
                                                                       for _ in range(4)]
    assert_folded_equals_dynamic(net, torch.randn(2, 3, 16, 16), archs, random_deltas(net) if with_deltas else None)


def test_folding_equals_the_dynamic_model_on_the_mlp_backbone():
    torch.manual_seed(0)
    tasks = [make_task("regression", name=f"t{i}", out_channels=2) for i in range(3)]
    net = randomize_batchnorm(AnchorNet(MLPBackbone(input_dim=5, hidden=7, num_layers=3), tasks)).eval()
    gen = torch.Generator().manual_seed(5)
    archs = [Architecture.random(3, 3, generator=gen) for _ in range(4)]
    assert_folded_equals_dynamic(net, torch.randn(4, 5), archs, random_deltas(net))


@pytest.mark.parametrize("backbone, shape", [
    (DeepLabMobileNetV2(aspp_channels=32), (2, 3, 48, 48)),
    (DeepLabResNet34(aspp_channels=32, aspp_rates=(2,)), (2, 3, 48, 48)),
    (ResNet9(width=0.25), (2, 3, 32, 32)),
])
def test_folding_equals_the_dynamic_model_on_the_paper_networks(backbone, shape):
    torch.manual_seed(0)
    dense = not isinstance(backbone, ResNet9)
    tasks = ([make_task("semseg", out_channels=5), make_task("depth")] if dense else
             [make_task("classification", name=f"c{i}", out_channels=5) for i in range(2)])
    net = randomize_batchnorm(AnchorNet(backbone, tasks)).eval()
    gen = torch.Generator().manual_seed(4)
    arch = Architecture.random(2, net.n_layers, generator=gen)
    assert_folded_equals_dynamic(net, torch.randn(*shape), [arch], random_deltas(net))


def test_fold_batchnorms_leaves_batch_statistics_and_unpaired_batchnorms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    randomize_batchnorm(net[3:])
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
        assert fold_batchnorms(net) == 1  # only the last conv-BN pair
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    # the folded BatchNorm is gone from the Sequential (no module call left for it)
    assert [type(m).__name__ for m in net] == ["Conv2d", "BatchNorm2d", "ReLU", "BatchNorm2d", "Conv2d"]


def test_a_folded_torchvision_block_keeps_its_attributes():
    """torchvision's BasicBlock calls ``self.bn1`` by name: its folded BatchNorms become ``nn.Identity``."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    block = randomize_batchnorm(BasicBlock(8, 8)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = block(x)
        assert fold_batchnorms(block) == 2
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)


def aten_op_counts(fn):
    """How many times each aten op runs during ``fn()`` (the profiler sees the ops a kernel calls inside too)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        fn()
    return Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_folded_dilated_conv_adds_its_bias_in_one_op(with_bias):
    """PyTorch's CPU ``slow_conv_dilated2d`` (batch 1, a small image, a 3x3 kernel: no oneDNN) adds a bias one
    channel at a time, a ``select`` and a ``fill_`` per channel: the folded dilated conv stays bias-free and one
    broadcast add follows it."""
    from dymu.deploy import ChannelBias

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 64, 3, padding=2, dilation=2, bias=with_bias), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
    randomize_batchnorm(net).eval()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        expected = net(x)
    assert fold_batchnorms(net) == 2
    assert net[0].bias is None and isinstance(net[1], ChannelBias) and net[1].bias.shape == (64,)
    assert net[3].bias is not None and len(net) == 4  # not dilated: the bias stays in the conv, the BN is gone
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    ops = aten_op_counts(lambda: net(x))
    assert ops["aten::slow_conv_dilated2d"] == 1, "the test's conv should take PyTorch's slow dilated path"
    assert ops["aten::fill_"] + ops["aten::select"] < 8, ops
    assert sum(p.numel() for p in net.parameters()) == 64 * 8 * 9 + 64 + 16 * 64 * 9 + 16


# ---------------------------------------------------------------- a trained-looking run directory

IMAGE = (3, 16, 16)
R, C = [0.6, 0.3, 0.1], 0.5


def tiny_model(weight=True, zero_shifts=False):
    """A tiny model whose BatchNorms, edge hypernet and weight hypernet are random and non-trivial (trees and BN
    shifts depend on the preference); ``weight=False``: no weight hypernet; ``zero_shifts``: its heads output
    zero (every BatchNorm shift 0)."""
    torch.manual_seed(0)
    backbone = ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 1), decoder_width=8, low_level_block=0)
    model = DynamicMultiTaskModel.build(backbone, DENSE_TASKS, edge={"embed_dim": 8, "hidden": 16},
                                        weight={"embed_dim": 8, "hidden": 16} if weight else None, input_shape=IMAGE)
    randomize_batchnorm(model.anchor)
    with torch.no_grad():
        for p in model.edge_hypernet.parameters():
            p.normal_(0.0, 1.0)
        if weight:
            for p in model.weight_hypernet.parameters():
                p.normal_(0.0, 0.2)
            if zero_shifts:
                for head in model.weight_hypernet.heads:
                    head.weight.zero_()
                    head.bias.zero_()
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a weight-stage checkpoint of ``tiny_model()`` and its data config."""
    return write_run(tiny_model(), tmp_path_factory.mktemp("deploy") / "run")


def write_run(model, root):
    (root / "weight").mkdir(parents=True)
    (root / "configs").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                META_KEY: {"stage": "weight", "model": model.config()}}, root / "weight" / "final.ckpt")
    data = {"class_path": "datamodules.synthetic.SyntheticScenesDataModule",
            "init_args": {"tasks": ["semseg", "depth", "normals"], "num_train": 8, "num_val": 4, "num_test": 6,
                          "image_size": 16, "batch_size": 4}}
    (root / "configs" / "pipeline.yaml").write_text(yaml.safe_dump({"data": data}))
    return root


@pytest.fixture(scope="module")
def model(run_dir):
    return DynamicMultiTaskModel.from_run(run_dir)


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    """Six synthetic scenes (16x16) written as 8-bit PNGs."""
    folder = tmp_path_factory.mktemp("scenes")
    for i, x in enumerate(scene_images()):
        Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(
            folder / f"scene{i}.png")
    return folder


def scene_images():
    """Six test images of the synthetic scenes at 16x16, in [-1, 1]."""
    from datamodules.synthetic import SyntheticScenesDataModule

    dm = SyntheticScenesDataModule(tasks=["semseg", "depth"], num_train=6, num_val=2, num_test=6, image_size=16,
                                   batch_size=6)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))["image"]


def read_back(folder):
    """The PNGs as the model reads them (uint8 / 127.5 - 1), in name order."""
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32).copy()).permute(2, 0, 1)
                        for p in sorted(folder.glob("*.png"))]) / 127.5 - 1


def test_specialize_fold_bn_equals_the_model_for_preferences_and_budgets(model):
    x = torch.randn(3, *IMAGE)
    trees = set()
    for r, c, budget in [(R, C, None), ([1, 0, 0], 0.0, None), ([1 / 3] * 3, 1.0, None), (R, 0.0, 0.8)]:
        lean = model.specialize(r, c, budget=budget, fold_bn=True)
        assert isinstance(lean, LeanNet) and not lean.training and count_batchnorms(lean) == 0
        assert lean.architecture == model.architecture(r, c, budget=budget)
        trees.add(lean.architecture)
        with torch.no_grad():
            expected, got = model(x, r, c, budget=budget), lean(x)
        for task in model.tasks:
            torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=1e-5)
        with torch.enable_grad():  # no parameter that the forward does not use
            sum(y.sum() for y in lean(x).values()).backward()
        assert all(p.grad is not None for p in lean.parameters())
        assert sum(p.numel() for p in lean.parameters()) < model.cost(r, c, budget=budget)["params"]
    assert len(trees) > 1, "the test model's trees should depend on the preference"


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_export_round_trip_equals_pytorch(run_dir, model, tmp_path, fmt, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{fmt}"
    args = ["export", "--run_dir", str(run_dir), "--r", "0.6,0.3,0.1", "--c", str(C), "--format", fmt,
            "--out", str(out), "--real_images", "4" if fmt == "onnx" else "0"]
    assert entry_point(args) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    arch = model.architecture(R, C)
    assert record["tree"]["parents"] == arch.to_list()
    assert record["tree"]["used_nodes"] == [sorted(u) for u in arch.used_nodes()]
    cost = model.cost(R, C)
    assert record["params"] == cost["params"] and record["gflops"] == pytest.approx(cost["flops"] / 1e9)
    assert record["input_shape"] == list(IMAGE) and [t["name"] for t in record["tasks"]] == model.tasks
    assert record["run_dir"] == str(run_dir.resolve())
    assert record["folded_batchnorms"] == count_batchnorms(model.specialize(R, C))
    assert set(record["check"]) == ({"random", "real"} if fmt == "onnx" else {"random"})
    assert record["max_check_error"] <= 1e-4
    exported = ExportedModel(out, fmt)  # an independent check, at another batch size than the export's example
    x = torch.randn(5, *IMAGE)
    with torch.no_grad():
        expected = model(x, R, C)
    for task, y in zip(model.tasks, exported(x)):
        torch.testing.assert_close(y, expected[task], atol=1e-4, rtol=1e-4)


def test_export_names_the_install_command_when_a_package_is_missing(run_dir, tmp_path, monkeypatch, capsys):
    import dymu.deploy

    real = dymu.deploy.has_package
    monkeypatch.setattr(dymu.deploy, "has_package", lambda name: name != "onnxruntime" and real(name))
    args = ["export", "--run_dir", str(run_dir), "--r", "1", "0", "0", "--c", "0", "--format", "onnx",
            "--out", str(tmp_path / "m.onnx")]
    assert entry_point(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "onnxruntime" in err and "pip install 'dymu[deploy]'" in err
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- show


def test_tree_drawing_marks_exactly_the_used_nodes_and_cross_edges():
    arch = Architecture(((0, 1, 2), (0, 0, 2), (0, 1, 2), (1, 1, 1)))
    drawing = tree_drawing(arch, ["semseg", "depth", "normals"])
    # heads all read block 3 of stream 1; it reads block 2 of stream 1, which reads block 1 of stream 0 (cross)
    assert drawing.used_nodes() == {(0, 0), (1, 0), (2, 1), (3, 1)}
    assert {(e.layer, e.parent, e.child) for e in drawing.cross_edges()} == {(1, 0, 1), (3, 1, 0), (3, 1, 2)}
    assert {(e.layer, e.parent, e.child) for e in drawing.edges} == {(0, 0, 0), (1, 0, 1), (2, 1, 1), (3, 1, 0),
                                                                     (3, 1, 1), (3, 1, 2)}
    fig = draw_tree(drawing)
    markers = {c.get_label(): {(int(x), int(y)) for x, y in c.get_offsets()} for c in fig.axes[0].collections}
    assert markers["used"] == {(t, k) for k, t in drawing.used_nodes()}
    assert markers["unused"] == {(t, k) for k in range(4) for t in range(3)} - markers["used"]
    text = render_text(drawing).splitlines()
    assert text[1].split() == ["heads", "o<1", "o", "o<1"]
    assert [row.split() for row in text[2:6]] == [["block", "3", ".", "o", "."], ["block", "2", ".", "o<0", "."],
                                                  ["block", "1", "o", ".", "."], ["block", "0", "o", ".", "."]]


def test_dymu_show_prints_the_tree_and_its_cost(run_dir, model, tmp_path, capsys):
    out = tmp_path / "tree.png"
    assert entry_point(["show", "--run_dir", str(run_dir), "--r", *map(str, R), "--c", str(C), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    arch, cost = model.architecture(R, C), model.cost(R, C)
    assert f"tree {arch};" in printed and f"{cost['params']:,} params" in printed
    assert render_text(tree_drawing(arch, model.tasks)) in printed
    assert Image.open(out).size[0] > 100


# ---------------------------------------------------------------- predict


def test_predict_writes_every_task_of_every_image_and_matches_the_model(run_dir, model, scene_files, tmp_path):
    out = tmp_path / "pred"
    args = ["predict", "--run_dir", str(run_dir), "--r", *map(str, R), "--c", str(C), "--out", str(out),
            "--batch_size", "4", str(scene_files)]
    assert entry_point(args) == 0
    names = sorted(p.stem for p in scene_files.glob("*.png"))
    for task in model.tasks:
        assert sorted(p.stem for p in (out / task).iterdir()) == names
    with torch.no_grad():
        expected = model(read_back(scene_files), R, C)
    labels = np.stack([np.asarray(Image.open(out / "semseg" / f"{n}.png")) for n in names])
    assert Image.open(out / "semseg" / f"{names[0]}.png").mode == "P"
    assert (labels == expected["semseg"].argmax(1).numpy()).mean() > 0.999
    normals = np.stack([np.asarray(Image.open(out / "normals" / f"{n}.png"), dtype=np.float64) for n in names])
    want = (torch.nn.functional.normalize(expected["normals"], dim=1) + 1) / 2 * 255
    assert np.abs(normals - want.permute(0, 2, 3, 1).numpy()).max() <= 0.51
    depth = np.asarray(Image.open(out / "depth" / f"{names[1]}.png"), dtype=np.int64)
    assert np.abs(depth - colour_map(expected["depth"][1, 0].numpy()).astype(np.int64)).max() <= 1
    summary = json.loads((out / "predict.json").read_text())
    assert summary["tree"]["parents"] == model.architecture(R, C).to_list() and len(summary["inputs"]) == 6

    # the same from an exported file
    exported, out2 = tmp_path / "model.pt2", tmp_path / "pred2"
    assert entry_point(["export", "--run_dir", str(run_dir), "--r", *map(str, R), "--c", str(C), "--format", "pt2",
                        "--out", str(exported), "--real_images", "0"]) == 0
    assert entry_point(["predict", "--model", str(exported), "--out", str(out2), str(scene_files)]) == 0
    labels2 = np.stack([np.asarray(Image.open(out2 / "semseg" / f"{n}.png")) for n in names])
    assert (labels2 == labels).mean() > 0.999
    normals2 = np.stack([np.asarray(Image.open(out2 / "normals" / f"{n}.png"), dtype=np.float64) for n in names])
    assert np.abs(normals2 - normals).max() <= 1


def test_class_scores_are_written_as_json(tmp_path):
    logits = torch.tensor([0.5, 2.0, -1.0])
    path = write_output("classification", logits, tmp_path / "img")
    record = json.loads(path.read_text())
    assert path.suffix == ".json" and record["class"] == 1
    assert record["scores"] == pytest.approx(torch.softmax(logits, 0).tolist())


# ---------------------------------------------------------------- bad input: one line, exit 1


def bad_image(folder, name, mode, size):
    path = folder / name
    Image.new(mode, size).save(path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("off_simplex", "sum to 1"),
    ("wrong_count", "3"),
    ("c_range", "[0, 1]"),
    ("budget_range", "budget"),
    ("unreadable", "cannot read image"),
    ("truncated", "cannot read image"),
    ("negative_r", ">= 0"),
    ("nan_c", "[0, 1]"),
    ("no_inputs", "no input images given"),
    ("wrong_size", "the model takes 16x16"),
    ("wrong_channels", "the model takes 3-channel"),
    ("no_stage", "no finished edge or weight stage"),
    ("no_run", "does not exist"),
    ("model_and_run", "not both"),
    ("no_preference", "missing --r, --c"),
])
def test_bad_input_is_one_line_and_exit_1(run_dir, scene_files, tmp_path, capsys, case, expected):
    r, c, extra, inputs, run = ["0.6", "0.3", "0.1"], "0.5", [], [str(scene_files)], str(run_dir)
    if case == "off_simplex":
        r = ["0.6", "0.3", "0.3"]
    elif case == "wrong_count":
        r = ["0.5", "0.5"]
    elif case == "c_range":
        c = "1.5"
    elif case == "budget_range":
        extra = ["--budget", "1.5"]
    elif case == "unreadable":
        (tmp_path / "broken.png").write_text("not an image")
        inputs.append(str(tmp_path / "broken.png"))
    elif case == "truncated":  # a valid header, the pixels cut short: found before anything is written
        whole = sorted(scene_files.glob("*.png"))[0].read_bytes()
        (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
        inputs.append(str(tmp_path / "cut.png"))
        expected = f"cannot read image {tmp_path / 'cut.png'}"
    elif case == "negative_r":
        r = ["1.2", "-0.2", "0"]
    elif case == "nan_c":
        c = "nan"
    elif case == "no_inputs":
        inputs = []
    elif case == "wrong_size":
        inputs.append(str(bad_image(tmp_path, "big.png", "RGB", (32, 16))))
    elif case == "wrong_channels":
        inputs.append(str(bad_image(tmp_path, "grey.png", "L", (16, 16))))
    elif case == "no_stage":
        (tmp_path / "half" / "configs").mkdir(parents=True)
        run = str(tmp_path / "half")
    elif case == "no_run":
        run = str(tmp_path / "missing")
    elif case == "model_and_run":
        extra = ["--model", str(tmp_path / "m.onnx")]
    out = tmp_path / "out"
    preference = ["--r", *r, "--c", c] if case != "no_preference" else []
    code = entry_point(["predict", "--run_dir", run, *preference, *extra, "--out", str(out), *inputs])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and err.startswith("dymu predict: error:") and expected in err, err
    assert "normalize=True" not in err, "a command line error names the command's options, not the Python API"
    assert not out.exists(), "nothing is written when an input is bad"


def test_predict_on_the_runs_test_images(run_dir, model, tmp_path):
    """``--test_images N``: the run's first N test images written as PNGs and predicted as files are."""
    out = tmp_path / "pred"
    args = ["predict", "--run_dir", str(run_dir), "--r", *map(str, R), "--c", str(C), "--out", str(out),
            "--test_images", "5", "--batch_size", "2"]
    assert entry_point(args) == 0
    names = [f"test_{i:03d}" for i in range(5)]
    assert sorted(p.stem for p in (out / "inputs").iterdir()) == names
    for task in model.tasks:
        assert sorted(p.stem for p in (out / task).iterdir()) == names
    images = read_back(out / "inputs")
    torch.testing.assert_close(images, scene_images()[:5], atol=1 / 127.5, rtol=0)  # 8-bit copies of the split
    with torch.no_grad():
        expected = model(images, R, C)["semseg"].argmax(1).numpy()
    labels = np.stack([np.asarray(Image.open(out / "semseg" / f"{n}.png")) for n in names])
    assert (labels == expected).mean() > 0.999
    assert len(json.loads((out / "predict.json").read_text())["inputs"]) == 5


def test_dymu_show_grid_draws_the_uniform_and_one_hot_trees_at_three_costs(run_dir, model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert entry_point(["show", "--run_dir", str(run_dir), "--grid", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ", c = " in line]
    prefs = [[1 / 3] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    assert len(lines) == len(prefs) * 3
    for line, (r, c) in zip(lines, [(r, c) for r in prefs for c in (0.0, 0.5, 1.0)]):
        assert f"c = {c:g}: tree {model.architecture(r, c)};" in line
    assert Image.open(out).size[1] > Image.open(out).size[0]  # four rows of three


# ---------------------------------------------------------------- export --all_trees


def test_preference_grid_is_the_simplex_lattice_and_the_uniform_preference():
    grid = preference_grid(3, 2, [0.0, 1.0])
    rs = {tuple(r) for r, _ in grid}
    lattice = {(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)}
    assert rs == lattice | {(1 / 3, 1 / 3, 1 / 3)} and len(grid) == 7 * 2
    assert sorted({c for _, c in grid}) == [0.0, 1.0]
    assert len(preference_grid(2, 2, [0.0])) == 3  # (1, 0), (0.5, 0.5), (0, 1): the uniform is on the lattice


def distinct_networks(model, prefs):
    """Groups of preferences whose folded networks are identical (same tree, every tensor equal), computed
    independently of the command's hashing."""
    groups = []
    for r, c in prefs:
        lean = model.specialize(r, c, fold_bn=True)
        state = lean.state_dict()
        for group in groups:
            if group["tree"] == lean.architecture and group["state"].keys() == state.keys() and all(
                    torch.equal(group["state"][k], state[k]) for k in state):
                group["prefs"].append((r, c))
                break
        else:
            groups.append({"tree": lean.architecture, "state": state, "prefs": [(r, c)]})
    return groups


@pytest.mark.parametrize("case", ["shifts", "zero_shifts", "no_weight_hypernet"])
def test_export_all_trees_writes_each_distinct_network_once(tmp_path, case, capsys):
    model = tiny_model(weight=case != "no_weight_hypernet", zero_shifts=case == "zero_shifts")
    run = write_run(model, tmp_path / "run")
    model = DynamicMultiTaskModel.from_run(run)
    out = tmp_path / "all"
    args = ["export", "--run_dir", str(run), "--all_trees", "--r_steps", "1", "--c_grid", "0", "0.5", "1",
            "--format", "torchscript", "--out", str(out), "--real_images", "0"]
    assert entry_point(args) == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    prefs = [(e["r"], e["c"]) for e in index["preferences"]]
    assert len(prefs) == 4 * 3 == index["grid"]["preferences"]  # 3 one-hot r + the uniform, 3 values of c
    groups = distinct_networks(model, prefs)
    trees = {model.architecture(r, c) for r, c in prefs}
    files = sorted(p.name for p in out.glob("net_*.pt"))
    assert len(files) == len(index["files"]) == len(groups)
    if case == "shifts":  # the shifts depend on the preference: a tree is not enough to share a file
        assert index["distinct_by"].startswith("folded weights") and len(groups) > len(trees)
    else:  # no shift differs: one file per tree
        assert len(groups) == len(trees) < len(prefs)
        assert index["distinct_by"] == ("tree" if case == "no_weight_hypernet" else index["distinct_by"])
    for group in groups:  # preferences with one network share one file, different networks never do
        assert len({e["file"] for e in index["preferences"] if (e["r"], e["c"]) in group["prefs"]}) == 1
    x = torch.randn(3, *IMAGE)
    for entry in index["preferences"]:  # each preference's file reproduces the model at that preference
        assert (out / entry["file"]).is_file() and (out / f"{entry['file']}.json").is_file()
        with torch.no_grad():
            expected = model(x, entry["r"], entry["c"])
        for task, y in zip(model.tasks, ExportedModel(out / entry["file"], "torchscript")(x)):
            torch.testing.assert_close(y, expected[task], atol=1e-4, rtol=1e-4)
        assert entry["tree"] == model.architecture(entry["r"], entry["c"]).to_list()


def test_export_all_trees_refuses_a_preference_and_a_file_name(run_dir, tmp_path, capsys):
    base = ["export", "--run_dir", str(run_dir), "--all_trees", "--format", "pt2"]
    assert entry_point([*base, "--r", "1", "0", "0", "--c", "0", "--out", str(tmp_path / "d")]) == 1
    assert "without --r and --c" in capsys.readouterr().err
    assert entry_point([*base, "--out", str(tmp_path / "m.pt2")]) == 1
    assert "folder" in capsys.readouterr().err
    assert entry_point([*base, "--r_steps", "100", "--out", str(tmp_path / "d")]) == 1
    assert "smaller --r_steps" in capsys.readouterr().err
