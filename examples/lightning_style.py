"""Where the cache's batch and loss plug into a loop with its own optimiser, schedule, EMA and mixed precision:
a Lightning-style module (training_step, configure_optimizers, on_train_batch_end), written without Lightning.

    python examples/lightning_style.py --shards 'data/train-*.tar' --cache teacher.zarr --steps 100 --amp bf16

`DistillModule` holds the pieces a LightningModule would; `fit` is the few lines of a Trainer this example needs.
With Lightning, keep the module's methods, give the Trainer `loader` as its train dataloader (a plain iterable; the
batches are already on the device) and build the loader with rank=trainer.global_rank, world=trainer.world_size.
"""

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dkd_cache


class DistillModule(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, teacher, *, lr: float, steps: int, amp: str, warmup_steps: int = 50,
                 ema_decay: float = 0.999):
        super().__init__()
        self.student, self.lr, self.steps, self.amp, self.warmup_steps = student, lr, steps, amp, warmup_steps
        # The loss: the teacher's entries (the cache's, or a LiveTeacher's) against the student's logits.
        self.dkd = dkd_cache.DKDLoss(teacher, alpha=1.0, beta=0.5, temperature=1.0)
        self.ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.global_step = 0  # as Lightning counts it: optimiser steps taken

    def training_step(self, batch: dkd_cache.DistillBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        # The batch: images as the teacher saw them (normalised, on the device), labels, the teacher's entries.
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        with torch.autocast(batch.images.device.type, dtype=dtype, enabled=self.amp != "none"):
            logits = self.student(batch.images)
        logits = logits.float()  # the loss in float32, whatever the forward ran in
        ce = F.cross_entropy(logits, batch.labels)
        kd = self.dkd(logits, batch.labels, batch.entries)
        warm = min(1.0, (self.global_step + 1) / self.warmup_steps)  # DKD's warm-up, here by steps
        return {"loss": ce + warm * kd, "ce": ce.detach(), "kd": kd.detach()}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=0.05)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)

    def on_train_batch_end(self) -> None:
        self.ema.update_parameters(self.student)
        self.global_step += 1


def fit(module: DistillModule, loader: dkd_cache.DistillLoader, steps: int) -> None:
    """A Trainer's loop, the part this example needs: epochs, steps, AMP's loss scaling, the schedule, EMA."""
    optimizer, schedule = module.configure_optimizers()
    scaler = torch.amp.GradScaler("cuda", enabled=module.amp == "fp16")  # fp16 needs scaling; bf16 does not
    module.train()
    step, epoch = 0, 0
    while step < steps:
        loader.set_epoch(epoch)  # the teacher's views of this epoch (resume mid-epoch: start_step=k)
        for batch_idx, batch in enumerate(loader):
            out = module.training_step(batch, batch_idx)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            module.on_train_batch_end()
            step += 1
            print(f"step {step} epoch {epoch} loss {out['loss'].item():.6f} ce {out['ce'].item():.4f} "
                  f"kd {out['kd'].item():.4f} lr {schedule.get_last_lr()[0]:.3g}", flush=True)
            if step == steps:
                return
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description="DKD from a teacher cache in a Lightning-style module")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        ap.error("--amp fp16 needs a CUDA device (on the CPU use bf16)")

    cache = dkd_cache.open_cache(args.cache)
    loader = dkd_cache.DistillLoader(args.shards, cache, batch_size=args.batch_size, workers=args.workers,
                                     device=args.device)
    torch.manual_seed(0)
    student = torchvision.models.resnet18(num_classes=cache.num_classes).to(args.device)
    module = DistillModule(student, cache, lr=args.lr, steps=args.steps, amp=args.amp)
    fit(module, loader, args.steps)
    ema_params = sum(p.numel() for p in module.ema.module.parameters())
    print(f"done: {args.steps} steps; the EMA student ({ema_params} parameters) is module.ema.module")


if __name__ == "__main__":
    main()
