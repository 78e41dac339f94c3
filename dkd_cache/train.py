"""train-student: DKD from the cache (the teacher is never built), or CE only, or DKD with a live teacher.

One loop for the three modes, top to bottom, like nanoGPT's train.py. Set-up lives in train_setup.py, the
metrics log and progress lines in metrics_log.py, the run directory and its checkpoints in run_checkpoint.py.
Under torchrun every rank runs the same number of steps per epoch (see loader.plan_epoch); checkpoints are
written atomically each epoch (and every `checkpoint_every` steps), and --resume continues so that the result
equals an uninterrupted run, bit for bit: same samples in the same order, same weights, optimizer and RNG state.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import dist as dist_mod
from . import renderers
from . import run_checkpoint
from . import train_setup
from .data import expand_shards, scan_shards
from .errors import ConfigError, DKDCacheError
from .loader import Batch, RankPlan, StreamSpec, Task, batches, canonical_runs, make_loader, plan_epoch, skips_for
from .metrics_log import EpochClock, MetricsLog, PendingStep, status_line
from .progress import Progress
from .run_checkpoint import Position, plan_workers, transfer_block  # noqa: F401  (transfer_block: its home)
from .teacher_signal import dkd_from_entries, encode_entries, teacher_forward
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
    step, t_start = pos.step, time.perf_counter()
    run_checkpoint.restore_rng(ckpt, run.device)  # last before the steps: dropout draws what it drew unresumed
    for epoch in range(pos.epoch, cfg.epochs, m):  # one pass = M epochs of views (views_per_decode)
        p = plan_pass(cfg, run, epoch, block)
        consumed = pos.consumed if epoch == pos.epoch else 0  # views of this pass this rank has trained on
        resumed_at, t0 = consumed, time.perf_counter()
        skips = skips_for(p.plan.counts, consumed, block)
        stream = epoch_batches(p.spec, p.plan, skips, workers=cfg.workers, block=block, batch_size=local_batch,
                               pin_memory=run.device.type == "cuda")
        clock = EpochClock(steps=p.steps, first_step=step, step_in_epoch0=consumed // local_batch, t0=t0)
        run.model.train()
        with Progress(total=p.steps * local_batch - consumed, label=f"epoch {epoch}", enabled=lines) as bar:
            for batch in itertools.islice(stream, p.steps - consumed // local_batch):
                view_epoch = epoch + min(m - 1, consumed * m // p.views)  # the epoch of views this step is in
                lr = set_lr(run.optimizer, lr_at(cfg, view_epoch))
                x, labels, kd_fn = step_inputs(cfg, run, batch, p.size)
                batch.release()  # x holds the pixels now: the batch's transfer slot goes back to its worker
                # DKD's warm-up (official code): the KD term ramps as min(epoch / warmup, 1), epochs counted from 1
                losses = train_step(run.ddp_model, run.optimizer, x, labels, kd_fn, kd_factor=kd_factor(cfg, view_epoch),
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
        record = epoch_record(run, p, epoch, m, consumed=consumed, resumed_at=resumed_at, t0=t0)
        # Validation costs as much as a small run's epoch of training: every eval_every epochs, and at the end.
        if cfg.val_shards and ((epoch + m) % cfg.eval_every == 0 or epoch + m >= cfg.epochs):
            record.update(evaluate(run.model, cfg, run.data.recipe, run.data.num_classes, run.device, dinfo))
            say(lines, f"epoch {epoch + 1}/{cfg.epochs}  val top-1 {100 * record['val_top1']:.2f}%  top-5 "
                       f"{100 * record['val_top5']:.2f}%  ({record['val_samples']} samples)")
        if p.dropped:
            say(lines, f"epoch {epoch + 1}/{cfg.epochs}: the last {p.dropped} sample(s) (a partial batch) were left out")
        log.write_epoch(record)
        finished = consumed >= p.steps * local_batch  # else stopped by max_steps: the position within the pass
        save(cfg, run, Position(epoch=epoch + m, consumed=0, step=step) if finished
             else Position(epoch=epoch, consumed=consumed, step=step), block)
        if cfg.max_steps and step >= cfg.max_steps:
            break
    log.close()
    result = {**log.last, "wall_seconds": time.perf_counter() - t_start, "run_dir": str(Path(cfg.out)), "rank": dinfo.rank}
    dist_mod.shutdown(dinfo)
    return result


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassPlan:
    """One pass over the data (M = views_per_decode epochs of views) as this rank runs it."""

    plan: RankPlan  # the rank's streams and their counts, in views
    views: int  # views this rank trains on in the pass
    steps: int  # full batches of them (the same on every rank)
    dropped: int  # views over all ranks left out as a partial last batch
    padding: int  # samples repeated over all ranks so that every rank has as many (reported, not hidden)
    size: int  # the student's input size
    spec: StreamSpec


def plan_pass(cfg: TrainConfig, run: train_setup.TrainSetup, epoch: int, block: int) -> PassPlan:
    dinfo, data, m = run.dinfo, run.data, cfg.views_per_decode
    plan = with_views(plan_epoch(data.sizes, seed=cfg.seed, epoch=epoch, world=dinfo.world, rank=dinfo.rank,
                                 workers=plan_workers(cfg.workers)), m)
    n_local = sum(plan.counts)
    padding = sum(plan_epoch(data.sizes, seed=cfg.seed, epoch=epoch, world=dinfo.world, rank=r, workers=1).padding
                  for r in range(dinfo.world))
    # Full batches only (as the reference recipes' drop_last): a last batch of one sample would break
    # BatchNorm, and every rank drops the same number. The dropped samples are reported in the epoch record.
    steps = n_local // run.local_batch
    if steps == 0:
        raise ConfigError(f"the batch ({run.local_batch} per rank) holds more samples than an epoch gives a rank "
                          f"({n_local}); lower --batch-size")
    size = student_size(cfg, data.recipe, epoch)
    spec = StreamSpec(urls=data.urls, recipe=data.recipe, seed=cfg.seed, epoch=epoch,
                      view=epoch % data.views if data.views else epoch, rank=dinfo.rank, cache_path=cfg.cache,
                      entry_arrays=data.entry_arrays, num_classes=data.num_classes, shuffle_buffer=cfg.shuffle_buffer,
                      renderer=data.renderer, image_size=size, views_per_decode=m, block=block)
    return PassPlan(plan=plan, views=n_local, steps=steps, dropped=(n_local - steps * run.local_batch) * dinfo.world,
                    padding=padding, size=size, spec=spec)


def epoch_record(run: train_setup.TrainSetup, p: PassPlan, epoch: int, m: int, *, consumed: int, resumed_at: int,
                 t0: float) -> dict[str, Any]:
    """The pass's metrics record. It counts the whole pass, as an uninterrupted run does, also when this process
    resumed it part way (`resumed_at` views in); the rate is this process's. Every rank's steps, gathered: the
    record shows they ran the same number."""
    seconds = time.perf_counter() - t0
    world = run.dinfo.world
    return {"event": "epoch", "epoch": epoch, "epochs": m, "steps": p.steps,
            "rank_steps": dist_mod.all_gather_int(run.dinfo, consumed // run.local_batch),
            "samples": consumed * world, "padding": p.padding * m, "dropped": p.dropped, "image_size": p.size,
            "renderer": run.data.renderer, "images_per_s": (consumed - resumed_at) * world / max(seconds, 1e-9),
            "seconds": seconds}


def with_views(plan: RankPlan, m: int) -> RankPlan:
    """The plan in views: every sample gives M consecutive items (views_per_decode)."""
    return dataclasses.replace(plan, counts=tuple(c * m for c in plan.counts)) if m > 1 else plan


def epoch_batches(spec: StreamSpec, plan: RankPlan, skips: Sequence[int], *, workers: int, block: int,
                  batch_size: int, pin_memory: bool = False) -> Iterator[Batch]:
    """The rank's batches of one pass in the canonical order, from `skips` on (a resume): the worker streams
    (tar read, cache join, shuffle buffer, render) -> groups in canonical order -> batches.

    A batch may be a worker's transfer slot, lent: the step normalises it into new memory, then releases it."""
    loader = own_generator(make_loader(spec, plan, skips, workers), spec.seed)
    return batches(canonical_runs(loader, plan, skips, block), batch_size, pin_memory=pin_memory)


