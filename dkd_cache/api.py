"""dkd-cache's public Python API: train a student from a teacher cache inside your own loop.

Everything in `__all__` is re-exported by `dkd_cache` and changes only as a visible decision (tests/test_api.py
snapshots the names and signatures). Anything else in the package is internal and may change. train-student
builds its batches and its loss with these same classes, and verify opens caches with `open_cache`.

    cache = dkd_cache.open_cache("teacher.zarr")                 # a folder or an s3:// prefix
    teacher = cache                                              # live instead: dkd_cache.LiveTeacher(model, ...)
    loader = dkd_cache.DistillLoader("shards/train-{0000..0099}.tar", cache, teacher=teacher, batch_size=256)
    dkd = dkd_cache.DKDLoss(teacher, alpha=1.0, beta=0.5, temperature=1.0)
    for batch in loader:                                         # images as the teacher saw them, normalised
        logits = student(batch.images)
        loss = F.cross_entropy(logits, batch.labels) + dkd(logits, batch.labels, batch.entries)
        # a recipe with mixup/cutmix: dkd_cache.ce_from_entries(logits, batch.labels, batch.entries) for the CE
        # (lam CE(a) + (1 - lam) CE(b)); dkd mixes both targets the same way by itself

The batch stream, per iteration (one rank, one epoch):
    plan_epoch (pure: seed, epoch, ranks, shard sizes) -> worker streams (tar read, cache join, shuffle, render)
    -> canonical order (loader.canonical_runs) -> loader.Batch (lent memory) -> DistillBatch (memory of its own,
    on the device: normalised images or uint8, labels, the teacher's entries)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import cache as cache_mod
from . import dist as dist_mod
from . import renderers
from . import train_setup
from .codec_fidelity import CodecFidelity
from .errors import (BadSampleError, CacheError, CacheLockedError, CacheMetadataError, CacheMismatchError,
                     CheckpointError, CheckpointNotFoundError, CheckpointWriteError, ConfigError, DKDCacheError,
                     LoanError, NonFiniteLossError, PeerError, RemoteReadError, ResumeMismatchError, ShardError,
                     ShardNotFoundError, SharedMemoryError)
from .loader import Batch, RankPlan, StreamSpec, batches, canonical_runs, make_loader, plan_epoch, skips_for
from .loss import RULES, dkd_loss, mixed_cross_entropy
from .renderers import RendererInfo
from .run_checkpoint import plan_workers
from .teacher import TeacherInfo, load_teacher
from .teacher_signal import (ComputePolicy, Storage, ce_from_entries, dkd_from_entries, encode_entries, resolve_policy,
                             teacher_forward)
from .views import Recipe, normalize as normalize_images, parse_positive_int

__all__ = [
    # the cache
    "open_cache", "TeacherCache", "Provenance", "Recipe",
    # batches
    "DistillLoader", "DistillBatch",
    # the loss
    "DKDLoss", "LiveTeacher", "Storage", "dkd_from_entries", "dkd_loss", "ce_from_entries", "mixed_cross_entropy",
    # typed errors (each also subclasses the matching built-in: ValueError, FileNotFoundError, ...)
    "DKDCacheError", "ConfigError", "ShardError", "ShardNotFoundError", "BadSampleError", "RemoteReadError",
    "CacheError", "CacheMetadataError", "CacheMismatchError", "CacheLockedError", "CheckpointError",
    "CheckpointNotFoundError", "CheckpointWriteError", "ResumeMismatchError", "NonFiniteLossError", "PeerError",
    "LoanError", "SharedMemoryError",
]


# --------------------------------------------------------------------------------------------- the cache
@dataclasses.dataclass(frozen=True, kw_only=True)
class Provenance:
    """How a cache was made: the teacher (arch, classes, weights digests), how it computed (device type, amp,
    TF32; None where not recorded), the renderer of its views, the view seed, and the library versions."""

    teacher: TeacherInfo
    compute: ComputePolicy | None
    renderer: RendererInfo
    seed: int
    views: int
    format_version: int
    versions: dict[str, str]
    fidelity: CodecFidelity | None  # the codec's held-out fidelity measured at dump time; None: not recorded

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.to_dict(), "compute": None if self.compute is None else self.compute.to_dict(),
                "renderer": self.renderer.to_dict(), "seed": self.seed, "views": self.views,
                "format_version": self.format_version, "versions": dict(self.versions),
                "fidelity": None if self.fidelity is None else self.fidelity.to_dict()}


class TeacherCache(cache_mod.Cache):
    """An open cache (made by open_cache). Public: `path`, `recipe`, `codec`, `num_classes`, `views`,
    `temperatures`, `samples`, `provenance`, `meta` (the whole metadata record) and `check(deep=False)` (integrity
    findings). Its other methods are the internal reader's."""

    @property
    def recipe(self) -> Recipe:
        """The views' recipe: image size, RandomResizedCrop scale and ratio, interpolation, mean and std."""
        return self.meta.recipe

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def views(self) -> int:
        """Stored views per sample (epoch e replays view e mod views)."""
        return self.meta.views

    @property
    def temperatures(self) -> tuple[float, ...]:
        """The temperatures whose log-partition is stored: a top-k codec's DKD needs its temperature among them."""
        return self.meta.temperatures

    @property
    def samples(self) -> int:
        return self.meta.manifest.samples

    @property
    def provenance(self) -> Provenance:
        m = self.meta
        return Provenance(teacher=m.teacher, compute=m.compute, renderer=m.renderer, seed=m.seed, views=m.views,
                          format_version=m.format_version, versions=dict(m.versions), fidelity=m.fidelity)


