"""The public Python API (dkd_cache.api, re-exported by dkd_cache): its names and signatures (a snapshot: a change
is a visible decision), the cache handle, the loader's guarantees, the loss and the live teacher, the typed errors,
and train-student standing on the same pieces."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dkd_cache
from dkd_cache import api
from dkd_cache.synth import make_shards
from dkd_cache.train import TrainConfig, train_student
from dkd_cache.views import normalize

from .conftest import CLASSES, TINY_RECIPE

# The documented members a TeacherCache inherits from the internal reader; the reader's other methods are internal.
INHERITED_PUBLIC = {"TeacherCache": ("path", "codec", "meta", "check")}
NOT_MADE_BY_USERS = ("TeacherCache",)  # made by open_cache: its constructor is the reader's, internal


def _member(cls, name: str) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            v = vars(klass)[name]
            break
    else:  # a dataclass field without a default
        return "field"
    if isinstance(v, property):
        return "property"
    if isinstance(v, (classmethod, staticmethod)):
        return "classmethod " + str(inspect.signature(getattr(cls, name)))
    if not callable(v):
        return "field"
    return str(inspect.signature(v))


def surface() -> dict:
    """Every exported name: a function's signature, a class's constructor and public members, an error's bases."""
    out = {}
    for name in api.__all__:
        obj = getattr(api, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            out[name] = "error(" + ", ".join(b.__name__ for b in obj.__bases__) + ")"
        elif inspect.isclass(obj):
            members = {} if name in NOT_MADE_BY_USERS else {"__init__": str(inspect.signature(obj))}
            own = [k for k, v in vars(obj).items() if (not k.startswith("_") or k in ("__iter__", "__len__"))
                   and (callable(v) or isinstance(v, (property, classmethod, staticmethod)))]  # fields: __init__'s
            for k in sorted({*own, *INHERITED_PUBLIC.get(name, ())}):
                members[k] = _member(obj, k)
            out[name] = members
        else:
            out[name] = str(inspect.signature(obj))
    return out


SURFACE = {
    'open_cache': "(path: 'str | Path') -> 'TeacherCache'",
    'TeacherCache': {'check': '(self, *, deep: \'bool\' = False) -> "list[\'Finding\']"',
                     'codec': 'property',
                     'meta': 'field',
                     'num_classes': 'property',
                     'path': 'property',
                     'provenance': 'property',
                     'recipe': 'property',
                     'samples': 'property',
                     'temperatures': 'property',
                     'views': 'property'},
    'Provenance': {'__init__': "(*, teacher: 'TeacherInfo', compute: 'ComputePolicy | None', renderer: "
                               "'RendererInfo', seed: 'int', views: 'int', format_version: 'int', versions: "
                               "'dict[str, str]', fidelity: 'CodecFidelity | None') -> None",
                   'to_dict': "(self) -> 'dict[str, Any]'"},
    'Recipe': {'__init__': "(*, image_size: 'int' = 224, scale: 'tuple[float, float]' = (0.08, 1.0), ratio: "
                           "'tuple[float, float]' = (0.75, 1.3333333333333333), hflip: 'float' = 0.5, interpolation: "
                           "'str' = 'bilinear', antialias: 'bool' = True, mean: 'tuple[float, float, float]' = "
                           "(0.485, 0.456, 0.406), std: 'tuple[float, float, float]' = (0.229, 0.224, 0.225), randaugment: "
                           "'str' = '', color_jitter: 'float' = 0.0, random_erasing: 'float' = 0.0, mixup: 'float' = "
                           "0.0, cutmix: 'float' = 0.0, mix_prob: 'float' = 1.0, mix_switch_prob: 'float' = 0.5, "
                           "mix_window: 'int' = 8) -> None",
               'from_dict': 'classmethod (d: \'dict[str, Any]\') -> "\'Recipe\'"',
               'to_dict': "(self) -> 'dict[str, Any]'"},
    'DistillLoader': {'__init__': "(shards: 'str | Sequence[str]', cache: 'str | Path | TeacherCache | None' = None, "
                                  "*, batch_size: 'int', epoch: 'int' = 0, rank: 'int' = 0, world: 'int' = 1, "
                                  "workers: 'int' = 2, renderer: 'str | None' = None, views_per_decode: 'int' = 1, "
                                  "seed: 'int' = 0, teacher: 'TeacherCache | LiveTeacher | None' = None, normalize: "
                                  "'bool' = True, device: 'str | torch.device' = 'cpu', channels_last: 'bool' = "
                                  "False, image_size: 'int | None' = None, start_step: 'int' = 0, shuffle_buffer: "
                                  "'int' = 256, num_classes: 'int | None' = None, recipe: 'Recipe | None' = None, "
                                  "allow_other_renderer: 'bool' = False, wait_seconds: 'float' = 14400.0)",
                      '__iter__': "(self) -> 'Iterator[DistillBatch]'",
                      '__len__': "(self) -> 'int'",
                      'dropped': 'property',
                      'image_size': 'property',
                      'num_classes': 'property',
                      'padding': 'property',
                      'recipe': 'property',
                      'samples': 'property',
                      'set_epoch': "(self, epoch: 'int', *, start_step: 'int' = 0) -> 'None'"},
    'DistillBatch': {'__init__': "(images: 'torch.Tensor', labels: 'torch.Tensor', entries: 'dict[str, "
                                 "torch.Tensor]') -> None",
                     '__len__': "(self) -> 'int'"},
    'DKDLoss': {'__init__': "(teacher: 'TeacherCache | LiveTeacher | Storage', *, alpha: 'float' = 1.0, beta: "
                            "'float' = 0.5, temperature: 'float' = 1.0, rule: 'str' = 'uniform', reduction: 'str' = "
                            "'mean')",
                'extra_repr': "(self) -> 'str'",
                'forward': "(self, student_logits: 'torch.Tensor', labels: 'torch.Tensor', entries: 'Mapping[str, "
                           "Any]') -> 'torch.Tensor'"},
    'LiveTeacher': {'__init__': "(model: 'torch.nn.Module', *, num_classes: 'int', temperatures: 'Sequence[float]' = "
                                "(1.0,), amp: 'str | None' = 'none')",
                    'entries': "(self, images: 'torch.Tensor', labels: 'torch.Tensor', labels_b: 'torch.Tensor | None' = "
                               "None) -> 'dict[str, torch.Tensor]'",
                    'from_file': "classmethod (weights: 'str | Path', *, arch: 'str', device: 'str | torch.device' = "
                                 "'cpu', temperatures: 'Sequence[float]' = (1.0,), amp: 'str | None' = 'none') -> "
                                 '"\'LiveTeacher\'"'},
    'Storage': {'__init__': "(*, codec: 'Codec', num_classes: 'int', temperatures: 'tuple[float, ...]') -> None",
                'exact': 'classmethod (num_classes: \'int\', temperatures: \'Sequence[float]\') -> "\'Storage\'"',
                'is_exact': 'property',
                'of_cache': 'classmethod (cache: \'Any\') -> "\'Storage\'"',
                'temperature_index': "(self, temperature: 'float') -> 'int'"},
    'dkd_from_entries': ("(student_logits: 'torch.Tensor', labels: 'torch.Tensor', entries: 'Mapping[str, Any]', "
                         "storage: 'Storage', *, alpha: 'float', beta: 'float', temperature: 'float', rule: 'str' = "
                         "'uniform', reduction: 'str' = 'mean') -> 'torch.Tensor'"),
    'dkd_loss': ("(student_logits: 'torch.Tensor', teacher_logits: 'torch.Tensor', target: 'torch.Tensor', alpha: "
                 "'float', beta: 'float', temperature: 'float', reduction: 'str' = 'mean', *, target_logit: "
                 "'torch.Tensor | None' = None, teacher_lse: 'torch.Tensor | None' = None) -> 'torch.Tensor'"),
    'ce_from_entries': ("(logits: 'torch.Tensor', labels: 'torch.Tensor', entries: 'Mapping[str, Any]', reduction: "
                        "'str' = 'mean') -> 'torch.Tensor'"),
    'mixed_cross_entropy': ("(logits: 'torch.Tensor', labels: 'torch.Tensor', labels_b: 'torch.Tensor', lam: "
                            "'torch.Tensor', reduction: 'str' = 'mean') -> 'torch.Tensor'"),
    'DKDCacheError': 'error(Exception)',
    'ConfigError': 'error(DKDCacheError, ValueError)',
    'ShardError': 'error(DKDCacheError, ValueError)',
    'ShardNotFoundError': 'error(DKDCacheError, FileNotFoundError)',
    'BadSampleError': 'error(ShardError)',
    'RemoteReadError': 'error(ShardError, ConnectionError)',
    'CacheError': 'error(DKDCacheError, ValueError)',
    'CacheMetadataError': 'error(CacheError)',
    'CacheMismatchError': 'error(CacheError)',
    'CacheLockedError': 'error(CacheError)',
    'CheckpointError': 'error(DKDCacheError, ValueError)',
    'CheckpointNotFoundError': 'error(DKDCacheError, FileNotFoundError)',
    'CheckpointWriteError': 'error(CheckpointError)',
    'ResumeMismatchError': 'error(ConfigError)',
    'NonFiniteLossError': 'error(DKDCacheError, FloatingPointError)',
    'PeerError': 'error(DKDCacheError, RuntimeError)',
    'LoanError': 'error(DKDCacheError, RuntimeError)',
    'SharedMemoryError': 'error(DKDCacheError, OSError)',
}


def test_exported_names_and_signatures_are_the_snapshot():
    """A change to the public API must change this snapshot in the same commit (and the README's section)."""
    assert surface() == SURFACE


def test_the_package_exports_the_api_lazily():
    assert dkd_cache.__all__ == api.__all__
    for name in api.__all__:
        assert getattr(dkd_cache, name) is getattr(api, name)
    with pytest.raises(AttributeError):
        dkd_cache.StreamSpec  # noqa: B018  (internal: not exported)
    # `import dkd_cache` (and so the CLI's start) does not load torch
    code = "import sys, dkd_cache; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


# --------------------------------------------------------------------------------------------- the cache
def test_open_cache_reads_recipe_codec_and_provenance(cache_path):
    cache = dkd_cache.open_cache(cache_path)
    assert isinstance(cache, dkd_cache.TeacherCache)
    assert cache.recipe == TINY_RECIPE and cache.num_classes == CLASSES and cache.views == 2
    assert cache.codec.name == "topk:4" and cache.temperatures == (1.0, 4.0) and cache.samples == 80
    prov = cache.provenance
    assert prov.teacher.arch == "resnet18" and prov.seed == 0 and prov.views == 2
    assert prov.compute is not None and prov.compute.device == "cpu" and prov.renderer.name == "cpu"
    assert prov.to_dict()["teacher"]["num_classes"] == CLASSES and "torch" in prov.versions
    assert cache.check() and all(f.ok for f in cache.check())  # the reader's findings


def test_open_cache_errors_are_typed(tmp_path, shards):
    with pytest.raises(dkd_cache.CacheError, match="no cache there"):
        dkd_cache.open_cache(tmp_path / "nothing.zarr")
    with pytest.raises(dkd_cache.CacheError, match="tar shard"):  # a shard given where the cache goes
        dkd_cache.open_cache(shards["train"][0])


# --------------------------------------------------------------------------------------------- batches
def _loader(shards, cache_path, **kw) -> dkd_cache.DistillLoader:
    base = dict(batch_size=16, workers=0, shuffle_buffer=16)
    base.update(kw)
    return dkd_cache.DistillLoader(_train_glob(shards), str(cache_path), **base)


def _train_glob(shards) -> str:
    return str(Path(shards["train"][0]).parent / "train-*.tar")


def _same(a: dkd_cache.DistillBatch, b: dkd_cache.DistillBatch) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.entries.keys() == b.entries.keys()
            and all(torch.equal(a.entries[k], b.entries[k]) for k in a.entries))


