"""train-student: DKD from the cache (the teacher is never built), or CE only, or DKD with a live teacher.

One loop for the three modes, top to bottom. Under torchrun every rank runs the same number of steps
per epoch (see loader.plan_epoch); checkpoints are written atomically each epoch (and every
`checkpoint_every` steps), and --resume continues so that the result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import cache as cache_mod
from . import cache_meta
from . import dist as dist_mod
from . import store as store_mod
from .data import expand_shards, scan_shards, shard_name
from .errors import CacheMismatchError, ConfigError, DKDCacheError
from .loader import (ITEMS_PER_TRANSFER, RankPlan, StreamSpec, Task, batches, canonical_runs, make_loader, plan_epoch,
                     skips_for)
from .loss import total_loss
from . import renderers, tb_log
from .progress import Progress, hms
from .checkpoint import read_run_checkpoint, save_checkpoint
from .teacher import build_model, load_teacher
from .teacher_signal import Storage, dkd_from_entries, encode_entries, resolve_policy, teacher_forward
from .views import Recipe, normalize, parse_positive_int

LOSSES = ("dkd", "ce")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    shards: str | tuple[str, ...]
    out: str
    cache: str | None = None
    checkpoint_url: str | None = None  # a copy of each checkpoint goes there too (s3:// or a folder), one whole put
    val_shards: str | None = None
    arch: str = "resnet18"
    num_classes: int | None = None  # from the cache; needed only without one
    loss: str = "dkd"
    live_teacher: str | None = None
    teacher_arch: str = "resnet34"
    epochs: int = 100
    batch_size: int = 512  # global, split evenly over ranks
    lr: float = 0.2  # at lr_batch; scaled linearly with the global batch
    lr_batch: int = 512
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[int, ...] = (30, 60, 90)
    lr_gamma: float = 0.1
    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    temperature: float = 1.0
    warmup_epochs: float = 1.0
    residual_rule: str = "uniform"
    workers: int = 2
    amp: str = "none"
    channels_last: bool = True
    seed: int = 0
    device: str = "cpu"
    shuffle_buffer: int = 256
    checkpoint_every: int = 0  # steps; 0: only at epoch ends
    recipe: dict[str, Any] | None = None  # used without a cache; with one, the cache's recipe is used
    allow_pipe: bool = False
    max_steps: int = 0  # stop after this many steps in total (0: no limit); for tests and quick checks
    log_every: int = 20  # steps between reads of the step losses (one host sync and one metrics write each)
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    tensorboard: bool = False  # mirror metrics.jsonl as TensorBoard scalars in RUN_DIR/tensorboard (rank 0)
    renderer: str | None = None  # renderers.RENDERERS; None: the cache's (without a cache: cpu)
    allow_other_renderer: bool = False  # train with another renderer than the cache's (other pixels than the teacher's)
    views_per_decode: int = 1  # M: each decoded image gives M of its stored views to one pass (= M epochs)
    image_size: int | None = None  # the student's input size; None: the recipe's (the teacher's)
    image_size_schedule: tuple[tuple[int, int], ...] = ()  # ((first epoch, size), ...): progressive resizing

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr_batch", "shuffle_buffer", "log_every", "views_per_decode",
                     "eval_every"):
            parse_positive_int(name, getattr(self, name))
        if self.epochs % self.views_per_decode:
            raise ConfigError(f"epochs ({self.epochs}) must be a multiple of views_per_decode "
                              f"({self.views_per_decode}): a pass over the data covers that many epochs")
        if self.renderer is not None:
            renderers.parse_renderer(self.renderer)
        if self.image_size is not None:
            parse_positive_int("image_size", self.image_size)
        object.__setattr__(self, "image_size_schedule", parse_size_schedule(self.image_size_schedule))
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "dkd" and not self.cache and not self.live_teacher:
            raise ConfigError("loss 'dkd' needs --cache (or --live-teacher WEIGHTS); use --loss ce for no teacher")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("lr must be > 0; momentum, weight_decay and warmup_epochs >= 0")
        if self.residual_rule not in ("uniform", "bucket"):
            raise ConfigError(f"residual_rule must be 'uniform' or 'bucket', got {self.residual_rule!r}")
        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.workers < 0 or self.checkpoint_every < 0 or self.max_steps < 0:
            raise ConfigError("workers, checkpoint_every and max_steps must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def parse_size_schedule(value: Any) -> tuple[tuple[int, int], ...]:
    """((first epoch, size), ...) with epochs strictly increasing from 0, sizes > 0; or "0:160,30:192,90:224"."""
    if isinstance(value, str):
        try:
            value = tuple(tuple(int(x) for x in part.split(":")) for part in value.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"image size schedule {value!r}: write EPOCH:SIZE pairs, e.g. 0:160,30:192,90:224"
                              ) from None
    pairs = tuple(tuple(p) for p in value)
    if pairs and (any(len(p) != 2 for p in pairs) or pairs[0][0] != 0
                  or any(b[0] <= a[0] for a, b in zip(pairs, pairs[1:]))):
        raise ConfigError(f"image size schedule {pairs}: (epoch, size) pairs starting at epoch 0, epochs increasing")
    for _, size in pairs:
        parse_positive_int("image size in the schedule", size)
    return pairs


def student_size(cfg: TrainConfig, recipe: Recipe, epoch: int) -> int:
    """The student's input size at `epoch`: the schedule's, else image_size, else the recipe's (the teacher's)."""
    size = cfg.image_size or recipe.image_size
    for first, s in parse_size_schedule(cfg.image_size_schedule):
        if epoch >= first:
            size = s
    return size


def with_views(plan: RankPlan, m: int) -> RankPlan:
    """The plan in views: every sample gives M consecutive items (views_per_decode)."""
    return dataclasses.replace(plan, counts=tuple(c * m for c in plan.counts)) if m > 1 else plan


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    base = cfg.lr * cfg.batch_size / cfg.lr_batch
    return base * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


def _prepare_run_dir(cfg: TrainConfig, resume: bool, dinfo) -> dict | None:
    """Refuse a run directory holding another run; on resume, load the checkpoint (config must match)."""
    out = Path(cfg.out)
    cfg_path, ckpt_path = out / "config.json", out / "checkpoint.pt"
    if not resume:
        if cfg_path.exists():
            raise ConfigError(f"{out} already holds a run (config.json); pass --resume to continue it or choose another --out")
        return None
    if dinfo.is_main:  # a save torn by a crash leaves its temporary file; the last whole checkpoint stands
        for stale in out.glob(".checkpoint.pt.*.tmp"):
            stale.unlink(missing_ok=True)
    if not ckpt_path.exists() and cfg.checkpoint_url:  # a fresh machine: the run's copy on the store
        store_mod.fetch_file(cfg.checkpoint_url, "checkpoint.pt", ckpt_path)
    if not ckpt_path.exists():
        return None  # nothing saved yet: start from scratch (a resume of a run killed before its first checkpoint)
    ckpt = read_run_checkpoint(ckpt_path)
    saved = dict(ckpt.get("config", {}))
    now = cfg.to_dict()
    differs = [k for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
    if differs:
        raise ConfigError(f"{out}: --resume with other settings than the saved run: {differs}")
    check_resume_layout(ckpt, world=dinfo.world, workers=cfg.workers, where=str(out))
    return ckpt


# Settings a resume may change: they decide when to stop, what is evaluated and how often metrics are written,
# never which sample a step sees or what it computes.
RESUMABLE = ("epochs", "workers", "max_steps", "log_every", "val_shards", "eval_every", "tensorboard")


def plan_workers(workers: int) -> int:
    """The number of sample streams an epoch's order is planned for (0 workers reads in one stream)."""
    return max(1, workers)


