"""Learning to Branch's figure 3 as a number: do the tree searches group the regression tasks by activation?

On the Learning-to-Branch regression data (``configs/synthetic_regression.yaml``: tasks in groups by activation
function), run the LTB and BMTAS search stages for several seeds with the stage runner (one run directory per seed
under ``--out``), read each found tree from its checkpoint, and score the task grouping at the deepest shared layer
(``dymu.baselines.grouping.deepest_shared_grouping``) against the true groups with the adjusted Rand index (1: the
activations exactly; about 0: no better than chance). Prints a Markdown table and writes it, with the trees, to
``--out``/grouping_ari.md and .json.

    python docs/scripts/grouping_ari.py --seeds 0 1 2 --out runs/grouping_ari --init scratch --anchor_steps 20

LTB's figure 3 at its scale: ``--setting a|b|c`` (15 tasks, 5 per activation, Z in R^200, T in R^100; also scored
against the grouping its figure shows) and ``--paper_net`` (bias-only task layers, 3 child nodes per block):

    python docs/scripts/grouping_ari.py --seeds 0 1 2 --out runs/ltb_fig3/a --searches ltb --anchor_steps 20 \
        --setting a --paper_net --set data.init_args.phi=input_dim

The searches' sections (step budgets, warm-up, temperatures, learning rates, BMTAS's resource weight) are built
from the options below; ``--set`` overrides any entry of the pipeline config as ``dymu run --set`` does. Only the
run seed (``seed_everything``: weights, Gumbel noise, BMTAS's split) changes between seeds; the data (its own
``seed``) stays the same problem.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from dymu.baselines.bmtas import routing_to_architecture
from dymu.baselines.grouping import adjusted_rand_index, deepest_shared_grouping, partition_labels, tree_groupings
from dymu.baselines.ltb import found_architecture
from dymu.checkpoint import META_KEY, load_checkpoint
from dymu.layout import RunLayout
from stages.common import build_data
from stages.pipeline import load_pipeline_config
from stages.runner import run_pipeline

SEARCHES = ("ltb", "bmtas")
LABELS = {"ltb": "LTB", "bmtas": "BMTAS"}
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    # LTB's figure 3: 15 tasks, 5 per activation, Z in R^200, T in R^100; "truth" merges activation groups
    # into the grouping the paper's figure shows
    "a": {"data": {"activations": ["bent", "square", "sinc"]}, "truth": [[0], [1], [2]]},
    "b": {"data": {"activations": ["sin", "sin", "sin"], "scale_multipliers": [1.0, 2.0, 3.0]}, "truth": [[0, 1, 2]]},
    "c": {"data": {"activations": ["cos", "sinc", "square"]}, "truth": [[0, 1], [2]]},
}
PAPER_SCALE = {"tasks_per_group": 5, "input_dim": 200, "output_dim": 100}


def setting_overrides(setting: str | None, paper_net: bool) -> list[str]:
    """``--set`` entries for one of the paper's settings (its scale) and for its network (bias-only task
    layers, 3 child nodes per branching block)."""
    out: list[str] = []
    if setting is not None:
        data = {**PAPER_SETTINGS[setting]["data"], **PAPER_SCALE}
        out += [f"data.init_args.{k}={json.dumps(v)}" for k, v in data.items()]
        out += ["data.init_args.scale_multipliers=null"] if "scale_multipliers" not in data else []
        out += [f"backbone.init_args.input_dim={PAPER_SCALE['input_dim']}",
                f"backbone.init_args.hidden={PAPER_SCALE['output_dim']}", "backbone.init_args.num_layers=4"]
    if paper_net:
        out += ["backbone.init_args.head=bias", "ltb.model.nodes_per_layer=3"]
    return out


def truth_labels(groups: list[list[str]], names: list[str], merge: list[list[int]] | None) -> list[int]:
    """One label per task: its activation group's, or the merged group's that contains it (``merge``: lists of
    activation-group indices)."""
    group_of = [next(g for g, group in enumerate(groups) if name in group) for name in names]
    if merge is None:
        return group_of
    return [next(m for m, block in enumerate(merge) if g in block) for g in group_of]


def trainer(steps: int) -> dict[str, Any]:
    return {"max_steps": steps, "accelerator": "cpu", "devices": 1, "val_check_interval": steps,
            "check_val_every_n_epoch": None, "enable_progress_bar": False, "enable_model_summary": False}


def search_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The pipeline sections of the two searches."""
    return {
        "ltb": {"trainer": trainer(args.ltb_steps), "checkpoint": {"every_n_train_steps": 500},
                "model": {"init": args.init, "warmup_steps": args.ltb_steps // 10, "temperature": args.ltb_temperature,
                          "branching_lr": args.ltb_branching_lr}},
        "bmtas": {"trainer": trainer(args.bmtas_steps), "checkpoint": {"every_n_train_steps": 500},
                  "model": {"init": args.init, "warmup_steps": args.bmtas_warmup, "resource_weight": args.bmtas_lambda,
                            "arch_lr": args.bmtas_arch_lr, "arch_samples": args.bmtas_samples,
                            "restarts": args.bmtas_restarts}},
    }


