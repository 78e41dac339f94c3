"""Codec frontier: bytes per view on disk against DKD loss and gradient fidelity, for every logit codec.

Sources of teacher logits (ground truth: the float32 logits themselves), each split in two: a learned codec
(lowrank) is fitted on one part and every codec is measured on the other, so no figure is in-sample:
  real         /work/shared/data/imagenet-real-logits/logits.npz (<repo>/../shared/data/...; --real-logits PATH):
               1,024 views of 16 photos through EfficientNet-Lite0 (1,000 classes; flat tails); fit on every other
               view of each photo, measured on the other 512 views (other crops of the same photos).
  real-photos  the same file, fit on the 8 even photos, measured on the views of the 8 odd ones (content the fit
               never saw: the pessimistic case).
               Students of both: "trained" = the file's student_logits (EfficientNet-Lite1); "untrained" = random
               logits N(0, 0.1^2), seed 0 (the scale of a freshly initialised network's outputs), same shape.
  demo         (optional: --cache C.zarr --shards P --weights W [--student CKPT] [--demo-samples N]) the demo's
               teacher on its own stored views: each (sample, view) of the cache is re-rendered from the shards with
               its stored box and flip and passed through the teacher in float32 (the cache's own codec is not
               used); fit on every other sample, measured on the others. Students: --student's logits on the same
               views ("trained", if given) and N(0, 0.1^2) ("untrained"). This source also has the teacher's
               penultimate features: "features:q8" and "features:fp16" are a feature cache (the features stored with
               that codec, logits = the teacher's fc of the decoded features, fc kept once per cache).

For each codec (--codecs; default CODECS) and, for the top-k codecs that store no tail, each residual rule (uniform,
bucket), at T=1 (alpha 1, beta 0.5: the ImageNet recipe) and T=4 (alpha 1, beta 8: DKD's CIFAR-100 setting):
  bytes/view   the codec's arrays plus the exact target logit and the lse at one temperature (float32 each: what
               the cache stores beside every codec), encoded from the measured rows, written with zarr using the
               cache's compressors (dkd_cache.cache_writer.COMPRESSORS) in the cache's chunking (inner chunks of
               --chunk-rows rows, sharded), measured as chunk bytes on disk / entries (zarr.json excluded: a
               constant per array). The crop box and flip (~9 raw bytes per view) are not counted; nor is a learned
               basis or a feature cache's fc (stored once per cache; "basis_bytes" in the JSON).
  loss error   |DKD(decoded) - DKD(exact)| / DKD(exact), DKD as the batch mean over the measured rows.
  grad cosine  per sample, cosine between d DKD/d student logits from the stored entries and from the exact teacher
               logits: median, 5th percentile and worst over samples.
The cached loss is what training computes: dkd_cache.teacher_signal.encode_entries then dkd_from_entries (full-
decoding codecs: TCKD exact from the stored target logit and lse; top-k codecs: loss.dkd_loss_topk).

Prints a markdown table, writes --json, plots the frontier (x bytes/view, log; y 1 - median cosine, log; T=1 and T=4
panels) to --plot (default benchmarks/frontier.png), names the smallest codec with median cosine >= 0.999 and
p5 >= 0.99 at T=1 on the real logits (trained student), and the default by the project's rule: the smallest codec
meeting that bar on every source.

Reproduce (about 3 minutes on 2 CPU cores):
    .venv/bin/python benchmarks/fidelity.py --json /tmp/fidelity.json
    # with the demo teacher too, after `dkd-cache demo /tmp/dkd-demo`:
    .venv/bin/python benchmarks/fidelity.py --cache /tmp/dkd-demo/teacher.zarr --shards /tmp/dkd-demo/shards/train.txt \\
        --weights /tmp/dkd-demo/runs/teacher/checkpoint.pt --student /tmp/dkd-demo/runs/student-ce/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REAL = REPO.parent / "shared" / "data" / "imagenet-real-logits" / "logits.npz"
CODECS = ("topk:1", "topk:5", "topk:10", "topk:20", "topk:50", "topk:10+q2", "topk:10+q4", "topk:10+q8", "topk:20+q4",
          "q8", "fp16", "fp32", "lowrank:64+sparse:16", "lowrank:16+top:32+sparse:8", "lowrank:32+top:32+sparse:8",
          "lowrank:32+top:64+sparse:8", "lowrank:32+top:64+sparse:16", "lowrank:64+top:128+sparse:32",
          "lowrank:96+top:128+sparse:32", "lowrank:128+top:128+sparse:32")
FEATURE_CODECS = ("q8", "fp16")  # codecs applied to the penultimate features (a feature cache)
RULES = ("uniform", "bucket")
SETTINGS = {1.0: (1.0, 0.5), 4.0: (1.0, 8.0)}  # T -> (alpha, beta)
UNTRAINED_STD = 0.1
MEDIAN_COS, P5_COS = 0.9995, 0.995  # codec_fidelity.BAR_MEDIAN, BAR_P5: --codec auto's bar


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-logits", default=str(DEFAULT_REAL), help="the real ImageNet logits (.npz)")
    p.add_argument("--no-real", action="store_true", help="skip the real logits")
    p.add_argument("--cache", default=None, help="a cache dumped from the demo (its views are re-rendered)")
    p.add_argument("--shards", default=None, help="the cache's shards")
    p.add_argument("--weights", default=None, help="the cache's teacher weights")
    p.add_argument("--student", default=None, help="a trained student checkpoint for the demo source (optional)")
    p.add_argument("--student-arch", default="resnet18")
    p.add_argument("--demo-samples", type=int, default=1024, help="views of the demo cache to use")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per inner chunk when measuring bytes")
    p.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec specs")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--plot", default=str(REPO / "benchmarks" / "frontier.png"), help="'' to skip the plot")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="no study: table, default and plot from the rows of earlier --json outputs, together")
    a = p.parse_args(argv)
    if a.cache and not (a.shards and a.weights):
        p.error("--cache needs --shards and --weights (the teacher is run on the re-rendered views)")
    return a


# ------------------------------------------------------------------------------------------------ sources
def untrained(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * UNTRAINED_STD


def held_out(source: dict[str, Any], fit: np.ndarray, name: str, how: str) -> dict[str, Any]:
    """The source split in two: codecs that learn (lowrank) fit on the `fit` rows; every codec is measured on the
    others, so no figure is in-sample."""
    fit = torch.from_numpy(np.asarray(fit, bool))
    ev = ~fit
    out = {"name": name, "teacher": source["teacher"][ev].clone(), "labels": source["labels"][ev].clone(),
           "calibration": source["teacher"][fit].clone(),
           "students": {k: v[ev].clone() for k, v in source["students"].items()},
           "about": f"{source['about']}; {how}: fit on {int(fit.sum())} rows, measured on {int(ev.sum())}"}
    if "features" in source:
        out.update(features=source["features"][ev].clone(), fc=source["fc"])
    return out


def alternate_within(groups: np.ndarray) -> np.ndarray:
    """True for every other row of each group (the group's 1st, 3rd, ... row in file order)."""
    out = np.zeros(len(groups), bool)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        out[rows[::2]] = True
    return out


def real_sources(path: str) -> list[dict[str, Any]]:
    """Two held-out splits of the real logits: 'real' fits on half the views of every photo and is measured on
    the other views (other crops of the same photos: a calibration sample that covers the data's content, as a
    sample of a whole training set does); 'real-photos' fits on 8 photos and is measured on the 8 others
    (content the fit never saw: the pessimistic case, harsher than any calibration sample of the data itself)."""
    d = np.load(path, allow_pickle=False)
    z = torch.from_numpy(np.asarray(d["teacher_logits"], np.float32))
    photo = np.asarray(d["image_index"]).astype(np.int64)
    whole = {"teacher": z, "labels": torch.from_numpy(np.asarray(d["labels"]).astype(np.int64)),
             "students": {"trained": torch.from_numpy(np.asarray(d["student_logits"], np.float32)),
                          "untrained": untrained(tuple(z.shape))},
             "about": f"{path}: EfficientNet-Lite0 teacher, EfficientNet-Lite1 student, {z.shape[0]} views of "
                      f"{len(np.unique(photo))} photos, {z.shape[1]} classes"}
    return [held_out(whole, alternate_within(photo), "real", "held-out views (every other view of each photo)"),
            held_out(whole, photo % 2 == 0, "real-photos", "held-out photos (even photos fit, odd measured)")]


def demo_source(a: argparse.Namespace) -> dict[str, Any]:
    """The demo teacher's float32 logits on the cache's own views (re-rendered from the shards)."""
    from dkd_cache import cache as cache_mod
    from dkd_cache import cache_meta
    from dkd_cache.data import expand_shards, iter_raw_samples, parse_sample, shard_name
    from dkd_cache.teacher import load_teacher
    from dkd_cache.views import normalize, render

    cache = cache_mod.open_cache(a.cache)
    meta = cache.meta
    m = meta.manifest
    urls = {shard_name(u): u for u in expand_shards(a.shards)}
    n = meta.manifest.rows
    status = cache.read_rows("samples/status", 0, n)
    labels = cache.read_rows("samples/label", 0, n)
    keys = cache_mod.decode_keys(cache.read_rows("samples/key", 0, n))
    boxes = np.stack([cache.read_rows("views/box", 0, n, view=v) for v in range(meta.views)])
    flips = np.stack([cache.read_rows("views/flip", 0, n, view=v) for v in range(meta.views)])
    # (row, view) entries: every view of the first ok rows, shard by shard, until --demo-samples
    want: list[tuple[int, int]] = []
    for e in m.shards:
        for r in range(e.row_start, e.row_start + e.samples):
            if status[r] == cache_meta.STATUS_OK:
                want.extend((r, v) for v in range(meta.views))
        if len(want) >= a.demo_samples:
            break
    want = want[:a.demo_samples]
    rows_needed = {r for r, _ in want}
    images: dict[int, bytes] = {}
    for e in m.shards:
        if not any(e.row_start <= r < e.row_stop for r in rows_needed):
            continue
        for pos, raw in enumerate(iter_raw_samples(urls[e.name])):
            r = e.row_start + pos
            if r in rows_needed:
                s = parse_sample(raw)
                if s.key != keys[r]:
                    raise SystemExit(f"{e.name}: sample {pos} is {s.key!r}, the cache has {keys[r]!r}")
                images[r] = s.image
    x = torch.stack([render(images[r], tuple(int(b) for b in boxes[v, r]), bool(flips[v, r]), meta.recipe)
                     for r, v in want])
    teacher, _ = load_teacher(meta.teacher.arch, a.weights)
    students = {"untrained": None}
    if a.student:  # any weights file the teacher loader reads (a train-student checkpoint included)
        model, _ = load_teacher(a.student_arch, a.student)
        students["trained"] = model
    out: dict[str, list[torch.Tensor]] = {"teacher": [], **{k: [] for k in students if students[k] is not None}}
    feats: list[torch.Tensor] = []  # the teacher's penultimate features: the input of its final layer
    hook = teacher.fc.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].float()))
    with torch.inference_mode():
        for i in range(0, len(x), 128):
            xb = normalize(x[i:i + 128], meta.recipe)
            out["teacher"].append(teacher(xb).float())
            for k, mdl in students.items():
                if mdl is not None:
                    out[k].append(mdl(xb).float())
    hook.remove()
    z = torch.cat(out["teacher"])
    stud = {k: torch.cat(v) for k, v in out.items() if k != "teacher"}
    stud["untrained"] = untrained(tuple(z.shape))
    y = torch.tensor([int(labels[r]) for r, _ in want], dtype=torch.long)
    # The ground truth must be the cache's teacher on the cache's views: its target logits match the stored ones.
    stored = np.array([cache.read_rows("logits/target", r, r + 1, view=v)[0] for r, v in want], np.float32)
    gap = float((z.gather(1, y[:, None])[:, 0] - torch.from_numpy(stored)).abs().max())
    whole = {"teacher": z.clone(), "labels": y, "students": {k: v.clone() for k, v in stud.items()},
             "features": torch.cat(feats).clone(),
             "fc": (teacher.fc.weight.detach().float().clone(), teacher.fc.bias.detach().float().clone()),
             "about": f"{a.cache}: {meta.teacher.arch} teacher, {len(want)} (sample, view) entries, "
                      f"{meta.num_classes} classes; re-rendered teacher vs stored target logit: max |diff| {gap:.2e}"}
    sample = np.array([r for r, _ in want])
    return held_out(whole, np.isin(sample, np.unique(sample)[::2]), "demo", "held-out samples (every other sample)")