def transfer_block(ckpt: dict | None, local_batch: int) -> int:
    """Samples per transfer group and canonical block: the rank's batch, so that a step's batch is one group
    (loader.collate takes it without a copy). The order of an epoch depends on it, so a resumed run keeps its
    checkpoint's block; a checkpoint of a version that recorded none was trained with ITEMS_PER_TRANSFER."""
    if ckpt is None:
        return local_batch
    return int(ckpt.get("transfer_block", ITEMS_PER_TRANSFER))


def check_resume_layout(ckpt: dict, *, world: int, workers: int, where: str) -> None:
    """The resume contract: an epoch's sample order depends on the number of ranks and of loader workers
    (loader.plan_epoch). A checkpoint taken in the middle of an epoch continues only under the numbers it was
    taken with; at an epoch boundary (consumed 0) any numbers may follow. Refused otherwise, saying how to go on."""
    consumed = int(ckpt.get("consumed", 0))
    if consumed == 0:
        return
    saved_world, saved_workers = ckpt.get("world"), ckpt.get("plan_workers")
    if saved_world == world and saved_workers == plan_workers(workers):
        return
    was = (f"{saved_world} process(es) x --workers {saved_workers}" if saved_world is not None
           else "an unrecorded number of processes and workers (a checkpoint of an older version)")
    raise ConfigError(
        f"{where}: the checkpoint was taken in the middle of epoch {ckpt.get('epoch')} ({consumed} samples into "
        f"it per rank) under {was}; this run has {world} process(es) x --workers {plan_workers(workers)}. The "
        "order of an epoch's samples depends on both, so continuing with others would repeat some samples and "
        "skip others. Resume with the same numbers (torchrun --nproc-per-node "
        f"{saved_world if saved_world is not None else 'N'} ... --workers {saved_workers if saved_workers else 'W'}); "
        "once that run finishes the epoch (or stop it there with --epochs), the next resume may use any numbers")


