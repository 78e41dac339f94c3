"""CacheMeta is typed (TeacherInfo, Codec, ComputePolicy, SkippedSample, CacheState) and its stored JSON is the one
caches were written with before: an old cache opens, rewrites to the same bytes and trains; malformed metadata is a
typed error naming the cache and the field."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dkd_cache import cache as cache_mod
from dkd_cache import cache_meta
from dkd_cache import cache_writer
from dkd_cache.cli import app
from dkd_cache.errors import CacheError, CacheMetadataError, DKDCacheError
from dkd_cache.logit_codecs import TopKCodec
from dkd_cache.teacher import TeacherInfo
from dkd_cache.teacher_signal import ComputePolicy
from dkd_cache.train import TrainConfig, train_student

# The `dkd_cache` attribute of zarr.json exactly as the code before CacheMeta was typed (main at 50cbf4e) wrote it,
# for the conftest shards dumped with the conftest settings (resnet18, 2 views, topk:4, T 1 and 4, 32 px, chunk_rows 8)
PREVIOUS = Path(__file__).parent / "data" / "cache_meta_previous.json"

runner = CliRunner()


def _previous() -> dict:
    return json.loads(PREVIOUS.read_text())


def _with_meta(cache_path: Path, out: Path, meta: dict) -> Path:
    """A copy of the session cache whose metadata is `meta` (written as zarr writes attributes)."""
    shutil.copytree(cache_path, out)
    node = json.loads((out / "zarr.json").read_text())
    node["attributes"]["dkd_cache"] = meta
    (out / "zarr.json").write_text(json.dumps(node, indent=2))
    return out


def test_a_cache_written_before_the_typing_opens_rewrites_byte_identically_and_trains(cache_path, shards, tmp_path):
    old = _previous()
    assert old["manifest"] == json.loads((cache_path / "zarr.json").read_text())["attributes"]["dkd_cache"]["manifest"]
    path = _with_meta(cache_path, tmp_path / "old.zarr", old)
    cache = cache_mod.open_cache(path, mode="r+")
    m = cache.meta
    assert m.teacher == TeacherInfo(arch="resnet18", sha256=old["teacher"]["sha256"], num_classes=10,
                                    source_format="dkd-cache")
    assert m.codec == TopKCodec(k=4) and cache.codec.name == "topk:4"
    assert m.compute == ComputePolicy(device="cpu", amp="none", tf32=False)
    assert m.state is cache_meta.CacheState.COMPLETE and m.skipped == ()
    assert json.dumps(m.to_dict()) == json.dumps(old)  # same keys, same order, same values
    before = (path / "zarr.json").read_bytes()
    cache_writer.write_meta(cache, m)  # what a dump's finalize does
    assert (path / "zarr.json").read_bytes() == before

    r = train_student(TrainConfig(shards=str(Path(shards["train"][0]).parent), cache=str(path),
                                  out=str(tmp_path / "run"), arch="resnet18", epochs=1, batch_size=16, lr_batch=16,
                                  workers=0, max_steps=2), progress=False)
    assert r["step"] == 2


def test_a_cache_written_before_compute_and_renderer_were_recorded_opens(cache_path, tmp_path):
    old = _previous()
    del old["compute"], old["renderer"]
    m = cache_mod.open_cache(_with_meta(cache_path, tmp_path / "older.zarr", old)).meta
    assert m.compute is None and m.renderer.name == "cpu"
    assert m.to_dict()["compute"] == {}  # as the code before the typing wrote it back


def test_skipped_samples_and_states_round_trip_in_the_stored_form():
    old = _previous()
    old["state"] = "writing"
    old["skipped"] = [{"shard": "train-000001.tar", "key": "0007_x", "reason": "image cannot be decoded"}]
    m = cache_meta.CacheMeta.from_dict(copy.deepcopy(old))
    assert m.state is cache_meta.CacheState.WRITING
    assert m.skipped == (cache_meta.SkippedSample(shard="train-000001.tar", key="0007_x",
                                                 reason="image cannot be decoded"),)
    assert json.dumps(m.to_dict()) == json.dumps(old)
    done = dataclasses.replace(m, state="complete")  # parsed on construction, whatever the caller passes
    assert done.state is cache_meta.CacheState.COMPLETE and done.to_dict()["state"] == "complete"
    with pytest.raises(CacheMetadataError, match="'state'"):
        dataclasses.replace(m, state="finished")


def _set(path: str, value):
    def change(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


def _drop(key: str):
    return lambda d: d.pop(key)


MALFORMED = [
    ("state", _set("state", "done"), "must be one of ['writing', 'complete']"),
    ("state", _set("state", 1), "got 1"),
    ("teacher", _set("teacher", "resnet18"), "must be a table"),
    ("teacher", _set("teacher.num_classes", "10"), "num_classes must be a positive integer"),
    ("teacher", _set("teacher.sha256", "abc"), "sha256"),
    ("teacher", _set("teacher.mirror", "http://x"), "unknown keys ['mirror']"),
    ("codec", _set("codec.k", "4"), "'k' must be an integer"),
    ("codec", _set("codec.kind", "zip"), "'kind' must be one of"),
    ("codec", _set("codec.scale", 2), "'scale' is unknown"),
    ("compute", _set("compute.device", "tpu"), "device must be one of"),
    ("compute", _set("compute.tf32", "yes"), "tf32 must be true or false"),
    ("compute", _set("compute.precision", "high"), "unknown fields ['precision']"),
    ("compute", _set("compute", ["cpu"]), "must be a table"),
    ("skipped", _set("skipped", "none"), "must be a list"),
    ("skipped[0]", _set("skipped", [{"shard": "a.tar", "key": 3, "reason": "r"}]), "all strings"),
    ("skipped[0]", _set("skipped", [{"shard": "a.tar", "key": "k", "reason": "r", "view": 0}]), "exactly"),
    ("views", _set("views", "2"), "must be an integer >= 1"),
    ("views", _set("views", 0), "must be an integer >= 1"),
    ("chunk_rows", _set("chunk_rows", True), "must be an integer >= 1"),
    ("seed", _set("seed", 1.5), "must be an integer"),
    ("temperatures", _set("temperatures", []), "non-empty list of positive numbers"),
    ("temperatures", _set("temperatures", [1.0, -4.0]), "non-empty list of positive numbers"),
    ("versions", _set("versions.torch", 2), "version strings"),
    ("manifest", _set("manifest.extra", 1), "manifest must have exactly"),
    ("manifest", _set("manifest.shards", [{"name": "a.tar"}]), "TypeError"),
    ("recipe", _set("recipe.blur", 1), "unknown recipe keys ['blur']"),
    ("renderer", _set("renderer", "cpu"), "must be a table"),
    ("renderer", _set("renderer.name", "vulkan"), "renderer must be one of"),
    ("renderer", _set("renderer.lut", "srgb"), "unknown keys ['lut']"),
    ("future_field", _set("future_field", 1), "is not a field of format version 1"),
    ("teacher", _drop("teacher"), "is missing"),
]


@pytest.mark.parametrize("field, change, problem", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_metadata_is_a_typed_error_naming_the_cache_and_the_field(cache_path, tmp_path, field, change,
                                                                           problem):
    meta = _previous()
    change(meta)
    path = _with_meta(cache_path, tmp_path / "bad.zarr", meta)
    with pytest.raises(CacheMetadataError) as info:
        cache_mod.open_cache(path)
    e = info.value
    assert isinstance(e, CacheError) and isinstance(e, DKDCacheError) and isinstance(e, ValueError)
    assert (e.cache, e.field) == (str(path), field)
    assert problem in e.problem, e.problem
    assert str(e).startswith(f"{path}: metadata field {field!r}: ") and "re-dump the cache" in str(e)


def test_inspect_names_the_bad_field_without_a_traceback(cache_path, tmp_path):
    meta = _previous()
    meta["state"] = "done"
    path = _with_meta(cache_path, tmp_path / "bad.zarr", meta)
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code != 0
    assert f"{path}: metadata field 'state': must be one of ['writing', 'complete'], got 'done'" in r.output
    assert "Traceback" not in r.output


def test_a_done_record_with_a_malformed_skipped_entry_is_named_when_the_cache_is_completed(cache_path, tmp_path):
    path = _with_meta(cache_path, tmp_path / "c.zarr", {**_previous(), "state": "writing"})
    record = path / "_dkd" / "done" / "000002.json"
    rec = json.loads(record.read_text())
    rec["skipped"] = [{"shard": "train-000002.tar", "key": "k"}]
    record.write_text(json.dumps(rec))
    with pytest.raises(CacheMetadataError) as info:
        cache_writer.finalize(cache_mod.open_cache(path, mode="r+"))
    assert info.value.cache == f"{path}: done record of tar shard train-000002.tar"
    assert info.value.field == "skipped[0]"


def test_library_versions_name_the_jpeg_decoder_torchvision_decodes_with():
    """views.decode decodes with torchvision.io: the recorded JPEG library is torchvision's, not Pillow's."""
    import torch

    from dkd_cache.cache_meta import library_versions

    versions = library_versions()
    assert "libjpeg" not in versions  # Pillow's libjpeg, which no view is decoded with
    api = int(torch.ops.image._jpeg_version())
    assert versions["jpeg_decoder"].endswith(f"(jpeglib API {api // 10}.{api % 10})")
    turbo = bool(torch.ops.image._is_compiled_against_turbo())
    assert versions["jpeg_decoder"].startswith("libjpeg-turbo" if turbo else "libjpeg (")


def test_finishing_a_dump_on_a_host_that_resizes_with_another_kernel_is_refused(cache_path):
    """A dump resumed on a host without AVX2 would render the rest of the cache with torchvision's float path:
    pixels a level off the ones the first host rendered. Create-or-compare names it instead of mixing them."""
    meta = cache_mod.open_cache(cache_path).meta
    here = meta.renderer.resize[meta.recipe.interpolation]
    other = dataclasses.replace(meta.renderer, cpu_capability="DEFAULT",
                                resize={**meta.renderer.resize, meta.recipe.interpolation: here + " (other)"})
    diffs = meta.differences(dataclasses.replace(meta, renderer=other))
    assert len(diffs) == 1 and diffs[0].startswith("resize kernel") and "other" in diffs[0]
    older = dataclasses.replace(meta.renderer, cpu_capability=None, resize={})  # not recorded: nothing to compare
    assert meta.differences(dataclasses.replace(meta, renderer=older)) == []