# ------------------------------------------------------------------------------------------------ measures
def disk_bytes_per_view(codec, z: torch.Tensor, chunk_rows: int, temperature: float = 1.0) -> dict[str, float]:
    """Encode z, write the codec's arrays + target + lse like the cache does, return bytes per entry.
    A learned basis is stored once per cache (not per view): reported beside as basis_bytes."""
    import zarr

    from dkd_cache.cache_writer import COMPRESSORS

    n, c = z.shape
    arrays = {f"logits/{k}": v for k, v in codec.encode(z).items()}
    arrays["logits/target"] = z.max(dim=1).values.numpy().astype(np.float32)  # any float32 logit per row
    arrays["logits/lse"] = torch.logsumexp(z / temperature, dim=1).numpy().astype(np.float32)[:, None]
    with tempfile.TemporaryDirectory(prefix="dkd-fidelity-") as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        for name, values in arrays.items():
            values = np.ascontiguousarray(values)[None]  # (V=1, N, ...)
            tail = values.shape[2:]
            arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(1, chunk_rows, *tail),
                                     shards=(1, chunk_rows, *tail), compressors=COMPRESSORS,
                                     config={"write_empty_chunks": True})
            arr[:] = values
        data = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = codec.bytes_per_entry(c) + 8
    basis = sum(a.nbytes for a in codec.state_arrays().values())
    return {"disk_bytes_per_view": data / n, "raw_bytes_per_view": raw, "basis_bytes": basis}


