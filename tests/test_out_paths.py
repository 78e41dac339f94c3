"""dump-teacher --out: refused only where it would overwrite or be read as input; train-student --out: an
unwritable one is named, not a traceback."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dkd_cache.cli import app
from dkd_cache.data import check_out_path
from dkd_cache.dump import dump_teacher
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


def test_train_student_into_a_read_only_out_is_named_with_what_to_do(shards, cache_path, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "run"
    if os.access(locked, os.W_OK):  # root writes through permissions: a file system that refuses everyone
        out = Path("/sys/dkd-cache-test-run")
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no read-only location to write to (root, and no /sys)")
    try:
        r = CliRunner().invoke(app, ["train-student", "--shards", str(Path(shards["train"][0]).parent), "--cache",
                                     str(cache_path), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                                     "--workers", "0", "--no-progress"])
    finally:
        locked.chmod(0o755)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"--out {out}: cannot write the run directory" in r.output and "writable --out" in r.output, r.output
