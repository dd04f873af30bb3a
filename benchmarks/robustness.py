"""How far one hostile node can drag the Global-LiGO under each defence, and what each costs honest runs.

Runs the real ServerApp (``server_app.app.main``) against the real ClientApp
(``client_app.app:app``, its mods included) in this process
(:class:`benchmarks.in_process_grid.InProcessGrid`), ``fedgrow`` mode:

1. **Drag.** For each defence and each federation size ``N`` (3 and 5), one
   honest run and one run per attack (:data:`benchmarks.attacks.ATTACKS`), in
   which the last partition is hostile and sees every honest reply of the
   round. The drag of an attack is
   ``||G_attacked - G_honest|| / ||G_honest - G_initial||`` over the final
   Global-LiGOs, both runs under the same defence: 1 means the attacker moved
   the operator as far as all honest progress. Its ``alignment`` is the
   cosine of ``G_attacked - G_initial`` with ``G_honest - G_initial``: below 0,
   the attack reversed the run. Small ViTs (2 and 3 layers, 32 wide, each
   pre-trained on its own MNIST rows) grown through tiny shapes for 5 rounds
   of 10 steps (:data:`SMALL_VIT_RUN`), the app's default settings otherwise,
   with float32 updates (the defences act on the decoded updates, so the
   encoding does not change what they see).
   ``absent`` (the hostile node's replies are errors) is the reference a
   perfect filter would reach: the honest run without that node.
2. **Honest cost.** Each defence's honest runs of the image preset
   (``presets/image.toml``: 3 clients, seeds 0 to 2): the mean client accuracy
   of FedAvg with the clip at 2x and the weight cap at 3x the median minus the
   defence's, in accuracy points, paired
   by seed.

Prints one table per part and writes ``robustness.json`` under ``--out``. The
last line is ``worst_drag=<x> honest_cost=<points>`` for the app's default
defence: the largest drag over every attack and size, and its mean honest
cost (goal: drag <= 0.5 with one hostile node of three, cost within the
seeds' noise).

    python -m benchmarks.robustness [--sizes 3 5] [--seeds 0 1 2] [--defences ...] [--no-cost] [--out DIR]
    python -m benchmarks.robustness --report DIR/robustness.json   # the tables again, nothing run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict
from safetensors.numpy import load_file

import client_app.app as fedgrow_client
import server_app.app as fedgrow_server
from benchmarks.attacks import ATTACKS, HostileNode
from benchmarks.in_process_grid import SERVER_NODE_ID, federation
from experiments.runner import run_overrides
from fedgrow_core.growth.diagnostics import flatten
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig, pyproject_config
from server_app.persistence.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PRESET = ROOT / "presets" / "image.toml"
#: The drag part's federation: small ViTs pre-trained on their own MNIST rows, grown through tiny shapes.
SMALL_VIT_RUN = {
    "task": "image",
    "dataset": "mnist",
    "client-models": "vit:2x32x2x64,vit:3x32x2x64",
    "intermediate-shape": "3x48x96x3",
    "target-shape": "4x64x128x4",
    "pretrain-steps": 150,
    "patch-size": 7,
    "num-server-rounds": 5,
    "local-steps": 10,
    "batch-size": 32,
    "max-train-examples": 1000,
    "max-test-examples": 100,
    "eval-max-examples": 64,
    "finetune-steps": 1,
    "save-models": False,
    "update-encoding": "float32",
}


@dataclass(frozen=True)
class Defence:
    """A server-side defence: run-config overrides for a federation of ``n`` nodes, and the fewest nodes it needs.

    Attributes
    ----------
    name : str
        Its row in the tables.
    overrides : callable
        ``n -> {run-config key: value}``, on top of the app's defaults.
    min_nodes : int
        Smallest federation it can aggregate (Bulyan needs ``4f + 3``).
    """

    name: str
    overrides: Callable[[int], dict] = field(default=lambda n: {})
    min_nodes: int = 1


def _defence(name: str, strategy: str, clip: float = 2.0, cap: float = 3.0, min_nodes: int = 1, **extra) -> Defence:
    """A :class:`Defence` fixing strategy, clip and weight cap (and ``extra``: values or ``n -> value``).

    Fixing them all keeps a row's meaning whatever the app's defaults are.
    """

    def overrides(n: int) -> dict:
        values = {k.replace("_", "-"): v(n) if callable(v) else v for k, v in extra.items()}
        return {"strategy": strategy, "clip-update-median": clip, "cap-weight-median": cap, **values}

    return Defence(name, overrides, min_nodes)


#: The defences compared, all behind the trust boundary's checks (Flower's strategies as they are).
DEFENCES = [
    _defence("fedavg, clip 2x, weight cap 3x", "fedavg"),
    _defence("fedavg, clip 1x, weight cap 3x", "fedavg", clip=1.0),
    _defence("fedavg, clip 1x, weight cap 1x", "fedavg", clip=1.0, cap=1.0),
    _defence("fedmedian", "fedmedian"),
    _defence("fedtrimmedavg", "fedtrimmedavg", trimmed_beta=lambda n: round(1 / n + 0.01, 2)),
    _defence("krum", "krum", num_malicious_nodes=1),
    _defence("multikrum", "multikrum", num_malicious_nodes=1, multikrum_select=lambda n: n - 1),
    _defence("bulyan", "bulyan", min_nodes=7, num_malicious_nodes=1),
    _defence("geometric-median, weight cap 3x", "geometric-median"),
    _defence("geometric-median, weight cap 1x", "geometric-median", cap=1.0),
    _defence("centred-clipping", "centred-clipping"),
]
#: FedAvg (the paper's aggregation) with the clip at 2x and the weight cap at 3x: the reference of the honest cost.
REFERENCE = DEFENCES[0].name


def default_defence() -> str:
    """The :data:`DEFENCES` row that the app's default run config is (strategy, clip and weight cap)."""
    config = RunConfig.from_flower(pyproject_config(ROOT / "pyproject.toml"))
    for defence in DEFENCES:
        keys = defence.overrides(3)
        if all(getattr(config, k.replace("-", "_")) == v for k, v in keys.items() if k != "trimmed-beta"):
            return defence.name
    raise RuntimeError(f"the default strategy {config.strategy!r} is not one of the benchmark's defences")


