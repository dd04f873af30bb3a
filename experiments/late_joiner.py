"""Does a late joiner gain from the federation's Global-LiGO? Newcomers grow their small models four ways.

    python -m experiments.late_joiner --preset presets/paper-image.toml \
        --runs results/paper-image --seeds 0 1 2 --out docs/results/paper-late-joiner

For each seed, the final Global-LiGO of that seed's ``fedgrow`` run (``<runs>/runs/*-fedgrow-seed<k>/``)
is given to ``--newcomers`` organisations that were not in the federation. Their rows are a
Dirichlet partition (``flwr-datasets``' ``DirichletPartitioner``, the preset's alpha) of the
dataset's *test* split, which no federation client trained on; each pre-trains its own small
model (the preset's ``client-models``, cycling) on its own rows. Each newcomer then runs every
arm of :func:`fedgrow_core.late_joiner.grow_newcomer` for the same budget: the federated
Global-LiGO frozen, the federated Global-LiGO trainable, the initial Global-LiGO (no
federation), and its small model alone. Written to ``--out``: ``newcomers.csv`` (one row per
seed, newcomer and arm), ``curves.csv`` (accuracy against steps), ``late_joiner.md`` (mean
accuracy per arm, paired differences with 95% intervals over seeds, steps to reach the small
model's best accuracy) and ``late_joiner.png``.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from flwr.common.config import flatten_dict
from flwr_datasets.partitioner import DirichletPartitioner

from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.data.sources import load_data_source
from fedgrow_core.late_joiner import ARMS, grow_newcomer, load_global_ligo
from fedgrow_core.run_config import RunConfig

from .significance import paired_differences

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARM_NAMES = {
    "frozen": "federated Global-LiGO, frozen",
    "trainable": "federated Global-LiGO, trainable",
    "initial": "initial Global-LiGO (no federation)",
    "small": "small model alone",
}


def newcomer_rows(run: RunConfig, newcomers: int, folder: Path) -> list[Path]:
    """Write each newcomer's rows (a Dirichlet partition of the test split) as an ``.npz`` file of uint8 images."""
    test = load_data_source(run.dataset)["test"]
    partitioner = DirichletPartitioner(
        num_partitions=newcomers, partition_by="label", alpha=run.dirichlet_alpha, seed=run.seed, min_partition_size=0
    )
    partitioner.dataset = test
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(newcomers):
        path = folder / f"seed{run.seed}-newcomer{k}.npz"
        if not path.is_file():
            rows = partitioner.load_partition(k).with_format("numpy")
            images = np.stack([np.asarray(x) for x in rows["image"]])
            if images.dtype.kind in "iu":  # pixel values 0..255
                images = images.astype(np.uint8)
            np.savez(path, image=images, label=np.asarray(rows["label"]))
        paths.append(path)
    return paths


def _global_ligo(runs: Path, seed: int) -> Path:
    found = sorted(runs.glob(f"runs/*-fedgrow-seed{seed}/output/*/global_ligo.safetensors"))
    if not found:
        raise FileNotFoundError(f"no fedgrow run of seed {seed} with a global_ligo.safetensors under {runs}/runs")
    return found[-1]


