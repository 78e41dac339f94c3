"""`dkd-cache inspect`: what a cache holds, how complete it is, what it costs on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import augment
from . import cache as cache_mod
from .codec_fidelity import BAR_MEDIAN, BAR_P5


def describe(path: str | Path, *, deep: bool = False) -> dict[str, Any]:
    """What the cache holds, and its integrity findings (Cache.check; deep reads every chunk)."""
    cache = cache_mod.open_cache(path)
    m = cache.meta
    pending = cache.pending_shards()
    total_views = m.manifest.samples * m.views
    logit_bytes = cache_mod.disk_bytes(path, "logits") + cache_mod.disk_bytes(path, "views")
    return {
        "path": str(path), "format_version": m.format_version, "state": m.state.value,
        "shards_done": len(m.manifest.shards) - len(pending), "shards": len(m.manifest.shards),
        "samples": m.manifest.samples, "rows": m.manifest.rows, "views": m.views, "skipped": len(m.skipped),
        "teacher": m.teacher.to_dict(), "codec": m.codec.to_dict(), "temperatures": list(m.temperatures), "seed": m.seed,
        "recipe": m.recipe.to_dict(), "renderer": m.renderer.to_dict(),
        "resize_kernel": m.renderer.kernel(m.recipe.interpolation), "chunk_rows": m.chunk_rows, "versions": m.versions,
        "bytes_on_disk": cache_mod.disk_bytes(path),
        "bytes_per_view": logit_bytes / max(total_views, 1),
        "shard_names": [s.name for s in m.manifest.shards[:3]] + (["..."] if len(m.manifest.shards) > 3 else []),
        "findings": [f.to_dict() for f in cache.check(deep=deep)],
        "fidelity": None if m.fidelity is None else m.fidelity.to_dict(),
        "augment": {"pipeline": augment_pipeline(m.recipe), "record_bytes": augment.record_bytes(m.recipe),
                    "bytes_per_view_on_disk": cache_mod.disk_bytes(path, "views/aug") / max(total_views, 1)},
    }


def augment_pipeline(recipe) -> str:
    """The recipe's rendering after crop + flip, in the order it is applied (augment.py)."""
    steps = []
    if recipe.randaugment:
        steps.append(f"randaugment {recipe.randaugment}")
    if recipe.color_jitter > 0:
        steps.append(f"colour jitter {recipe.color_jitter:g}")
    if recipe.random_erasing > 0:
        steps.append(f"random erasing p {recipe.random_erasing:g}")
    mix = [f"{name} alpha {a:g}" for name, a in (("mixup", recipe.mixup), ("cutmix", recipe.cutmix)) if a > 0]
    if mix:
        steps.append(" or ".join(mix) + (f" (cutmix on {recipe.mix_switch_prob:g} of pairs)" if len(mix) == 2 else "")
                     + f", pairs mixed with p {recipe.mix_prob:g} in windows of {recipe.mix_window} samples")
    return "crop + flip" + "".join(f" -> {s}" for s in steps)


def render_text(info: dict[str, Any]) -> str:
    t = info["teacher"]
    lines = [
        f"cache         {info['path']}  (format {info['format_version']}, {info['state']})",
        f"teacher       {t.get('arch')}  file sha256 {str(t.get('sha256'))[:16]}…  tensors "
        f"{str(t['tensors_sha256'])[:16] + '…' if t.get('tensors_sha256') else 'not recorded'}  "
        f"{t.get('num_classes')} classes",
        f"codec         {info['codec']}  temperatures {info['temperatures']}",
        f"recipe        {info['recipe']}",
        f"renderer      {info['renderer']['name']}: {info['renderer']['backend']}",
        f"resize        {info['resize_kernel']}",
        f"augment       {info['augment']['pipeline']}",
        f"              views/aug {info['augment']['record_bytes']} bytes per view "
        f"({info['augment']['bytes_per_view_on_disk']:.1f} on disk)" if info["augment"]["record_bytes"] else
        "              no views/aug record (crop + flip only)",
        f"views         {info['views']} per sample, seed {info['seed']}",
        f"shards        {info['shards_done']}/{info['shards']} done  ({', '.join(info['shard_names'])})",
        f"samples       {info['samples']}  ({info['skipped']} skipped)",
        f"on disk       {info['bytes_on_disk'] / 2**20:.2f} MiB, {info['bytes_per_view']:.1f} bytes per view",
        "versions      " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
    ]
    lines.extend(fidelity_lines(info["fidelity"]))
    for f in info["findings"]:
        verdict = "ok" if f["ok"] else ("warning" if f["warning"] else "FAIL")
        lines.append(f"check         {verdict:<8}{f['check']}" + (f"  ({f['detail']})" if f["detail"] else ""))
    return "\n".join(lines)


def fidelity_lines(fid: dict[str, Any] | None) -> list[str]:
    """The codec's held-out fidelity as recorded at dump time (codec_fidelity), one line per cell."""
    if fid is None:
        return ["fidelity      not recorded (a cache written before dkd-cache measured it): run dkd-cache verify"]
    lines = [f"fidelity      {fid['codec']} held out: fitted on {fid['fit_views']} views, scored on "
             f"{fid['scored_views']} views of other samples; classes seen {fid['classes_seen']}/{fid['num_classes']}; "
             f"alpha {fid['alpha']:g} beta {fid['beta']:g}"]
    for s in fid["scores"]:
        meets = s["cos_median"] >= BAR_MEDIAN and s["cos_p5"] >= BAR_P5
        lines.append(f"  T={s['temperature']:<4g} {s['student']:<13} gradient cosine median {s['cos_median']:.5f} "
                     f"p5 {s['cos_p5']:.4f}  loss error {s['rel_loss_error']:.1e}  "
                     f"{'meets' if meets else 'BELOW'} the bar ({BAR_MEDIAN}, {BAR_P5})")
    if fid["choice"]:
        lines.append(f"  {fid['choice']}")
    return lines