def loss_and_grad(fn, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return float(loss.detach()), s.grad.detach()


def cached_loss_fn(codec, rule: str | None, z: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float,
                   beta: float):
    """DKD of a student against z stored with `codec`: teacher_signal.encode_entries, then dkd_from_entries (the
    function training runs on every batch; full-decoding codecs get TCKD from the stored target logit and lse)."""
    from dkd_cache.teacher_signal import Storage, dkd_from_entries, encode_entries

    storage = Storage(codec=codec, num_classes=z.shape[1], temperatures=(temperature,))
    entries = encode_entries(z, y, storage)
    return lambda st: dkd_from_entries(st, y, entries, storage, alpha=alpha, beta=beta,  # noqa: E731
                                       temperature=temperature, rule=rule or "uniform")


def feature_loss_fn(codec, feats: torch.Tensor, fc: tuple[torch.Tensor, torch.Tensor], z: torch.Tensor,
                    y: torch.Tensor, temperature: float, alpha: float, beta: float):
    """A feature cache: the teacher's penultimate features stored with `codec`, logits = fc(decoded features),
    with the exact target logit and lse stored beside them (TCKD exact, as for full-decoding codecs)."""
    from dkd_cache.logit_codecs import roundtrip
    from dkd_cache.loss import dkd_loss

    logits = torch.nn.functional.linear(roundtrip(codec, feats).full, fc[0], fc[1])
    zt, lse = z.gather(1, y[:, None])[:, 0], torch.logsumexp(z / temperature, dim=1)
    return lambda st: dkd_loss(st, logits, y, alpha, beta, temperature, target_logit=zt,  # noqa: E731
                               teacher_lse=lse)


def fidelity(fn, s: torch.Tensor, exact: tuple[float, torch.Tensor]) -> dict[str, float]:
    loss, grad = loss_and_grad(fn, s)
    l0, g0 = exact
    cos = torch.nn.functional.cosine_similarity(grad.double(), g0.double(), dim=1).numpy()
    return {"loss": loss, "exact_loss": l0, "rel_loss_error": abs(loss - l0) / abs(l0),
            "cos_median": float(np.median(cos)), "cos_p5": float(np.percentile(cos, 5)),
            "cos_min": float(cos.min())}


def study(source: dict[str, Any], codecs: list[str], chunk_rows: int) -> list[dict[str, Any]]:
    from dkd_cache.logit_codecs import LowRankCodec, parse_codec
    from dkd_cache.loss import dkd_loss

    z, y = source["teacher"], source["labels"]
    c = z.shape[1]
    rows = []
    sizes, fitted = {}, {}
    for spec in codecs:
        codec = parse_codec(spec, c)
        if isinstance(codec, LowRankCodec):
            codec = codec.fit(source["calibration"])
        fitted[spec] = codec
        sizes[spec] = disk_bytes_per_view(codec, z, chunk_rows)
    # the teacher's penultimate features (sources that have them): fc kept once per cache, features per view
    feature_codecs = {spec: parse_codec(spec, source["features"].shape[1]) for spec in FEATURE_CODECS} \
        if "features" in source else {}
    for spec, codec in feature_codecs.items():
        sizes[f"features:{spec}"] = {**disk_bytes_per_view(codec, source["features"], chunk_rows),
                                     "basis_bytes": sum(t.numel() * 4 for t in source["fc"])}
    for student, s in source["students"].items():
        for temperature, (alpha, beta) in SETTINGS.items():
            exact = loss_and_grad(lambda st: dkd_loss(st, z, y, alpha, beta, temperature), s)
            for spec in codecs:
                codec = fitted[spec]
                for rule in (RULES if not codec.decodes_full else (None,)):
                    f = fidelity(cached_loss_fn(codec, rule, z, y, temperature, alpha, beta), s, exact)
                    rows.append({"source": source["name"], "student": student, "T": temperature, "alpha": alpha,
                                 "beta": beta, "codec": spec, "rule": rule or "-", **sizes[spec], **f})
            for spec, codec in feature_codecs.items():
                f = fidelity(feature_loss_fn(codec, source["features"], source["fc"], z, y, temperature, alpha,
                                             beta), s, exact)
                rows.append({"source": source["name"], "student": student, "T": temperature, "alpha": alpha,
                             "beta": beta, "codec": f"features:{spec}", "rule": "-", **sizes[f"features:{spec}"], **f})
    return rows


# ------------------------------------------------------------------------------------------------ output
def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | student | T (alpha, beta) | codec | rule | bytes/view disk (raw) | rel. loss error | "
             "cos median | cos p5 | cos worst |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['student']} | {r['T']:g} ({r['alpha']:g}, {r['beta']:g}) | {r['codec']} | "
                     f"{r['rule']} | {r['disk_bytes_per_view']:.1f} ({r['raw_bytes_per_view']}) | "
                     f"{r['rel_loss_error']:.2e} | {r['cos_median']:.6f} | {r['cos_p5']:.6f} | {r['cos_min']:.4f} |")
    return "\n".join(lines)