def test_batches_replay_the_teachers_views_the_live_teacher_gives_the_same_entries(shards, cache_path, teacher_ckpt):
    """The images are what the teacher saw: the teacher run live on them (LiveTeacher) gives the cache's stored
    target logit and lse at every cached temperature, to float rounding."""
    loader = _loader(shards, cache_path)
    live = dkd_cache.LiveTeacher.from_file(teacher_ckpt, arch="resnet18", temperatures=(1.0, 4.0))
    assert len(loader) == 5 and loader.samples == 80 and loader.dropped == 0 and loader.padding == 0
    n = 0
    for batch in loader:
        assert batch.images.dtype == torch.float32 and batch.images.shape == (16, 3, 32, 32)
        assert batch.labels.dtype == torch.int64 and sorted(batch.entries) == [
            "logits/lse", "logits/target", "logits/topk_idx", "logits/topk_val"]
        ours = live.entries(batch.images, batch.labels)
        assert torch.allclose(ours["logits/target"], batch.entries["logits/target"], atol=1e-3, rtol=0)
        assert torch.allclose(ours["logits/lse"], batch.entries["logits/lse"], atol=1e-3, rtol=0)
        n += len(batch)
    assert n == 80


def test_uint8_batches_are_the_normalised_ones_and_own_their_memory(shards, cache_path):
    """normalize=False gives the uint8 pixels; kept batches stay intact with DataLoader workers (the workers'
    transfer slots are poisoned on release in the tests, so a batch that kept a view of one would read flat)."""
    kept = list(_loader(shards, cache_path, workers=2, normalize=False))
    normed = list(_loader(shards, cache_path, workers=2))
    assert len(kept) == len(normed) == 5
    recipe = dkd_cache.open_cache(cache_path).recipe
    for u8, x in zip(kept, normed):
        assert u8.images.dtype == torch.uint8 and torch.equal(u8.labels, x.labels)
        assert torch.equal(normalize(u8.images, recipe, channels_last=False), x.images)
        assert u8.images.float().std() > 1  # not a flat (poisoned) slot