def grouping_text(partition: tuple[tuple[int, ...], ...], names: list[str]) -> str:
    return " ".join("{" + ",".join(names[t] for t in block) + "}" for block in partition)


def score_tree(tree: Any, truth: list[int], paper: list[int] | None = None) -> dict[str, Any]:
    """The found tree's groupings, the deepest shared layer's and its adjusted Rand index against ``truth`` (the
    activations) and against ``paper`` (the grouping the paper's figure shows, when given); ``within_groups``:
    some tasks share that layer and no node of it mixes two true groups (the grouping refines the truth)."""
    layer, grouping = deepest_shared_grouping(tree)
    labels = partition_labels(grouping, len(truth))
    groupings = tree_groupings(tree)
    return {"tree": tree.to_list(), "groupings": [list(map(list, g)) for g in groupings],
            "groups_per_layer": [len(g) for g in groupings],
            "deepest_shared_layer": layer, "grouping": [list(b) for b in grouping],
            "within_groups": layer is not None and all(len({truth[t] for t in block}) == 1 for block in grouping),
            "ari": adjusted_rand_index(truth, labels),
            "ari_paper": None if paper is None else adjusted_rand_index(paper, labels)}


def restart_scores(path: Path, truth: list[int]) -> list[dict[str, Any]] | None:
    """Every restart of a BMTAS search with ``restarts`` > 1 (its checkpoint's record): its objective on the
    architecture split, its found tree's ARI against ``truth``, and whether it was kept; None for one search."""
    record = load_checkpoint(path, mmap=True)[META_KEY]["bmtas"].get("restarts")
    if record is None:
        return None
    return [{"objective": objective, "ari": score_tree(routing_to_architecture(routing), truth)["ari"],
             "kept": k == record["selected"]}
            for k, (objective, routing) in enumerate(zip(record["objectives"], record["routings"]))]


def restarts_text(restarts: list[dict[str, Any]] | None) -> str:
    if not restarts:
        return "-"
    return " ".join(f"{r['ari']:.2f} / {r['objective']:.4f}{'*' if r['kept'] else ''}" for r in restarts)