def run_federation(
    run_config: dict, num_nodes: int, run_id: int, attack: str | None = None, hostile_partition: int = -1
) -> Path:
    """One run of the real apps in this process; partition ``hostile_partition`` (default: the last) plays ``attack``.

    Returns
    -------
    Path
        The run folder (``summary.json``, ``global_ligo.safetensors``, the checkpoint).
    """
    config = RunConfig.from_flower(run_config)
    node = 1001 + hostile_partition % num_nodes
    hostile = HostileNode(node, attack, config.clip_update_median, seed=run_id)
    grid = federation(fedgrow_client.app, num_nodes, run_config, run_id, {"node-policy": "open"}, hostile)
    context = Context(run_id, SERVER_NODE_ID, {}, RecordDict(), dict(run_config))
    grid.run_server(fedgrow_server.main, context)
    (run_dir,) = Path(config.output_dir).glob("*/summary.json")
    return run_dir.parent


def drag(attacked: dict, honest: dict, initial: dict) -> tuple[float, float]:
    """``(||attacked - honest|| / ||honest - initial||, cos(attacked - initial, honest - initial))``, in float64.

    Parameters
    ----------
    attacked, honest, initial : dict of str to ndarray
        Final Global-LiGOs of the attacked and the honest run, and the initial one (same names and shapes).

    Returns
    -------
    tuple of float
        The drag (``inf`` if the honest run did not move) and the alignment (``nan`` if either did not move).
    """
    keys = sorted(initial)
    start = flatten(initial, keys)
    honest_move, attacked_move = flatten(honest, keys) - start, flatten(attacked, keys) - start
    moved = float(np.linalg.norm(honest_move))
    value = float(np.linalg.norm(attacked_move - honest_move)) / moved if moved > 0 else math.inf
    denominator = moved * float(np.linalg.norm(attacked_move))
    alignment = float(attacked_move @ honest_move) / denominator if denominator > 0 else math.nan
    return value, alignment


def small_vit_config(work: Path) -> dict:
    """The app's default run config with :data:`SMALL_VIT_RUN`, its pre-trained models cached under ``work``."""
    return {**pyproject_config(ROOT / "pyproject.toml"), **SMALL_VIT_RUN, "cache-dir": str(work / "cache")}


