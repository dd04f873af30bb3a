"""Regenerate ``docs/results.md``, its tables and its plots from the committed comparison records.

    python -m experiments.results_page          # make results-page

Reads ``docs/results/<task>/clients.csv`` and ``rounds.csv``
(:mod:`experiments.records`) for every comparison of :data:`COMPARISONS`,
rewrites that folder's tables (:func:`experiments.tables.write_tables`) and
plots (:func:`experiments.plots.plot_accuracy`), and writes the page: the
settings of each comparison (from its preset), the commands, the machines,
dates and commits recorded in the rows, the results with paired 95% intervals,
the paper's claims beside ours, and where Fed-Grow wins and where it does not.
Every number on the page comes from those CSV files; nothing is run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .flower_launcher import ROOT
from .plots import plot_accuracy
from .records import RUN_KEY, load_records, resolved_config
from .significance import paired_differences, paired_markdown
from .tables import (
    PAPER_FEWER_TRAINABLE,
    PAPER_LESS_COMMUNICATION,
    comparison_markdown,
    markdown,
    paper_comparison,
    per_client_markdown,
    results_table,
    write_tables,
)


@dataclass(frozen=True)
class Comparison:
    """One comparison of the page: its records folder, its preset and how to run it."""

    name: str
    title: str
    folder: Path
    preset: Path
    make_target: str
    note: str = ""
    bar: float | None = None
    bar_alpha: float = 10.0
    federation: str = ""
    target_seeds: int = 5
    modes: tuple[str, ...] = ("fedgrow", "independent-dual-ligo", "independent-ligo", "small-only", "scratch-fedavg")
    late_joiner: Path | None = None

    def command(self, seeds: list[int], modes: list[str]) -> str:
        """The runner's command line for these seeds and modes (``make <target>`` runs the planned ones)."""
        federation = f" --federation {self.federation}" if self.federation else ""
        return (
            f"python -m experiments.runner --preset {_rel(self.preset)}{federation} --seeds "
            f"{' '.join(map(str, seeds))} --modes {' '.join(modes)} --out {_rel(self.folder)} "
            f"--work results/{self.name}"
        )


COMPARISONS = (
    Comparison(
        "text",
        "Text: Rotten Tomatoes",
        ROOT / "docs" / "results" / "text",
        ROOT / "presets" / "results-text.toml",
        "results-text",
        "The package registries ship pre-trained BERT-family models with this vocabulary only at width 384 "
        "(all-MiniLM-L6-v2 and copies of it, MiniLM-L3 as ONNX), so the clients differ in depth (3 and 6 layers) "
        "and the intermediate shape is wider than all of them: every Local-LiGO grows width (384 to 480, not a "
        "multiple) and depth. The bar for a budget in which the baselines learn: `small-only` at least 0.78 "
        "mean accuracy at alpha 10. These records were made with the operators of the app commits listed above "
        "(fixed split weights, zero extra key rows, a Local-LiGO seed per partition, no `independent-dual-ligo`); "
        "the current operators have not been run on this comparison.",
        bar=0.78,
        modes=("fedgrow", "independent-ligo", "small-only", "scratch-fedavg"),
    ),
    Comparison(
        "paper-image",
        "Paper-shaped images: Fashion-MNIST, ten clients",
        ROOT / "docs" / "results" / "paper-image",
        ROOT / "presets" / "paper-image.toml",
        "results-paper",
        "The paper's shapes on a budget that fits two CPU cores: ten data-scarce clients, each pre-training its own "
        "small ViT (256 wide, 2, 3 or 4 layers, mlp ratio 1) on its own rows only; every Local-LiGO grows depth and "
        "width to the intermediate 4 x 320, the Global-LiGO to the target 6 x 384, with `identity` depth growth "
        "(exact for pre-LN ViTs: each grown model starts as its small model). `independent-dual-ligo` runs "
        "Fed-Grow's own Dual-LiGO from the same seeds and never averages, so Fed-Grow minus it is what the "
        "federation adds. In these records the final fine-tuning (`lr-finetune = 1e-4`, 40 steps) lowers every "
        "growth mode's accuracy: compare the grown models before fine-tuning, below.",
        federation="flwr_home/federation-10.toml",
        target_seeds=3,
        late_joiner=ROOT / "docs" / "results" / "paper-late-joiner",
    ),
    Comparison(
        "image",
        "Images: Fashion-MNIST",
        ROOT / "docs" / "results" / "image",
        ROOT / "presets" / "results-image.toml",
        "results-image",
        "Each client pre-trains its own small ViT on its own rows first (`pretrain-steps`), so the small models "
        "differ in width (64, 128, 192) and depth (2, 3, 4), and every Local-LiGO grows both to the intermediate "
        "5 x 256. These records were made with the operators of the app commits listed above (fixed split weights, "
        "a Local-LiGO seed per partition, no `independent-dual-ligo`); the current operators have not been run on "
        "this comparison.",
        modes=("fedgrow", "independent-ligo", "small-only", "scratch-fedavg"),
    ),
    *(
        Comparison(
            f"paper-scale-{task}",
            f"Paper scale, {words} (GPU)",
            ROOT / "docs" / "results" / f"paper-scale-{task}",
            ROOT / "presets" / f"paper-scale-{task}.toml",
            "",
            "10 SuperNodes sharing one GPU (`flwr_home/federation-gpu.toml`).",
            federation="flwr_home/federation-gpu.toml",
        )
        for task, words in (("text", "text"), ("image", "images"))
    ),
)


