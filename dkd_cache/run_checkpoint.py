"""A training run's directory and its checkpoint: open it (refusing another run, or a resume on other settings or
other data), restore a run's position, weights and random state, and save them atomically.

A checkpoint holds the model, the optimizer, the position (epoch, samples consumed in it per rank, global step),
the RNG states, the layout the epoch's order was planned for (ranks, loader streams, transfer block) and the data
fingerprint (data_fingerprint.py). Everything else a resumed run needs is derived from these by pure functions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from . import dist as dist_mod
from . import store as store_mod
from .checkpoint import read_run_checkpoint, save_checkpoint
from .data_fingerprint import DataFingerprint
from .errors import CheckpointWriteError, ConfigError, ResumeMismatchError
from .loader import ITEMS_PER_TRANSFER
from .train_config import TrainConfig

# Settings a resume may change: they decide when to stop, what is evaluated and how often metrics are written,
# how long ranks wait for rank 0 (wait_seconds), never which sample a step sees or what it computes.
RESUMABLE = ("epochs", "workers", "max_steps", "log_every", "val_shards", "eval_every", "tensorboard",
             "wait_seconds")
# Paths, compared by the data behind them (the checkpoint's data fingerprint), not as strings: the same data may
# be spelled another way (./c.zarr, an absolute --out, a glob for a brace pattern), and other data may stand behind
# the same spelling (a shard added to a globbed folder, a cache re-dumped in place).
BY_CONTENT = ("shards", "cache", "out", "live_teacher")
CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Position:
    """Where a run stands: the pass it is in, the samples (views) of it each rank has consumed, the global step."""

    epoch: int = 0
    consumed: int = 0
    step: int = 0


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


def check_same_data(ckpt: dict, cfg: TrainConfig, data: DataFingerprint, *, where: str) -> None:
    """The resumed run trains on the data its checkpoint was trained on, compared by content. A checkpoint of a
    version that recorded no fingerprint is compared by the strings it was given, as that version did."""
    saved = dict(ckpt.get("config", {}))
    if "data" not in ckpt:
        differs = [k for k in BY_CONTENT if saved.get(k) != cfg.to_dict()[k]]
        if differs:
            raise ResumeMismatchError(f"{where}: --resume with other {differs} than the saved run (a checkpoint of "
                                      "an older version, which recorded paths, not the data behind them)")
        return
    changes = DataFingerprint.from_dict(ckpt["data"], where=where).differences(data)
    if changes:
        raise ResumeMismatchError(
            f"{where}: --resume with other data than the run was trained on: " + "; ".join(changes) + ". Resume "
            "with the run's shards, cache and teacher, or start a new run in another --out")


def open_run(cfg: TrainConfig, dinfo: dist_mod.DistInfo, data: DataFingerprint, *, resume: bool) -> dict | None:
    """Check the run directory, and on resume load its checkpoint (None: nothing saved yet, start from scratch):
    refused if it holds another run, or on --resume with other settings or other data. Then rank 0 writes
    config.json, so an unwritable --out is named before the first step."""
    ckpt = _fetch_checkpoint(cfg, resume, main=dinfo.is_main)
    if ckpt is not None:
        now = cfg.to_dict()
        saved = dict(ckpt.get("config", {}))
        differs = [k for k in now if k not in RESUMABLE + BY_CONTENT and saved.get(k) != now[k]]
        if differs:
            raise ConfigError(f"{cfg.out}: --resume with other settings than the saved run: {differs}")
        check_same_data(ckpt, cfg, data, where=cfg.out)
        check_resume_layout(ckpt, world=dinfo.world, workers=cfg.workers, where=cfg.out)
    dist_mod.barrier(dinfo)  # every rank has checked the run directory before rank 0 writes config.json into it
    dist_mod.on_rank0(dinfo, lambda: write_config(cfg))
    return ckpt


def _fetch_checkpoint(cfg: TrainConfig, resume: bool, *, main: bool) -> dict | None:
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    if not resume:
        if (out / "config.json").exists():
            raise ConfigError(f"{out} already holds a run (config.json); pass --resume to continue it or choose "
                              "another --out")
        return None
    if main:  # a save torn by a crash leaves its temporary file; the last whole checkpoint stands
        for stale in out.glob(f".{CHECKPOINT}.*.tmp"):
            stale.unlink(missing_ok=True)
    if not ckpt_path.exists() and cfg.checkpoint_url:  # a fresh machine: the run's copy on the store
        store_mod.fetch_file(cfg.checkpoint_url, CHECKPOINT, ckpt_path)
    if not ckpt_path.exists():
        return None  # nothing saved yet: start from scratch (a resume of a run killed before its first checkpoint)
    return read_run_checkpoint(ckpt_path)


def write_config(cfg: TrainConfig) -> None:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the run directory ({e.strerror or e}); choose a writable "
                          "--out") from e


def restore(ckpt: dict | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Position:
    """Load a checkpoint's weights and optimizer state; its position (the start for a new run)."""
    if ckpt is None:
        return Position()
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return Position(epoch=int(ckpt["epoch"]), consumed=int(ckpt["consumed"]), step=int(ckpt["step"]))


def restore_rng(ckpt: dict | None, device: torch.device) -> None:
    """The random state the run had when it saved (dropout, stochastic depth draw from it), so that the resumed
    steps draw what the uninterrupted ones drew. Rank 0's state serves every rank: all ranks seed alike and draw
    alike (the same batch shapes), so their states are equal."""
    if ckpt is None:
        return
    if "torch_rng" in ckpt:
        torch.set_rng_state(ckpt["torch_rng"])
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def save(cfg: TrainConfig, dinfo: dist_mod.DistInfo, position: Position, *, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, device: torch.device, meta: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint atomically (temporary file, fsync, rename) and copies it to --checkpoint-url;
    every rank waits for it, and receives its error (a full disk: the previous checkpoint stands)."""
    dist_mod.on_rank0(dinfo, lambda: _write(cfg, position, model, optimizer, device, meta))


def _write(cfg: TrainConfig, position: Position, model, optimizer, device, meta: dict[str, Any]) -> None:
    path = Path(cfg.out) / CHECKPOINT
    try:
        save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=position.epoch,
                        consumed=position.consumed, step=position.step, config=cfg.to_dict(),
                        torch_rng=torch.get_rng_state(),
                        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None, **meta)
    except CheckpointWriteError as e:
        raise CheckpointWriteError(e.path, e.cause, ", then rerun the same command with --resume: training "
                                   "continues from the last checkpoint") from e.cause
    if cfg.checkpoint_url:  # written whole locally first, then one put: the store never holds half of it
        store_mod.put_file(cfg.checkpoint_url, CHECKPOINT, path)
