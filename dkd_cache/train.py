"""train-student: DKD from the cache (the teacher is never built), or CE only, or DKD with a live teacher.

One loop for the three modes, top to bottom, like nanoGPT's train.py. Set-up lives in train_setup.py, the
metrics log and progress lines in metrics_log.py, the run directory and its checkpoints in run_checkpoint.py.
The batches and the loss are the public API's (api.DistillLoader, api.LiveTeacher, api.DKDLoss): the loop any user
writes with dkd_cache's exported names is this one's data path and loss, not a copy of them.
Under torchrun every rank runs the same number of steps per epoch (see loader.plan_epoch); checkpoints are
written atomically each epoch (and every `checkpoint_every` steps), and --resume continues so that the result
equals an uninterrupted run, bit for bit: same samples in the same order, same weights, optimizer and RNG state.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import api
from . import dist as dist_mod
from . import run_checkpoint
from . import train_setup
from .data import expand_shards, scan_shards
from .api import epoch_batches, own_generator, with_views  # noqa: F401  (epoch_batches, with_views: tests import them here)
from .errors import DKDCacheError
from .loader import RankPlan, StreamSpec, Task, batches, canonical_runs, make_loader
from .metrics_log import EpochClock, MetricsLog, PendingStep, status_line
from .progress import Progress
from .run_checkpoint import Position, plan_workers, transfer_block  # noqa: F401  (transfer_block: its home)
from .train_config import LOSSES, TrainConfig, kd_factor, lr_at, student_size  # noqa: F401  (re-exported)
from .views import Recipe, normalize


def train_student(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train; under torchrun, a collective that fails because a peer died becomes a typed error (exit 2)."""
    try:
        return _train_student(cfg, resume=resume, progress=progress)
    except RuntimeError as e:
        if not dist_mod.is_peer_failure(e):
            raise
        raise DKDCacheError(f"a collective failed: another rank stopped ({str(e).splitlines()[0][:200]}). "
                            "See that rank's log; rerun with --resume (or let torchrun --max-restarts do it): "
                            "training continues from the last checkpoint") from e


