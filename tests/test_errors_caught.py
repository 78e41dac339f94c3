"""Errors are caught for what they are: a damaged chunk is not a permission problem or a bug, and a peer that
died is not any message that mentions a backend."""

from __future__ import annotations

import errno

import pytest
import torch.distributed as dist

from dkd_cache import cache as cache_mod
from dkd_cache import dist as dist_mod


class _Failing:
    def __init__(self, arr, exc):
        self.arr, self.exc, self.ndim, self.shape = arr, exc, arr.ndim, arr.shape

    def __getitem__(self, key):
        raise self.exc


def test_read_rows_names_damage_io_errors_and_lets_bugs_through(cache_path, monkeypatch):
    cache = cache_mod.open_cache(cache_path)
    real = cache_mod.Cache.array

    def with_error(exc):
        monkeypatch.setattr(cache_mod.Cache, "array", lambda self, name: _Failing(real(self, name), exc))

    with_error(ValueError("Stored and computed checksum do not match"))
    with pytest.raises(cache_mod.CacheError, match="damaged"):
        cache.read_rows("samples/label", 0, 8)
    with_error(PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(cache_mod.CacheError, match="Permission denied") as e:
        cache.read_rows("samples/label", 0, 8)
    assert "damaged" not in str(e.value)
    with_error(TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        cache.read_rows("samples/label", 0, 8)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_peer_failure_is_recognised_by_what_happened_not_by_a_backend_name(one_rank_group):
    assert dist_mod.is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                                 "[127.0.0.1]:41234"))
    assert dist_mod.is_peer_failure(dist.DistNetworkError("connection reset"))
    for not_peer in (RuntimeError("NCCL error in: invalid usage (run with NCCL_DEBUG=WARN for details)"),
                     RuntimeError("gloo backend was asked for a CUDA tensor"),
                     ValueError("Connection closed by peer")):
        assert not dist_mod.is_peer_failure(not_peer), not_peer