def test_resume_by_step_count_yields_the_rest_of_the_epoch(shards, cache_path):
    whole = list(_loader(shards, cache_path, epoch=1))
    for start in (1, 3, 5):
        rest = list(_loader(shards, cache_path, epoch=1, start_step=start))
        assert all(_same(a, b) for a, b in zip(rest, whole[start:], strict=True))
    loader = _loader(shards, cache_path)
    loader.set_epoch(1, start_step=2)
    assert all(_same(a, b) for a, b in zip(loader, whole[2:], strict=True))


def test_set_epoch_moves_to_that_epochs_views_and_order(shards, cache_path):
    loader = _loader(shards, cache_path)
    first = list(loader)
    loader.set_epoch(1)
    second = list(loader)
    assert len(second) == len(loader) == len(first)
    assert all(_same(a, b) for a, b in zip(second, _loader(shards, cache_path, epoch=1), strict=True))
    assert not torch.equal(first[0].labels, second[0].labels)  # another order (and another stored view)
    loader.set_epoch(0)
    assert all(_same(a, b) for a, b in zip(loader, first, strict=True))  # the same epoch again: the same batches


def test_ranks_get_the_same_number_of_batches(shards, cache_path):
    """80 samples in shards of 25/25/25/5 over 3 ranks: unequal shares padded to the largest, equal steps."""
    loaders = [_loader(shards, cache_path, rank=r, world=3, batch_size=8) for r in range(3)]
    assert len({len(x) for x in loaders}) == 1 and len({x.samples for x in loaders}) == 1
    assert loaders[0].padding == 3 * loaders[0].samples - 80
    assert sum(len(b) for b in loaders[2]) == len(loaders[2]) * 8


