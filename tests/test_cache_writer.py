"""The cache writer driven without a teacher: synthetic logits through CacheWriter, killed and rerun, refused while
another writer holds the lease, refused on a read-only path, and a learned codec fitted through its hook.

Also the child process of the kill tests (here and in tests/test_s3.py):
    python -m tests.test_cache_writer OUT DIE_AT LEASE_SECONDS
writes the synthetic cache to OUT and SIGKILLs itself half way through its DIE_AT-th chunk-file write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dkd_cache import FORMAT_VERSION
from dkd_cache import cache as cache_mod
from dkd_cache import store as store_mod
from dkd_cache.cache_meta import STATUS_OK, STATUS_SKIPPED, CacheMeta, CacheState, build_manifest
from dkd_cache.cache_writer import Calibrated, CacheWriter, LogitRows, NewCache, SampleRow, WriterSpec, open_writer
from dkd_cache.data import ShardIndex
from dkd_cache.errors import CacheError, CacheLockedError, CacheMismatchError, ConfigError
from dkd_cache.logit_codecs import parse_codec
from dkd_cache.teacher import TeacherInfo
from dkd_cache.teacher_signal import LSE, TARGET, Storage, encode_entries
from dkd_cache.views import Recipe

from .helpers import assert_caches_equal

ROOT = Path(__file__).resolve().parents[1]
CLASSES, VIEWS, CHUNK = 10, 3, 4
SIZES = (7, 5, 9, 4)  # samples per tar shard
SKIPPED = {(1, 2): "image cannot be decoded (synthetic)"}  # (shard, pos) -> reason


def synthetic_cache(codec: str = "topk:4", seed: int = 0) -> NewCache:
    """What a dump of four synthetic tar shards would create (no shard file, no teacher)."""
    indexes = tuple(ShardIndex(url=f"synthetic/s{i}.tar", name=f"s{i}.tar",
                               keys=tuple(f"s{i}-{j:03d}" for j in range(n)),
                               labels=tuple((i + j) % CLASSES for j in range(n)),
                               bad=tuple((j, r) for (s, j), r in SKIPPED.items() if s == i))
                    for i, n in enumerate(SIZES))
    meta = CacheMeta(format_version=FORMAT_VERSION,
                     teacher=TeacherInfo(arch="synthetic", sha256="0" * 64, num_classes=CLASSES,
                                         source_format="dkd-cache"),
                     recipe=Recipe(image_size=32), seed=seed, views=VIEWS, codec=parse_codec(codec, CLASSES),
                     temperatures=(1.0, 4.0), chunk_rows=CHUNK, manifest=build_manifest(indexes, CHUNK),
                     versions={"dkd_cache": "synthetic"})
    return NewCache(meta=meta, indexes=indexes)


def synthetic_logits(shard: int, pos: int, view: int) -> np.ndarray:
    return np.random.default_rng([shard, pos, view]).normal(size=CLASSES).astype(np.float32) * 4


def spec_for(out: str, new: NewCache, **kw) -> WriterSpec:
    return WriterSpec(out=out, meta=new.meta, scan=lambda: new.indexes, **kw)


def write_synthetic(out: str, *, lease_seconds: float = 120.0, batch: int = 5, plan=synthetic_cache,
                    calibrate=None) -> bool:
    """Every pending shard through the writer, then close: whether the cache is complete."""
    with open_writer(spec_for(out, plan(), calibrate=calibrate, lease_seconds=lease_seconds)) as writer:
        for shard in writer.my_shards():
            add_shard(writer, shard, batch)
        return writer.close()


def add_shard(writer: CacheWriter, shard: int, batch: int = 5) -> None:
    """A shard's samples, then its views' synthetic logits in teacher batches of `batch` views."""
    storage = Storage(codec=writer.codec, num_classes=CLASSES, temperatures=writer.meta.temperatures)
    entry = writer.meta.manifest.shards[shard]
    for pos in range(entry.samples):
        writer.add_sample(SampleRow(shard=shard, pos=pos, boxes=np.full((VIEWS, 4), pos + 1, np.uint16),
                                    flips=np.arange(VIEWS, dtype=np.uint8) % 2, height=40 + pos, width=50 + shard,
                                    skipped=SKIPPED.get((shard, pos))))
    views = [(p, v) for p in range(entry.samples) if (shard, p) not in SKIPPED for v in range(VIEWS)]
    for i in range(0, len(views), batch):
        part = views[i:i + batch]
        z = torch.from_numpy(np.stack([synthetic_logits(shard, p, v) for p, v in part]))
        stored = encode_entries(z, torch.tensor([(shard + p) % CLASSES for p, _ in part]), storage)
        writer.add_logits(LogitRows(shard=shard, pos=np.array([p for p, _ in part]),
                                    view=np.array([v for _, v in part]), target=stored.pop(TARGET).numpy(),
                                    lse=stored.pop(LSE).numpy(),
                                    encoded={k.split("/", 1)[1]: v.numpy() for k, v in stored.items()}))


def die_at_chunk_write(n: int) -> None:
    """SIGKILL this process half way through its n-th chunk-file write (on disk: a torn temporary file)."""
    count = [0]
    real_disk, real_object = store_mod.DiskLocation.write_files, store_mod.ObjectLocation.write_files

    def disk(self, files):
        for key, data in files.items():
            count[0] += 1
            if count[0] == n:
                path = self.path / key
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(f"{path}.{os.getpid()}.partial", "wb") as f:
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real_disk(self, {key: data})

    def objects(self, files):
        for key, data in files.items():
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            real_object(self, {key: data})

    store_mod.DiskLocation.write_files = disk
    store_mod.ObjectLocation.write_files = objects


def run_killed(out: str, die_at: int, lease_seconds: float = 120.0) -> subprocess.CompletedProcess:
    """The synthetic write in a child process, SIGKILLed in its die_at-th chunk-file write."""
    proc = subprocess.run([sys.executable, "-m", "tests.test_cache_writer", out, str(die_at), str(lease_seconds)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return proc


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("writer") / "whole.zarr"
    assert write_synthetic(str(out))
    return out


def test_synthetic_cache_holds_what_was_added(uninterrupted):
    cache = cache_mod.open_cache(uninterrupted)
    m = cache.meta
    assert m.state is CacheState.COMPLETE and [f for f in cache.check(deep=True) if not f.ok and not f.warning] == []
    status = cache.read_rows("samples/status", 0, m.manifest.rows)
    e1 = m.manifest.shards[1]
    assert status[e1.row_start + 2] == STATUS_SKIPPED and (status[e1.row_start:e1.row_start + 2] == STATUS_OK).all()
    assert [(s.shard, s.key) for s in m.skipped] == [("s1.tar", "s1-002")]
    e2 = m.manifest.shards[2]
    target = cache.read_rows("logits/target", e2.row_start, e2.row_stop, view=1)
    assert target[3] == synthetic_logits(2, 3, 1)[(2 + 3) % CLASSES]
    assert cache.read_rows("samples/height", e2.row_start, e2.row_stop)[4] == 44


def test_writer_killed_mid_write_then_rerun_equals_uninterrupted(uninterrupted, tmp_path):
    """kill -9 inside a chunk-file write, twice (the second run continues the first), then a rerun completes
    exactly the shards without a done record; the cache equals an uninterrupted write, array for array."""
    out = str(tmp_path / "killed.zarr")
    run_killed(out, die_at=3)
    cache = cache_mod.open_cache(out)
    assert cache.meta.state is CacheState.WRITING and len(cache.pending_shards()) == len(SIZES)
    run_killed(out, die_at=60)  # 96 chunk files in all: the first shards have their done records by then
    done = store_mod.location(out).keys("_dkd/done")
    assert 1 <= len(done) < len(SIZES)
    assert write_synthetic(out)
    assert_caches_equal(uninterrupted, out)
    assert not list(Path(out).rglob("*.partial"))


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(tmp_path):
    out = str(tmp_path / "c.zarr")
    new, scans = synthetic_cache(), []
    second = WriterSpec(out=out, meta=new.meta, scan=lambda: scans.append(out) or new.indexes)
    with open_writer(spec_for(out, new)):
        with pytest.raises(CacheLockedError, match="being written by another dump-teacher"):
            with open_writer(second):
                pass
    assert scans == []  # refused before its scan: the scan runs under the lease
    assert write_synthetic(out)  # the lease went with the first writer


def test_a_cache_made_with_other_settings_is_refused(uninterrupted):
    with pytest.raises(CacheMismatchError, match="seed: cache has 0, this run has 1"):
        write_synthetic(str(uninterrupted), plan=lambda: synthetic_cache(seed=1))


def test_a_learned_codec_is_fitted_through_the_hook_once(tmp_path):
    """The writer never builds a teacher: it calls the fit it is given, when it creates the cache only."""
    out = str(tmp_path / "lowrank.zarr")
    fits = []

    def fit(new: NewCache):
        fits.append(new.meta.manifest.samples)
        z = torch.from_numpy(np.stack([synthetic_logits(9, p, 0) for p in range(64)]))
        return Calibrated(codec=new.meta.codec.fit(z))

    plan = lambda: synthetic_cache(codec="lowrank:4+top:2")  # noqa: E731
    with pytest.raises(ConfigError, match="needs a fit"):
        write_synthetic(out, plan=plan)
    assert write_synthetic(out, plan=plan, calibrate=fit)
    assert write_synthetic(out, plan=plan, calibrate=fit)  # a rerun keeps the stored basis: no second fit
    assert fits == [sum(SIZES)]
    assert cache_mod.open_cache(out).codec.name == "lowrank:4+top:2"


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    try:  # root writes through permissions; /sys is read-only for everyone
        (Path("/sys") / ".dkd-probe").mkdir()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder on this machine")


def test_a_read_only_out_is_a_cache_error_naming_the_path_and_the_fix(tmp_path):
    out = str(_read_only_dir(tmp_path) / "c.zarr")
    with pytest.raises(CacheError, match=r"c\.zarr: cannot write .*choose a writable --out"):
        write_synthetic(out)


if __name__ == "__main__":  # the child of run_killed
    die_at_chunk_write(int(sys.argv[2]))
    write_synthetic(sys.argv[1], lease_seconds=float(sys.argv[3]))
    sys.exit(3)  # not killed: the test fails on the return code
