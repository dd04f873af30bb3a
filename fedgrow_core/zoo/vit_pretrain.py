"""Pre-train heterogeneous small ``timm`` ViTs on a client's data shard, with a cache.

No pre-trained ViT ships in a package registry, so image clients pre-train their
own small models before growth (the paper's clients hold pre-trained models).
Each model is saved with ``timm.models.save_for_hf`` (``config.json`` with timm's
``architecture``, ``model_args`` and a ``pretrained_cfg`` holding the mean/std
measured on the training rows, and ``model.safetensors``), so
``timm.create_model("local-dir:<folder>", pretrained=True)`` loads it, plus
``metrics.json`` (test accuracy, steps, seconds), in a folder whose name
includes a hash of everything that determines it (the saving format included);
a folder with ``metrics.json`` is reused, not retrained.

Command line (see ``--help``)::

    python -m fedgrow_core.zoo.vit_pretrain --dataset mnist --specs 2x64 3x128 4x192 --out outputs/vits
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from datasets import Dataset
from transformers import get_cosine_schedule_with_warmup

from fedgrow_core.data.partitions import federate
from fedgrow_core.data.preprocessing import ImageTransform, make_dataloader
from fedgrow_core.data.sources import IMAGE, LABEL, label_names, load_data_source, task_of
from fedgrow_core.growth.families import get_family
from fedgrow_core.growth.families.vit import ARCHITECTURE
from fedgrow_core.training import cycle, evaluate, resolve_device, train_steps

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class VitSpec:
    """Shape of a small ViT: ``layers`` blocks of width ``hidden`` with ``heads`` heads and an FFN of ``ffn``."""

    layers: int
    hidden: int
    heads: int
    ffn: int = 0  # 0: 4 * hidden, timm's default mlp ratio

    @classmethod
    def parse(cls, text: str, head_dim: int = 32) -> VitSpec:
        """``"LxD"`` (heads ``D / head_dim``), ``"LxDxH"`` or ``"LxDxHxF"`` (FFN width ``F``).

        Raises
        ------
        ValueError
            On a malformed spec, or a width not divisible by the heads.
        """
        parts = text.lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3, 4) or min(numbers) < 1:
            raise ValueError(f"ViT spec must look like 'LxD', 'LxDxH' or 'LxDxHxF' (e.g. '4x192'), got {text!r}")
        layers, hidden = numbers[:2]
        heads = numbers[2] if len(numbers) >= 3 else max(1, hidden // head_dim)
        if hidden % heads:
            raise ValueError(f"ViT spec {text!r}: hidden {hidden} is not divisible by {heads} heads")
        ffn = numbers[3] if len(numbers) == 4 and numbers[3] != 4 * hidden else 0
        return cls(layers, hidden, heads, ffn)

    @property
    def ffn_width(self) -> int:
        """The FFN's hidden units."""
        return self.ffn or 4 * self.hidden

    def __str__(self) -> str:
        return f"{self.layers}x{self.hidden}x{self.heads}" + (f"x{self.ffn}" if self.ffn else "")


def build_vit(spec: VitSpec, img_size: int, patch_size: int, in_chans: int, num_classes: int, seed: int = 0):
    """A randomly initialised plain timm ``VisionTransformer`` (cls token, qkv bias, FFN ``spec.ffn_width``).

    ``img_size`` and ``patch_size`` are in pixels (square); input
    ``(B, in_chans, img_size, img_size)``, output logits ``(B, num_classes)``.
    Built by ``timm.create_model`` (Dosovitskiy et al. 2021's ViT).
    """
    torch.manual_seed(seed)
    return timm.create_model(
        ARCHITECTURE,
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=spec.hidden,
        depth=spec.layers,
        num_heads=spec.heads,
        mlp_ratio=spec.ffn_width / spec.hidden,
        num_classes=num_classes,
    )


