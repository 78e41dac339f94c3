"""Shards and caches on object storage, against a real S3 server: moto's, started here on 127.0.0.1.

Every test gets its own bucket; the endpoint and credentials reach the code only through the standard AWS
environment variables, as on a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache import store as store_mod
from dkd_cache.cache_writer import open_writer
from dkd_cache.cli import app
from dkd_cache.data import expand_shards, iter_raw_samples, parse_sample, scan_shard
from dkd_cache.dump import dump_teacher
from dkd_cache.errors import BadSampleError, CacheError, CacheLockedError, RemoteReadError, ShardError, ShardNotFoundError
from dkd_cache.verify import VerifySettings, verify

from .conftest import dump_settings
from .helpers import assert_caches_equal, sample_members, write_tar
from .test_cache_writer import SIZES, add_shard, run_killed, spec_for, synthetic_cache, write_synthetic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()

    def restart(self):
        """A new server on the same port; the objects live in moto's process-wide state and come back."""
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    srv = S3Server()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket; the AWS environment points at the local server (and nothing else)."""
    # AWS_MAX_ATTEMPTS=1: botocore does not retry on its own, so the tests see our retries (and stay fast)
    for k, v in {**AWS_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    name = f"dkd-{uuid.uuid4().hex[:12]}"
    store_mod.object_fs().mkdir(name)
    return name


def upload_shards(shards: dict, bucket: str, split: str = "train") -> list[str]:
    fs = store_mod.object_fs()
    urls = []
    for p in shards[split]:
        url = f"s3://{bucket}/data/{split}/{Path(p).name}"
        fs.put_file(str(p), url[len("s3://"):])
        urls.append(url)
    return urls


def remote_settings(shards, teacher, out: str, urls: list[str], **kw):
    """The session cache's settings (tests/conftest.py), shards and cache on S3."""
    return dataclasses.replace(dump_settings(shards, teacher, out, **kw), shards=urls)


# ============================================================================================== reads
def test_shards_from_s3_read_exactly_like_local_ones(shards, bucket, tmp_path):
    urls = upload_shards(shards, bucket)
    local = [str(p) for p in shards["train"]]
    names = sorted(Path(u).name for u in urls)
    stem = names[0].rsplit("-", 1)[0]
    # a brace pattern, a glob, a folder, and a listing file (on S3, with relative lines) all give the same urls
    pattern = f"s3://{bucket}/data/train/{stem}-{{000000..{len(names) - 1:06d}}}.tar"
    assert expand_shards(pattern) == sorted(urls)
    assert expand_shards(f"s3://{bucket}/data/train/*.tar") == sorted(urls)
    assert expand_shards(f"s3://{bucket}/data/train/") == sorted(urls)
    store_mod.object_fs().pipe_file(f"{bucket}/data/train.txt", "\n".join(f"train/{n}" for n in names).encode())
    assert expand_shards(f"s3://{bucket}/data/train.txt") == sorted(urls)
    listing = tmp_path / "remote.txt"  # a local listing of remote urls
    listing.write_text("\n".join(sorted(urls)))
    assert expand_shards(str(listing)) == sorted(urls)

    for url, path in zip(sorted(urls), sorted(local)):
        remote = list(iter_raw_samples(url))
        here = list(iter_raw_samples(path))
        assert [{k: v for k, v in r.items() if k != "__shard__"} for r in remote] == \
               [{k: v for k, v in r.items() if k != "__shard__"} for r in here]
        assert scan_shard(url) == scan_shard(path).__class__(**{**scan_shard(path).__dict__, "url": url})