def _train_student(cfg: TrainConfig, *, resume: bool, progress: bool) -> dict[str, Any]:
    run = train_setup.resolve(cfg)  # process group, data checked against the cache, student, teacher signal
    dinfo, local_batch, m = run.dinfo, run.local_batch, cfg.views_per_decode
    ckpt = run_checkpoint.open_run(cfg, dinfo, run.fingerprint, resume=resume)  # refuses other settings or data
    pos = run_checkpoint.restore(ckpt, run.model, run.optimizer)
    block = transfer_block(ckpt, local_batch)  # an epoch's order depends on it: a resume keeps the checkpoint's
    log = MetricsLog(Path(cfg.out), main=dinfo.is_main, tensorboard=cfg.tensorboard, step=pos.step, epoch=pos.epoch)
    lines = progress and dinfo.is_main  # plain progress lines in logs, where no bar is drawn
    say(lines, f"lr {lr_at(cfg, 0):.4g} (= --lr {cfg.lr:g} x batch {cfg.batch_size} / --lr-batch {cfg.lr_batch}), "
               f"{dinfo.world} process(es), {cfg.epochs} epochs")
    # The teacher's signal, as the public API gives it to any loop: the cache's entries, or a live teacher's
    # computed on each batch in exact storage (api.LiveTeacher), and the DKD loss of either (api.DKDLoss).
    live = None if run.teacher is None else api.LiveTeacher(run.teacher, num_classes=run.data.num_classes,
                                                            temperatures=(cfg.temperature,), amp=cfg.amp)
    dkd = None if cfg.loss != "dkd" else api.DKDLoss(live or run.data.cache, alpha=cfg.alpha, beta=cfg.beta,
                                                     temperature=cfg.temperature, rule=cfg.residual_rule)
    step, t_start = pos.step, time.perf_counter()
    run_checkpoint.restore_rng(ckpt, run.device)  # last before the steps: dropout draws what it drew unresumed
    del ckpt  # a second copy of the weights and optimizer state: not kept through the run, nor forked into workers
    for epoch in range(pos.epoch, cfg.epochs, m):  # one pass = M epochs of views (views_per_decode)
        consumed = pos.consumed if epoch == pos.epoch else 0  # views of this pass this rank has trained on
        loader = pass_loader(cfg, run, live, epoch, block, start_step=consumed // local_batch)
        resumed_at, t0 = consumed, time.perf_counter()
        clock = EpochClock(steps=len(loader), first_step=step, step_in_epoch0=consumed // local_batch, t0=t0)
        run.model.train()
        with Progress(total=len(loader) * local_batch - consumed, label=f"epoch {epoch}", enabled=lines) as bar:
            for batch in loader:  # normalised on the device, the teacher's entries beside them
                view_epoch = epoch + min(m - 1, consumed * m // loader.samples)  # the epoch of views this step is in
                lr = set_lr(run.optimizer, lr_at(cfg, view_epoch))
                labels = batch.labels
                kd_fn = None if dkd is None else functools.partial(dkd, labels=labels, entries=batch.entries)
                # DKD's warm-up (official code): the KD term ramps as min(epoch / warmup, 1), epochs counted from 1
                losses = train_step(run.ddp_model, run.optimizer, batch.images, labels, kd_fn, entries=batch.entries,
                                    kd_factor=kd_factor(cfg, view_epoch),
                                    ce_weight=cfg.ce_weight if cfg.loss == "dkd" else 1.0, amp=cfg.amp, dinfo=dinfo,
                                    where=f"at epoch {view_epoch} step {step + 1}")
                step += 1
                consumed += labels.shape[0]
                log.add_step(PendingStep(epoch=view_epoch, step=step, lr=lr, losses=torch.stack(losses).float(),
                                         t=time.perf_counter() - t_start))
                bar.advance(labels.shape[0])
                checkpoint_due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
                if step % cfg.log_every == 0 or checkpoint_due:  # one host sync per window of steps
                    show(log.flush_steps(), bar, clock, cfg, lines)
                if checkpoint_due:
                    save(cfg, run, Position(epoch=epoch, consumed=consumed, step=step), block)
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            show(log.flush_steps(), bar, clock, cfg, lines)
        record = epoch_record(run, loader, epoch, m, consumed=consumed, resumed_at=resumed_at, t0=t0)
        # Validation costs as much as a small run's epoch of training: every eval_every epochs, and at the end.
        if cfg.val_shards and ((epoch + m) % cfg.eval_every == 0 or epoch + m >= cfg.epochs):
            record.update(evaluate(run.model, cfg, run.data.recipe, run.data.num_classes, run.device, dinfo))
            say(lines, f"epoch {epoch + 1}/{cfg.epochs}  val top-1 {100 * record['val_top1']:.2f}%  top-5 "
                       f"{100 * record['val_top5']:.2f}%  ({record['val_samples']} samples)")
        if loader.dropped:
            say(lines, f"epoch {epoch + 1}/{cfg.epochs}: the last {loader.dropped} sample(s) (a partial batch) were "
                       "left out")
        log.write_epoch(record)
        finished = consumed >= len(loader) * local_batch  # else stopped by max_steps: the position within the pass
        save(cfg, run, Position(epoch=epoch + m, consumed=0, step=step) if finished
             else Position(epoch=epoch, consumed=consumed, step=step), block)
        if cfg.max_steps and step >= cfg.max_steps:
            break
    log.close()
    result = {**log.last, "wall_seconds": time.perf_counter() - t_start, "run_dir": str(Path(cfg.out)), "rank": dinfo.rank}
    dist_mod.shutdown(dinfo)
    return result


def pass_loader(cfg: TrainConfig, run: train_setup.TrainSetup, live: api.LiveTeacher | None, epoch: int,
                block: int, *, start_step: int) -> api.DistillLoader:
    """The rank's batches of the pass that starts at `epoch` (M = views_per_decode epochs of views), from batch
    `start_step` on: the public loader over the run's data (opened and checked once, by train_setup), at the
    student's size of that epoch, in the checkpoint's transfer block."""
    return api.DistillLoader._of_data(
        run.data, batch_size=run.local_batch, epoch=epoch, rank=run.dinfo.rank, world=run.dinfo.world,
        workers=cfg.workers, views_per_decode=cfg.views_per_decode, seed=cfg.seed, teacher=live, normalize=True,
        device=run.device, channels_last=cfg.channels_last, image_size=student_size(cfg, run.data.recipe, epoch),
        start_step=start_step, shuffle_buffer=cfg.shuffle_buffer, block=block)


def epoch_record(run: train_setup.TrainSetup, loader: api.DistillLoader, epoch: int, m: int, *, consumed: int,
                 resumed_at: int, t0: float) -> dict[str, Any]:
    """The pass's metrics record. It counts the whole pass, as an uninterrupted run does, also when this process
    resumed it part way (`resumed_at` views in); the rate is this process's. Every rank's steps, gathered: the
    record shows they ran the same number."""
    seconds = time.perf_counter() - t0
    world = run.dinfo.world
    return {"event": "epoch", "epoch": epoch, "epochs": m, "steps": len(loader),
            "rank_steps": dist_mod.all_gather_int(run.dinfo, consumed // run.local_batch),
            "samples": consumed * world, "padding": loader.padding * m, "dropped": loader.dropped,
            "image_size": loader.image_size, "renderer": run.data.renderer,
            "images_per_s": (consumed - resumed_at) * world / max(seconds, 1e-9), "seconds": seconds}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def save(cfg: TrainConfig, run: train_setup.TrainSetup, position: Position, block: int) -> None:
    """The checkpoint of `position`: with what a resume needs to plan the same order and refuse other data."""
    run_checkpoint.save(cfg, run.dinfo, position, model=run.model, optimizer=run.optimizer, device=run.device,
                        meta={"num_classes": run.data.num_classes, "arch": cfg.arch,
                              "recipe": run.data.recipe.to_dict(), "world": run.dinfo.world,
                              "plan_workers": plan_workers(cfg.workers), "transfer_block": block,
                              "data": run.fingerprint.to_dict()})


def say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)


def show(record: dict | None, bar: Progress, clock: EpochClock, cfg: TrainConfig, lines: bool) -> None:
    """The last logged step on the bar, or as a plain line where no bar is drawn (a log file, Slurm, nohup)."""
    if record is None:
        return
    bar.advance(0, info=f"loss {record['loss']:.3f}")
    if lines and not bar.enabled:
        say(True, status_line(record, clock, epochs=cfg.epochs, batch_size=cfg.batch_size, max_steps=cfg.max_steps))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor,
               kd_fn: Callable[[torch.Tensor], torch.Tensor] | None, *, kd_factor: float, ce_weight: float,
               amp: str = "none", dinfo: dist_mod.DistInfo | None = None, where: str = "",
               entries: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step of ce_weight * CE + kd_factor * kd_fn(student logits) on a normalised batch.

    CE is the batch's (api.ce_from_entries): plain, or for mixed views (entries with "mix/lam", "mix/label")
    lam * CE(own label) + (1 - lam) * CE(partner's label).
    Returns (loss, ce, kd) as detached tensors. A non-finite loss on any rank stops every rank before
    optimizer.step (the weights stay those of the last good step): NonFiniteLossError."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = model(x)
    logits = logits.float()
    ce = api.ce_from_entries(logits, labels, entries or {})  # a batch without "mix/lam": F.cross_entropy as ever
    kd = kd_fn(logits) if kd_fn is not None else torch.zeros((), device=logits.device)
    loss = ce_weight * ce + kd_factor * kd if kd_fn is not None else ce
    # Agreed before backward (so no rank enters DDP's gradient all-reduce alone) and before optimizer.step. The host
    # read waits for the forward only: the backward and the step are queued after it, so the GPU idles for no more
    # than a kernel launch.
    dist_mod.require_finite(dinfo, loss, where)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), ce.detach(), kd.detach()


EVAL_BATCH = 256


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, recipe: Recipe, num_classes: int, device, dinfo) -> dict[str, float]:
    """Top-1/top-5 on the val shards (resize 256/224 of the size, centre crop); ranks split shards, sums reduced."""
    urls = expand_shards(cfg.val_shards, allow_pipe=cfg.allow_pipe)
    mine = urls[dinfo.rank :: dinfo.world]
    model.eval()
    correct1 = correct5 = total = 0
    if mine:
        spec = StreamSpec(urls=tuple(mine), recipe=recipe, seed=cfg.seed, epoch=0, view=0, rank=dinfo.rank,
                          cache_path=None, num_classes=num_classes, evaluation=True, block=EVAL_BATCH)
        counts = [len(ix.keys) for ix in scan_shards(mine)]
        plan = RankPlan(workers=(tuple(Task(i) for i in range(len(mine))),), counts=(sum(counts),), padding=0)
        loader = own_generator(make_loader(spec, plan, [0], min(cfg.workers, 1)), cfg.seed)
        for batch in batches(canonical_runs(loader, plan, [0], EVAL_BATCH), EVAL_BATCH):
            with batch:  # released once normalised: x is new memory
                x, labels = normalize(batch.images.to(device), recipe, cfg.channels_last), batch.labels
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                logits = model(x).float()
            top5 = logits.topk(min(5, num_classes), dim=1).indices.cpu()
            correct1 += int((top5[:, 0] == labels).sum())
            correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
            total += labels.shape[0]
    sums = torch.tensor([correct1, correct5, total], dtype=torch.float64)
    if dinfo.world > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    c1, c5, n = sums.tolist()
    return {"val_top1": c1 / max(n, 1), "val_top5": c5 / max(n, 1), "val_samples": int(n)}