def measure_drag(
    defences: list[Defence], sizes: list[int], attacks: list[str], work: Path, every_position_up_to: int = 3
) -> list[dict]:
    """One row per (defence, size, attack, hostile partition): the drag and alignment of the final Global-LiGO.

    Each honest run adds a row with ``attack = "honest"`` and its rounds' mean pairwise cosine of the
    clients' updates (``update_cosine``), which decides how far any aggregator can be dragged.

    In federations of at most ``every_position_up_to`` nodes each partition is
    hostile in turn (a defence can drop one partition's replies in the honest
    run too, which would hide an attack by that partition); in larger ones, the
    last partition.
    """
    base = small_vit_config(work)
    initial = {k: v.detach().numpy() for k, v in initial_global_ligo(RunConfig.from_flower(base)).state_dict().items()}
    rows, run_id = [], 0
    for n in sizes:
        positions = range(n) if n <= every_position_up_to else [n - 1]
        for defence in defences:
            if n < defence.min_nodes:
                rows.append({"defence": defence.name, "nodes": n, "attack": "*", "drag": None})
                continue
            run_id += 1
            config = {**base, **defence.overrides(n), "output-dir": str(work / f"run-{run_id}")}
            honest_dir = run_federation(config, n, run_id)
            honest = load_file(str(honest_dir / "global_ligo.safetensors"))
            cosines = [e.get("update_cosine") for e in read_checkpoint(honest_dir).entries]
            rows.append(
                {"defence": defence.name, "nodes": n, "attack": "honest", "drag": None, "update_cosine": cosines}
            )
            print(f"  N={n} {defence.name:24s} honest: mean pairwise update cosine per round {cosines}", flush=True)
            for position in positions:
                for attack in attacks:
                    run_id += 1
                    config = {**base, **defence.overrides(n), "output-dir": str(work / f"run-{run_id}")}
                    start = time.perf_counter()
                    run_dir = run_federation(config, n, run_id, attack, position)
                    value, alignment = drag(load_file(str(run_dir / "global_ligo.safetensors")), honest, initial)
                    rows.append(
                        {
                            "defence": defence.name,
                            "nodes": n,
                            "hostile": position,
                            "attack": attack,
                            "drag": value,
                            "alignment": alignment,
                        }
                    )
                    print(
                        f"  N={n} {defence.name:24s} partition {position} {attack:17s} drag {value:6.3f} "
                        f"alignment {alignment:+.3f} ({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
    return rows


def measure_cost(defences: list[Defence], seeds: list[int], work: Path) -> list[dict]:
    """One row per (defence, seed): the honest image-preset run's mean client accuracy."""
    base = {**pyproject_config(ROOT / "pyproject.toml"), **run_overrides(IMAGE_PRESET, [])}
    base.update({"save-models": False, "cache-dir": str(work / "cache")})
    rows, run_id = [], 1000
    for seed in seeds:
        for defence in defences:
            if 3 < defence.min_nodes:
                continue
            run_id += 1
            config = {**base, **defence.overrides(3), "seed": seed, "output-dir": str(work / f"image-{run_id}")}
            start = time.perf_counter()
            run_dir = run_federation(config, 3, run_id)
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"defence": defence.name, "seed": seed, "accuracy": summary["mean_accuracy"]})
            print(
                f"  seed {seed} {defence.name:24s} accuracy {summary['mean_accuracy']:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return rows


def cost_by_defence(rows: list[dict]) -> dict[str, dict]:
    """Per defence: mean accuracy, and the reference's minus it per seed (points), mean and sample std."""
    by = {}
    for row in rows:
        by.setdefault(row["defence"], {})[row["seed"]] = row["accuracy"]
    reference = by.get(REFERENCE, {})
    out = {}
    for name, accs in by.items():
        diffs = [100 * (reference[s] - a) for s, a in accs.items() if s in reference]
        out[name] = {
            "accuracy": float(np.mean(list(accs.values()))),
            "cost_points": float(np.mean(diffs)) if diffs else None,
            "cost_std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure every defence's drag and honest cost; print the tables and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--defences", nargs="+", default=[d.name for d in DEFENCES])
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), help="none: the honest runs only")
    parser.add_argument(
        "--every-position-up-to", type=int, default=3, help="in federations this small, each partition attacks in turn"
    )
    parser.add_argument("--cost-defences", nargs="+", help="defences whose honest cost is measured (default: all)")
    parser.add_argument("--no-cost", action="store_true", help="skip the image-preset runs")
    parser.add_argument("--no-drag", action="store_true", help="skip the drag runs")
    parser.add_argument("--out", type=Path, help="folder for robustness.json")
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print the tables of earlier robustness.json files, merged; run nothing"
    )
    args = parser.parse_args(argv)
    if args.report:
        report = merged([json.loads(path.read_text()) for path in args.report])
    else:
        report = measure(args)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "robustness.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["drag"], report["cost"], report["sizes"]))
    print(summary_line(report))


