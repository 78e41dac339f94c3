"""Distil a student from a teacher cache in a plain PyTorch loop: no dkd-cache CLI, your optimiser, your loop.

    python examples/own_training_loop.py --shards 'data/train-*.tar' --cache teacher.zarr --steps 100

Prints the loss of every step. For the same --steps, --seed, --batch-size, --lr and --workers it trains exactly
as `dkd-cache train-student --arch resnet18 --batch-size B --lr LR --lr-batch B --workers W --max-steps N` does:
same batches, same losses (tests/test_examples.py checks it).
"""

import argparse

import torch
import torch.nn.functional as F
import torchvision

import dkd_cache


def main() -> None:
    ap = argparse.ArgumentParser(description="DKD from a teacher cache in a plain PyTorch loop")
    ap.add_argument("--shards", required=True, help="the shards the cache was dumped from (glob, folder, braces)")
    ap.add_argument("--cache", required=True, help="the teacher cache (a folder or s3:// prefix)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    cache = dkd_cache.open_cache(args.cache)
    print(f"cache: {cache.samples} samples x {cache.views} views, codec {cache.codec.name}, "
          f"teacher {cache.provenance.teacher.arch}, {cache.recipe.image_size} px")
    teacher = cache  # a live teacher instead (the one line to change):
    # teacher = dkd_cache.LiveTeacher.from_file("teacher.pt", arch="resnet50", device=args.device)
    loader = dkd_cache.DistillLoader(args.shards, cache, teacher=teacher, batch_size=args.batch_size,
                                     workers=args.workers, seed=args.seed, device=args.device, channels_last=True)
    dkd = dkd_cache.DKDLoss(teacher, alpha=1.0, beta=0.5, temperature=1.0)

    torch.manual_seed(args.seed)  # the student's initial weights
    student = torchvision.models.resnet18(num_classes=cache.num_classes)
    student = student.to(args.device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)

    step, epoch = 0, 0
    while step < args.steps:
        loader.set_epoch(epoch)  # epoch e replays the teacher's views of epoch e, in a new order
        for batch in loader:  # normalised images on the device, labels, the teacher's entries
            logits = student(batch.images)
            loss = F.cross_entropy(logits, batch.labels) + dkd(logits, batch.labels, batch.entries)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            print(f"step {step} epoch {epoch} loss {loss.item():.6f}", flush=True)
            if step == args.steps:
                break
        epoch += 1


if __name__ == "__main__":
    main()
