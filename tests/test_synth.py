"""Tests of the synthetic shard maker (dkd_cache.synth)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dkd_cache.errors import ConfigError
from dkd_cache.synth import class_specs, make_shards

SMALL = dict(classes=5, train_per_class=6, val_per_class=3, shard_size=7, min_side=32, max_side=96)
WRITERS = ["webdataset", "tar"]


def read_shard(path: str) -> dict[str, dict[str, bytes]]:
    """Members of one shard grouped by key, in tar order: {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.isfile(), m.name
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module", params=WRITERS)
def small(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"synth-{request.param}")
    return out, make_shards(out, seed=3, writer=request.param, **SMALL)


def test_summary_and_layout(small):
    out, summary = small
    assert summary["classes"] == 5 and summary["train_samples"] == 30 and summary["val_samples"] == 15
    assert [Path(p).name for p in summary["train"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [Path(p).name for p in summary["val"]] == [f"val-{i:06d}.tar" for i in range(3)]
    for split in ("train", "val"):
        listed = (out / f"{split}.txt").read_text().splitlines()
        assert listed == summary[split]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in listed)
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(Path(p).name for p in listed)  # no .tmp left


def test_members_labels_and_images(small):
    _, summary = small
    all_keys = set()
    for split, per_class in (("train", 6), ("val", 3)):
        per_label: Counter = Counter()
        sizes = set()
        shard_sizes = []
        mixed = False
        for path in summary[split]:
            samples = read_shard(path)
            shard_sizes.append(len(samples))
            labels = set()
            for key, members in samples.items():
                assert set(members) == {"jpg", "cls", "json"}, key
                assert "." not in key and key not in all_keys
                all_keys.add(key)
                label = int(members["cls"].decode("ascii"))
                assert 0 <= label < 5 and key.startswith(f"s{label:04d}_")
                assert json.loads(members["json"]) == {"class": label, "synset": f"s{label:04d}"}
                with Image.open(io.BytesIO(members["jpg"])) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    im.load()
                    assert 32 <= im.width <= 96 and 32 <= im.height <= 96
                    sizes.add(im.size)
                per_label[label] += 1
                labels.add(label)
            mixed |= len(labels) > 1
        assert per_label == {c: per_class for c in range(5)}
        assert shard_sizes[:-1] == [7] * (len(shard_sizes) - 1) and 0 < shard_sizes[-1] <= 7
        assert mixed, "samples should be shuffled across classes"
        assert len(sizes) > len(shard_sizes), "image sizes should vary"


def test_webdataset_reads_shards(small):
    wds = pytest.importorskip("webdataset")
    _, summary = small
    got = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(summary["val"], shardshuffle=False)]
    assert len(got) == 15 and all(k.startswith(f"s{c:04d}_") for k, c in got)


@pytest.mark.parametrize("writer", WRITERS)
def test_same_seed_same_bytes_other_seed_differs(tmp_path, writer):
    kw = dict(SMALL, classes=3, train_per_class=4, val_per_class=2, writer=writer)
    a = make_shards(tmp_path / "a", seed=1, **kw)
    b = make_shards(tmp_path / "b", seed=1, **kw)
    c = make_shards(tmp_path / "c", seed=2, **kw)
    for split in ("train", "val"):
        assert len(a[split]) == len(b[split]) == len(c[split])
        for pa, pb, pc in zip(a[split], b[split], c[split]):
            assert Path(pa).read_bytes() == Path(pb).read_bytes()
            assert Path(pa).read_bytes() != Path(pc).read_bytes()


def test_class_specs_distinct():
    for n in (1, 100, 1000, 10000):
        specs = class_specs(n)
        assert len({(s.shape, s.texture, s.freq, s.hue) for s in specs}) == n


@pytest.mark.parametrize(
    "bad",
    [
        dict(classes=0), dict(classes=10001), dict(classes=2.5), dict(train_per_class=0), dict(val_per_class=-1),
        dict(shard_size=0), dict(seed=-1), dict(min_side=100, max_side=50), dict(min_side=8),
        dict(max_side=5000), dict(writer="zip"), dict(classes=True), dict(extra_per_class=-1), dict(clutter=-1),
        dict(textures=0), dict(textures=8), dict(shapes=0), dict(shapes=11),
    ],
)
def test_bad_args(tmp_path, bad):
    with pytest.raises(ConfigError):
        make_shards(tmp_path / "out", **{**SMALL, **bad})
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "train-000000.tar").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not empty"):
        make_shards(tmp_path, **SMALL)
    other = tmp_path / "other"
    (other / "val").mkdir(parents=True)
    (other / "val" / "stray").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not empty"):
        make_shards(other, **SMALL)
    assert not (other / "train").exists()
    with pytest.raises(ConfigError, match="not a folder"):
        make_shards(other / "val" / "stray", **SMALL)