MODE_MEANINGS = {
    "fedgrow": "Fed-Grow: private Local-LiGO, shared Global-LiGO averaged with FedAvg, then local fine-tuning",
    "scratch-fedavg": "the target model from a seeded random initialisation, trained with FedAvg",
    "independent-ligo": "each client grows its small model to the target alone with one LiGO (no federation)",
    "independent-dual-ligo": "Fed-Grow's own Dual-LiGO from the same seeds, whose Global-LiGO each client keeps "
    "and never averages: the same as `fedgrow` but for the averaging",
    "small-only": "each client fine-tunes its own small model alone (no growth, no federation)",
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _settings(comp: Comparison, clients: pd.DataFrame) -> str:
    preset = tomllib.loads(comp.preset.read_text())
    keys = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in preset.items())
    models = clients.drop_duplicates("partition_id").sort_values("partition_id")["model"].tolist()
    first = clients.iloc[0]
    seeds = sorted(clients["seed"].unique())
    return "\n".join(
        [
            f"- Dataset `{first['dataset']}`, Dirichlet alpha {first['dirichlet_alpha']:g}, {len(models)} clients "
            f"holding {', '.join(f'`{m}`' for m in models)}.",
            f"- Intermediate shape {first['intermediate_shape']}, target shape {first['target_shape']}; "
            f"{int(first['steps'])} optimiser steps per client in every mode.",
            f"- Preset [`{_rel(comp.preset)}`](../{_rel(comp.preset)}): {keys}.",
            f"- Seeds {', '.join(str(s) for s in seeds)}; command: "
            f"`{comp.command(seeds, list(clients['mode'].unique()))}`"
            + (f" (all planned runs: `make {comp.make_target}`)." if comp.make_target else "."),
            f"- Measured on {_listing(clients['machine'])} ({_listing(clients['software'])}); "
            f"dates {_listing(clients['date'])}; app commit(s) {_listing(clients['commit'])}.",
        ]
    )


def _listing(column: pd.Series) -> str:
    return ", ".join(f"`{v}`" for v in sorted(set(column.astype(str))))