def choose(rows: list[dict[str, Any]], source: str = "real", student: str = "trained", temperature: float = 1.0):
    ok = [r for r in rows if r["source"] == source and r["student"] == student and r["T"] == temperature
          and r["cos_median"] >= MEDIAN_COS and r["cos_p5"] >= P5_COS]
    return min(ok, key=lambda r: (r["disk_bytes_per_view"], r["codec"])) if ok else None


def choose_everywhere(rows: list[dict[str, Any]], temperature: float = 1.0):
    """The default's rule: the smallest codec (bytes on the first source) meeting the bar on every source, with the
    trained student where a source has one (else its untrained student)."""
    sources = list(dict.fromkeys(r["source"] for r in rows))
    student = {src: "trained" if any(r["source"] == src and r["student"] == "trained" for r in rows) else "untrained"
               for src in sources}
    passing = None
    for src in sources:
        ok = {(r["codec"], r["rule"]) for r in rows if r["source"] == src and r["student"] == student[src]
              and r["T"] == temperature and r["cos_median"] >= MEDIAN_COS and r["cos_p5"] >= P5_COS}
        passing = ok if passing is None else passing & ok
    first = [r for r in rows if r["source"] == sources[0] and r["student"] == student[sources[0]]
             and r["T"] == temperature and (r["codec"], r["rule"]) in (passing or set())]
    return (min(first, key=lambda r: (r["disk_bytes_per_view"], r["codec"])) if first else None), sources


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-9
    series = sorted({(r["source"], r["student"]) for r in rows})
    colours = dict(zip(series, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                "tab:pink", "tab:olive")))

    def marker(r):
        if r["codec"].startswith("topk") and "+q" not in r["codec"]:
            return "o" if r["rule"] == "uniform" else "s"
        if r["codec"].startswith("lowrank"):
            return "P"
        return {"q8": "D", "fp16": "v", "fp32": "*"}.get(r["codec"], "^")

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), sharey=True)
    for ax, temperature in zip(axes, SETTINGS):
        alpha, beta = SETTINGS[temperature]
        for ser in series:
            pts = [r for r in rows if (r["source"], r["student"]) == ser and r["T"] == temperature]
            for r in pts:
                ax.scatter(r["disk_bytes_per_view"], max(1 - r["cos_median"], floor), marker=marker(r), s=55,
                           color=colours[ser], alpha=0.85, edgecolors="k", linewidths=0.4)
                if ser == ("real", "trained"):
                    label = r["codec"] + ("" if r["rule"] == "-" else f" {r['rule'][0]}")
                    ax.annotate(label, (r["disk_bytes_per_view"], max(1 - r["cos_median"], floor)), fontsize=7,
                                xytext=(4, 3), textcoords="offset points")
        ax.axhline(1 - MEDIAN_COS, color="grey", ls="--", lw=0.8)
        ax.annotate(f"median cos {MEDIAN_COS}", (0.01, 1 - MEDIAN_COS), xycoords=("axes fraction", "data"),
                    fontsize=7, va="bottom", color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes per view on disk (codec + target + lse, zstd)")
        ax.set_title(f"T={temperature:g} (alpha {alpha:g}, beta {beta:g})")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].set_ylabel(f"1 - median per-sample gradient cosine (exact codecs clipped to {floor:g})")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[s], label=f"{s[0]} / {s[1]} student")
               for s in series]
    handles += [plt.Line2D([], [], marker=m, ls="", color="grey", label=l) for m, l in
                (("o", "topk:K uniform"), ("s", "topk:K bucket"), ("^", "topk:K+qB"), ("P", "lowrank (held out)"),
                 ("D", "q8"), ("v", "fp16"), ("*", "fp32"))]
    axes[1].legend(handles=handles, fontsize=8, loc="upper right")
    fig.suptitle("DKD cache codecs: size against gradient fidelity (labels: real logits, trained student)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    t0 = time.perf_counter()
    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()]
    sources, rows = [], []
    if a.from_json:  # rows of earlier runs (e.g. the real logits and a demo cache, run apart): no recomputation
        for path in a.from_json:
            saved = json.loads(Path(path).read_text())
            rows.extend(saved["rows"])
            sources.extend({"about": about} for about in saved["sources"])
    else:
        if not a.no_real:
            sources.extend(real_sources(a.real_logits))
        if a.cache:
            sources.append(demo_source(a))
    for src in ([] if a.from_json else sources):
        print(f"source {src['name']}: {src['about']}; students {sorted(src['students'])}", flush=True)
        rows.extend(study(src, codecs, a.chunk_rows))
    print(table(rows))
    best = choose(rows) if any(r["source"] == "real" for r in rows) else None
    if best:
        print(f"\nSmallest codec with median cosine >= {MEDIAN_COS} and p5 >= {P5_COS} at T=1 on the real logits "
              f"(trained student): {best['codec']}" + ("" if best["rule"] == "-" else f" ({best['rule']} rule)")
              + f" at {best['disk_bytes_per_view']:.1f} bytes/view on disk (median {best['cos_median']:.5f}, "
              f"p5 {best['cos_p5']:.5f}, loss error {best['rel_loss_error']:.1e})")
    elif any(r["source"] == "real" for r in rows):
        print(f"\nNo codec reaches median cosine >= {MEDIAN_COS} and p5 >= {P5_COS} at T=1 on the real logits")
    default, names = choose_everywhere(rows) if rows else (None, [])
    print(f"Default by the rule (smallest meeting median >= {MEDIAN_COS} and p5 >= {P5_COS} at T=1 on every "
          f"source: {', '.join(names)}; the trained student where the source has one, else the untrained): "
          + (default["codec"] if default else "none"))
    if a.plot:
        plot(rows, a.plot)
        print(f"frontier plot: {a.plot}")
    seconds = time.perf_counter() - t0
    print(f"wall time {seconds:.0f} s")
    result = {"rows": rows, "best": best, "default": default, "sources": [s["about"] for s in sources], "settings":
              {str(k): {"alpha": v[0], "beta": v[1]} for k, v in SETTINGS.items()},
              "untrained_student": f"N(0, {UNTRAINED_STD}^2) logits, seed 0", "seconds": seconds}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