def measure(args: argparse.Namespace) -> dict:
    """Run both parts for the parsed arguments; returns the report (``drag`` rows, ``cost`` per defence)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    chosen = [d for d in DEFENCES if d.name in args.defences]
    with tempfile.TemporaryDirectory(prefix="fedgrow-robustness-") as tmp:
        print("drag (one hostile node):", flush=True)
        drags = (
            []
            if args.no_drag
            else measure_drag(chosen, args.sizes, args.attacks, Path(tmp) / "drag", args.every_position_up_to)
        )
        costs = {}
        if not args.no_cost:
            print("honest cost (image preset):", flush=True)
            names = list(dict.fromkeys([REFERENCE, *(args.cost_defences or [d.name for d in chosen])]))
            rows = measure_cost([d for d in DEFENCES if d.name in names], args.seeds, Path(tmp) / "cost")
            costs = cost_by_defence(rows)
    return {"drag": drags, "cost": costs, "sizes": args.sizes, "seeds": args.seeds}


def merged(reports: list[dict]) -> dict:
    """One report from several (drag rows concatenated, costs updated in order, sizes and seeds united)."""
    out = {"drag": [], "cost": {}, "sizes": [], "seeds": []}
    for report in reports:
        out["drag"] += report["drag"]
        out["cost"].update(report["cost"])
        out["sizes"] = sorted({*out["sizes"], *(r["nodes"] for r in report["drag"])})
        out["seeds"] = sorted({*out["seeds"], *report["seeds"]}) if report["cost"] else out["seeds"]
    return out


def summary_line(report: dict) -> str:
    """``worst_drag=<x> honest_cost=<points>`` for the app's default defence (attacks only, every size)."""
    default = default_defence()
    drags = [r["drag"] for r in report["drag"] if r["defence"] == default and r["attack"] != "absent"]
    worst = max((d for d in drags if d is not None), default=math.nan)
    cost = report["cost"].get(default, {}).get("cost_points")
    return f"worst_drag={worst:.3f} honest_cost={'n/a' if cost is None else f'{cost:.2f}'}"


def table(drags: list[dict], costs: dict, sizes: list[int]) -> str:
    """One markdown row per defence: each attack's drag per size (worst partition), worst drag, alignment, cost."""
    attacks = sorted({r["attack"] for r in drags if r["attack"] in ATTACKS}, key=list(ATTACKS).index)
    header = [
        "defence",
        *[f"{a} N={n}" for n in sizes for a in attacks],
        "worst drag",
        "lowest alignment",
        "honest cost (points)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in dict.fromkeys(r["defence"] for r in drags):
        mine = [r for r in drags if r["defence"] == name and r["drag"] is not None]
        cells = []
        for n in sizes:
            for a in attacks:
                hit = [r["drag"] for r in mine if r["nodes"] == n and r["attack"] == a]
                cells.append(f"{max(hit):.2f}" if hit else "n/a")
        attacked = [r for r in mine if r["attack"] != "absent"]
        worst = f"{max(r['drag'] for r in attacked):.2f}" if attacked else "n/a"
        lowest = f"{min(r['alignment'] for r in attacked):+.2f}" if attacked else "n/a"
        cost = costs.get(name, {})
        spread = f" ± {cost['cost_std']:.2f}" if cost.get("cost_std") is not None else ""
        cost_cell = "" if cost.get("cost_points") is None else f"{cost['cost_points']:+.2f}{spread}"
        lines.append(f"| {name} | " + " | ".join([*cells, worst, lowest, cost_cell]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