def _answer(comp: Comparison, table: pd.DataFrame, paired: pd.DataFrame) -> list[str]:
    """Per Dirichlet alpha: Fed-Grow's accuracy, the sweep's completeness, the bar, and one line per baseline."""
    lines = []
    for alpha, at in table.groupby("dirichlet_alpha", sort=True):
        ours = at[at["mode"] == "fedgrow"]
        if ours.empty:
            lines.append(f"- **{comp.title}** (alpha {alpha:g}): no Fed-Grow runs recorded yet.")
        else:
            o = ours.iloc[0]
            lines.append(
                f"- **{comp.title}** (alpha {alpha:g}, {int(o['seeds'])} seeds): Fed-Grow's grown models "
                f"reach {o['accuracy_mean']:.3f} ± {o['accuracy_std']:.3f} mean client accuracy."
            )
        planned = comp.target_seeds
        short = {m: int(n) for m, n in zip(at["mode"], at["seeds"], strict=True) if n < planned}
        missing = [m for m in comp.modes if m not in set(at["mode"])]
        if short or missing:
            parts = [f"`{m}` has {n} of {planned} seeds" for m, n in short.items()]
            parts += [f"`{m}` has none" for m in missing]
            rerun = (
                f"make {comp.make_target}" if comp.make_target else comp.command(list(range(planned)), list(comp.modes))
            )
            lines.append(
                f"  - the sweep is not complete ({'; '.join(parts)}); `{rerun}` runs what is missing, skipping "
                "every run already recorded."
            )
        small = at[at["mode"] == "small-only"]
        if comp.bar is not None and alpha == comp.bar_alpha and not small.empty:
            acc = small.iloc[0]["accuracy_mean"]
            met = "met" if acc >= comp.bar else "NOT met"
            lines.append(
                f"  - the small models alone (`small-only`) reach {acc:.3f}: the bar of {comp.bar:.2f} "
                f"at alpha {alpha:g} for a budget in which the baselines learn is {met}."
            )
        for _, p in (paired[paired["dirichlet_alpha"] == alpha] if not paired.empty else paired).iterrows():
            base = at[at["mode"] == p["baseline"]].iloc[0]
            lines.append(
                f"  - against `{p['baseline']}` ({base['accuracy_mean']:.3f}): {p['difference']:+.3f} "
                f"(95% CI [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}], {int(p['seeds'])} seeds, "
                f"{int(p['pairs'])} client pairs; Fed-Grow ahead in {p['client_wins']:.0%} of them): {p['verdict']}."
            )
    return lines


def _paper_lines(table: pd.DataFrame) -> list[str]:
    if "fedgrow" not in set(table["mode"]):
        return []
    comp = paper_comparison(table)
    lines = []
    for _, r in comp[comp["baseline"] == "scratch-fedavg"].iterrows():
        lines.append(
            f"- {r['task']}, alpha {r['dirichlet_alpha']:g}: against `scratch-fedavg`, Fed-Grow trains "
            f"{r['fewer_trainable']:.1%} fewer parameters per client in the rounds (paper: "
            f"{PAPER_FEWER_TRAINABLE:.2%}) and uploads {r['less_communication']:.1%} fewer bytes per client per "
            f"round (paper: {PAPER_LESS_COMMUNICATION:.2%}); accuracy {r['accuracy_gain']:+.3f}."
        )
    return lines


Section = tuple[Comparison, pd.DataFrame, pd.DataFrame, pd.DataFrame]
"""One comparison of the page: its client records, :func:`results_table` and :func:`paired_differences`."""