def channel_stats(dataset: Dataset, max_rows: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the images in [0, 1] (uint8 scaled by 1/255), from up to ``max_rows`` rows."""
    # one batch read of the column (``[:]``), not an iteration over rows
    images = np.asarray(dataset.select(range(min(len(dataset), max_rows))).with_format("numpy")[:][IMAGE])
    x = images.astype(np.float32) / (255.0 if dataset.features[IMAGE].dtype == "uint8" else 1.0)
    return x.mean(axis=(0, 2, 3)).tolist(), (x.std(axis=(0, 2, 3)) + 1e-6).tolist()


@dataclass
class PretrainResult:
    """A pre-trained small ViT: where it is, its test accuracy, cost, and whether it came from the cache."""

    spec: str
    path: str
    test_accuracy: float
    steps: int
    seconds: float
    cached: bool


def pretrain_small_vits(
    specs: list[VitSpec],
    train: Dataset,
    test: Dataset,
    out_dir: str | Path,
    *,
    data_tag: str,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    patch_size: int = 7,
    seed: int = 0,
    device: str = "auto",
) -> list[PretrainResult]:
    """Pre-train one small ViT per spec on ``train``, test it on ``test``, save it; skip cached ones.

    Parameters
    ----------
    specs : list of VitSpec
        Heterogeneous shapes (depths and widths).
    train, test : datasets.Dataset
        Image rows (``image`` ``(C, H, W)``, ``label``), e.g. one client's shard.
    out_dir : str or Path
        Parent folder of the model folders (``vit-<L>x<D>-<hash>``). The hash
        covers the data, shape, training settings and the saving format, so a
        folder written with other settings or another format is never reused
        (it stays on disk, unread).
    data_tag : str
        Names the data shard in the cache key (e.g. ``"mnist/iid/3/p0"``).
    steps : int
        AdamW steps (cosine schedule, 5% warm-up).
    batch_size : int
        Images per step.
    lr, weight_decay : float
        AdamW peak learning rate and decoupled weight decay.
    patch_size : int
        Patch side in pixels; must divide the image side.
    seed : int
        Seeds initialisation and shuffling.
    device : str
        ``auto``, ``cpu`` or ``cuda``.

    Returns
    -------
    list of PretrainResult
        In the order of ``specs``.

    Raises
    ------
    ValueError
        Not an image dataset, or a patch size that does not divide the image.
    """
    if task_of(train) != "image":
        raise ValueError("ViT pre-training needs an image dataset")
    in_chans, height, width = train.features[IMAGE].shape
    if height != width or height % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the square image side, got images {height}x{width}")
    num_classes = len(label_names(train))
    run_device = resolve_device(device)
    transform = None  # computed for the first model not in the cache
    results = []
    for spec in specs:
        key = {
            "data": data_tag,
            "rows": len(train),
            "spec": str(spec),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "patch_size": patch_size,
            "seed": seed,
            "saved_with": "timm.models.save_for_hf",
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        folder = Path(out_dir) / f"vit-{spec.layers}x{spec.hidden}{f'x{spec.ffn}' if spec.ffn else ''}-{digest}"
        if (folder / METRICS_FILE).is_file():
            metrics = json.loads((folder / METRICS_FILE).read_text())
            results.append(PretrainResult(str(spec), str(folder), metrics["test_accuracy"], steps, 0.0, True))
            continue
        if transform is None:
            transform = ImageTransform((height, width), in_chans, *channel_stats(train))
        model = build_vit(spec, height, patch_size, in_chans, num_classes, seed).to(run_device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
        loader = make_dataloader(train, transform, batch_size, shuffle=True, seed=seed)
        start = time.perf_counter()
        train_steps(model, cycle(loader), optimizer, steps, run_device, scheduler=scheduler)
        seconds = time.perf_counter() - start
        result = evaluate(model, make_dataloader(test, transform, 512), run_device)
        config = get_family("vit").target_config(model, get_family("vit").shape(model), num_classes)
        config["data_config"] = transform.to_config()
        get_family("vit").save(model.cpu(), config, folder)
        metrics = {**key, "test_accuracy": result.accuracy, "test_rows": result.num_examples, "seconds": seconds}
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        results.append(PretrainResult(str(spec), str(folder), result.accuracy, steps, seconds, False))
    return results


def main(argv: list[str] | None = None) -> list[PretrainResult]:
    """Command-line entry point; prints one line per model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", help="image source: mnist, digits, an .npz file, ...")
    parser.add_argument("--specs", nargs="+", default=["2x64", "3x128", "4x192"], help="LxD or LxDxH")
    parser.add_argument("--out", default="outputs/vits", help="parent folder of the saved models")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--patch-size", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-partitions", type=int, default=1, help="> 1: pre-train on one client's shard")
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet", "shards"])
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)
    specs = [VitSpec.parse(s) for s in args.specs]
    data = load_data_source(args.dataset)
    if args.num_partitions > 1:
        shard = federate(data, args.num_partitions, args.partitioner, alpha=args.alpha, seed=args.seed)
        split = shard.client(args.partition_id)
        train, test = split["train"], split["test"]
        tag = f"{args.dataset}/{args.partitioner}-{args.alpha}/{args.num_partitions}/p{args.partition_id}"
    else:
        if "test" in data:
            train, test = data["train"], data["test"]
        else:
            split = data["train"].train_test_split(test_size=0.2, seed=args.seed, stratify_by_column=LABEL)
            train, test = split["train"], split["test"]
        tag = args.dataset
    results = pretrain_small_vits(
        specs,
        train,
        test,
        args.out,
        data_tag=tag,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        patch_size=args.patch_size,
        seed=args.seed,
        device=args.device,
    )
    for r in results:
        print(json.dumps(asdict(r)))
    return results


if __name__ == "__main__":
    main()
