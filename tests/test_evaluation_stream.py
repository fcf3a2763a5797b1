"""``dymu evaluate`` streams the test set: the same records as a brute-force evaluation, memory that does not
grow with the test set, the same sums under two-process DDP, and a clear error for a folder that is no run."""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from dymu.anchor import recalibrate_batchnorm
from dymu.backbones.base import Backbone
from dymu.checkpoint import META_KEY
from dymu.evaluation import Evaluated, LossSums, configuration_forwards, protocol_variants
from dymu.layout import RunLayout
from dymu.metrics import hypervolume, mean_uniformity
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, evaluation_preferences
from dymu.search_space import Architecture
from dymu.tasks import task_losses, task_scales
from lightning_modules.evaluation import ProtocolEvaluation
from stages.common import build_data, instantiate, write_yaml
from stages.evaluate import evaluate_run, training_images

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = {"class_path": "dymu.backbones.ConvEncoderDecoder",
            "init_args": {"channels": [4, 6, 8], "strides": [1, 2, 1], "decoder_width": 8, "low_level_block": 0}}
# 11 test images in batches of 4, 4, 3: a mean of batch means would differ from the data set's mean
DATA = {"class_path": "datamodules.synthetic.SyntheticScenesDataModule",
        "init_args": {"tasks": ["semseg", "depth", "normals"], "num_train": 16, "num_val": 4, "num_test": 11,
                      "image_size": 16, "batch_size": 4}}
OPTIONS = {"num_preferences": 4, "num_cost_preferences": 10, "recalibrate_batches": 2}