def test_views_per_decode_covers_m_epochs_per_pass(shards, cache_path):
    loader = _loader(shards, cache_path, views_per_decode=2)
    assert loader.samples == 160 and len(loader) == 10
    with pytest.raises(dkd_cache.ConfigError, match="multiple of views_per_decode"):
        loader.set_epoch(1)


def test_without_a_cache_the_batches_carry_no_teacher_entries(shards, cache_path):
    """CE only (or a LiveTeacher): views drawn from (seed, epoch, key) with the recipe given."""
    loader = dkd_cache.DistillLoader(_train_glob(shards), batch_size=16, workers=0, num_classes=CLASSES,
                                     recipe=TINY_RECIPE)
    batch = next(iter(loader))
    assert batch.entries == {} and batch.images.shape == (16, 3, 32, 32) and loader.recipe == TINY_RECIPE
    with pytest.raises(dkd_cache.ConfigError, match="recipe"):  # with a cache, the cache's recipe is the one
        _loader(shards, cache_path, recipe=dkd_cache.Recipe(image_size=64))


def test_loader_errors_are_typed(shards, cache_path, tmp_path):
    with pytest.raises(dkd_cache.ConfigError, match="batch_size"):
        _loader(shards, cache_path, batch_size=0)
    with pytest.raises(dkd_cache.ConfigError, match="holds more samples than an epoch"):
        _loader(shards, cache_path, batch_size=100)
    with pytest.raises(dkd_cache.ConfigError, match="rank"):
        _loader(shards, cache_path, rank=2, world=2)
    with pytest.raises(dkd_cache.ConfigError, match="start_step"):
        _loader(shards, cache_path, start_step=6)
    for bad in (0, -1.0, float("inf"), "soon"):  # how long ranks wait for rank 0's check: a positive number
        with pytest.raises(dkd_cache.ConfigError, match="wait_seconds"):
            _loader(shards, cache_path, wait_seconds=bad)
    with pytest.raises(dkd_cache.ShardNotFoundError):
        dkd_cache.DistillLoader(str(tmp_path / "none-*.tar"), str(cache_path), batch_size=16)
    with pytest.raises(dkd_cache.ConfigError, match="num_classes"):  # no cache: the classes must be given
        dkd_cache.DistillLoader(_train_glob(shards), batch_size=16)
    with pytest.raises(dkd_cache.ConfigError, match="teacher"):
        _loader(shards, cache_path, teacher="resnet50")
    with pytest.raises(dkd_cache.CacheMismatchError):  # shards the cache was not dumped from
        other = make_shards(tmp_path / "other", classes=CLASSES, train_per_class=2, val_per_class=1, shard_size=25,
                            seed=1)
        dkd_cache.DistillLoader(str(Path(other["train"][0]).parent), str(cache_path), batch_size=4, workers=0)


