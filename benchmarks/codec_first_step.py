"""The first training step's DKD from a cache of each codec against the live teacher's exact DKD (same views, same
student init): the figures behind tests/test_codec_pipeline.py's tolerances.

    python benchmarks/codec_first_step.py /tmp/codec-first-step > benchmarks/results/codec_first_step.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dkd_cache.dump import DumpSettings, dump_teacher
from dkd_cache.synth import make_shards
from dkd_cache.checkpoint import save_checkpoint
from dkd_cache.teacher import build_model
from dkd_cache.train import TrainConfig, train_student
from dkd_cache.views import Recipe


def first_step(shards: str, out: Path, **kw) -> dict:
    train_student(TrainConfig(shards=shards, out=str(out), epochs=1, batch_size=16, lr=0.05, lr_batch=16, workers=0,
                              max_steps=1, temperature=4.0, log_every=1, **kw), progress=False)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    # the test suite's fixtures: 10 classes, 80 samples, a ResNet-18 teacher with sharpened logits, 32 px
    data = make_shards(work / "data", classes=10, train_per_class=8, val_per_class=2, shard_size=25, seed=0,
                       min_side=40, max_side=90)
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    with torch.no_grad():
        model.fc.weight.mul_(20.0)
    teacher = work / "teacher.pt"
    save_checkpoint(teacher, model=model.state_dict(), arch="resnet18")
    shards = str(Path(data["train"][0]).parent)
    base = dict(shards=shards, weights=str(teacher), arch="resnet18", views=1, temperatures=(1.0, 4.0),
                recipe=Recipe(image_size=32), batch_size=16, workers=0, chunk_rows=8, seed=0)
    ref_cache = work / "fp32.zarr"
    dump_teacher(DumpSettings(out=str(ref_cache), codec="fp32", **base), progress=False)
    live = first_step(shards, work / "live", cache=str(ref_cache), live_teacher=str(teacher), teacher_arch="resnet18")
    print(f"live teacher, exact DKD at T 4: {live['dkd']:.6f}")
    print(f"{'codec':<26}{'first-step DKD':>16}{'relative difference':>22}")
    for codec in ("fp32", "fp16", "q8", "topk:3+q4", "topk:3+q2", "lowrank:4+top:4+sparse:2"):
        cache = work / f"{codec.replace(':', '_').replace('+', '_')}.zarr"
        if not cache.exists():
            dump_teacher(DumpSettings(out=str(cache), codec=codec, **base), progress=False)
        got = first_step(shards, work / f"run-{cache.stem}", cache=str(cache))
        print(f"{codec:<26}{got['dkd']:>16.6f}{abs(got['dkd'] - live['dkd']) / live['dkd']:>22.3g}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