def random_model(tasks, image_size: int, seed: int = 0) -> DynamicMultiTaskModel:
    """A model with both hypernets whose weights are perturbed so that the preferences give several trees,
    non-zero BatchNorm shifts and running statistics that recalibration changes."""
    torch.manual_seed(seed)
    model = DynamicMultiTaskModel.build(instantiate(Backbone, BACKBONE, "backbone"), tasks,
                                        edge={"embed_dim": 8, "hidden": 16}, weight={"embed_dim": 8, "hidden": 16},
                                        input_shape=(3, image_size, image_size))
    with torch.no_grad():
        for net in (model.edge_hypernet, model.weight_hypernet):
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        for module in model.anchor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_run(run_dir: Path, model: DynamicMultiTaskModel, data_config: dict) -> Path:
    """A run directory as `dymu run` leaves it, as far as `dymu evaluate` reads it."""
    layout = RunLayout(run_dir)
    write_yaml({"data": data_config, "backbone": BACKBONE, "evaluate": OPTIONS}, layout.pipeline_config)
    layout.final("weight").parent.mkdir(parents=True)
    torch.save({META_KEY: {"stage": "weight", "model": model.config()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, layout.final("weight"))
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tasks = build_data(DATA).tasks
    return write_run(tmp_path_factory.mktemp("eval") / "run", random_model(tasks, 16), DATA)


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_streamed_records_equal_a_brute_force_evaluation(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    result = evaluate_run(run_dir, **OPTIONS)
    assert json.loads(RunLayout(run_dir).metrics.read_text())["records"] == json.loads(json.dumps(result["records"]))

    # the reference: the whole test split as one batch, each configuration's losses on it
    data = build_data(DATA)
    data.setup("test")
    batches = list(data.test_dataloader())
    full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    tasks, x = data.tasks, full["image"]
    model = DynamicMultiTaskModel.from_checkpoint(RunLayout(run_dir).model_checkpoint())
    calibration = training_images(DATA, OPTIONS["recalibrate_batches"], seed=0)

    def reference(method: str, adaptation: bool, pref: Preference) -> list[float]:
        arch = model.architecture(pref)
        with torch.no_grad():
            if method == "single-task anchor":
                outputs = model.anchor(x)
            elif method == "dymu, recalibrated BN":
                outputs = recalibrate_batchnorm(model.anchor.specialize(arch), calibration)(x)
            elif adaptation:
                outputs = model(x, pref)
            else:
                outputs = model.anchor(x, architecture=arch)
        return (task_losses(tasks, outputs, full) * task_scales(tasks)).tolist()

    assert result["num_test_samples"] == 11
    kinds = [(r["method"], r["adaptation"], r["c"]) for r in result["records"]]
    assert kinds == [(m, a, c) for c in (0.0, 1.0) for m, a in [("single-task anchor", False), ("dymu", False),
                                                                   ("dymu", True), ("dymu, recalibrated BN", False)]]
    anchor = reference("single-task anchor", False, Preference.uniform(3, 0.0))
    np.testing.assert_allclose(result["anchor"]["losses"], anchor, rtol=1e-6, atol=1e-7)
    ref_point = np.array([2.0 * v for v in anchor])
    np.testing.assert_allclose(result["reference_point"], ref_point, rtol=1e-6)
    losses_by_method = {}
    for rec in result["records"]:
        prefs = [Preference(p["r"], p["c"]) for p in rec["preferences"]]
        assert prefs == evaluation_preferences(3, 4, c=rec["c"], seed=0)
        points = np.array([reference(rec["method"], rec["adaptation"], p) for p in prefs])
        np.testing.assert_allclose([p["losses"] for p in rec["preferences"]], points, rtol=1e-6, atol=1e-7)
        for pref, entry in zip(prefs, rec["preferences"]):
            arch = (Architecture.anchor(3, model.anchor.n_layers) if rec["method"] == "single-task anchor"
                    else model.architecture(pref))
            assert entry["architecture"] == arch.to_list()
        assert rec["hypervolume"] == pytest.approx(hypervolume(points, ref_point), rel=1e-6, abs=1e-9)
        assert rec["uniformity"] == pytest.approx(mean_uniformity(np.array([p.r for p in prefs]), points),
                                                  rel=1e-6, abs=1e-9)
        losses_by_method[(rec["method"], rec["adaptation"], rec["c"])] = points
    # the check is not vacuous: several trees, and adaptation and recalibration change the losses
    assert any(len({str(p["architecture"]) for p in r["preferences"]}) > 1 for r in result["records"])
    for c in (0.0, 1.0):
        plain = losses_by_method[("dymu", False, c)]
        assert not np.allclose(plain, losses_by_method[("dymu", True, c)])
        assert not np.allclose(plain, losses_by_method[("dymu, recalibrated BN", False, c)])
    assert RunLayout(run_dir).report.is_file()


def test_max_batches_limits_the_stream(tiny_run, tmp_path):
    result = evaluate_run(copy_run(tiny_run, tmp_path / "run"), num_preferences=2, num_cost_preferences=5,
                          max_batches=2)
    assert result["num_test_samples"] == 8
    with pytest.raises(ValueError, match="max_batches must be at least 1"):
        evaluate_run(tmp_path / "run", max_batches=0)


def test_loss_sums_are_fixed_size_and_keep_no_batch():
    tasks = build_data(DATA).tasks
    model = random_model(tasks, 16)
    prefs = evaluation_preferences(3, 3, c=0.0, seed=0)
    evaluated = [Evaluated.create(model, v, p) for v in protocol_variants(model, recalibrate=False) for p in prefs]
    forwards = configuration_forwards(model, evaluated)
    assert len(forwards) == len({e.key for e in evaluated}) < len(evaluated)  # the anchor's tree is shared
    sums = LossSums(forwards, tasks)
    shapes = (sums.total.shape, sums.support.shape)
    refs = []
    for _ in range(5):
        batch = {"image": torch.randn(2, 3, 16, 16), "semseg": torch.randint(0, 4, (2, 16, 16)),
                 "depth": torch.rand(2, 1, 16, 16) + 1.0,
                 "normals": torch.nn.functional.normalize(torch.randn(2, 3, 16, 16), dim=1)}
        sums.update(batch)
        refs += [weakref.ref(t) for t in batch.values()]
        del batch
    gc.collect()
    assert all(ref() is None for ref in refs), "the sums hold on to a batch"
    assert (sums.total.shape, sums.support.shape) == shapes == ((len(forwards), 3), (3,))
    assert int(sums.samples) == 10


class LazyScenes(Dataset):
    """Random semseg/depth samples made on access: the data set itself takes no memory."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        s = self.size
        return {"image": torch.randn(3, s, s, generator=g), "semseg": torch.randint(0, 4, (s, s), generator=g),
                "depth": torch.rand(1, s, s, generator=g) + 0.5}


class LazyData(L.LightningDataModule):
    """``n`` lazy samples in batches of ``batch_size``; remembers a weak reference to every batch it made."""

    def __init__(self, n: int, size: int, batch_size: int) -> None:
        super().__init__()
        self.n, self.size, self.batch_size = n, size, batch_size
        self.batches: list[weakref.ref] = []

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        self.batches.append(weakref.ref(batch["image"]))
        return batch

    def live_batches(self) -> int:
        return sum(ref() is not None for ref in self.batches)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(LazyScenes(self.n, self.size), batch_size=self.batch_size, collate_fn=self.collate)


def two_task_setup(size: int):
    tasks = build_data({**DATA, "init_args": {**DATA["init_args"], "tasks": ["semseg", "depth"]}}).tasks
    model = random_model(tasks, size)
    prefs = evaluation_preferences(2, 2, c=0.0, seed=0)
    return model, tasks, [Evaluated.create(model, v, p) for v in protocol_variants(model, False) for p in prefs]


def quiet_trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


class LiveBatches(L.Callback):
    def __init__(self, data: LazyData) -> None:
        self.data, self.most = data, 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        gc.collect()
        self.most = max(self.most, self.data.live_batches())


def test_the_test_loop_holds_no_batch():
    model, tasks, evaluated = two_task_setup(8)
    module = ProtocolEvaluation(model, tasks, evaluated)
    data = LazyData(24, 8, batch_size=2)
    watch = LiveBatches(data)
    trainer = quiet_trainer()
    trainer.callbacks.append(watch)
    trainer.test(module, datamodule=data, verbose=False)
    assert module.num_samples == 24 and len(data.batches) == 12
    assert watch.most <= 2, f"{watch.most} batches alive at once: the loop keeps batches"  # this one, the next
    del trainer, watch
    gc.collect()
    assert data.live_batches() == 0
    assert module.sums is None and set(module.losses) == {e.key for e in evaluated}
    assert all(v.shape == (2,) for v in module.losses.values())


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_peak_memory_does_not_grow_with_the_test_set():
    # glibc's adaptive mmap threshold makes the peak RSS wander by tens of MiB from run to run; a fixed
    # threshold maps every large tensor on its own, so the peak follows the live tensors
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    size = 32
    model, tasks, evaluated = two_task_setup(size)

    def peak_growth_kib(n: int) -> int:
        module = ProtocolEvaluation(model, tasks, evaluated)
        trainer = quiet_trainer()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
        before = rss_kib("VmRSS")
        trainer.test(module, datamodule=LazyData(n, size, batch_size=64), verbose=False)
        assert module.num_samples == n
        return rss_kib("VmHWM") - before

    peak_growth_kib(64)  # warm-up: one-time allocations of the first loop
    small, large = peak_growth_kib(64), peak_growth_kib(32 * 64)
    test_set_kib = 32 * 64 * sum(t.numel() * t.element_size() for t in LazyScenes(1, size)[0].values()) / 1024
    assert test_set_kib > 0.4 * small, "the large test set must be large enough for a kept copy to show"
    assert large <= 1.2 * small, (small, large, test_set_kib)


def test_two_process_ddp_gives_the_sums_of_one_process(tiny_run, tmp_path):
    single = evaluate_run(copy_run(tiny_run, tmp_path / "single"), **OPTIONS)
    ddp_dir = copy_run(tiny_run, tmp_path / "ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "evaluate", "--run_dir", str(ddp_dir),
                           "--device", "cpu", "--devices", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(RunLayout(ddp_dir).metrics.read_text())
    assert ddp["num_test_samples"] == single["num_test_samples"] == 11  # every sample once, none twice
    assert len(ddp["records"]) == len(single["records"])
    for a, b in zip(ddp["records"], single["records"]):
        assert (a["method"], a["adaptation"], a["c"]) == (b["method"], b["adaptation"], b["c"])
        np.testing.assert_allclose([p["losses"] for p in a["preferences"]], [p["losses"] for p in b["preferences"]],
                                   rtol=1e-6, atol=1e-7)
        assert math.isclose(a["hypervolume"], b["hypervolume"], rel_tol=1e-6, abs_tol=1e-9)


def test_a_folder_that_is_no_run_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        evaluate_run(tmp_path / "empty")
    unfinished = copy_run(tiny_run, tmp_path / "unfinished")
    shutil.rmtree(RunLayout(unfinished).stage_dir("weight"))
    with pytest.raises(FileNotFoundError, match="no finished edge or weight stage"):
        evaluate_run(unfinished)
    from stages.cli import entry_point

    assert entry_point(["evaluate", "--run_dir", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is not a run directory" in err and "\n" not in err
    assert not RunLayout(tmp_path / "empty").evaluation_dir.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_gives_the_records_of_the_cpu(tiny_run, tmp_path):
    cpu = evaluate_run(copy_run(tiny_run, tmp_path / "cpu"), **OPTIONS, device="cpu")
    gpu = evaluate_run(copy_run(tiny_run, tmp_path / "gpu"), **OPTIONS, device="cuda")
    assert gpu["num_test_samples"] == cpu["num_test_samples"] == 11
    for a, b in zip(gpu["records"], cpu["records"]):
        assert [p["architecture"] for p in a["preferences"]] == [p["architecture"] for p in b["preferences"]]
        np.testing.assert_allclose([p["losses"] for p in a["preferences"]], [p["losses"] for p in b["preferences"]],
                                   rtol=1e-4, atol=1e-6)
