"""The benchmark's smoke test (``benchmarks/run.py --quick``): every row is there and ran, the table prints.
No timing assertion: speed goals live in the benchmark, never in tests. Also the hand-built static networks
the benchmark times against compute what the routed ones do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.networks import NETWORKS
from benchmarks.run import DEPLOY_BATCHES, expected_rows, merged
from benchmarks.static import SingleTaskNet, StaticTree
from dymu.anchor import AnchorNet
from dymu.backbones import ConvEncoderDecoder
from dymu.deploy import has_package
from dymu.search_space import Architecture
from dymu.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
HAS_ONNX = all(has_package(p) for p in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.slow  # 65-90 s; the suite's default run took 922 s on a fresh clone. The benchmark's own code paths
# (folding, ONNX, stacked trials, captured step) have their fast tests in test_deploy, test_batched_trials, ...
def test_quick_run_writes_every_row_and_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "torch", "torch_threads", "device"} <= set(report["machine"])
    rows = {(r["network"], r["row"], r["variant"]): r for r in report["rows"]}
    for net in NETWORKS:
        for row, variant in expected_rows(net):
            entry = rows.get((net.name, row, variant))
            assert entry is not None, f"no row {net.name} {row} {variant}"
            assert entry["status"] != "failed", f"{net.name} {row} {variant}: {entry['note']}"
            if variant.endswith("compile"):
                assert entry["status"] == "skipped"  # --quick never compiles
            elif row == "deploy_onnxruntime" and not HAS_ONNX:
                assert entry["status"] == "skipped" and "pip install" in entry["note"]
            elif not row.endswith("latency_vs_gflops"):
                assert entry["status"] == "ok" and entry["median_ms"] > 0, (net.name, row, variant)
                assert entry["peak_mb"] is not None
    assert len(rows) == sum(len(expected_rows(n)) for n in NETWORKS)
    fit = rows[("quickstart", "latency_vs_gflops", "trees c=0..1")]["extra"]
    assert fit["flops_ratio"] < 1  # the c = 1 end (one stream) costs less than the anchor
    for net in NETWORKS:
        check_deploy_rows(net.name, rows)
    targets = {(t["network"], t["target"]): t for t in report["targets"]}
    assert len(targets) == 10 * len(NETWORKS)
    folded = targets[("quickstart", "folded / hand-built static latency (worse of batch 1, large batch)")]
    assert folded["value"] == max(rows[("quickstart", "deploy_folded", v)]["ratio"] for v in DEPLOY_BATCHES)
    table = proc.stdout
    assert "| network | row | variant | median ms |" in table and "| network | target |" in table
    for net in NETWORKS:
        assert f"| {net.name} | anchor_step | fp32 |" in table
    assert out.with_suffix(".md").read_text().strip() == table.strip()


def check_deploy_rows(network, rows):
    """The deploy rows measured what they say: the folded model (no BatchNorm left) equals the unfolded one,
    ONNX Runtime equals it, the latency-vs-GFLOPs rows hold the uniform preference's points against the anchor."""
    for variant in DEPLOY_BATCHES:
        folded = rows[(network, "deploy_folded", variant)]
        assert folded["vs"] == ["deploy_static", variant] and folded["paired"]
        x = folded["extra"]
        assert x["folded_batchnorms"] > 0 and x["batchnorms_left"] == 0
        assert x["max_rel_error_vs_unfolded"] <= 1e-5 and x["vs_unfolded"] > 0
        batch = rows[(network, "deploy_static", variant)]["extra"]["batch"]
        assert (batch == 1) == (variant == "batch 1") and x["batch"] == batch
        if HAS_ONNX:
            ort = rows[(network, "deploy_onnxruntime", variant)]
            assert ort["vs"] == ["deploy_folded", variant] and ort["extra"]["max_rel_error"] <= 1e-4
        fit = rows[(network, "deploy_latency_vs_gflops", f"uniform r, {variant}")]
        assert fit["status"] == "ok", fit["note"]
        trees = fit["extra"]["trees"]
        assert [t["point"] for t in trees] == ["c=0", "c=1"]  # --quick: the two ends
        for t in trees:
            assert 0 < t["flops_ratio"] <= 1 and t["latency_ratio"] > 0
            assert t["off"] == pytest.approx(t["latency_ratio"] / t["flops_ratio"] - 1)
        assert fit["extra"]["worst_off"] == max((t["off"] for t in trees), key=abs)


