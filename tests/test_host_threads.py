"""dump-teacher's per-batch encode runs on one host thread, and the caller's thread settings come back after."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from dkd_cache.host_threads import one_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_one_thread_inside_and_restored_after(two_threads):
    blas_before = _blas_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
        assert all(n == 1 for n in _blas_threads())
        np.ones((64, 64)) @ np.ones((64, 64))  # BLAS work inside still runs
    assert torch.get_num_threads() == 2
    assert _blas_threads() == blas_before


def test_restored_when_the_work_raises(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with one_thread():
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_nested_inside_a_single_threaded_region(two_threads):
    with one_thread():
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
