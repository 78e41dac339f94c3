"""train-student's set-up, before the first step: the process group, the data (from the cache when there is one,
so nothing is typed twice, checked against the shards), the student, the teacher's signal, the optimizer and the
data fingerprint a checkpoint records. Every input is checked here: a typo must not cost an epoch.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import augment
from . import cache as cache_mod
from . import cache_meta
from . import dist as dist_mod
from . import renderers, shard_scan, tb_log
from .codec_fidelity import recipe_problem
from .data import expand_shards, index_differs, match_shards, scan_shards, shard_name
from .data_fingerprint import DataFingerprint, ShardPrint, cache_identity, of_shards, teacher_identity
from .errors import BadSampleError, CacheMismatchError, ConfigError
from .teacher import build_model, load_teacher, same_weights
from .train_config import TrainConfig, lr_at, student_size
from .views import Recipe


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainData:
    """What the run trains on: the shards in the run's order and what each epoch's stream needs to read them."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]  # usable samples per shard, in url order (the epoch plan's input)
    shards: tuple[ShardPrint, ...]  # the shards by content, for the data fingerprint
    recipe: Recipe
    num_classes: int
    views: int | None  # views per sample in the cache (None: no cache, views drawn from (seed, epoch, key))
    entry_arrays: tuple[str, ...]  # the cache arrays each sample's entries carry
    renderer: str
    cache: cache_mod.Cache | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSetup:
    """Everything the loop uses that does not change from step to step."""

    dinfo: dist_mod.DistInfo
    device: torch.device
    local_batch: int  # the rank's share of the global batch
    data: TrainData
    model: torch.nn.Module  # the student (its state is what checkpoints hold)
    ddp_model: torch.nn.Module  # the student wrapped for DDP under torchrun (the model itself otherwise)
    optimizer: torch.optim.Optimizer
    teacher: torch.nn.Module | None  # live mode only (train.py computes its entries with api.LiveTeacher)
    fingerprint: DataFingerprint