def test_merge_replaces_only_the_measured_rows_and_recomputes_the_targets():
    def row(network, name, variant, ms, ratio=None, vs=None, **extra):
        return {"network": network, "row": name, "variant": variant, "status": "ok", "median_ms": ms,
                "times_ms": [ms], "peak_mb": None, "memory": None, "vs": vs, "ratio": ratio, "paired": False,
                "note": "", "extra": extra}

    old_rows = [row("quickstart", "anchor_step", "fp32", 10.0, 0.9, ["single_task_nets_step", "fp32"]),
                row("quickstart", "single_task_nets_step", "fp32", 11.0),
                row("quickstart", "deploy_folded", "batch 1", 5.0, 1.2, ["deploy_static", "batch 1"]),
                row("nyuv2", "deploy_folded", "batch 1", 7.0, 1.1, ["deploy_static", "batch 1"])]
    settings = {"runs": [{"networks": ["quickstart", "nyuv2"]}], "sizes": {"quickstart": "a", "nyuv2": "b"}}
    old = {"machine": {}, "settings": settings, "rows": old_rows, "targets": []}
    new_rows = [row("quickstart", "deploy_folded", "batch 1", 4.0, 0.8, ["deploy_static", "batch 1"]),
                row("quickstart", "deploy_folded", "large batch", 3.0, 0.7, ["deploy_static", "large batch"])]
    new = {"machine": {}, "settings": {"runs": [{"networks": ["quickstart"]}], "sizes": {"quickstart": "c"}},
           "rows": new_rows, "targets": []}
    out = merged(old, new, torch.device("cpu"))
    keys = [(r["network"], r["row"], r["variant"]) for r in out["rows"]]
    assert keys == [("quickstart", "anchor_step", "fp32"), ("quickstart", "single_task_nets_step", "fp32"),
                    ("quickstart", "deploy_folded", "batch 1"), ("quickstart", "deploy_folded", "large batch"),
                    ("nyuv2", "deploy_folded", "batch 1")]
    assert out["rows"][2]["median_ms"] == 4.0 and out["rows"][4]["median_ms"] == 7.0
    assert len(out["settings"]["runs"]) == 2 and out["settings"]["sizes"] == {"quickstart": "c", "nyuv2": "b"}
    targets = {(t["network"], t["target"]): t for t in out["targets"]}
    name = "folded / hand-built static latency (worse of batch 1, large batch)"
    assert targets[("quickstart", name)]["value"] == 0.8 and targets[("quickstart", name)]["status"] == "met"
    assert targets[("nyuv2", name)]["status"] == "missed"
    step = targets[("quickstart", "N-stream step / N networks one after another")]
    assert step["value"] == 0.9 and step["status"] == "met"  # from the old rows, kept


def test_static_networks_compute_what_the_routed_ones_do():
    torch.manual_seed(0)
    tasks = [make_task("semseg", out_channels=4), make_task("depth"), make_task("normals")]
    anchor = AnchorNet(ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8), tasks).eval()
    x = torch.randn(2, 3, 16, 16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for arch in [Architecture.anchor(3, 3), Architecture.shared(3, 3),
                     *(Architecture.random(3, 3, generator=gen) for _ in range(5))]:
            spec = anchor.specialize(arch).eval()
            expected, got = spec(x), StaticTree(spec)(x)
            for name in expected:
                assert torch.equal(got[name], expected[name])
        routed = anchor(x)
        for t, name in enumerate(anchor.task_names):
            single = SingleTaskNet(list(anchor.streams[t]), anchor.heads[t]).eval()
            assert torch.equal(single(x), routed[name])