def open_cache(path: str | Path) -> TeacherCache:
    """Open a cache for reading: a folder or an s3:// prefix (credentials and endpoint from the environment).
    CacheError names the path and the fix when there is no cache there or it is damaged."""
    reader = cache_mod.open_cache(path)
    return TeacherCache(location=reader.location, meta=reader.meta, group=reader.group)


# --------------------------------------------------------------------------------------------- the teacher's signal
class LiveTeacher:
    """A teacher model run on every batch, giving the entries a cache stores for it (exact float32 logits, the target
    logit and lse(z / T) at `temperatures`): pass it where a cache goes (DistillLoader's teacher=, DKDLoss) and the
    loop is the same. The model is put in eval mode; it runs in inference mode under `amp` ("none": float32,
    "bf16": bfloat16 autocast; None: bf16 on CUDA, float32 on the CPU), TF32 off."""

    def __init__(self, model: torch.nn.Module, *, num_classes: int, temperatures: Sequence[float] = (1.0,),
                 amp: str | None = "none"):
        parse_positive_int("num_classes", num_classes)
        first = next(iter(model.parameters()), None)
        self.model = model.eval()
        self.policy = resolve_policy(first.device if first is not None else "cpu", amp)
        self.storage = Storage.exact(num_classes, temperatures)

    @classmethod
    def from_file(cls, weights: str | Path, *, arch: str, device: str | torch.device = "cpu",
                  temperatures: Sequence[float] = (1.0,), amp: str | None = "none") -> "LiveTeacher":
        """A torchvision classifier `arch` with the weights of a file (state dict, safetensors, dkd-cache or
        mmpretrain checkpoint), loaded safely and strictly; its classes are read from the weights."""
        model, info = load_teacher(arch, weights, device=device)
        return cls(model, num_classes=info.num_classes, temperatures=temperatures, amp=amp)

    def entries(self, images: torch.Tensor, labels: torch.Tensor, labels_b: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The teacher's entries for a normalised batch, on its device (see DistillBatch.entries); with labels_b
        (mixed views' partner labels) also "logits/target_b"."""
        return encode_entries(teacher_forward(self.model, images, self.policy), labels, self.storage,
                              labels_b=labels_b)


def storage_of(teacher: cache_mod.Cache | LiveTeacher | Storage) -> Storage:
    """How a teacher's entries are stored: a cache's codec, or a live teacher's exact float32."""
    if isinstance(teacher, LiveTeacher):
        return teacher.storage
    if isinstance(teacher, Storage):
        return teacher
    if isinstance(teacher, cache_mod.Cache):
        return Storage.of_cache(teacher)  # a learned codec with its basis, checked against its recorded hash
    raise ConfigError(f"the teacher must be an open cache (dkd_cache.open_cache) or a dkd_cache.LiveTeacher, "
                      f"got {type(teacher).__name__}")


class DKDLoss(torch.nn.Module):
    """DKD (Zhao et al. 2022) of a student's logits against the teacher's entries of the same batch:
    T^2 (alpha TCKD + beta NCKD), the batch mean (reduction "none": per sample). `teacher` is an open cache (its
    codec decides how entries decode; top-k codecs spread the unknown tail by `rule`, "uniform" or "bucket") or a
    LiveTeacher (or a Storage). forward(student_logits (B, C) float, labels (B,) int, entries) -> float32 loss;
    the plain function is dkd_from_entries(student_logits, labels, entries, loss.storage, alpha=, beta=,
    temperature=)."""

    def __init__(self, teacher: TeacherCache | LiveTeacher | Storage, *, alpha: float = 1.0, beta: float = 0.5,
                 temperature: float = 1.0, rule: str = "uniform", reduction: str = "mean"):
        super().__init__()
        self.storage = storage_of(teacher)
        if rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {rule!r}")
        self.alpha, self.beta, self.temperature, self.rule, self.reduction = alpha, beta, temperature, rule, reduction
        if not self.storage.codec.decodes_full:  # the cached form needs lse at this temperature: say so now
            self.storage.temperature_index(temperature)
        # the hyper-parameters checked now, on a one-row batch, not at the first step
        z = torch.zeros((1, self.storage.num_classes))
        dkd_loss(z, z, torch.zeros(1, dtype=torch.long), alpha, beta, temperature, reduction=reduction)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, entries: Mapping[str, Any]
                ) -> torch.Tensor:
        return dkd_from_entries(student_logits, labels, entries, self.storage, alpha=self.alpha, beta=self.beta,
                                temperature=self.temperature, rule=self.rule, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"codec={self.storage.codec.name!r}, alpha={self.alpha}, beta={self.beta}, "
                f"temperature={self.temperature}, rule={self.rule!r}")


# --------------------------------------------------------------------------------------------- batches
@dataclasses.dataclass(frozen=True)
class DistillBatch:
    """One batch, memory of its own, on the loader's device: images float32 normalised (B, 3, S, S) (uint8 with
    normalize=False), labels int64 (B,), and the teacher's entries {"logits/target": (B,), "logits/lse": (B, T),
    "logits/<codec array>": (B, ...)} ({} without a teacher: CE only). A recipe with mixup or cutmix adds
    "mix/lam" float32 (B,) (the own sample's share of each mixed image, 1.0 unmixed), "mix/label" int64 (B,) (the
    partner's label) and, with a teacher, "logits/target_b" (B,) (its exact logit of the partner's label)."""

    images: torch.Tensor
    labels: torch.Tensor
    entries: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pass:
    """One pass (M = views_per_decode epochs of views) as this rank reads it."""

    plan: RankPlan  # the rank's streams and their counts, in views
    samples: int  # views this rank reads in the pass
    steps: int  # full batches of them (the same on every rank)
    dropped: int  # views over all ranks left out as a partial last batch
    padding: int  # samples repeated over all ranks so that every rank has as many
    spec: StreamSpec


class DistillLoader:
    """The batches of one rank for one epoch, as an iterable: views replayed bit for bit as the teacher saw them
    (the cache's boxes and flips, rendered by its renderer), labels, and the teacher's entries (the cache's, or a
    LiveTeacher's computed on the batch).

    Guarantees: the order is canonical (a pure function of seed, epoch, rank, world, workers and the shards: the
    same batches whatever the scheduling); every rank gets the same number of full batches (`len`; a short last
    batch is dropped, ranks short of samples repeat their first ones: `dropped`, `padding`); iterating from
    `start_step` k yields exactly batches k.. of the uninterrupted epoch (resume by a step count). With
    views_per_decode M each decoded image gives M consecutive stored views: one iteration covers epochs epoch ..
    epoch + M - 1 and `epoch` is a multiple of M. Like torch's DataLoader: `len(loader)`, `loader.set_epoch(e)`.

    shards: brace pattern, glob, folder, .txt list or a sequence of them; cache: a path, s3:// prefix or open
    cache (None: no cache; views drawn from (seed, epoch, key) with `recipe`, CE only or a LiveTeacher; give
    num_classes; with a cache its recipe is the one, another is refused);
    batch_size: per rank; workers: DataLoader processes (0: in this process); renderer: the cache's by default
    (another needs allow_other_renderer: other pixels than the teacher's); image_size: the student's (default the
    recipe's); device: where batches are put (pinned, non-blocking copies to CUDA); wait_seconds: inside a process
    group, how long the other ranks wait for rank 0's check of the shards against the cache (train-student's
    --wait-seconds)."""

    def __init__(self, shards: str | Sequence[str], cache: str | Path | TeacherCache | None = None, *,
                 batch_size: int, epoch: int = 0, rank: int = 0, world: int = 1, workers: int = 2,
                 renderer: str | None = None, views_per_decode: int = 1, seed: int = 0,
                 teacher: TeacherCache | LiveTeacher | None = None, normalize: bool = True,
                 device: str | torch.device = "cpu", channels_last: bool = False, image_size: int | None = None,
                 start_step: int = 0,
                 shuffle_buffer: int = 256, num_classes: int | None = None, recipe: Recipe | None = None,
                 allow_other_renderer: bool = False, wait_seconds: float = dist_mod.DEFAULT_WAIT_S):
        if isinstance(teacher, cache_mod.Cache):  # the cache's own entries
            if cache is not None and cache is not teacher:
                raise ConfigError("teacher= is another cache than cache=: give the cache once (teacher=None reads "
                                  "the cache's entries) or a LiveTeacher")
            cache, teacher = teacher, None
        elif teacher is not None and not isinstance(teacher, LiveTeacher):
            storage_of(teacher)  # raises ConfigError naming what a teacher is
        if teacher is not None and cache is not None and image_size not in (None, _meta_of(cache).recipe.image_size):
            raise ConfigError(f"a LiveTeacher sees the student's batch, so the student's image size must be the "
                              f"recipe's ({_meta_of(cache).recipe.image_size} px), got {image_size}")
        for name, value in (("world", world), ("batch_size", batch_size), ("views_per_decode", views_per_decode)):
            parse_positive_int(name, value)
        wait_seconds = dist_mod.parse_wait_seconds(wait_seconds)
        data = train_setup.open_data(shards, cache if not isinstance(cache, Path) else str(cache),
                                     _checking_dist(rank, world, wait_seconds), num_classes=num_classes, recipe=recipe,
                                     renderer=renderer,
                                     allow_other_renderer=allow_other_renderer, teacher_entries=teacher is None)
        renderers.check_recipe(data.renderer, data.recipe)  # the same checks as train-student's set-up
        renderers.check_decoder(data.renderer, None if data.cache is None else data.cache.meta.renderer, device,
                                allow_other_renderer)
        self._setup(data, batch_size=batch_size, epoch=epoch, rank=rank, world=world, workers=workers,
                    views_per_decode=views_per_decode, seed=seed, teacher=teacher, normalize=normalize, device=device,
                    channels_last=channels_last, image_size=image_size, start_step=start_step,
                    shuffle_buffer=shuffle_buffer, block=batch_size)

    @classmethod
    def _of_data(cls, data: train_setup.TrainData, **settings: Any) -> "DistillLoader":
        """The loader of data already opened and checked (train-student's, train_setup.resolve); `block` is the
        transfer block its checkpoint recorded. Internal."""
        loader = cls.__new__(cls)
        loader._setup(data, **settings)
        return loader

    def _setup(self, data: train_setup.TrainData, *, batch_size: int, epoch: int, rank: int, world: int, workers: int,
               views_per_decode: int, seed: int, teacher: LiveTeacher | None, normalize: bool,
               device: str | torch.device, channels_last: bool, image_size: int | None, start_step: int,
               shuffle_buffer: int, block: int) -> None:
        for name, value in (("batch_size", batch_size), ("world", world), ("views_per_decode", views_per_decode),
                            ("shuffle_buffer", shuffle_buffer), ("block", block)):
            parse_positive_int(name, value)
        if image_size is not None:
            parse_positive_int("image_size", image_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ConfigError(f"rank must be an integer in [0, {world}), got {rank!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")
        self._data, self.batch_size, self.rank, self.world, self.workers = data, batch_size, rank, world, workers
        self.views_per_decode, self.seed, self.teacher, self.normalize = views_per_decode, seed, teacher, normalize
        self.device, self.channels_last, self.shuffle_buffer = torch.device(device), channels_last, shuffle_buffer
        self._block, self._image_size = block, image_size
        self._passes: dict[int, _Pass] = {}
        self.set_epoch(epoch, start_step=start_step)

    # -- torch DataLoader conventions
    def set_epoch(self, epoch: int, *, start_step: int = 0) -> None:
        """The epoch the next iteration reads, from its batch `start_step` on (a resume: `start_step` batches of
        this epoch were trained on already)."""
        m = self.views_per_decode
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0 or epoch % m:
            raise ConfigError(f"epoch must be an integer >= 0 and a multiple of views_per_decode ({m}), got {epoch!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.epoch, self.start_step = epoch, start_step
        if start_step > len(self):
            raise ConfigError(f"start_step {start_step} lies past the epoch's {len(self)} batches")

    def __len__(self) -> int:
        """Full batches per epoch (the same on every rank), counting those before start_step."""
        return self._pass().steps

    @property
    def samples(self) -> int:
        """Views this rank reads per pass (its share, padding included)."""
        return self._pass().samples

    @property
    def dropped(self) -> int:
        """Views over all ranks left out as a partial last batch (every rank drops as many)."""
        return self._pass().dropped

    @property
    def padding(self) -> int:
        """Samples repeated over all ranks so that every rank reads as many (a rank's first samples again)."""
        return self._pass().padding

    @property
    def image_size(self) -> int:
        return self._image_size or self._data.recipe.image_size

    @property
    def recipe(self) -> Recipe:
        return self._data.recipe

    @property
    def num_classes(self) -> int:
        return self._data.num_classes

    def __iter__(self) -> Iterator[DistillBatch]:
        p, start = self._pass(), self.start_step
        skips = skips_for(p.plan.counts, start * self.batch_size, self._block)
        stream = epoch_batches(p.spec, p.plan, skips, workers=self.workers, block=self._block,
                               batch_size=self.batch_size, pin_memory=self.device.type == "cuda")
        for batch in itertools.islice(stream, p.steps - start):  # full batches only, as every rank has them
            yield self._tensors(batch)

    # -- one batch
    def _tensors(self, batch: Batch) -> DistillBatch:
        """A loader batch on the device, in memory of its own (the batch's transfer slot goes back to its worker
        on leaving `with batch`), with the teacher's entries."""
        recipe = self._data.recipe
        with batch:
            x = renderers.to_device(batch.images, batch.entries, recipe, self.device, self.image_size)
            labels = batch.labels.to(self.device)
            entries = {k: v.to(self.device, non_blocking=True) for k, v in batch.entries.items()
                       if k.startswith(("logits/", "mix/"))}  # mix/: a mixing recipe's lam and partner label
            if self.normalize:
                x = normalize_images(x, recipe, self.channels_last)
            elif batch.lent and x.device.type == "cpu":
                x = x.clone()  # the worker's slot itself: copied out before it goes back
        if self.teacher is not None:  # live: the teacher's signal in exact storage, the same loss as cached
            seen = x if self.normalize else normalize_images(x, recipe, self.channels_last)
            mix = {k: v for k, v in entries.items() if k.startswith("mix/")}
            entries = {**self.teacher.entries(seen, labels, labels_b=mix.get("mix/label")), **mix}
        return DistillBatch(x, labels, entries)

    def _pass(self) -> _Pass:
        if self.epoch not in self._passes:
            self._passes = {self.epoch: self._plan(self.epoch)}  # one pass kept: a new epoch replaces it
        return self._passes[self.epoch]

    def _plan(self, epoch: int) -> _Pass:
        data, m, world = self._data, self.views_per_decode, self.world
        plan = with_views(plan_epoch(data.sizes, seed=self.seed, epoch=epoch, world=world, rank=self.rank,
                                     workers=plan_workers(self.workers)), m)
        n_local = sum(plan.counts)
        padding = sum(plan_epoch(data.sizes, seed=self.seed, epoch=epoch, world=world, rank=r, workers=1).padding
                      for r in range(world))
        # Full batches only (as the reference recipes' drop_last): a last batch of one sample would break
        # BatchNorm, and every rank drops the same number. The dropped samples are reported, not hidden.
        steps = n_local // self.batch_size
        if steps == 0:
            raise ConfigError(f"the batch ({self.batch_size} per rank) holds more samples than an epoch gives a rank "
                              f"({n_local}); lower --batch-size")
        spec = StreamSpec(urls=data.urls, recipe=data.recipe, seed=self.seed, epoch=epoch,
                          view=epoch % data.views if data.views else epoch, rank=self.rank,
                          cache_path=None if data.cache is None else data.cache.path,
                          entry_arrays=data.entry_arrays, num_classes=data.num_classes,
                          shuffle_buffer=self.shuffle_buffer, renderer=data.renderer, image_size=self.image_size,
                          views_per_decode=m, block=self._block)
        return _Pass(plan=plan, samples=n_local, steps=steps, dropped=(n_local - steps * self.batch_size) * world,
                     padding=padding, spec=spec)


def with_views(plan: RankPlan, m: int) -> RankPlan:
    """The plan in views: every sample gives M consecutive items (views_per_decode)."""
    return dataclasses.replace(plan, counts=tuple(c * m for c in plan.counts)) if m > 1 else plan


def epoch_batches(spec: StreamSpec, plan: RankPlan, skips: Sequence[int], *, workers: int, block: int,
                  batch_size: int, pin_memory: bool = False) -> Iterator[Batch]:
    """The rank's batches of one pass in the canonical order, from `skips` on (a resume): the worker streams
    (tar read, cache join, shuffle buffer, render) -> groups in canonical order -> batches (lent: see loader.Batch)."""
    loader = own_generator(make_loader(spec, plan, skips, workers), spec.seed)
    return batches(canonical_runs(loader, plan, skips, block), batch_size, pin_memory=pin_memory)


def own_generator(loader: DataLoader, seed: int) -> DataLoader:
    """Each iteration of a DataLoader draws a base seed for its workers, from the global RNG unless the loader has
    a generator of its own. Given one, the global RNG is the training steps' alone (dropout, stochastic depth), as
    a resumed run restores it. (The streams draw nothing from it: views come from loader.seeded_rng.)"""
    loader.generator = torch.Generator().manual_seed(seed)
    return loader


def _meta_of(cache: str | Path | cache_mod.Cache):
    return (cache if isinstance(cache, cache_mod.Cache) else cache_mod.open_cache(cache)).meta


def _checking_dist(rank: int, world: int, wait_seconds: float = dist_mod.DEFAULT_WAIT_S) -> dist_mod.DistInfo:
    """Who checks the shards against the cache: rank 0 for every rank inside a process group of this size (the
    others receive its result, waiting up to wait_seconds for it), else each process for itself."""
    d = torch.distributed
    if world > 1 and d.is_available() and d.is_initialized() and d.get_world_size() == world and d.get_rank() == rank:
        return dist_mod.DistInfo(rank=rank, world=world, wait_s=wait_seconds)
    return dist_mod.DistInfo(wait_s=wait_seconds)