def test_remote_shard_errors_name_the_object(shards, bucket, tmp_path):
    fs = store_mod.object_fs()
    with pytest.raises(ShardNotFoundError, match="not found"):
        expand_shards(f"s3://{bucket}/data/train-{{000000..000002}}.tar")
    with pytest.raises(ShardNotFoundError, match="not found"):
        list(iter_raw_samples(f"s3://{bucket}/nothing.tar"))
    # a truncated shard: the same strict error as on local disk, naming the url and the last good sample
    members = [m for i in range(6) for m in sample_members(f"k{i:03d}", i % 3, seed=i)]
    tar = write_tar(tmp_path / "whole.tar", members).read_bytes()
    fs.pipe_file(f"{bucket}/cut.tar", tar[: len(tar) // 2 + 100])
    with pytest.raises(ShardError, match=rf"s3://{bucket}/cut.tar: tar is truncated or corrupt after sample 'k00"):
        list(iter_raw_samples(f"s3://{bucket}/cut.tar"))
    # a duplicate key: the same skippable BadSampleError as local, raised when the sample is parsed
    fs.pipe_file(f"{bucket}/dup.tar", write_tar(tmp_path / "dup.tar", members[:4] + members[:2]).read_bytes())
    with pytest.raises(BadSampleError, match="duplicate key"):
        [parse_sample(raw) for raw in iter_raw_samples(f"s3://{bucket}/dup.tar")]


def test_a_transient_outage_is_retried_and_a_lasting_one_is_named(shards, bucket, s3_server, monkeypatch):
    from dkd_cache import remote_shards

    (url,) = upload_shards({"train": shards["train"][:1]}, bucket)
    whole = Path(shards["train"][0]).read_bytes()
    monkeypatch.setattr(remote_shards, "BACKOFF_S", 0.4)
    monkeypatch.setattr(remote_shards, "BLOCK_BYTES", 4096)  # one ranged GET per 4 KiB: the outage hits mid-shard

    # the server goes away after the first block and comes back 1 s later: the read resumes where it stopped
    reader = remote_shards.RetryingReader(url)
    first = reader.read(4096)
    s3_server.stop()
    threading.Timer(1.0, s3_server.restart).start()
    rest = b"".join(iter(lambda: reader.read(65536), b""))
    assert first + rest == whole and reader.failures >= 1

    # it goes away for good in the middle of the shard: the error names the url, the member and the attempts
    monkeypatch.setattr(remote_shards, "ATTEMPTS", 3)
    monkeypatch.setattr(remote_shards, "BACKOFF_S", 0.05)
    stream = iter_raw_samples(url)
    next(stream)
    s3_server.stop()
    try:
        with pytest.raises(RemoteReadError) as err:
            list(stream)
    finally:
        s3_server.restart()
    e = err.value
    assert e.url == url and e.attempts == 3 and "member" in str(e) and "failed 3 times" in str(e)
    assert isinstance(e, ShardError) and isinstance(e, ConnectionError)


# ============================================================================================== the cache
def test_dump_to_s3_equals_the_local_cache_and_other_readers_read_it(shards, teacher_ckpt, cache_path, bucket,
                                                                     s3_server):
    urls = upload_shards(shards, bucket)
    out = f"s3://{bucket}/caches/c.zarr"
    report = dump_teacher(remote_settings(shards, teacher_ckpt, out, urls), progress=False)
    assert report.complete
    cache = cache_mod.open_cache(out)
    assert cache.meta.state == "complete" and cache.pending_shards() == []
    assert_caches_equal(cache_path, out)
    fs = store_mod.object_fs()
    assert not fs.exists(f"{bucket}/caches/c.zarr/_dkd/lease.json"), "the lease is released at the end"
    assert not fs.exists(f"{bucket}/caches/c.zarr/{store_mod.CREATING}")
    # a rerun is a no-op
    again = dump_teacher(remote_settings(shards, teacher_ckpt, out, urls), progress=False)
    assert again.complete and again.views_written == 0
    # inspect and verify read it where it is
    r = CliRunner().invoke(app, ["inspect", out, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["state"] == "complete" and info["shards_done"] == 4 and info["bytes_on_disk"] > 0
    report = verify(VerifySettings(cache=out, shards=urls, weights=str(teacher_ckpt), samples=8,
                                   live_cosine_tol=-1.0, live_p5_tol=-1.0, live_loss_tol=100.0))  # topk:4: lossy
    assert report["passed"], report["failures"]
    # another Zarr v3 implementation reads every array straight from the bucket: tensorstore's S3 driver
    import tensorstore as ts

    local = zarr.open_group(str(cache_path), mode="r")
    for group in ("samples", "views", "logits"):
        for name, _ in local[group].members():
            kvstore = {"driver": "s3", "bucket": bucket, "path": f"caches/c.zarr/{group}/{name}/",
                       "endpoint": s3_server.endpoint, "aws_region": "us-east-1"}
            spec = {"driver": "zarr3", "kvstore": kvstore}
            got = ts.open(spec).result().read().result()
            want = local[f"{group}/{name}"][...]
            assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), f"{group}/{name}"


def test_a_live_lease_refuses_a_second_dump_and_a_stale_one_is_taken_over(shards, teacher_ckpt, bucket):
    urls = upload_shards(shards, bucket)
    out = f"s3://{bucket}/c.zarr"
    loc = store_mod.location(out)
    first = store_mod.acquire_lease(loc, seconds=60)  # another dump holds the cache (never renewed here)
    with pytest.raises(CacheLockedError, match="being written by another dump-teacher"):
        dump_teacher(remote_settings(shards, teacher_ckpt, out, urls), progress=False)
    assert not loc.exists("zarr.json"), "a refused dump writes nothing"
    first.check()  # still the holder

    stale = store_mod.acquire_lease(store_mod.location(f"s3://{bucket}/d.zarr"), seconds=0.5)
    time.sleep(0.6)  # its holder died: nobody renews it
    report = dump_teacher(remote_settings(shards, teacher_ckpt, f"s3://{bucket}/d.zarr", urls,
                                          lease_seconds=5), progress=False)
    assert report.complete
    with pytest.raises(CacheLockedError, match="lost its writer lease"):
        stale.check()  # the old holder, were it alive, would commit nothing more
    stale.renew()  # nor could it renew: its If-Match names an ETag that is gone
    assert stale.lost is not None


def test_a_renewed_lease_outlives_its_term_and_is_released_at_the_end(bucket):
    loc = store_mod.location(f"s3://{bucket}/r.zarr")
    with loc.writer_lease(seconds=1.5) as lease:
        time.sleep(2.5)  # longer than one term: only the renewals keep it
        with pytest.raises(CacheLockedError, match="being written by another dump-teacher"):
            store_mod.acquire_lease(loc, seconds=1.5)
        lease.check()
    assert not loc.exists(store_mod.LEASE)
    store_mod.acquire_lease(loc, seconds=1.5).release()


def _cli_dump(shards, teacher, out: str, urls: list[str], *extra) -> list[str]:
    """The session cache's settings as a dump-teacher command line (a fresh process, killable for real)."""
    listing = Path(teacher).parent / "remote-shards.txt"
    listing.write_text("\n".join(urls))
    return [sys.executable, "-m", "dkd_cache", "dump-teacher", "--shards", str(listing), "--weights", str(teacher),
            "--out", out, "--arch", "resnet18", "--views", "2", "--codec", "topk:4", "--temperature", "1",
            "--temperature", "4", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--chunk-rows", "8",
            "--no-progress", *extra]


def _kill_when(cmd: list[str], ready, timeout: float = 240) -> None:
    """Start the command and SIGKILL it the moment `ready()` sees the state we want to cut it in."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the dump ended (rc {proc.returncode}) before the kill point: {proc.stdout.read()!r}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point never came")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_dump_killed_on_s3_then_rerun_equals_uninterrupted(shards, teacher_ckpt, cache_path, bucket):
    """kill -9 during creation and after a shard's record; the killed dump's lease refuses reruns until it
    lapses, then a rerun takes it over; the result equals an uninterrupted dump, array for array."""
    urls = upload_shards(shards, bucket)
    out = f"s3://{bucket}/k.zarr"
    loc = store_mod.location(out)
    lease_s = 8.0
    cmd = _cli_dump(shards, teacher_ckpt, out, urls, "--lease-seconds", str(lease_s))
    settings = remote_settings(shards, teacher_ckpt, out, urls, lease_seconds=lease_s)

    # 1. killed during creation: the 'creating' marker is there, no cache opens
    _kill_when(cmd, lambda: loc.exists(store_mod.CREATING))
    killed_at = time.monotonic()
    with pytest.raises(CacheError, match="creation was cut short"):
        cache_mod.open_cache(out)
    # a rerun while the killed dump's lease is still live is refused, and writes nothing
    with pytest.raises(CacheLockedError, match="being written by another dump-teacher"):
        dump_teacher(settings, progress=False)
    assert time.monotonic() - killed_at < lease_s, "the refusal must come while the lease is live"

    # 2. once the lease lapsed, a rerun takes it over, re-creates the cache, and is killed after one shard
    time.sleep(max(0.0, killed_at + lease_s + 0.5 - time.monotonic()))
    _kill_when(cmd, lambda: len(loc.keys("_dkd/done")) >= 1)
    killed_at = time.monotonic()
    done = loc.keys("_dkd/done")
    assert 1 <= len(done) < 4 and cache_mod.open_cache(out).meta.state == "writing"

    # 3. the next run (after the lapse) completes only what is missing; the result equals an uninterrupted dump
    time.sleep(max(0.0, killed_at + lease_s + 0.5 - time.monotonic()))
    report = dump_teacher(settings, progress=False)
    manifest = cache_mod.open_cache(out).meta.manifest
    assert report.complete
    assert report.views_written == 2 * (manifest.samples - sum(manifest.shards[int(d[:6])].samples for d in done))
    assert_caches_equal(cache_path, out)
    assert not loc.exists(store_mod.LEASE) and not loc.exists(store_mod.CREATING)



def test_writer_killed_on_s3_then_rerun_equals_uninterrupted(bucket, tmp_path):
    """The writer alone (synthetic logits, no teacher) on the object store: kill -9 inside a chunk write; its lease
    refuses a rerun while live; once lapsed a rerun takes it over and completes; equal to an uninterrupted write."""
    local = tmp_path / "whole.zarr"
    assert write_synthetic(str(local))
    out = f"s3://{bucket}/w.zarr"
    lease_s = 6.0
    run_killed(out, die_at=60, lease_seconds=lease_s)
    killed_at = time.monotonic()
    with pytest.raises(CacheLockedError, match="being written by another dump-teacher"):
        write_synthetic(out, lease_seconds=lease_s)
    assert time.monotonic() - killed_at < lease_s, "the refusal must come while the lease is live"
    loc = store_mod.location(out)
    assert 1 <= len(loc.keys("_dkd/done")) < len(SIZES)
    time.sleep(max(0.0, killed_at + lease_s + 0.5 - time.monotonic()))
    assert write_synthetic(out, lease_seconds=lease_s)
    assert_caches_equal(local, out)
    assert not loc.exists(store_mod.LEASE)


def test_a_writer_that_lost_its_lease_commits_nothing_more(bucket):
    """The lease is checked before each commit: once another process took it over, a whole shard's done record is
    not written and the writer ends in CacheLockedError, not with a cache two writers wrote."""
    out = f"s3://{bucket}/lost.zarr"
    loc = store_mod.location(out)
    with pytest.raises(CacheLockedError, match="lost its writer lease"):
        with open_writer(spec_for(out, synthetic_cache(), lease_seconds=60)) as writer:
            loc.put(store_mod.LEASE, json.dumps({"owner": "another-dump", "expires": time.time() + 60}).encode())
            add_shard(writer, writer.my_shards()[0])
            writer.close()
    assert loc.keys("_dkd/done") == [] and cache_mod.open_cache(out).meta.state == "writing"


def _two_nodes(args: list[str], timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --nproc_per_node 2 --rdzv-backend c10d` twice on this machine, on loopback: two node
    agents standing in for two machines, four ranks in all."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex[:8],
           "--local-addr", "127.0.0.1", "-m", "dkd_cache", *args]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-node run did not finish in time")
        outs.append(subprocess.CompletedProcess(cmd, p.returncode, out, ""))
    return outs


@pytest.mark.slow
def test_two_node_torchrun_dump_and_train_with_shards_and_cache_on_s3(shards, teacher_ckpt, cache_path, bucket,
                                                                      tmp_path):
    urls = upload_shards(shards, bucket)
    out = f"s3://{bucket}/nodes.zarr"
    dump_args = _cli_dump(shards, teacher_ckpt, out, urls)[3:]  # without `python -m dkd_cache`
    runs = _two_nodes(dump_args)
    assert all(r.returncode == 0 for r in runs), "\n".join(r.stdout[-3000:] for r in runs)
    # the dump ended only once the cache was complete: every shard recorded, rank 0 says so
    assert cache_mod.open_cache(out).pending_shards() == [] and cache_mod.open_cache(out).meta.state == "complete"
    assert any("cache complete" in r.stdout for r in runs), "\n".join(r.stdout[-3000:] for r in runs)
    # four ranks, one whole shard each; the cache equals the one-process dump, array for array
    assert_caches_equal(cache_path, out)
    assert not store_mod.location(out).exists(store_mod.LEASE)

    run = tmp_path / "run"
    listing = Path(teacher_ckpt).parent / "remote-shards.txt"
    runs = _two_nodes(["train-student", "--shards", str(listing), "--cache", out, "--out", str(run),
                       "--epochs", "1", "--batch-size", "20", "--lr", "0.05", "--workers", "0", "--no-progress"])
    assert all(r.returncode == 0 for r in runs), "\n".join(r.stdout[-3000:] for r in runs)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    # 80 samples in shards of 25/25/25/5 over 4 ranks: one shard each, padded to 25; 5 per rank per step
    assert len(epoch["rank_steps"]) == 4 and len(set(epoch["rank_steps"])) == 1
    assert epoch["samples"] == 100 and epoch["padding"] == 20
    steps = [r for r in records if r["event"] == "step"]
    assert steps and all(np.isfinite(r["dkd"]) and r["dkd"] > 0 for r in steps), "DKD from the remote cache"


@pytest.mark.slow
def test_a_rank_that_lists_late_still_gets_its_share_and_the_dump_completes(shards, teacher_ckpt, cache_path,
                                                                            bucket):
    """Rank 1 is slow: it lists the done records only after rank 0 recorded its first shard (on a loaded
    machine this happens by itself). Every rank must still dump from one plan: each shard once, the cache
    complete when the dump ends, equal to the one-process dump. (Each rank once split its own listing: rank 1
    then took shard 2, which rank 0 also had, and shards 1 and 3 were dumped by nobody.)"""
    urls = upload_shards(shards, bucket)
    out = f"s3://{bucket}/late.zarr"
    harness = Path(__file__).with_name("fault_harness.py")  # the real CLI with the fault below on rank 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(harness),
           *_cli_dump(shards, teacher_ckpt, out, urls)[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "DKD_FAULT": json.dumps({"late_listing": 120, "rank": 1})}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "cache complete" in r.stdout, r.stdout[-3000:]
    cache = cache_mod.open_cache(out)
    assert cache.meta.state == "complete" and cache.pending_shards() == []
    records = [cache.shard_record(i) for i in range(4)]
    assert [rec["shard"] for rec in records] == [e.name for e in cache.meta.manifest.shards]
    assert_caches_equal(cache_path, out)


def test_a_chunk_written_after_a_listing_is_found_not_called_missing(bucket):
    """One process reads a cache (its chunk listing is cached per array) while another writes a chunk: the
    reader must find the new chunk, never report it missing because its listing is older than the chunk."""
    url = f"s3://{bucket}/live.zarr"
    reader, writer = store_mod.location(url), store_mod.location(url)
    writer.put("logits/lse/c/0/0/0", b"first")
    assert reader.chunk_exists("logits/lse/c/0/0/0")  # lists logits/lse/c once
    assert not reader.chunk_exists("logits/lse/c/0/1/0")
    writer.put("logits/lse/c/0/1/0", b"second")  # another process's write, after the reader's listing
    assert reader.chunk_exists("logits/lse/c/0/1/0")
    assert reader.chunk_exists("logits/lse/c/0/0/0") and not reader.chunk_exists("logits/lse/c/0/2/0")
    writer.put("logits/lse/c/0/2/0", b"third")
    assert reader.chunk_exists("logits/lse/c/0/2/0")


def test_checkpoints_go_to_the_store_whole_and_a_fresh_machine_resumes_from_there(shards, cache_path, bucket,
                                                                                  tmp_path):
    from dkd_cache.checkpoint import read_checkpoint
    from dkd_cache.train import TrainConfig, train_student

    url = f"s3://{bucket}/runs/r18"

    def config(out: Path, epochs: int) -> TrainConfig:
        return TrainConfig(shards=str(Path(shards["train"][0]).parent), out=str(out), cache=str(cache_path),
                           checkpoint_url=url, arch="resnet18", epochs=epochs, batch_size=16, lr=0.05, lr_batch=16,
                           workers=0, shuffle_buffer=16)

    first = tmp_path / "run"
    train_student(config(first, 1), progress=False)
    assert _epochs(first) == [0]
    local = (first / "checkpoint.pt").read_bytes()
    assert store_mod.location(url).read("checkpoint.pt") == local, "the store holds the whole last checkpoint"

    # another machine: the run directory is not there; --resume continues from the store's copy
    shutil.rmtree(first)
    second = first
    train_student(config(second, 2), resume=True, progress=False)
    assert _epochs(second) == [1], "only the second epoch ran"
    assert read_checkpoint(second / "checkpoint.pt")["epoch"] == 2
    assert store_mod.location(url).read("checkpoint.pt") == (second / "checkpoint.pt").read_bytes()


def _epochs(run: Path) -> list[int]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["epoch"] for r in records if r["event"] == "epoch"]