# --------------------------------------------------------------------------------------------- the loss
def test_dkd_loss_module_is_the_plain_function_and_trains(shards, cache_path):
    cache = dkd_cache.open_cache(cache_path)
    loss_fn = dkd_cache.DKDLoss(cache, alpha=1.0, beta=2.0, temperature=4.0)
    assert isinstance(loss_fn, torch.nn.Module) and "topk:4" in repr(loss_fn)
    batch = next(iter(_loader(shards, cache_path)))
    logits = torch.randn(len(batch), CLASSES, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = loss_fn(logits, batch.labels, batch.entries)
    plain = dkd_cache.dkd_from_entries(logits, batch.labels, batch.entries, dkd_cache.Storage.of_cache(cache),
                                       alpha=1.0, beta=2.0, temperature=4.0)
    assert torch.equal(loss, plain) and loss.dim() == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    per_sample = dkd_cache.DKDLoss(cache, temperature=4.0, reduction="none")(logits, batch.labels, batch.entries)
    assert per_sample.shape == (len(batch),)


def test_the_live_teachers_loss_matches_full_logit_dkd(teacher_ckpt):
    """A LiveTeacher's entries in exact storage give exact DKD on its logits (loss.dkd_loss)."""
    live = dkd_cache.LiveTeacher.from_file(teacher_ckpt, arch="resnet18", temperatures=(4.0,))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6) % CLASSES
    student = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(2))
    loss = dkd_cache.DKDLoss(live, alpha=1.0, beta=8.0, temperature=4.0)(student, labels, live.entries(x, labels))
    with torch.no_grad():
        teacher_logits = live.model(x)
    exact = dkd_cache.dkd_loss(student, teacher_logits, labels, 1.0, 8.0, 4.0)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)


def test_a_live_teachers_mixed_entries_give_the_mixed_dkd(teacher_ckpt):
    """LiveTeacher.entries with the partner labels of mixed views: "logits/target_b" is the teacher's exact logit of
    the partner label, and DKDLoss on the batch's mix entries is lam DKD(a) + (1 - lam) DKD(b) of its logits."""
    live = dkd_cache.LiveTeacher.from_file(teacher_ckpt, arch="resnet18", temperatures=(4.0,))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels, labels_b = torch.arange(6) % CLASSES, torch.tensor([0, 1, 5, 7, 9, 3])  # rows 0, 1 unmixed
    lam = torch.tensor([1.0, 1.0, 0.25, 0.5, 0.9, 0.0])
    student = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(2))
    entries = live.entries(x, labels, labels_b=labels_b)
    with torch.no_grad():
        teacher_logits = live.model(x)
    torch.testing.assert_close(entries["logits/target_b"], teacher_logits.gather(1, labels_b[:, None])[:, 0])
    assert "logits/target_b" not in live.entries(x, labels)
    loss = dkd_cache.DKDLoss(live, alpha=1.0, beta=8.0, temperature=4.0)(
        student, labels, {**entries, "mix/lam": lam, "mix/label": labels_b})
    per_target = [dkd_cache.dkd_loss(student, teacher_logits, y, 1.0, 8.0, 4.0, reduction="none")
                  for y in (labels, labels_b)]
    assert loss.item() == pytest.approx((lam * per_target[0] + (1 - lam) * per_target[1]).mean().item(), rel=1e-5)


