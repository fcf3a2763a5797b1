"""The benchmark's smoke test (``benchmarks/run.py --quick``): every row is there and ran, the table prints.
No timing assertion: speed goals live in the benchmark, never in tests. Also the hand-built static networks
the benchmark times against compute what the routed ones do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.networks import NETWORKS
from benchmarks.run import expected_rows
from benchmarks.static import SingleTaskNet, StaticTree
from dymu.anchor import AnchorNet
from dymu.backbones import ConvEncoderDecoder
from dymu.search_space import Architecture
from dymu.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


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
            elif row != "latency_vs_gflops":
                assert entry["status"] == "ok" and entry["median_ms"] > 0, (net.name, row, variant)
                assert entry["peak_mb"] is not None
    assert len(rows) == sum(len(expected_rows(n)) for n in NETWORKS)
    fit = rows[("quickstart", "latency_vs_gflops", "trees c=0..1")]["extra"]
    assert fit["flops_ratio"] < 1  # the c = 1 end (one stream) costs less than the anchor
    targets = {(t["network"], t["target"]) for t in report["targets"]}
    assert len(targets) == 5 * len(NETWORKS)
    table = proc.stdout
    assert "| network | row | variant | median ms |" in table and "| network | target |" in table
    for net in NETWORKS:
        assert f"| {net.name} | anchor_step | fp32 |" in table
    assert out.with_suffix(".md").read_text().strip() == table.strip()


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
