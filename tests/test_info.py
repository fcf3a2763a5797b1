"""``dymu info``: our sizes beside the paper's (DYMU tables 1-4), the paper configs' anchors at the paper's size,
and ``--stages``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dymu.paper_figures import PAPER_SETTINGS, PaperSetting, paper_setting
from stages.cli import entry_point
from stages.graph import STAGES
from stages.info import Row, describe, format_info, format_rows, main, paper_rows
from stages.runner import load_pipeline_config

ROOT = Path(__file__).resolve().parent.parent
PAPER_RESULTS = Path("/work/shared/design/PAPER_RESULTS.md")
PASCAL = "datamodules.pascal_context.PascalContext"

# pipeline config: (the paper's setting, our anchor's parameters)
PAPER_CONFIGS = {
    "pascal_context/pipeline.yaml": ("PASCAL-Context 5 tasks", 9_860_177),
    "pascal_context/pipeline_3tasks.yaml": ("PASCAL-Context 3 tasks", 5_917_293),
    "nyuv2/pipeline.yaml": ("NYU-v2", 64_491_324),
    "cifar100/pipeline.yaml": ("CIFAR-100", 36_272_760),
}


@pytest.fixture(scope="module", params=list(PAPER_CONFIGS))
def described(request):
    """(config name, describe() of the paper pipeline config as shipped)."""
    return request.param, describe(load_pipeline_config(ROOT / "configs" / request.param))


def test_each_paper_config_has_its_anchor_within_half_a_percent_of_the_paper(described):
    name, info = described
    setting, params = PAPER_CONFIGS[name]
    paper = paper_setting(info["data"], info["tasks"])
    assert paper is PAPER_SETTINGS[setting]
    assert info["anchor_params"] == params
    assert abs(info["anchor_params"] / paper.anchor_params - 1) < 0.005


def test_info_prints_ours_beside_the_paper(described):
    name, info = described
    paper = PAPER_SETTINGS[PAPER_CONFIGS[name][0]]
    out = format_info(info)
    assert f"{paper.table} ({paper.name})" in out
    anchor_row = next(line for line in out.splitlines() if line.startswith("| anchor params "))
    cells = [c.strip() for c in anchor_row.strip("|").split("|")]
    assert cells == ["anchor params", f"{info['anchor_params']:,}", f"{paper.anchor_params / 1e6:.2f}M",
                     f"{info['anchor_params'] / paper.anchor_params:.3f}"]
    edge_row = next(line for line in out.splitlines() if line.startswith("| edge hypernet params"))
    assert f"{info['edge_hypernet_params']:,}" in edge_row and f"{paper.edge_params / 1e6:.2f}M" in edge_row


def test_dymu_info_command_on_a_paper_config(capsys):
    assert entry_point(["info", "--config", str(ROOT / "configs" / "cifar100" / "pipeline.yaml")]) == 0
    out = capsys.readouterr().out
    assert "anchor_params           36,272,760" in out
    assert re.search(r"\| anchor params +\| +36,272,760 \| +36\.18M \| +1\.003 \|", out)
    assert re.search(r'\| anchor GMACs \(paper: its "GFLOPs"\) +\| +2\.10 \| +348\.79 \| +0\.006 \|', out)
    assert re.search(r"\| control params \(edge \+ weight hypernets\) +\| +4,950,884 \| +3\.10M \| +1\.597 \|", out)
    # --set reaches the networks: cifar10-fast's own widths
    assert main(["--config", str(ROOT / "configs" / "cifar100" / "pipeline.yaml"),
                 "--set", "backbone.init_args.width=1.0"]) == 0
    assert re.search(r"\| anchor params +\| +131,411,300 \| +36\.18M \| +3\.632 \|", capsys.readouterr().out)


def test_synthetic_configs_print_ours_only(capsys):
    assert main(["--config", str(ROOT / "configs" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "anchor_params" in out and "no paper figures" in out
    assert "| anchor params" not in out and "DYMU table " not in out


def test_stages_lists_every_stage_without_a_config(capsys):
    assert main(["--stages"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| stage | kind | parents |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(STAGES)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_paper_setting_lookup():
    assert paper_setting(PASCAL, ["edges", "normals", "saliency", "parts", "semseg"]).table == "DYMU table 1"
    assert paper_setting(PASCAL, ["saliency", "semseg", "parts"]).table == "DYMU table 2"
    assert paper_setting(PASCAL, ["semseg", "normals", "edges"]) is None
    assert paper_setting("datamodules.nyuv2.NYUv2", ["depth", "semseg", "normals"]).table == "DYMU table 3"
    assert paper_setting("datamodules.nyuv2.NYUv2", ["depth", "semseg"]) is None
    assert paper_setting("datamodules.cifar100.CIFAR100MultiTask", [f"t{i}" for i in range(20)]).table == \
        "DYMU table 4"
    assert paper_setting("datamodules.synthetic.SyntheticScenesDataModule", ["semseg", "depth", "normals"]) is None


def test_rows_and_table():
    paper = PaperSetting("X", "table 9", "d", None, anchor_params=2.0e6, anchor_gflops=4.0, edge_params=0.01e6,
                         control_params=1.01e6)
    assert paper.weight_params == pytest.approx(1.0e6)
    info = {"anchor_params": 3_000_000, "anchor_gmacs": 2.0, "anchor_gflops": 4.0, "edge_hypernet_params": 5_000,
            "weight_hypernet_params": 495_000}
    rows = paper_rows(info, paper)
    assert [(r.ours, r.paper) for r in rows] == [(3_000_000, 2.0e6), (2.0, 4.0), (4.0, None), (5_000, 0.01e6),
                                                 (495_000, paper.weight_params), (500_000, 1.01e6)]
    assert [r.ratio for r in rows][:4] == [1.5, 0.5, None, 0.5]
    assert Row("a", 9_860_177, 9.84e6, "params").cells() == ["a", "9,860,177", "9.84M", "1.002"]
    assert Row("b", 15.854, None, "G").cells() == ["b", "15.85", "-", "-"]
    table = format_rows(rows[:2]).splitlines()
    assert table[0] == "| quantity                           |      ours | paper | ours / paper |"
    assert set(table[1]) <= {"|", "-", " "}
    assert table[2] == "| anchor params                      | 3,000,000 | 2.00M |        1.500 |"
    assert all(len(line) == len(table[0]) for line in table)


@pytest.mark.skipif(not PAPER_RESULTS.is_file(), reason="the design notes are not on this machine")
def test_figures_are_the_transcribed_tables():
    """Every figure in dymu/paper_figures.py is the one in PAPER_RESULTS.md's tables 1-4."""
    text = PAPER_RESULTS.read_text()
    block = text[text.index("## DYMU tables 1-4"):text.index("## DYMU table 5")]
    rows, setting = {}, None
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] == "setting" or set(cells[0]) == {"-"}:
            continue
        setting = cells[0] or setting
        rows[(setting, cells[1])] = cells
    value = lambda cell: float(cell.rstrip("M")) * (1e6 if cell.endswith("M") else 1)  # noqa: E731
    for name, paper in PAPER_SETTINGS.items():
        (key,) = {s for s, _ in rows if s.startswith(name + " ")}
        single, edge, ours = rows[(key, "Single-Task")], rows[(key, "Ours w/o adaptation, c=0")], rows[(key, "Ours, c=0")]
        assert (paper.anchor_params, paper.anchor_gflops) == (value(single[4]), value(single[5])), name
        assert (paper.edge_params, paper.control_params) == (value(edge[6]), value(ours[6])), name