def render(sections: list[Section]) -> str:
    """The Markdown of ``docs/results.md`` from each comparison's client records, table and paired differences."""
    answer, body, paper = [], [], []
    for comp, clients, table, paired in sections:
        answer += _answer(comp, table, paired)
        paper += _paper_lines(table)
        folder = _rel(comp.folder).removeprefix("docs/")
        run = resolved_config(tomllib.loads(comp.preset.read_text()))
        body += [
            f"## {comp.title}",
            "",
            _settings(comp, clients),
            "",
            comp.note,
            "",
            "Mean over seeds ± sample std over seeds (of each run's mean over its clients); spread: std over "
            "clients within a run; upload: message content per client, MB = 1e6 bytes. Wall time is the "
            "ServerApp's, on a machine that other jobs (tests) shared at times during the sweep: it is not a "
            "speed benchmark ([testing.md](testing.md) has the benchmarks).",
            "",
            markdown(table),
            "",
            *(
                [
                    "Fed-Grow minus each baseline on the same seed and client (positive: Fed-Grow more accurate); "
                    "the interval is a Student t interval over seeds of each seed's mean client difference.",
                    "",
                    paired_markdown(paired),
                    "",
                ]
                if not paired.empty
                else ["No Fed-Grow runs are recorded yet, so there are no paired differences.", ""]
            ),
            *growth_diagnostics(comp, clients),
            "Each client's accuracy (mean ± sample std over seeds):",
            "",
            per_client_markdown(clients),
            "",
            "Curves: mean over seeds of the mean client accuracy, the band one sample std over seeds. Each round's "
            f"point is on each client's first {run.eval_max_examples} test rows (`eval-max-examples`); the last "
            "point, after the final fine-tuning, is on all of them (the numbers in the tables above), so the last "
            "step of a curve mixes two test sets.",
            "",
            f"![accuracy against optimiser steps]({folder}/accuracy_vs_steps.png)",
            "",
            f"![accuracy against uploaded bytes]({folder}/accuracy_vs_bytes.png)",
            "",
            *(
                [
                    "In the terms of the paper's claims: fewer parameters trained per client in the rounds "
                    "(Fed-Grow then fine-tunes the whole grown model locally, as every mode fine-tunes its model), "
                    "and fewer bytes uploaded per client per round (Fed-Grow's Global-LiGO updates travel as int8, "
                    "the default `update-encoding`, about a quarter of their float32 bytes; `scratch-fedavg` sends "
                    "float32 weights; see [communication.md](communication.md)):",
                    "",
                    comparison_markdown(paper_comparison(table)),
                    "",
                ]
                if not paired.empty
                else []
            ),
            f"Records: [`clients.csv`]({folder}/clients.csv) (one row per client per run), "
            f"[`rounds.csv`]({folder}/rounds.csv) (one row per round per run).",
            "",
            *late_joiner_lines(comp),
        ]
    modes = "\n".join(f"- `{m}`: {meaning}." for m, meaning in MODE_MEANINGS.items())
    return "\n".join(
        [
            "# Results",
            "",
            "<!-- Generated by `python -m experiments.results_page` (make results-page) from the committed "
            "records under docs/results/; edit experiments/results_page.py, not this file. -->",
            "",
            "Does Fed-Grow give each client a better large model than its alternatives? Each comparison runs "
            "every mode on the same seeds, so that a seed fixes the partition, each client's rows, its small "
            "model and its batch order; every mode gets the same optimiser steps on the same rows (in the image "
            "comparison each client first pre-trains its own small ViT on its own rows, `pretrain-steps`, which "
            "every mode but `scratch-fedavg` starts from). Whole models (`small-only`, `scratch-fedavg`) train "
            "at `lr-finetune`, their heads at `lr-head`; `scratch-fedavg` has no rate of its own, so it trains "
            "from a random initialisation at a fine-tuning rate. The modes:",
            "",
            modes,
            "",
            "## The answer",
            "",
            *answer,
            "",
            *discussion(sections),
            "",
            "## Beside the paper",
            "",
            "Shen et al. (Fed-Grow, IEEE TPDS 2026) report, in their abstract, 59.25% fewer trainable parameters "
            "and 73.01% less communication than the compared methods, with higher accuracy and precision; the "
            "abstract does not name the method each figure is measured against. Of the compared methods (federated "
            "training of the target model, independent growth, the small models alone), only the federated "
            "training of the target model (`scratch-fedavg` here) trains and sends a model of the target's size, "
            "so ours are given against it. Their setting (their public configurations): clients' small models "
            "of 2 to 4 layers at width 256, intermediate 4 x 320, target 6 x 384, 10 to 50 clients, 100 to 200 "
            "rounds, on GPUs. Ours, on the budgets below:",
            "",
            *(paper or ["- no `scratch-fedavg` runs recorded."]),
            "",
            *body,
            *NOT_MEASURED,
        ]
    )


