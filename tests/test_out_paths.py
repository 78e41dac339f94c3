"""dump-teacher --out: refused only where it would overwrite or be read as input."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from dkd_cache.dump import check_out_path, dump_teacher
from dkd_cache.errors import ConfigError

from .conftest import dump_settings


def test_a_cache_beside_or_below_its_shards_is_accepted(shards, teacher_ckpt, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(shards["train"][0]).parent, data)
    pattern = str(data / "train-*.tar")
    for out in (data / "r18.zarr", data / "caches" / "r18.zarr"):
        settings = dataclasses.replace(dump_settings(shards, teacher_ckpt, out, views=1), shards=pattern)
        r = dump_teacher(settings, progress=False)
        assert r.complete


def test_outputs_that_are_inputs_or_match_an_input_pattern_are_refused(shards, tmp_path):
    d = Path(shards["train"][0]).parent
    urls = [str(p) for p in sorted(d.glob("*.tar"))]
    with pytest.raises(ConfigError, match="input"):
        check_out_path(urls[0], urls, [str(d / "*.tar")])  # an input file
    with pytest.raises(ConfigError, match="input"):
        check_out_path(str(d), urls, [str(d)])  # the folder holding the inputs
    with pytest.raises(ConfigError, match="pattern"):
        check_out_path(str(d / "cache.tar"), urls, [str(d / "*.tar")])  # a later run would read it as a shard
    check_out_path(str(d / "cache.zarr"), urls, [str(d / "train-*.tar")])
    check_out_path(str(d / "sub" / "cache.zarr"), urls, [str(d / "train-*.tar")])