def run_newcomers(
    preset: Path, runs: Path, seeds: list[int], newcomers: int, growth_steps: int, eval_every: int, work: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (seed, newcomer, arm); returns the ``newcomers.csv`` and ``curves.csv`` frames."""
    base = {k.replace("-", "_"): v for k, v in flatten_dict(tomllib.loads(preset.read_text())).items()}
    rows, curves = [], []
    for seed in seeds:
        run = RunConfig(**{**base, "seed": seed})
        state = load_global_ligo(_global_ligo(runs, seed), run)
        for k, data in enumerate(newcomer_rows(run, newcomers, work)):
            model = run.client_models[k % len(run.client_models)]
            setup = ClientSetup.load(run, k, newcomers, model=model, dataset=str(data))
            for arm in ARMS:
                curve = grow_newcomer(run, setup, arm, state, growth_steps, eval_every)
                print(f"[late-joiner] seed {seed} newcomer {k} {arm}: {curve.final_accuracy:.3f}", flush=True)
                rows.append(
                    {
                        "seed": seed,
                        "newcomer": k,
                        "model": model,
                        "arm": arm,
                        "train_examples": len(setup.train_rows),
                        "test_examples": curve.test_examples,
                        "grown_accuracy": curve.grown_accuracy,
                        "accuracy": curve.final_accuracy,
                    }
                )
                curves += [
                    {"seed": seed, "newcomer": k, "arm": arm, "step": s, "accuracy": a}
                    for s, a in zip(curve.steps, curve.accuracy, strict=True)
                ]
    return pd.DataFrame(rows), pd.DataFrame(curves)


def steps_to_small_best(curves: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean over (seed, newcomer) of the steps to reach the small model's best curve accuracy.

    A run that never reaches it counts as not reached (``reached`` gives the share that did).
    """
    out = []
    for _, group in curves.groupby(["seed", "newcomer"]):
        target = group[group["arm"] == "small"]["accuracy"].max()
        for arm, g in group.groupby("arm"):
            hit = g[g["accuracy"] >= target]["step"]
            out.append({"arm": arm, "steps": float(hit.min()) if len(hit) else float("nan"), "reached": len(hit) > 0})
    frame = pd.DataFrame(out)
    return frame.groupby("arm").agg(steps=("steps", "mean"), reached=("reached", "mean")).reset_index()


def write_report(rows: pd.DataFrame, curves: pd.DataFrame, out: Path) -> str:
    """``late_joiner.md`` and ``late_joiner.png``; returns the Markdown."""
    means = rows.groupby("arm")[["grown_accuracy", "accuracy"]].mean().reindex(list(ARMS))
    clients = rows.rename(columns={"arm": "mode", "newcomer": "partition_id"}).assign(
        task="late-joiner", dirichlet_alpha=0
    )
    lines = ["| arm | accuracy before fine-tuning | final accuracy |", "| --- | --- | --- |"]
    for arm, r in means.iterrows():
        grown = "-" if pd.isna(r["grown_accuracy"]) else f"{r['grown_accuracy']:.3f}"
        lines.append(f"| {ARM_NAMES[arm]} | {grown} | {r['accuracy']:.3f} |")
    lines += [
        "",
        "| reference | against | difference | 95% interval | newcomer wins |",
        "| --- | --- | --- | --- | --- |",
    ]
    for reference in ("trainable", "frozen"):
        paired = paired_differences(clients, "accuracy", reference)
        for _, p in paired.iterrows():
            lines.append(
                f"| {ARM_NAMES[reference]} | {ARM_NAMES[p['baseline']]} | {p['difference']:+.3f} | "
                f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | {p['client_wins']:.2f} |"
            )
    reach = steps_to_small_best(curves).set_index("arm").reindex(list(ARMS))
    lines += ["", "| arm | steps to the small model's best accuracy | share that reached it |", "| --- | --- | --- |"]
    for arm, r in reach.iterrows():
        lines.append(f"| {ARM_NAMES[arm]} | {r['steps']:.0f} | {r['reached']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "late_joiner.md").write_text(text)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, g in curves.groupby("arm"):
        mean = g.groupby("step")["accuracy"].mean()
        ax.plot(mean.index, mean.values, marker="o", label=ARM_NAMES[arm])
    ax.set_xlabel("steps (growth; small: training)")
    ax.set_ylabel("accuracy (first eval-max-examples test rows)")
    ax.set_title("Late joiners, mean over seeds and newcomers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "late_joiner.png", dpi=120)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> None:
    """Run the newcomers (or, with ``--collect-only``, tabulate ``--out``'s records)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True, help="the comparison's work folder (its runs/)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--newcomers", type=int, default=2)
    parser.add_argument("--growth-steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="where the newcomers' rows are written (default: --runs)")
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.collect_only:
        rows, curves = pd.read_csv(args.out / "newcomers.csv"), pd.read_csv(args.out / "curves.csv")
    else:
        work = args.work or args.runs
        work.mkdir(parents=True, exist_ok=True)
        rows, curves = run_newcomers(
            args.preset, args.runs, args.seeds, args.newcomers, args.growth_steps, args.eval_every, work
        )
        rows.to_csv(args.out / "newcomers.csv", index=False)
        curves.to_csv(args.out / "curves.csv", index=False)
        (args.out / "setup.json").write_text(
            json.dumps({"preset": str(args.preset), "growth_steps": args.growth_steps, "eval_every": args.eval_every})
        )
    print(write_report(rows, curves, args.out))


if __name__ == "__main__":
    main()