def own_generator(loader: DataLoader, seed: int) -> DataLoader:
    """Each iteration of a DataLoader draws a base seed for its workers, from the global RNG unless the loader has
    a generator of its own. Given one, the global RNG is the steps' alone (dropout, stochastic depth), as a resumed
    run restores it. (Our streams draw nothing from it: views come from seeded_rng.)"""
    loader.generator = torch.Generator().manual_seed(seed)
    return loader


def step_inputs(cfg: TrainConfig, run: train_setup.TrainSetup, batch: Batch, size: int
                ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """A batch on the device, normalised into new memory (the batch may be released after this); the KD term as a
    function of the student's logits (None for CE)."""
    entries = batch.entries
    x = normalize(renderers.to_device(batch.images, entries, run.data.recipe, run.device, size), run.data.recipe,
                  cfg.channels_last)
    labels = batch.labels.to(run.device)
    if run.teacher is not None:  # live: the teacher's signal in exact storage, the same loss as cached
        entries = encode_entries(teacher_forward(run.teacher, x, run.teacher_policy), labels, run.storage)
    if cfg.loss != "dkd":
        return x, labels, None
    return x, labels, functools.partial(dkd_from_entries, labels=labels, entries=entries, storage=run.storage,
                                        alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature,
                                        rule=cfg.residual_rule)


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
               amp: str = "none", dinfo: dist_mod.DistInfo | None = None, where: str = ""
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step of ce_weight * CE + kd_factor * kd_fn(student logits) on a normalised batch.

    Returns (loss, ce, kd) as detached tensors. A non-finite loss on any rank stops every rank before
    optimizer.step (the weights stay those of the last good step): NonFiniteLossError."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = model(x)
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
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


