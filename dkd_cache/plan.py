"""`dkd-cache plan`: what a run will cost before it is spent. The cache's size from the codec's exact bytes per view
and the schema's per-sample arrays (cache_writer's arrays, rows padded per shard to whole chunks), the dump's and
an epoch's time from rates this repository measured (benchmarks/results/*.json, named in the output) or one given,
the shared memory each rank's DataLoader workers take (transfer.ShmNeed, as the rings are sized), and the storage
read rate training needs (each view's cache entries and its JPEG, every epoch)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from . import transfer
from .errors import ConfigError
from .loader import IMAGES_IN_FLIGHT
from .logit_codecs import parse_codec

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# device -> the benchmark result measured on it (benchmarks/throughput.py: teacher resnet34, student resnet18, 224 px)
MEASURED = {"h200": "throughput-gpu.json", "h100": "throughput-gpu-h100.json", "cpu": "throughput-cpu.json"}
JPEG_RESULT = "input-path-cpu.json"  # mean_jpeg_bytes of the ImageNet-geometry JPEGs benchmarks/input_path.py made
PER_SAMPLE_BYTES = 4 + 4 + 1 + 4 + 4  # samples/label, shard, status, height, width (the key is apart)
PER_VIEW_BYTES = 4 + 8 + 1  # logits/target float32, views/box 4 x uint16, views/flip uint8 (lse: 4 per temperature)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanInputs:
    samples: int
    views: int
    classes: int
    codec: str = "topk:10+q4"
    temperatures: int = 1
    epochs: int = 100
    device: str | None = "h200"  # a key of MEASURED, or None with `rate`
    rate: float | None = None  # views/s one rank's teacher dumps (overrides the measured rate)
    train_rate: float | None = None  # images/s one rank trains (overrides the measured rate)
    ranks: int = 8
    workers: int = 12
    batch_size: int = 256  # per rank
    image_size: int = 224
    shard_size: int = 1252  # samples per tar shard (ImageNet: 1,281,167 in 1,024 shards)
    chunk_rows: int = 256
    key_bytes: int = 24  # samples/key width: the longest key's UTF-8 bytes rounded up to 8, at least 16
    jpeg_bytes: float | None = None  # mean JPEG size (None: the measured one)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Figure:
    name: str
    value: str
    source: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    rows: int  # samples padded per shard to whole chunks
    shards: int
    bytes_per_view: int  # raw (before zstd): the codec's arrays, target, lse, box, flip
    bytes_per_sample: int  # raw: key, label, shard, status, height, width
    cache_bytes: int  # raw, every array (zstd shrinks the chunk files; metadata files ~1 KiB an array)
    disk_ratio: float | None  # on disk / raw, as measured for this codec (None: not measured)
    dump_seconds: float | None
    epoch_seconds: float | None
    train_shm_bytes: int  # per rank
    dump_shm_bytes: int  # per rank
    read_bytes_per_s: float | None  # all ranks together, while training
    figures: tuple[Figure, ...]


def _positive(name: str, value, kind=int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                              or (kind is int and int(value) != value)):
        raise ConfigError(f"plan: {name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


def _result(name: str) -> dict:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"plan: the measured result {path} cannot be read ({e}); give the rates "
                          "(--rate, --train-rate, --jpeg-bytes) instead") from e


def rows_of(samples: int, shard_size: int, chunk_rows: int) -> tuple[int, int]:
    """(rows, shards): the cache's rows when `samples` come in shards of `shard_size` (the last one shorter), each
    shard's rows padded to whole chunks of `chunk_rows` (cache_meta.build_manifest)."""
    shards = -(-samples // shard_size)
    last = samples - (shards - 1) * shard_size
    pad = lambda n: -(-n // chunk_rows) * chunk_rows  # noqa: E731
    return (shards - 1) * pad(shard_size) + pad(last), shards


def make_plan(p: PlanInputs) -> Plan:
    for name in ("samples", "views", "classes", "temperatures", "epochs", "ranks", "batch_size", "image_size",
                 "shard_size", "chunk_rows", "key_bytes"):
        _positive(name, getattr(p, name))
    for name in ("rate", "train_rate", "jpeg_bytes"):
        _positive(name, getattr(p, name), float)
    if p.workers < 0:
        raise ConfigError(f"plan: workers must be >= 0, got {p.workers}")
    if p.device is not None and p.device not in MEASURED:
        raise ConfigError(f"plan: no measured rates for device {p.device!r}; measured: {sorted(MEASURED)}, or give "
                          "--rate and --train-rate")
    codec = parse_codec(p.codec, p.classes)
    figures: list[Figure] = []
    bpv = codec.bytes_per_entry(p.classes) + PER_VIEW_BYTES + 4 * p.temperatures
    bps = p.key_bytes + PER_SAMPLE_BYTES
    rows, shards = rows_of(p.samples, p.shard_size, p.chunk_rows)
    cache_bytes = rows * (bps + p.views * bpv)
    schema = "the codec's arrays and the cache schema (cache_writer._array_specs)"
    figures.append(Figure(name="bytes per view (raw)", value=f"{bpv} B", source=f"codec {codec.name}: {schema}"))
    figures.append(Figure(name="cache rows", value=f"{rows:,} ({shards:,} shards of {p.shard_size} samples, "
                          f"padded to chunks of {p.chunk_rows})", source="cache_meta.build_manifest"))
    figures.append(Figure(name="cache size (raw, before zstd)", value=_gb(cache_bytes), source=schema))

    measured = _result(MEASURED[p.device]) if p.device is not None else None
    disk_ratio = None
    if measured is not None and codec.name in measured.get("bytes", {}):
        # the benchmark's views/ and logits/ bytes on disk per sample's view (100 classes, T=1, its own padding)
        b, cfg = measured["bytes"][codec.name], measured["config"]
        bench_rows, _ = rows_of(int(cfg["samples"]), int(cfg["shard_size"]), 256)
        raw_row_view = codec.bytes_per_entry(100) + PER_VIEW_BYTES + 4
        disk_ratio = float(b["bytes_per_view"]) * int(cfg["samples"]) / bench_rows / raw_row_view
        disk = rows * (bps + p.views * bpv * disk_ratio)
        figures.append(Figure(name="cache size on disk (measured ratio)", value=_gb(disk),
                              source=f"{MEASURED[p.device]}: {codec.name} at 100 classes took {disk_ratio:.2f} x its "
                                     f"{raw_row_view} raw bytes per row and view on disk (zstd); per-sample arrays "
                                     "counted raw"))

    dump_rate, dump_src = p.rate, "given (--rate)"
    if dump_rate is None and measured is not None:
        dumps = measured.get("dump", {})
        key = codec.name if codec.name in dumps else next(iter(dumps), None)
        if key is not None:
            dump_rate = float(dumps[key]["images_per_s"])
            dump_src = (f"{MEASURED[p.device]}: dump of {key} on {measured.get('device_name')}, teacher resnet34 at "
                        f"{measured['config'].get('image_size')} px, {dump_rate:,.0f} views/s per rank")
    dump_seconds = p.samples * p.views / (dump_rate * p.ranks) if dump_rate else None
    figures.append(Figure(name="dump time", value=_hours(dump_seconds) + f" on {p.ranks} rank(s)", source=dump_src))

    train_rate, train_src = p.train_rate, "given (--train-rate)"
    if train_rate is None and measured is not None and "cached" in measured.get("train", {}):
        train_rate = float(measured["train"]["cached"]["best_images_per_s"])
        train_src = (f"{MEASURED[p.device]}: train-student from the cache on {measured.get('device_name')}, student "
                     f"resnet18 at {measured['config'].get('image_size')} px, {train_rate:,.0f} images/s per rank")
    epoch_seconds = p.samples / (train_rate * p.ranks) if train_rate else None
    figures.append(Figure(name="training time", value=(_hours(epoch_seconds) + " per epoch, "
                          + _hours(epoch_seconds * p.epochs if epoch_seconds else None) + f" for {p.epochs} epochs"),
                          source=train_src))

    jpeg, jpeg_src = p.jpeg_bytes, "given (--jpeg-bytes)"
    if jpeg is None:
        jpeg = float(_result(JPEG_RESULT)["mean_jpeg_bytes"])
        jpeg_src = f"{JPEG_RESULT}: mean JPEG of the ImageNet-geometry shards, {jpeg:,.0f} B"
    read = (jpeg + bpv) * train_rate * p.ranks if train_rate else None
    figures.append(Figure(name="storage read rate while training",
                          value="unknown" if read is None else f"{read / 1e6:,.1f} MB/s for all ranks "
                          f"({read / p.ranks / 1e6:,.1f} MB/s per rank: a JPEG and {bpv} B of cache per image)",
                          source=f"{jpeg_src}; the training rate above"))

    train_need = transfer.ShmNeed(workers=p.workers, slots=max(2, IMAGES_IN_FLIGHT // p.batch_size) + 2,
                                  slot_shape=(p.batch_size, 3, p.image_size, p.image_size))
    dump_need = transfer.ShmNeed(workers=p.workers, slots=-(-p.batch_size // p.views) + 4 + 2,
                                 slot_shape=(p.views, 3, p.image_size, p.image_size))
    train_shm = train_need.rank_bytes if p.workers else 0
    dump_shm = dump_need.rank_bytes if p.workers else 0
    figures.append(Figure(name="shared memory per rank, training", value=_gb(train_shm),
                          source=f"transfer.ShmNeed: {train_need.describe()}"))
    figures.append(Figure(name="shared memory per rank, dump", value=_gb(dump_shm),
                          source=f"transfer.ShmNeed: {dump_need.describe()}"))
    return Plan(rows=rows, shards=shards, bytes_per_view=bpv, bytes_per_sample=bps, cache_bytes=cache_bytes,
                disk_ratio=disk_ratio, dump_seconds=dump_seconds, epoch_seconds=epoch_seconds,
                train_shm_bytes=train_shm, dump_shm_bytes=dump_shm, read_bytes_per_s=read, figures=tuple(figures))


def _gb(n: float) -> str:
    return transfer.fmt_bytes(n)


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no measured rate: give one)"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(p: PlanInputs, plan: Plan) -> str:
    head = (f"plan: {p.samples:,} samples x {p.views} views, {p.classes} classes, codec {p.codec}, {p.epochs} epochs, "
            f"{p.ranks} rank(s), {p.workers} workers and batch {p.batch_size} per rank, {p.image_size} px")
    width = max(len(f.name) for f in plan.figures)
    lines = [head] + [f"  {f.name:<{width}}  {f.value}\n  {'':<{width}}  ({f.source})" for f in plan.figures]
    return "\n".join(lines)


def as_dict(p: PlanInputs, plan: Plan) -> dict:
    d = dataclasses.asdict(plan)
    d["inputs"] = dataclasses.asdict(p)
    return d