#: Why an outcome happens, per baseline, in words that hold whatever the exact numbers (which are above them);
#: each is given only where the verdicts show its outcome (:data:`WHY_WHEN_FEDGROW_WINS`).
WHY = {
    "scratch-fedavg": "Against `scratch-fedavg`, growth starts from what the clients' pre-trained small models "
    "know: the grown model's weights are the small model's weights mapped by the operators, while the target "
    "model trained from a random initialisation starts at chance, and a hundred steps or fewer at a fine-tuning "
    "rate are far too few to pre-train a transformer. Growth also trains and sends a fraction of the parameters.",
    "small-only": "Against the small models alone, every mode gets the same optimiser steps, and where growth is "
    "not exact the grown model does not even start where its small model is: stacked layers (and in the text "
    "comparison BERT's width grown by a non-multiple) change the function at initialisation "
    "([method.md](method.md#what-growth-preserves); the paper-shaped comparison's `identity` growth of pre-LN ViTs "
    "is exact). "
    "Within "
    "this budget the target's extra width and depth are not turned into accuracy that the small model does not "
    "reach by training the same steps itself, and each grown step costs several times a small one. Growth is "
    "an initialisation for a longer training of the large model, which this budget does not give.",
    "independent-dual-ligo": "Against the same Dual-LiGO never averaged (`independent-dual-ligo`), the averaging is "
    "the only difference, so this is what the federation adds. The diagnostics show why it adds little here: the "
    "clients' Global-LiGO updates are nearly orthogonal (their mean pairwise cosine, per round above, is at most a few "
    "hundredths), so FedAvg keeps little of any one client's step; the grown models before fine-tuning are as "
    "accurate with the averaged operator as with each client's own, and the local fine-tuning that follows is the "
    "same in both modes.",
    "independent-ligo": "Against independent growth, the federation adds only the Global-LiGO averaged over the "
    "clients: an operator from the intermediate to the target shape, trained for the growth rounds. Over a few "
    "rounds of three clients it carries little that each client's own LiGO does not learn from its own rows, and "
    "the fine-tuning that follows is local in both modes.",
}


#: For each :data:`WHY` paragraph: True if it explains Fed-Grow winning, False if it explains Fed-Grow not winning.
WHY_WHEN_FEDGROW_WINS = {
    "scratch-fedavg": True,
    "small-only": False,
    "independent-dual-ligo": False,
    "independent-ligo": False,
}


def discussion(sections: list[Section]) -> list[str]:
    """Where Fed-Grow wins and where it does not (from the verdicts), then why (:data:`WHY`, where it applies)."""
    lines = ["### Where Fed-Grow wins, where it does not, and why", ""]
    seen = set()
    for comp, _, _, paired in sections:
        if paired.empty:
            lines.append(f"- {comp.title}: no Fed-Grow runs recorded yet.")
            continue
        for alpha, at in paired.groupby("dirichlet_alpha", sort=True):
            kinds = {
                "is significantly more accurate than": at[at["verdict"].str.startswith("Fed-Grow")],
                "is significantly less accurate than": at[at["verdict"].str.contains("more accurate")
                                                          & ~at["verdict"].str.startswith("Fed-Grow")],
                "cannot be told apart from": at[~at["verdict"].str.contains("more accurate")],
            }  # fmt: skip
            said = [
                f"{words} {', '.join(f'`{b}`' for b in rows['baseline'])}"
                for words, rows in kinds.items()
                if not rows.empty
            ]
            lines.append(f"- {comp.title}, alpha {alpha:g}: Fed-Grow {'; '.join(said)}.")
            seen |= {(b, v.startswith("Fed-Grow")) for b, v in zip(at["baseline"], at["verdict"], strict=True)}
    lines.append("")
    lines += [WHY[b] + "\n" for b in WHY if (b, WHY_WHEN_FEDGROW_WINS[b]) in seen]
    return lines


def growth_diagnostics(comp: Comparison, clients: pd.DataFrame) -> list[str]:
    """Before fine-tuning, and how far the Global-LiGO moved, where the records have them.

    The grown models' accuracy before fine-tuning (``grown_accuracy``), Fed-Grow
    minus each growth baseline; and, per ``fedgrow`` round, the mean over seeds of
    the Global-LiGO's relative change and of the clients' update cosine.
    """
    lines: list[str] = []
    if "grown_accuracy" in clients and clients["grown_accuracy"].notna().any():
        grown = clients.dropna(subset=["grown_accuracy"])
        table = grown.groupby("mode")["grown_accuracy"].mean()
        lines += [
            "The grown models before fine-tuning (all test rows; mean over seeds and clients): "
            + ", ".join(f"`{m}` {v:.3f}" for m, v in table.items())
            + ". Fed-Grow minus each, on the same seed and client:",
            "",
            paired_markdown(paired_differences(grown, "grown_accuracy"), "grown_accuracy"),
            "",
        ]
    rounds = load_records(comp.folder)[1]
    if "relative_change" in rounds and rounds["relative_change"].notna().any():
        ours = rounds[(rounds["mode"] == "fedgrow") & rounds["relative_change"].notna()]
        per_round = ours.groupby("round")[["relative_change", "update_cosine"]].mean()
        lines += [
            "The Global-LiGO in `fedgrow`, per round (mean over seeds): its relative change "
            "`||G_after - G_sent|| / ||G_sent||` and the mean pairwise cosine of the clients' updates:",
            "",
            "| round | relative change | update cosine |",
            "| --- | --- | --- |",
            *(f"| {int(r)} | {v['relative_change']:.4f} | {v['update_cosine']:.3f} |" for r, v in per_round.iterrows()),
            "",
        ]
    return lines


