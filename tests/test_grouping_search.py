"""Learning to Branch finds a grouping the task loss identifies: the held-out grouping of docs/results.md ("BMTAS on
a held-out grouping": bent / square, three tasks each, data seed 1), through docs/scripts/grouping_ari.py as
documented. LTB groups the tasks by activation exactly in run seeds 0, 1 and 2 there; a search that mixed the
activations, or shared nothing, would fail this."""

import json
from pathlib import Path

import pytest

from tests.small_scenes import doc_script

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ["--set", 'data.init_args.activations=["bent","square"]', "--set", "data.init_args.tasks_per_group=3",
            "--set", "data.init_args.seed=1"]


@pytest.mark.slow  # one LTB search of 2000 steps from scratch: about 1.5 minutes
def test_ltb_finds_the_held_out_grouping(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the script's default config path
    out = tmp_path / "heldout"
    assert doc_script("grouping_ari").main(["--seeds", "0", "--out", str(out), "--searches", "ltb", "--anchor_steps", "20",
                                *HELD_OUT]) == 0
    (result,) = json.loads((out / "grouping_ari.json").read_text())["results"]
    assert result["grouping"] == [[0, 1, 2], [3, 4, 5]] and result["ari"] == pytest.approx(1.0), result
    assert result["within_groups"]
