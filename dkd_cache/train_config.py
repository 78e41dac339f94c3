"""train-student's settings: TrainConfig (validated on construction) and the pure functions of it that the loop
reads each step or epoch (the student's image size, the learning rate, the KD warm-up factor)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from . import renderers
from .dist import DEFAULT_WAIT_S, parse_wait_seconds
from .errors import ConfigError
from .loss import total_loss
from .views import Recipe, parse_positive_int

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
    strict: bool = False  # refuse a cache whose recorded fidelity does not vouch for this temperature and beta
    views_per_decode: int = 1  # M: each decoded image gives M of its stored views to one pass (= M epochs)
    image_size: int | None = None  # the student's input size; None: the recipe's (the teacher's)
    image_size_schedule: tuple[tuple[int, int], ...] = ()  # ((first epoch, size), ...): progressive resizing
    # under torchrun: how long the other ranks wait for rank 0's long phases (scanning shards, writing a checkpoint)
    # before a PeerError; a config or checkpoint saved without it reads as the default, and --resume may change it
    wait_seconds: float = DEFAULT_WAIT_S

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
        object.__setattr__(self, "wait_seconds", parse_wait_seconds(self.wait_seconds))
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


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of `epoch`: --lr scaled linearly with the global batch, stepped down at the milestones."""
    base = cfg.lr * cfg.batch_size / cfg.lr_batch
    return base * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


def kd_factor(cfg: TrainConfig, epoch: int) -> float:
    """The KD term's weight in epoch `epoch` (0-based): DKD's warm-up min((epoch + 1) / warmup_epochs, 1)."""
    return float(total_loss(0.0, 1.0, epoch + 1, cfg.warmup_epochs, 0.0))