def late_joiner_lines(comp: Comparison) -> list[str]:
    """The comparison's late-joiner section (:mod:`experiments.late_joiner`), if its records exist."""
    folder = comp.late_joiner
    if folder is None or not (folder / "late_joiner.md").is_file():
        return []
    rows = pd.read_csv(folder / "newcomers.csv")
    setup = json.loads((folder / "setup.json").read_text())
    rel = _rel(folder).removeprefix("docs/")
    seeds = " ".join(str(s) for s in sorted(rows["seed"].unique()))
    return [
        "### A client that joins later",
        "",
        f"After each seed's `fedgrow` run, {rows['newcomer'].nunique()} organisations that were not in the "
        "federation grow their own small models (pre-trained on their own rows: a Dirichlet partition of the "
        "dataset's test split, which no federation client trained on) with `fedgrow-grow`, for "
        f"{setup['growth_steps']} growth steps (evaluated every {setup['eval_every']}) and the preset's "
        "fine-tuning steps, four ways. Paired differences are over seeds of each seed's mean over newcomers. "
        f"Command: `python -m experiments.late_joiner --preset {_rel(comp.preset)} --runs results/{comp.name} "
        f"--seeds {seeds} --growth-steps {setup['growth_steps']} --eval-every {setup['eval_every']} "
        f"--out {_rel(folder)}` (`make late-joiner`).",
        "",
        (folder / "late_joiner.md").read_text().strip(),
        "",
        f"![late joiners: accuracy against steps]({rel}/late_joiner.png)",
        "",
        f"Records: [`newcomers.csv`]({rel}/newcomers.csv), [`curves.csv`]({rel}/curves.csv).",
        "",
    ]


#: What the page does not cover, and how to run it.
NOT_MEASURED: list[str] = [
    "## Not measured here",
    "",
    "- **Paper scale on a GPU.** `presets/paper-scale-text.toml` (target 12 x 768, FFN 3072) and "
    "`presets/paper-scale-image.toml` (the paper's ViT shapes: small models 2 to 4 x 256, intermediate 4 x 320, "
    "target 6 x 384) run 10 clients at Dirichlet alpha 0.5 for 50 rounds on CUDA (bf16 autocast), with "
    "`--federation flwr_home/federation-gpu.toml` (10 SuperNodes sharing one GPU); their records have the same "
    "columns. No GPU was available for the measurements on this page, so they have not been run.",
    "- **Other Dirichlet alphas.** Text is measured at alpha 10 only (where the small models alone learn "
    "the task), images at alpha 0.5 only; `--alphas 0.1 0.5 10` runs more into the same records.",
    "- **Federated fine-tuning of the grown models** is not a mode: the grown models share no coordinate "
    "system beyond the Global-LiGO, which Fed-Grow already averages (see "
    "[method.md](method.md#why-no-federated-fine-tuning-of-the-grown-models)).",
]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md", help="the page to write")
    args = parser.parse_args(argv)
    sections = []
    for comp in COMPARISONS:
        clients, rounds = load_records(comp.folder)
        if clients.empty:
            print(f"[results_page] {_rel(comp.folder)}: no records, left out", file=sys.stderr)
            continue
        write_tables(clients, comp.folder)
        plot_accuracy(rounds, comp.folder, title=comp.title.split(": ")[-1])
        sections.append((comp, clients, results_table(clients), paired_differences(clients)))
        print(f"[results_page] {comp.name}: {len(clients[RUN_KEY].drop_duplicates())} runs")
    if not sections:
        print("[results_page] no comparison records found", file=sys.stderr)
        return 1
    args.page.write_text(render(sections) + "\n")
    print(f"[results_page] wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