def test_train_step_takes_the_mixed_ce_of_a_mixed_batch():
    """train-student's step: CE is dkd_cache.ce_from_entries of the batch, the mixed CE when its entries carry
    "mix/lam" (lam CE(a) + (1 - lam) CE(b)), plain cross-entropy otherwise."""
    from dkd_cache.train import train_step

    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    labels, labels_b = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([0, 1, 3, 2, 1, 0, 0, 2])
    lam = torch.tensor([1.0, 1.0, 0.2, 0.4, 0.6, 0.8, 0.0, 0.5])
    mixed = {"mix/lam": lam, "mix/label": labels_b}
    for entries in ({}, mixed, None):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 4)
        with torch.no_grad():
            want = dkd_cache.ce_from_entries(model(x), labels, entries or {})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _, ce, _ = train_step(model, opt, x, labels, None, kd_factor=0.0, ce_weight=1.0, entries=entries)
        assert torch.equal(ce, want)
    with torch.no_grad():
        logits = torch.nn.Linear(5, 4).requires_grad_(False)(x)
    assert torch.equal(dkd_cache.ce_from_entries(logits, labels, {}), torch.nn.functional.cross_entropy(logits, labels))
    assert torch.equal(dkd_cache.ce_from_entries(logits, labels, mixed),
                       dkd_cache.mixed_cross_entropy(logits, labels, labels_b, lam))
    assert not torch.equal(dkd_cache.ce_from_entries(logits, labels, mixed),
                           dkd_cache.ce_from_entries(logits, labels, {}))


def test_loss_errors_are_typed_and_early(cache_path):
    cache = dkd_cache.open_cache(cache_path)
    with pytest.raises(dkd_cache.ConfigError, match="temperature 2.0 is not stored"):  # top-k: lse at T is needed
        dkd_cache.DKDLoss(cache, temperature=2.0)
    with pytest.raises(dkd_cache.ConfigError, match="beta"):
        dkd_cache.DKDLoss(cache, beta=-1.0)
    with pytest.raises(dkd_cache.ConfigError, match="rule"):
        dkd_cache.DKDLoss(cache, rule="spread")
    with pytest.raises(dkd_cache.ConfigError, match="open cache"):
        dkd_cache.DKDLoss("teacher.zarr")
    assert issubclass(dkd_cache.ConfigError, ValueError) and issubclass(dkd_cache.CacheError, dkd_cache.DKDCacheError)


# --------------------------------------------------------------------------------------------- train-student on it
def test_train_student_builds_its_batches_and_loss_with_the_api(monkeypatch, shards, cache_path, teacher_ckpt,
                                                                 tmp_path):
    """train-student's loop reads api.DistillLoader's batches and calls api.DKDLoss (cached) and
    api.LiveTeacher (live): one data path and one loss, the API's."""
    calls = {"batches": 0, "loss": 0, "live": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(api.DistillLoader, "_tensors", counting("batches", api.DistillLoader._tensors))
    monkeypatch.setattr(api.DKDLoss, "forward", counting("loss", api.DKDLoss.forward))
    monkeypatch.setattr(api.LiveTeacher, "entries", counting("live", api.LiveTeacher.entries))
    base = dict(shards=str(Path(shards["train"][0]).parent), cache=str(cache_path), arch="resnet18", epochs=2,
                batch_size=16, lr=0.05, lr_batch=16, workers=0, shuffle_buffer=16, max_steps=3)
    train_student(TrainConfig(out=str(tmp_path / "cached"), **base), progress=False)
    assert calls == {"batches": 3, "loss": 3, "live": 0}
    train_student(TrainConfig(out=str(tmp_path / "live"), live_teacher=str(teacher_ckpt), teacher_arch="resnet18",
                              **base), progress=False)
    assert calls == {"batches": 6, "loss": 6, "live": 3}


def test_verify_opens_caches_and_computes_the_loss_with_the_api():
    """verify stands on the same pieces: the public open_cache, and the loss function DKDLoss calls."""
    from dkd_cache import verify, verify_fidelity

    assert verify.open_cache is api.open_cache
    assert verify_fidelity.dkd_from_entries is api.dkd_from_entries
