"""/dev/shm checked before the first batch: a ring it cannot hold is a SharedMemoryError naming the bytes and the fix,
never torch's raw shared-memory RuntimeError, a SemLock OSError or a SIGBUS mid-epoch."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dkd_cache import transfer
from dkd_cache.cli import app
from dkd_cache.errors import SharedMemoryError
from dkd_cache.transfer import ShmNeed, TransferRing, check_shared_memory, start_workers

runner = CliRunner()


def test_ring_size_is_workers_times_slots_times_a_slot_plus_fallback_and_queues():
    need = ShmNeed(workers=12, slots=6, slot_shape=(64, 3, 224, 224))
    assert need.slot_bytes == 64 * 3 * 224 * 224
    assert need.ring_bytes == 12 * 6 * 64 * 3 * 224 * 224
    assert need.rank_bytes == need.ring_bytes + 12 * (need.slot_bytes + transfer.SHM_RESERVE_PER_WORKER) \
        + transfer.SHM_RESERVE


def test_a_ring_shm_cannot_hold_is_refused_before_any_allocation(monkeypatch):
    def no_allocation(*a, **k):
        raise AssertionError("the ring allocated shared memory although /dev/shm cannot hold it")

    monkeypatch.setattr(transfer, "shared_empty", no_allocation)
    with pytest.raises(SharedMemoryError) as e:
        TransferRing(2, 4, (8, 3, 32, 32), shm_free=lambda: 64 << 10)
    msg = str(e.value)
    need = ShmNeed(workers=2, slots=4, slot_shape=(8, 3, 32, 32))
    assert transfer.fmt_bytes(need.rank_bytes) in msg and "64.0 KiB free" in msg
    assert "--workers" in msg and "--shm-size" in msg
    assert isinstance(e.value, OSError)  # catchable as the built-in too


def test_every_rank_on_the_host_is_counted(monkeypatch):
    need = ShmNeed(workers=1, slots=2, slot_shape=(4, 3, 8, 8))
    check_shared_memory(need, lambda: need.rank_bytes)  # exactly enough for one rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(SharedMemoryError, match="x 8 ranks on this host"):
        check_shared_memory(need, lambda: need.rank_bytes)
    check_shared_memory(need, lambda: 8 * need.rank_bytes)


def test_shm_dir_is_read_with_statvfs(tmp_path, monkeypatch):
    """The real free-space function: pointed at another folder, it reads that filesystem's free bytes."""
    st = os.statvfs(tmp_path)
    monkeypatch.setattr(transfer, "SHM_DIR", str(tmp_path))
    free = transfer.shm_free_bytes()
    assert free is not None and abs(free - st.f_bavail * st.f_frsize) < (64 << 20)
    monkeypatch.setattr(transfer, "SHM_DIR", str(tmp_path / "absent"))
    assert transfer.shm_free_bytes() is None  # no /dev/shm to ask: the allocation's own error is translated


def test_a_semlock_or_raw_torch_error_at_worker_start_is_typed():
    class Loader:
        def __init__(self, e):
            self.e = e

        def __iter__(self):
            raise self.e

    need = ShmNeed(workers=2, slots=3, slot_shape=(4, 3, 8, 8))
    with pytest.raises(SharedMemoryError, match="No space left.*--shm-size"):
        start_workers(Loader(OSError(errno.ENOSPC, "No space left on device")), need)
    with pytest.raises(SharedMemoryError, match="unable to allocate shared memory"):
        start_workers(Loader(RuntimeError("unable to allocate shared memory(shm) for file </torch_1>")), None)
    with pytest.raises(PermissionError):  # anything else passes as it is
        start_workers(Loader(PermissionError(errno.EACCES, "denied")), need)


def test_dump_with_workers_on_a_small_shm_fails_before_the_first_batch(shards, teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "shm_free_bytes", lambda path=None: 64 << 10)  # Docker's 64 MB, scaled down
    out = tmp_path / "c.zarr"
    r = runner.invoke(app, ["dump-teacher", "--shards", str(Path(shards["train"][0]).parent), "--weights",
                            str(teacher_ckpt), "--out", str(out), "--arch", "resnet18", "--views", "2", "--codec",
                            "topk:4", "--workers", "2", "--batch-size", "16", "--image-size", "32"])
    assert r.exit_code == 2, r.output
    assert "64.0 KiB free" in r.output and "--shm-size" in r.output and "Traceback" not in r.output
    assert not list(out.glob("_dkd/done/*.json"))  # refused before any shard was written


def test_training_loader_on_a_small_shm_fails_before_the_first_batch(shards, cache_path, monkeypatch):
    from dkd_cache import cache as cache_mod
    from dkd_cache.data import expand_shards
    from dkd_cache.loader import StreamSpec, make_loader, plan_epoch

    from .conftest import CLASSES

    monkeypatch.setattr(transfer, "shm_free_bytes", lambda path=None: 1 << 20)
    cache = cache_mod.open_cache(cache_path)
    urls = expand_shards(str(Path(shards["train"][0]).parent))
    spec = StreamSpec(urls=tuple(urls), recipe=cache.meta.recipe, seed=0, epoch=0, view=0, rank=0,
                      cache_path=str(cache_path), entry_arrays=("views/box", "views/flip"), num_classes=CLASSES,
                      shuffle_buffer=16, block=64)
    plan = plan_epoch([s.samples for s in cache.meta.manifest.shards], seed=0, epoch=0, world=1, rank=0, workers=2)
    with pytest.raises(SharedMemoryError, match="1.0 MiB free"):
        make_loader(spec, plan, [0, 0], 2)


def _can_mount_tmpfs() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare to mount a small /dev/shm")
def test_a_real_64k_dev_shm_ends_in_the_named_error(shards, teacher_ckpt, tmp_path):
    """As a new user meets it in a container: /dev/shm really 64 KiB (a private mount namespace)."""
    out = tmp_path / "c.zarr"
    cmd = (f"mount -t tmpfs -o size=64k tmpfs /dev/shm && exec {sys.executable} -m dkd_cache dump-teacher "
           f"--shards {Path(shards['train'][0]).parent} --weights {teacher_ckpt} --out {out} --arch resnet18 "
           "--views 2 --codec topk:4 --workers 2 --batch-size 16 --image-size 32")
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "/dev/shm has 64.0 KiB free" in r.stderr and "--shm-size" in r.stderr and "Traceback" not in r.stderr