def test_empty_existing_split_folders_are_fine(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    summary = make_shards(tmp_path, **dict(SMALL, classes=2, train_per_class=1, val_per_class=1))
    assert len(summary["train"]) == len(summary["val"]) == 1


def test_extra_split_holds_more_images_of_the_same_classes_under_their_own_keys(tmp_path):
    base = make_shards(tmp_path / "a", seed=3, **SMALL)
    more = make_shards(tmp_path / "b", seed=3, extra_per_class=4, **SMALL)
    assert more["extra_samples"] == 20 and (tmp_path / "b" / "extra.txt").read_text().splitlines() == more["extra"]
    assert "extra" not in base and not (tmp_path / "a" / "extra").exists()
    # train and val are unchanged by the extra split: the students' data does not depend on the teacher's
    for split in ("train", "val"):
        assert [Path(p).read_bytes() for p in base[split]] == [Path(p).read_bytes() for p in more[split]]
    extra = {k: v for p in more["extra"] for k, v in read_shard(p).items()}
    train = {k: v for p in more["train"] for k, v in read_shard(p).items()}
    assert all("_x" in k for k in extra) and not set(extra) & set(train)
    assert Counter(int(v["cls"]) for v in extra.values()) == Counter({c: 4 for c in range(5)})
    assert not {v["jpg"] for v in extra.values()} & {v["jpg"] for v in train.values()}


def test_plain_textures_give_classes_that_differ_by_shape_and_hue_only():
    specs = class_specs(40, textures=1)
    assert {s.texture for s in specs} == {"plain"}
    assert len({(s.shape, s.hue) for s in specs}) == 40
    assert class_specs(40) == class_specs(40, textures=7)  # the default is every texture, as before
    two = class_specs(20, textures=1, shapes=2)
    assert {s.shape for s in two} == {"circle", "square"} and len({s.hue for s in two}) == 10


def test_clutter_zero_draws_no_distractors(tmp_path):
    import numpy as np

    from dkd_cache.synth import render_image

    spec = class_specs(1, textures=1)[0]
    a = render_image(spec, np.random.default_rng(0), 64, 64, clutter=0)
    b = render_image(spec, np.random.default_rng(0), 64, 64, clutter=5)
    assert a.size == b.size == (64, 64) and a.tobytes() != b.tobytes()


def test_rotation_limits_the_main_object_and_keeps_the_default_bytes(tmp_path):
    from dkd_cache.synth import encode_sample

    spec = class_specs(4, textures=1, shapes=4)[0]
    kw = dict(seed=0, min_side=64, max_side=64, clutter=0)
    default = encode_sample(spec, "train", 0, 3, **kw)
    assert encode_sample(spec, "train", 0, 3, rotation=180.0, **kw) == default  # 180 writes today's shards
    upright = encode_sample(spec, "train", 0, 3, rotation=0.0, **kw)
    assert upright["jpg"] != default["jpg"] and upright["cls"] == default["cls"]
    assert Image.open(io.BytesIO(upright["jpg"])).size == (64, 64)  # same geometry: only the angle changed
    for bad in (-1, 181, "90", True):
        with pytest.raises(ConfigError, match="rotation"):
            make_shards(tmp_path / "never", classes=2, train_per_class=1, val_per_class=1, rotation=bad)
    assert not (tmp_path / "never").exists()