def trim_metrics(path: Path, *, step: int, epoch: int) -> None:
    """Keep the metrics.jsonl records the checkpoint stands for: step records up to its step, epoch records of
    the epochs it finished. Rewritten atomically (temporary file, rename)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if (r.get("event") == "step" and r.get("step", 0) <= step) or \
                (r.get("event") == "epoch" and r.get("epoch", 0) < epoch):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _check_cache_matches(cache: cache_mod.Cache, urls: list[str], dinfo) -> list[int]:
    """Shards and cache belong together: same names, same keys (by digest). Returns per-shard usable sizes."""
    cache_mod.require_sound(cache)  # the fast pre-flight: records, layout, chunk files (no logit is read)
    m = cache.meta.manifest
    names = [shard_name(u) for u in urls]
    missing = [n for n in names if n not in {s.name for s in m.shards}]
    if missing:
        raise CacheMismatchError(f"{len(missing)} shard(s) are not in the cache's manifest, first {missing[:3]}; "
                                 "the cache was dumped from other shards")
    status = cache.read_rows("samples/status", 0, m.rows)

    def check_shards() -> None:
        # Bad samples are found, not raised: the ones the dump skipped (recorded in the cache) are left out of
        # training by the loader; any other is a shard that changed since the dump.
        for ix in scan_shards(urls, skip_bad=True):
            entry = m.shards[m.shard_index(ix.name)]
            if ix.keys_sha256 != entry.keys_sha256 or len(ix.keys) != entry.samples:
                raise CacheMismatchError(
                    f"shard {ix.name} holds {len(ix.keys)} samples (keys {ix.keys_sha256[:12]}), the cache "
                    f"{entry.samples} (keys {entry.keys_sha256[:12]}); the shard changed since the dump")
            for pos, reason in ix.bad:
                if status[entry.row_start + pos] != cache_meta.STATUS_SKIPPED:
                    raise CacheMismatchError(
                        f"{ix.name}: sample {ix.keys[pos]!r} is unusable ({reason}) but the cache holds it as "
                        "dumped; the shard changed since the dump: train with the shards the cache was dumped from")

    dist_mod.on_rank0(dinfo, check_shards)
    sizes = []
    for n in names:
        e = m.shards[m.shard_index(n)]
        sizes.append(int((status[e.row_start:e.row_stop] == cache_meta.STATUS_OK).sum()))
    return sizes


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
    dinfo = dist_mod.init(cfg.device)
    device = torch.device(f"cuda:{dinfo.local_rank}" if cfg.device == "cuda" else cfg.device)
    if cfg.batch_size % dinfo.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {dinfo.world} ranks")
    local_batch = cfg.batch_size // dinfo.world
    urls = expand_shards(cfg.shards, allow_pipe=cfg.allow_pipe)
    if cfg.tensorboard:
        tb_log.require_tensorboard()
    if cfg.val_shards:  # every input is checked before the first step: a typo must not cost an epoch
        expand_shards(cfg.val_shards, allow_pipe=cfg.allow_pipe)
    out = Path(cfg.out)
    if cfg.cache and Path(cfg.cache).resolve() in (out.resolve(), *out.resolve().parents):
        raise ConfigError(f"--out {out} lies inside the cache {cfg.cache}; choose another run directory")

    # ---- data and recipe: from the cache when there is one, so nothing is typed twice
    cache = cache_mod.open_cache(cfg.cache) if cfg.cache else None
    if cache is not None:
        sizes = _check_cache_matches(cache, urls, dinfo)
        recipe, num_classes, views = cache.meta.recipe, cache.meta.num_classes, cache.meta.views
        if cfg.num_classes is not None and cfg.num_classes != num_classes:
            raise ConfigError(f"num_classes {cfg.num_classes} contradicts the cache's {num_classes}")
        if cfg.recipe is not None and Recipe.from_dict(cfg.recipe) != recipe:
            raise ConfigError("the config's [recipe] contradicts the cache's recipe; the cache's recipe is used "
                              "for training: remove [recipe] or re-dump with it")
        codec = cache.codec  # a learned codec comes with its basis, checked against the recorded hash
        full_codec = codec.decodes_full
        if cfg.loss == "dkd" and not cfg.live_teacher and not full_codec and \
                cfg.temperature not in cache.meta.temperatures:
            raise ConfigError(f"temperature {cfg.temperature} was not dumped (cache has {list(cache.meta.temperatures)}); "
                              "the top-k codec needs the exact log-partition at that temperature")
        if cfg.epochs > views and dinfo.is_main:
            warnings.warn(f"{cfg.epochs} epochs over {views} cached views: view e mod {views} is reused, "
                          "so views repeat", stacklevel=2)
        renderer = renderers.choose_renderer(cache.meta.renderer, cfg.renderer, cfg.allow_other_renderer)
        entry_arrays = ("views/box", "views/flip")
        if cfg.loss == "dkd" and not cfg.live_teacher:
            entry_arrays += ("logits/target", "logits/lse", *(f"logits/{n}" for n in cache.codec_arrays))
    else:
        recipe = Recipe.from_dict(cfg.recipe or {})
        indexes = scan_shards(urls, cfg.num_classes)
        sizes = [len(ix.keys) - len(ix.bad) for ix in indexes]
        num_classes, views, entry_arrays, codec = cfg.num_classes, None, (), None
        renderer = cfg.renderer or "cpu"
        if num_classes is None:
            raise ConfigError("without a cache, give num_classes (in the config or --num-classes)")

    renderers.check_recipe(renderer, recipe)
    if cfg.loss == "dkd" and cfg.live_teacher:
        # The live teacher sees the batch the student sees; at another size its logits would not be the teacher's
        # signal for the recorded views (the cache's logits always are: rendered at the recipe's size).
        sizes_used = {student_size(cfg, recipe, e) for e in range(cfg.epochs)}
        if sizes_used != {recipe.image_size}:
            raise ConfigError(f"--live-teacher renders one batch for teacher and student, so the student's image "
                              f"size must be the recipe's ({recipe.image_size} px), got {sorted(sizes_used)}: "
                              f"drop --image-size/--image-size-schedule, or train from the cache (--cache) instead")

    # ---- models: the teacher exists only in live mode
    torch.manual_seed(cfg.seed)  # the student's initial weights: same seed, same start, on every rank
    model = build_model(cfg.arch, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if cfg.loss == "dkd" and cfg.live_teacher:
        teacher, tinfo = load_teacher(cfg.teacher_arch, cfg.live_teacher, device=device)
        if tinfo.num_classes != num_classes:
            raise ConfigError(f"live teacher has {tinfo.num_classes} classes, the data {num_classes}")
        if cache is not None and tinfo.sha256 != cache.meta.teacher.sha256 and dinfo.is_main:
            warnings.warn("the live teacher's weights differ from the cache's teacher", stacklevel=2)
    # ---- the teacher's signal: the cache's storage, or (live) exact storage of the teacher computed per batch
    storage = teacher_policy = None
    if teacher is not None:
        storage = Storage.exact(num_classes, (cfg.temperature,))
        teacher_policy = resolve_policy(device, cfg.amp)
    elif cfg.loss == "dkd":
        storage = Storage.of_cache(cache)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(cfg, 0), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    ddp_model = DistributedDataParallel(model) if dinfo.world > 1 else model

    # ---- resume: weights, optimizer, position
    ckpt = _prepare_run_dir(cfg, resume, dinfo)
    dist_mod.barrier(dinfo)  # every rank has checked the run directory before rank 0 writes config.json into it
    start_epoch, start_consumed, global_step = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, start_consumed, global_step = int(ckpt["epoch"]), int(ckpt["consumed"]), int(ckpt["step"])
    block = transfer_block(ckpt, local_batch)
    if dinfo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    metrics_path = out / "metrics.jsonl"
    if dinfo.is_main:  # what a killed or stopped run logged after its checkpoint is logged again by this one
        trim_metrics(metrics_path, step=global_step, epoch=start_epoch)

    tb_write, tb_close = (tb_log.open_writer(out, global_step) if cfg.tensorboard and dinfo.is_main
                          else (None, None))

    def log(*records: dict) -> None:
        if dinfo.is_main and records:
            now = time.time()
            with open(metrics_path, "a") as f:
                f.write("".join(json.dumps({**r, "time": now}) + "\n" for r in records))
            if tb_write is not None:
                for r in records:
                    tb_write(r, r.get("step", global_step))

    # Step losses stay on the device; every `log_every` steps (and before a checkpoint or the epoch's end) they
    # are read in one host sync, checked, and appended to metrics.jsonl in one write.
    # (epoch, step, lr, stacked [loss, ce, dkd], host seconds since the run started when the step was issued)
    window: list[tuple[int, int, float, torch.Tensor, float]] = []

    def flush_steps(bar=None) -> None:
        nonlocal last_metrics
        if not window:
            return
        values = torch.stack([w[3] for w in window]).tolist()
        records = []
        for (ep, step, lr, _, t), (loss_v, ce_v, kd_v) in zip(window, values):  # finite: train_step checked them
            records.append({"event": "step", "epoch": ep, "step": step, "loss": loss_v, "ce": ce_v, "dkd": kd_v,
                            "lr": lr, "t": round(t, 4)})
        window.clear()
        last_metrics = records[-1]
        log(*records)
        if bar is not None:
            bar.advance(0, info=f"loss {last_metrics['loss']:.3f}")
            if lines_wanted and not bar.enabled:  # no bar (a log file, Slurm, nohup): a plain line instead
                say(status_line(last_metrics))

    # Plain lines for logs: printed by rank 0 when progress is on and no progress bar is drawn.
    lines_wanted = progress and dinfo.is_main
    position: dict[str, Any] = {}  # this epoch's steps, start time and first step, for the status lines

    def say(text: str) -> None:
        if lines_wanted:
            print(text, flush=True)

    def status_line(m: dict[str, Any]) -> str:
        done = m["step"] - position["first_step"]
        elapsed = time.perf_counter() - position["t0"]
        rate = done * cfg.batch_size / max(elapsed, 1e-9)
        left = (position["steps"] - position["step_in_epoch0"] - done) + (cfg.epochs - m["epoch"] - 1) * position["steps"]
        if cfg.max_steps:
            left = min(left, cfg.max_steps - m["step"])
        eta = left * elapsed / max(done, 1)
        return (f"epoch {m['epoch'] + 1}/{cfg.epochs}  step {position['step_in_epoch0'] + done}/{position['steps']} "
                f"(total {m['step']})  {rate:.1f} img/s  loss {m['loss']:.4f}  lr {m['lr']:.4g}  "
                f"ETA {hms(eta)}")

    def save(epoch: int, consumed: int) -> None:
        if dinfo.is_main:
            save_checkpoint(out / "checkpoint.pt", model=model.state_dict(), optimizer=optimizer.state_dict(),
                            epoch=epoch, consumed=consumed, step=global_step, config=cfg.to_dict(),
                            num_classes=num_classes, arch=cfg.arch, recipe=recipe.to_dict(),
                            torch_rng=torch.get_rng_state(), world=dinfo.world,
                            plan_workers=plan_workers(cfg.workers), transfer_block=block)
            if cfg.checkpoint_url:  # written whole locally first, then one put: the store never holds half of it
                store_mod.put_file(cfg.checkpoint_url, "checkpoint.pt", out / "checkpoint.pt")
        dist_mod.barrier(dinfo)

    last_metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    say(f"lr {lr_at(cfg, 0):.4g} (= --lr {cfg.lr:g} x batch {cfg.batch_size} / --lr-batch {cfg.lr_batch}), "
        f"{dinfo.world} process(es), {cfg.epochs} epochs")
    m = cfg.views_per_decode
    for epoch in range(start_epoch, cfg.epochs, m):  # one pass = M epochs of views (views_per_decode)
        plan = with_views(plan_epoch(sizes, seed=cfg.seed, epoch=epoch, world=dinfo.world, rank=dinfo.rank,
                                     workers=plan_workers(cfg.workers)), m)
        n_local = sum(plan.counts)  # views this rank trains on in this pass
        padding = sum(plan_epoch(sizes, seed=cfg.seed, epoch=epoch, world=dinfo.world, rank=r, workers=1).padding
                      for r in range(dinfo.world))  # repeated samples over all ranks (reported, not hidden)
        # Full batches only (as the reference recipes' drop_last): a last batch of one sample would break
        # BatchNorm, and every rank drops the same number. The dropped samples are reported in the epoch record.
        steps = n_local // local_batch
        if steps == 0:
            raise ConfigError(f"the batch ({local_batch} per rank) holds more samples than an epoch gives a rank "
                              f"({n_local}); lower --batch-size")
        dropped = (n_local - steps * local_batch) * dinfo.world
        consumed = start_consumed if epoch == start_epoch else 0
        skips = skips_for(plan.counts, consumed, block)
        size = student_size(cfg, recipe, epoch)
        spec = StreamSpec(urls=tuple(urls), recipe=recipe, seed=cfg.seed, epoch=epoch,
                          view=epoch % views if views else epoch, rank=dinfo.rank, cache_path=cfg.cache,
                          entry_arrays=entry_arrays, num_classes=num_classes, shuffle_buffer=cfg.shuffle_buffer,
                          renderer=renderer, image_size=size, views_per_decode=m, block=block)
        loader = make_loader(spec, plan, skips, cfg.workers)
        model.train()
        seen = steps_done = 0
        t0 = time.perf_counter()
        position.update(steps=steps, t0=t0, first_step=global_step, step_in_epoch0=consumed // local_batch)
        with Progress(total=steps * local_batch - consumed, label=f"epoch {epoch}",
                      enabled=progress and dinfo.is_main) as bar:
            # borrow: a batch may be a worker's transfer slot, valid until the next is asked for; each step
            # normalises it into new memory first
            epoch_batches = batches(canonical_runs(loader, plan, skips, block), local_batch,
                                    pin_memory=device.type == "cuda", borrow=True)
            for images, labels, entries in itertools.islice(epoch_batches, steps - consumed // local_batch):
                view_epoch = epoch + min(m - 1, consumed * m // n_local)  # the epoch of views this step is in
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(cfg, view_epoch)
                x = normalize(renderers.to_device(images, entries, recipe, device, size), recipe, cfg.channels_last)
                labels = labels.to(device)
                if teacher is not None:  # live: the teacher's signal in exact storage, the same loss as cached
                    entries = encode_entries(teacher_forward(teacher, x, teacher_policy), labels, storage)
                kd_fn = None
                if cfg.loss == "dkd":
                    kd_fn = functools.partial(dkd_from_entries, labels=labels, entries=entries, storage=storage,
                                              alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature,
                                              rule=cfg.residual_rule)
                # DKD's warm-up (official code): the KD term ramps as min(epoch / warmup, 1), epochs counted from 1
                loss, ce, kd = train_step(ddp_model, optimizer, x, labels, kd_fn, kd_factor=kd_factor(cfg, view_epoch),
                                          ce_weight=cfg.ce_weight if cfg.loss == "dkd" else 1.0, amp=cfg.amp,
                                          dinfo=dinfo, where=f"at epoch {view_epoch} step {global_step + 1}")
                global_step += 1
                steps_done += 1
                consumed += labels.shape[0]
                seen += labels.shape[0]
                window.append((view_epoch, global_step, optimizer.param_groups[0]["lr"],
                               torch.stack([loss.detach(), ce.detach(), kd.detach()]).float(),
                               time.perf_counter() - t_start))
                bar.advance(labels.shape[0])
                if global_step % cfg.log_every == 0:
                    flush_steps(bar)
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                    flush_steps(bar)
                    save(epoch, consumed)
                if cfg.max_steps and global_step >= cfg.max_steps:
                    break
            flush_steps(bar)
        seconds = time.perf_counter() - t0
        # Every rank's step count, gathered: the record shows they ran the same number of steps.
        rank_steps = dist_mod.all_gather_int(dinfo, steps_done)
        epoch_record = {"event": "epoch", "epoch": epoch, "epochs": m, "steps": steps, "rank_steps": rank_steps,
                        "samples": seen * dinfo.world, "padding": padding * m, "dropped": dropped,
                        "image_size": size, "renderer": renderer,
                        "images_per_s": seen * dinfo.world / max(seconds, 1e-9), "seconds": seconds}
        # Validation costs as much as a small run's epoch of training: every eval_every epochs, and at the end.
        if cfg.val_shards and ((epoch + m) % cfg.eval_every == 0 or epoch + m >= cfg.epochs):
            epoch_record.update(evaluate(model, cfg, recipe, num_classes, device, dinfo))
            say(f"epoch {epoch + 1}/{cfg.epochs}  val top-1 {100 * epoch_record['val_top1']:.2f}%  top-5 "
                f"{100 * epoch_record['val_top5']:.2f}%  ({epoch_record['val_samples']} samples)")
        if dropped:
            say(f"epoch {epoch + 1}/{cfg.epochs}: the last {dropped} sample(s) (a partial batch) were left out")
        log(epoch_record)
        last_metrics.update(epoch_record)
        if consumed >= steps * local_batch:
            save(epoch + m, 0)
        else:  # stopped by max_steps inside the epoch: the checkpoint records the position within it
            save(epoch, consumed)
        if cfg.max_steps and global_step >= cfg.max_steps:
            break
    if tb_close is not None:
        tb_close()
    result = {**last_metrics, "wall_seconds": time.perf_counter() - t_start, "run_dir": str(out), "rank": dinfo.rank}
    dist_mod.shutdown(dinfo)
    return result


def kd_factor(cfg: TrainConfig, epoch: int) -> float:
    """The KD term's weight in epoch `epoch` (0-based): DKD's warm-up min((epoch + 1) / warmup_epochs, 1)."""
    return float(total_loss(0.0, 1.0, epoch + 1, cfg.warmup_epochs, 0.0))


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
        loader = make_loader(spec, plan, [0], min(cfg.workers, 1))
        for images, labels, _ in batches(canonical_runs(loader, plan, [0], EVAL_BATCH), EVAL_BATCH,
                                         borrow=True):
            x = normalize(images.to(device), recipe, cfg.channels_last)
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