def resolve(cfg: TrainConfig) -> TrainSetup:
    dinfo = dist_mod.init(cfg.device, wait_s=cfg.wait_seconds)
    device = torch.device(f"cuda:{dinfo.local_rank}" if cfg.device == "cuda" else cfg.device)
    if cfg.batch_size % dinfo.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {dinfo.world} ranks")
    check_inputs(cfg)
    data = resolve_data(cfg, dinfo)
    renderers.check_recipe(data.renderer, data.recipe)
    renderers.check_decoder(data.renderer, data.cache.meta.renderer if data.cache is not None else None, device,
                            cfg.allow_other_renderer)
    check_live_teacher_size(cfg, data.recipe)

    torch.manual_seed(cfg.seed)  # the student's initial weights: same seed, same start, on every rank
    model = build_model(cfg.arch, data.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher, teacher_info = None, None  # the teacher exists only in live mode
    if cfg.loss == "dkd" and cfg.live_teacher:
        teacher, teacher_info = load_teacher(cfg.teacher_arch, cfg.live_teacher, device=device)
        if teacher_info.num_classes != data.num_classes:
            raise ConfigError(f"live teacher has {teacher_info.num_classes} classes, the data {data.num_classes}")
        if data.cache is not None and not same_weights(teacher_info, data.cache.meta.teacher) and dinfo.is_main:
            warnings.warn("the live teacher's weights differ from the cache's teacher", stacklevel=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(cfg, 0), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    if teacher_info is None and data.cache is not None:
        teacher_info = data.cache.meta.teacher
    fingerprint = DataFingerprint(shards=data.shards,
                                  cache=None if data.cache is None else cache_identity(data.cache.meta),
                                  teacher=None if teacher_info is None else teacher_identity(teacher_info))
    return TrainSetup(dinfo=dinfo, device=device, local_batch=cfg.batch_size // dinfo.world, data=data, model=model,
                      ddp_model=DistributedDataParallel(model) if dinfo.world > 1 else model, optimizer=optimizer,
                      teacher=teacher, fingerprint=fingerprint)


def check_inputs(cfg: TrainConfig) -> None:
    """What can be checked from the config alone, before any shard or cache is read."""
    if cfg.tensorboard:
        tb_log.require_tensorboard()
    if cfg.val_shards:
        expand_shards(cfg.val_shards, allow_pipe=cfg.allow_pipe)
    out = Path(cfg.out)
    if cfg.cache and Path(cfg.cache).resolve() in (out.resolve(), *out.resolve().parents):
        raise ConfigError(f"--out {out} lies inside the cache {cfg.cache}; choose another run directory")


def check_live_teacher_size(cfg: TrainConfig, recipe: Recipe) -> None:
    """The live teacher sees the batch the student sees; at another size its logits would not be the teacher's
    signal for the recorded views (the cache's logits always are: rendered at the recipe's size)."""
    if not (cfg.loss == "dkd" and cfg.live_teacher):
        return
    sizes_used = {student_size(cfg, recipe, e) for e in range(cfg.epochs)}
    if sizes_used != {recipe.image_size}:
        raise ConfigError(f"--live-teacher renders one batch for teacher and student, so the student's image "
                          f"size must be the recipe's ({recipe.image_size} px), got {sorted(sizes_used)}: "
                          f"drop --image-size/--image-size-schedule, or train from the cache (--cache) instead")


def resolve_data(cfg: TrainConfig, dinfo: dist_mod.DistInfo) -> TrainData:
    """train-student's data: open_data with the config's settings, then what only training checks."""
    cached_dkd = cfg.loss == "dkd" and not cfg.live_teacher
    data = open_data(cfg.shards, cfg.cache, dinfo, allow_pipe=cfg.allow_pipe, num_classes=cfg.num_classes,
                     recipe=None if cfg.recipe is None else Recipe.from_dict(cfg.recipe), renderer=cfg.renderer,
                     allow_other_renderer=cfg.allow_other_renderer, teacher_entries=cached_dkd)
    if data.cache is not None:
        meta = data.cache.meta
        # a learned codec comes with its basis, checked against the recorded hash (cache.codec)
        if cached_dkd and not data.cache.codec.decodes_full and cfg.temperature not in meta.temperatures:
            raise ConfigError(f"temperature {cfg.temperature} was not dumped (cache has {list(meta.temperatures)}); "
                              "the top-k codec needs the exact log-partition at that temperature")
        problem = recipe_problem(meta.fidelity, meta.codec, cfg.temperature, cfg.beta) if cached_dkd else None
        if problem and cfg.strict:
            raise ConfigError(f"--strict: {problem}")
        if problem and dinfo.is_main:
            warnings.warn(problem + " (--strict refuses)", stacklevel=3)
        if cfg.epochs > meta.views and dinfo.is_main:
            warnings.warn(f"{cfg.epochs} epochs over {meta.views} cached views: view e mod {meta.views} is reused, "
                          "so views repeat", stacklevel=3)
    return data


def open_data(shards: str | Sequence[str], cache: str | cache_mod.Cache | None, dinfo: dist_mod.DistInfo, *,
              allow_pipe: bool = False, num_classes: int | None = None, recipe: Recipe | None = None,
              renderer: str | None = None, allow_other_renderer: bool = False, teacher_entries: bool = True
              ) -> TrainData:
    """Shards (and the cache they were dumped into, a path or an open Cache) -> what a rank's batches are read
    from, checked against each other. teacher_entries: each sample's entries carry the cache's logits, not only
    its views (the stream of a live teacher, or CE, reads the views alone). The public loader
    (api.DistillLoader) and train-student both start here."""
    urls = tuple(expand_shards(shards, allow_pipe=allow_pipe))
    if cache is not None:
        return _cache_data(cache, urls, dinfo, num_classes=num_classes, recipe=recipe, renderer=renderer,
                           allow_other_renderer=allow_other_renderer, teacher_entries=teacher_entries)
    return _shard_data(urls, num_classes=num_classes, recipe=recipe, renderer=renderer)


def _cache_data(cache: str | cache_mod.Cache, urls: tuple[str, ...], dinfo: dist_mod.DistInfo, *,
                num_classes: int | None, recipe: Recipe | None, renderer: str | None, allow_other_renderer: bool,
                teacher_entries: bool) -> TrainData:
    cache = cache if isinstance(cache, cache_mod.Cache) else cache_mod.open_cache(cache)
    meta = cache.meta
    sizes = check_cache_matches(cache, urls, dinfo)
    if num_classes is not None and num_classes != meta.num_classes:
        raise ConfigError(f"num_classes {num_classes} contradicts the cache's {meta.num_classes}")
    if recipe is not None and recipe != meta.recipe:
        raise ConfigError("the config's [recipe] contradicts the cache's recipe; the cache's recipe is used "
                          "for training: remove [recipe] or re-dump with it")
    entry_arrays = entry_arrays_of(cache, teacher_entries)
    by_name = {s.name: s for s in meta.manifest.shards}  # the shards as dumped: check_cache_matches scanned them
    shards = tuple(ShardPrint(name=by_name[n].name, samples=by_name[n].samples, keys_sha256=by_name[n].keys_sha256)
                   for n in map(shard_name, urls))
    return TrainData(urls=urls, sizes=tuple(sizes), shards=shards, recipe=meta.recipe, num_classes=meta.num_classes,
                     views=meta.views, entry_arrays=entry_arrays,
                     renderer=renderers.choose_renderer(meta.renderer, renderer, allow_other_renderer),
                     cache=cache)


def entry_arrays_of(cache: cache_mod.Cache, teacher_entries: bool) -> tuple[str, ...]:
    """The cache arrays each sample's entries carry: its views (box, flip and, when the recipe augments or mixes,
    the packed record views/aug) and, with teacher_entries, the teacher's logits (target, lse, the codec's arrays
    and, when the recipe mixes, the partner label's exact logit logits/target_b). Old caches: box and flip."""
    recipe = cache.meta.recipe
    names = ("views/box", "views/flip", *(("views/aug",) if augment.record_bytes(recipe) else ()))
    if teacher_entries:
        names += ("logits/target", "logits/lse", *(f"logits/{n}" for n in cache.codec_arrays),
                  *(("logits/target_b",) if augment.mixes(recipe) else ()))
    return names


def _shard_data(urls: tuple[str, ...], *, num_classes: int | None, recipe: Recipe | None, renderer: str | None
                ) -> TrainData:
    if num_classes is None:
        raise ConfigError("without a cache, give num_classes (in the config or --num-classes)")
    indexes = scan_shards(urls, skip_bad=True)  # labels read as they are, checked against num_classes here
    n = num_classes
    for ix in indexes:
        for pos, reason in ix.bad:
            raise BadSampleError(ix.name, ix.key(pos), reason, advice=NO_SKIP_BAD)
        for pos in np.flatnonzero(ix.labels >= n)[:1].tolist():  # the first label outside the classes, if any
            raise BadSampleError(ix.name, ix.key(pos), f"label {int(ix.labels[pos])} is outside the {n} classes of "
                                 f"--num-classes (0..{n - 1})", advice="Give the --num-classes that covers every "
                                 "label, or fix or remove the sample. " + NO_SKIP_BAD)
    return TrainData(urls=urls, sizes=tuple(len(ix.keys) for ix in indexes), shards=of_shards(indexes),
                     recipe=recipe or Recipe.from_dict({}), num_classes=num_classes, views=None,
                     entry_arrays=(), renderer=renderer or "cpu", cache=None)


# train-student reads every sample it is given: a sample to leave out is left out once, by the dump, and recorded.
NO_SKIP_BAD = ("Without a cache every sample is trained on; to leave bad samples out, dump a cache with "
               "dump-teacher --skip-bad (each skipped sample is recorded there) and train from it with --cache")


def check_cache_matches(cache: cache_mod.Cache, urls: tuple[str, ...], dinfo: dist_mod.DistInfo) -> list[int]:
    """Shards and cache belong together: same names, same keys (by digest). Returns per-shard usable sizes, in url
    order."""
    cache_mod.require_sound(cache)  # the fast pre-flight: records, layout, chunk files (no logit is read)
    m = cache.meta.manifest
    match = match_shards([s.name for s in m.shards], urls)
    if match.extra:
        raise CacheMismatchError(f"{len(match.extra)} shard(s) are not in the cache's manifest, first "
                                 f"{list(match.extra[:3])}; the cache was dumped from other shards")
    entry_of = {url: m.shards[i] for i, url in match.found.items()}
    status = cache.read_rows("samples/status", 0, m.rows)
    # Every rank scans its share (recorded beside the cache: an unchanged shard is not read again) and checks the
    # whole, gathered result: the same verdict on every rank. Bad samples are found, not raised: the ones the dump
    # skipped (recorded in the cache) are left out of training by the loader; any other is a shard that changed.
    for ix in shard_scan.scan_shards(urls, skip_bad=True, dist=dinfo, cache=cache.path):
        entry = entry_of[ix.url]
        differs = index_differs(ix, entry.samples, entry.keys_sha256)
        if differs:
            raise CacheMismatchError(differs)
        for pos, reason in ix.bad:
            if status[entry.row_start + pos] != cache_meta.STATUS_SKIPPED:
                raise CacheMismatchError(
                    f"{ix.name}: sample {ix.key(pos)!r} is unusable ({reason}) but the cache holds it as "
                    "dumped; the shard changed since the dump: train with the shards the cache was dumped from")
    return [int((status[entry_of[u].row_start:entry_of[u].row_stop] == cache_meta.STATUS_OK).sum()) for u in urls]
