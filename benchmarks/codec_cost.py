"""Codec decode cost against a training step, at ImageNet's 1,000 classes, in one process.

For each codec: a one-view cache shaped like an ImageNet one (throughput.imagenet_geometry_cache: 1,000 classes,
random logits; a learned codec is fitted on logits drawn the same way) and throughput.decode_cost on one batch of its
entries: codec decode alone, and decode + teacher_signal.dkd_from_entries forward and backward (what training runs
per step). The step it is compared with: dkd_cache.train.train_step of a ResNet-18 (CE only, SGD, channels_last) on
one random batch of the same size, model compute only (no data loading), so the percentages are upper bounds of the
share of a real step. Every figure is the best of --repeats timings: on a shared machine the best is the one least
disturbed by other jobs, for the step and for the codec alike. Reproduce (about a minute on 2 CPU cores; the machine may be shared: read the ratios):

    python benchmarks/codec_cost.py --json benchmarks/results/codec-cost-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import decode_cost, imagenet_geometry_cache, time_calls  # noqa: E402

CODECS = ("topk:10+q4", "q8", "lowrank:32+top:32+sparse:8", "lowrank:32+top:64+sparse:8", "lowrank:64+top:128+sparse:32")


def step_ms(batch: int, image_size: int, device: str, repeats: int) -> float:
    """The best of `repeats` timings (each the mean of 3 steps after 2 warm-up steps) of one train step."""
    from dkd_cache.teacher import build_model
    from dkd_cache.train import train_step

    torch.manual_seed(0)
    model = build_model("resnet18", 1000).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    best = float("inf")
    for i in range(repeats):
        n, dt = time_calls(lambda: train_step(model, opt, x, y, None, kd_factor=0.0, ce_weight=1.0), device,
                           0.0, warmup=2 if i == 0 else 0, min_calls=3)
        best = min(best, 1000 * dt / n)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--repeats", type=int, default=10, help="timings per figure; the best counts (shared machine)")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = {"batch": a.batch_size, "image_size": a.image_size, "device": a.device, "classes": 1000,
           "torch_threads": torch.get_num_threads(), "codecs": {}}
    out["train_step_ms"] = step_ms(a.batch_size, a.image_size, a.device, a.repeats)
    with tempfile.TemporaryDirectory(prefix="dkd-codec-cost-") as tmp:
        for spec in [c.strip() for c in a.codecs.split(",") if c.strip()]:
            path = imagenet_geometry_cache(Path(tmp) / f"{len(out['codecs'])}.zarr", spec, shards=1, per_shard=256)
            runs = [decode_cost(a, path, min_seconds=0.0) for _ in range(a.repeats)]  # each: mean of >= 10 calls
            out["codecs"][spec] = {**runs[0], **{k: min(r[k] for r in runs) for k in runs[0] if k.endswith("_ms")}}
    out["train_step_ms_after"] = step_ms(a.batch_size, a.image_size, a.device, a.repeats)  # drift check
    step = min(out["train_step_ms"], out["train_step_ms_after"])
    print(f"ResNet-18 train step, batch {a.batch_size}, {a.image_size} px, {a.device}: {out['train_step_ms']:.0f} ms "
          f"(again after the codecs: {out['train_step_ms_after']:.0f} ms; the smaller is the denominator)")
    print("| codec (1,000 classes) | decode ms | % of step | decode + DKD fwd/bwd ms | % of step |\n|---|---|---|---|---|")
    for spec, d in out["codecs"].items():
        d["decode_pct"] = 100 * d["decode_ms"] / step
        d["decode_loss_pct"] = 100 * d["decode_loss_fwd_bwd_ms"] / step
        print(f"| {spec} | {d['decode_ms']:.2f} | {d['decode_pct']:.2f}% | {d['decode_loss_fwd_bwd_ms']:.2f} | "
              f"{d['decode_loss_pct']:.2f}% |")
    out["seconds"] = time.perf_counter() - t0
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