def render(results: list[dict[str, Any]], names: list[str], truth_groups: list[list[str]],
           args: argparse.Namespace) -> str:
    lines = [f"True groups: {' '.join('{' + ','.join(g) + '}' for g in truth_groups)}. Searches from "
             f"{'scratch' if args.init == 'scratch' else 'the anchor'}; LTB {args.ltb_steps} steps (warm-up "
             f"{args.ltb_steps // 10}, temperature {args.ltb_temperature:g}, branching lr {args.ltb_branching_lr:g}), "
             f"BMTAS {args.bmtas_steps} steps (warm-up {args.bmtas_warmup}, resource weight {args.bmtas_lambda:g}, "
             f"architecture lr {args.bmtas_arch_lr:g}, {args.bmtas_samples} Gumbel samples per architecture batch, "
             f"{args.bmtas_restarts} restart{'s' if args.bmtas_restarts > 1 else ''}). "
             "Layers 0-based; the heads read the last.", "",
             "| search | seed | groups per layer | deepest shared layer | its grouping | within groups | ARI | "
             "ARI vs the paper's figure | restarts: ARI / objective (* kept) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        layer = "-" if r["deepest_shared_layer"] is None else str(r["deepest_shared_layer"])
        paper = "-" if r.get("ari_paper") is None else f"{r['ari_paper']:.2f}"
        lines.append(f"| {LABELS[r['search']]} | {r['seed']} | {'-'.join(map(str, r['groups_per_layer']))} | {layer} | "
                     f"{grouping_text(tuple(map(tuple, r['grouping'])), names)} | "
                     f"{'yes' if r['within_groups'] else 'no'} | {r['ari']:.2f} | {paper} | "
                     f"{restarts_text(r.get('restarts'))} |")
    lines += ["", "| search | mean ARI | sd | mean ARI vs the paper's figure | ARI 1 | within groups | seeds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for search in SEARCHES:
        rows = [r for r in results if r["search"] == search]
        if rows:
            aris = [r["ari"] for r in rows]
            sd = statistics.stdev(aris) if len(aris) > 1 else 0.0
            papers = [r["ari_paper"] for r in rows if r.get("ari_paper") is not None]
            paper = f"{statistics.mean(papers):.2f}" if papers else "-"
            exact = sum(a > 1 - 1e-9 for a in aris)
            within = sum(r["within_groups"] for r in rows)
            lines.append(f"| {LABELS[search]} | {statistics.mean(aris):.2f} | {sd:.2f} | {paper} | {exact} | {within} | "
                         f"{len(aris)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthetic_regression.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/grouping_ari", help="one run directory per seed: <out>/seed<s>")
    parser.add_argument("--searches", nargs="+", choices=SEARCHES, default=list(SEARCHES))
    parser.add_argument("--init", choices=["anchor", "scratch"], default="scratch",
                        help="the searches' initial weights (both papers search from scratch)")
    parser.add_argument("--anchor_steps", type=int, default=None,
                        help="the anchor stage's steps (a parent of the searches; with --init scratch only its "
                             "config is used); default: the config's")
    parser.add_argument("--ltb_steps", type=int, default=2000)
    parser.add_argument("--ltb_temperature", type=float, default=50.0, help="the paper's synthetic start")
    parser.add_argument("--ltb_branching_lr", type=float, default=1e-2)
    parser.add_argument("--bmtas_steps", type=int, default=1500)
    parser.add_argument("--bmtas_warmup", type=int, default=200)
    parser.add_argument("--bmtas_lambda", type=float, default=0.2, help="BMTAS's resource weight")
    parser.add_argument("--bmtas_arch_lr", type=float, default=0.05)
    parser.add_argument("--bmtas_samples", type=int, default=1,
                        help="Gumbel samples per architecture batch (BmtasSearch's arch_samples; the authors' code: 1)")
    parser.add_argument("--bmtas_restarts", type=int, default=1,
                        help="independent BMTAS searches side by side, the one with the smallest objective on the "
                             "architecture split kept (BmtasSearch's restarts; the authors': 1)")
    parser.add_argument("--setting", choices=sorted(PAPER_SETTINGS), default=None,
                        help="one of LTB's figure-3 settings at its scale (15 tasks, Z in R^200, T in R^100); "
                             "scored also against the grouping its figure shows")
    parser.add_argument("--paper_net", action="store_true",
                        help="LTB's synthetic network: bias-only task layers, 3 child nodes per branching block")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    args = parser.parse_args(argv)
    args.overrides = setting_overrides(args.setting, args.paper_net) + list(args.overrides)

    sections = search_sections(args)
    base = [f"{name}={json.dumps(section)}" for name, section in sections.items()]
    if args.anchor_steps is not None:
        base += [f"anchor.trainer.max_steps={args.anchor_steps}",
                 f"anchor.trainer.val_check_interval={args.anchor_steps}",
                 f"anchor.checkpoint.every_n_train_steps={args.anchor_steps}"]
    data = build_data(load_pipeline_config(args.config, list(args.overrides)).data)  # the --set data too
    names = list(data.task_names)
    truth_groups = data.groups
    truth = truth_labels(truth_groups, names, None)
    paper = truth_labels(truth_groups, names, PAPER_SETTINGS[args.setting]["truth"]) if args.setting else None
    out = Path(args.out)
    results = []
    for seed in args.seeds:
        overrides = [*base, f"seed_everything={seed}", *args.overrides]
        run_dir = run_pipeline(load_pipeline_config(args.config, overrides), out / f"seed{seed}", evaluate=False,
                               stages=tuple(args.searches))
        for search in args.searches:
            path = RunLayout(run_dir).final(search)
            tree = found_architecture(path)
            results.append({"search": search, "seed": seed, **score_tree(tree, truth, paper),
                            "restarts": restart_scores(path, truth) if search == "bmtas" else None})
            print(f"[grouping_ari] {search} seed {seed}: tree {tree}, ARI {results[-1]['ari']:.3f}", flush=True)
    table = render(results, names, truth_groups, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grouping_ari.md").write_text(table)
    (out / "grouping_ari.json").write_text(json.dumps({"tasks": names, "true_groups": truth_groups,
                                                       "sections": sections, "results": results}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
