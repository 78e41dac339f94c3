"""The `dkd-cache` command line: options are parsed here, all work is done by library functions."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer import _click  # typer vendors click: its UsageError is the one commands raise
from typer.core import TyperGroup

from .errors import DKDCacheError

QUOTE_HINT = ("; an unquoted glob or brace pattern? The shell expanded it into many arguments: quote it, "
              "e.g. --shards 'train-*.tar'")


# What to do after Ctrl-C: every command may be stopped at any moment, and these continue where they stopped.
RERUN_HINTS = {
    "train-student": "rerun the same command with --resume: training continues from the last checkpoint",
    "dump-teacher": "rerun the same command: the dump continues where it stopped (written shards are kept)",
    "demo": "rerun the same command: the finished stages are kept",
}


class _Commands(TyperGroup):
    """The command group; a usage error about extra arguments also says how to pass a shard pattern, and Ctrl-C
    says how to continue (exit 130, as a shell reports SIGINT)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _click.exceptions.UsageError as e:
            if "extra argument" in e.message and "quote it" not in e.message:
                e.message += QUOTE_HINT
            raise
        except KeyboardInterrupt:
            hint = RERUN_HINTS.get(ctx.invoked_subcommand or "", "rerun the same command to start it again")
            typer.echo(f"\ninterrupted (Ctrl-C): {hint}", err=True)
            raise typer.Exit(code=130) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run the teacher once; distil many students from its cached logits (DKD).")


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class Amp(str, enum.Enum):
    none = "none"
    bf16 = "bf16"


class LossKind(str, enum.Enum):
    dkd = "dkd"
    ce = "ce"


class Rule(str, enum.Enum):
    uniform = "uniform"
    bucket = "bucket"


class RendererName(str, enum.Enum):
    cpu = "cpu"
    device = "device"
    gpu = "gpu"


class Writer(str, enum.Enum):
    webdataset = "webdataset"
    tar = "tar"


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=2)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DKDCacheError as e:
        _fail(e)


def _flags(**kw):
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in kw.items()}


@app.command("make-shards")
def make_shards_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to create: OUT/train/*.tar, OUT/val/*.tar, OUT/train.txt")],
    classes: Annotated[int, typer.Option(help="Number of classes")] = 100,
    train_per_class: Annotated[int, typer.Option(help="Training images per class")] = 30,
    val_per_class: Annotated[int, typer.Option(help="Validation images per class")] = 10,
    extra_per_class: Annotated[int, typer.Option(
        help="Images per class in a third split OUT/extra (e.g. for a teacher that sees more than its students)")] = 0,
    clutter: Annotated[int, typer.Option(help="At most this many distractor shapes per image (0: none)")] = 5,
    textures: Annotated[int, typer.Option(help="Textures classes draw from, 1..7 (1: plain; shape and hue only)")] = 7,
    shapes: Annotated[int, typer.Option(help="Shapes classes draw from, 1..10")] = 10,
    rotation: Annotated[float, typer.Option(
        help="Largest rotation of the main object, degrees either way (180: any angle; 0: upright)")] = 180.0,
    shard_size: Annotated[int, typer.Option(help="Samples per shard")] = 500,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes byte-identical shards")] = 0,
    writer: Annotated[Writer, typer.Option(help="webdataset's ShardWriter or plain tar")] = Writer.webdataset,
) -> None:
    """Write a synthetic ImageNet-style dataset (JPEG + .cls) as webdataset shards."""
    from .synth import make_shards

    summary = _run(make_shards, out, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                   shard_size=shard_size, seed=seed, writer=writer.value, extra_per_class=extra_per_class,
                   clutter=clutter, textures=textures, shapes=shapes, rotation=rotation)
    extra = f", {summary['extra_samples']} extra" if extra_per_class else ""
    typer.echo(f"wrote {summary['train_samples']} train{extra} and {summary['val_samples']} val samples, "
               f"{summary['classes']} classes, to {out}")


@app.command("dump-teacher")
def dump_teacher_cmd(
    shards: Annotated[str, typer.Option(help="Shards: brace pattern, glob, folder or .txt list")],
    weights: Annotated[Path, typer.Option(help="Teacher weights: torchvision .pth, .safetensors, mmpretrain or dkd-cache checkpoint")],
    out: Annotated[str, typer.Option(help="The cache to create or complete: a Zarr v3 folder or an s3:// prefix")],
    config: Annotated[Optional[Path], typer.Option(help="Pipeline TOML ([recipe] and [dump] tables)")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Teacher architecture (any torchvision classifier)")] = None,
    views: Annotated[Optional[int], typer.Option(help="Augmented views per sample (one per epoch)")] = None,
    topk: Annotated[Optional[str], typer.Option(help="Shorthand codec: K for topk:K, 'all' for fp32")] = None,
    codec: Annotated[Optional[str], typer.Option(help="Logit codec: auto (default: the smallest whose held-out "
                                                      "fidelity meets the bar at every --temperature), topk:K, "
                                                      "topk:K+qB (B=2,4,8), q8, fp16, fp32, "
                                                      "lowrank:R+top:M+sparse:K (learned)")] = None,
    calibration_views: Annotated[Optional[int], typer.Option(
        help="Views drawn before the dump: 3/4 fit a learned codec, 1/4 score the codec's fidelity")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="DKD alpha the recorded fidelity is measured with")] = None,
    beta: Annotated[Optional[float], typer.Option(
        help="DKD beta the recorded fidelity is measured with (train-student's --beta)")] = None,
    temperature: Annotated[Optional[list[float]], typer.Option(help="Temperature(s) whose log-partition is stored")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size of the network")] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="bilinear, bicubic or nearest")] = None,
    antialias: Annotated[Optional[bool], typer.Option(help="Antialiased resize")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Views per teacher batch")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers for decoding and cropping")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the recorded views")] = None,
    device: Annotated[Device, typer.Option(help="cpu or cuda")] = Device.cpu,
    amp: Annotated[Optional[Amp], typer.Option(help="bf16 autocast (default: on for cuda, off for cpu)")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per Zarr chunk")] = None,
    renderer: Annotated[Optional[RendererName], typer.Option(
        help="How views become pixels: cpu (per view in workers), device (decode in workers, crop/resize/flip "
             "batched on --device) or gpu (workers send compressed bytes; decode on --device with nvImageCodec, "
             "pip install \"dkd-cache[gpu]\", then as device); recorded in the cache")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip bad samples, recording each and why in the cache")] = False,
    allow_pipe: Annotated[bool, typer.Option(help="Allow 'pipe:' shard urls (they run shell commands)")] = False,
    lease_seconds: Annotated[Optional[float], typer.Option(
        help="s3:// caches: a killed dump's writer lease lapses after this many seconds")] = None,
    wait_seconds: Annotated[Optional[float], typer.Option(
        help="Under torchrun: how long ranks wait for rank 0's long phases, e.g. scanning shards on object storage "
             "(seconds; default 14400)")] = None,
    log_every: Annotated[Optional[int], typer.Option(
        help="Teacher batches between progress lines when stdout is not a terminal (Slurm, nohup)")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress: a bar on a terminal, lines in a log")] = True,
) -> None:
    """Run the teacher once per recorded view and store its logits in a Zarr v3 cache (resumable)."""
    from .config import load_toml, merge
    from .dump import DumpSettings, dump_teacher
    from .views import Recipe

    try:
        file = load_toml(config)
        recipe = merge(Recipe, file["recipe"], _flags(image_size=image_size, interpolation=interpolation,
                                                       antialias=antialias), where=f"{config} [recipe]")
        if topk is not None and codec is not None:
            raise DKDCacheError("give --topk or --codec, not both")
        codec_spec = codec if codec is not None else (None if topk is None else ("fp32" if topk == "all" else f"topk:{topk}"))
        settings = merge(DumpSettings, file["dump"], _flags(
            arch=arch, views=views, codec=codec_spec, temperatures=tuple(temperature) if temperature else None,
            batch_size=batch_size, workers=workers, seed=seed, device=device, amp=amp, chunk_rows=chunk_rows,
            calibration_views=calibration_views, alpha=alpha, beta=beta,
            lease_seconds=lease_seconds, wait_seconds=wait_seconds,
            renderer=renderer, log_every=log_every,
        ), where=f"{config} [dump]", fixed={"shards": shards, "weights": str(weights), "out": str(out),
                                            "recipe": recipe, "skip_bad": skip_bad or file["dump"].get("skip_bad", False),
                                            "allow_pipe": allow_pipe})
        report = dump_teacher(settings, progress=progress)
    except DKDCacheError as e:
        _fail(e)
    if report.rank != 0:  # one summary per dump, not one per rank
        return
    share = "" if report.world == 1 else f"rank 0 of {report.world} (its shards): "
    typer.echo(f"{share}dumped {report.views_written} views of {report.samples} samples in {report.seconds:.1f} s "
               f"({report.views_per_s:.1f} views/s); skipped {report.skipped}; "
               f"cache {'complete' if report.complete else 'incomplete'}: {report.path}")
    typer.echo(f"codec {report.codec}; fidelity {report.fidelity}")
    if report.decoded:  # the gpu renderer: how the images were decoded (hardware, CPU fallbacks by reason)
        typer.echo("decoded: " + ", ".join(f"{n} {how}" for how, n in sorted(report.decoded.items())))


@app.command("train-student")
def train_student_cmd(
    shards: Annotated[str, typer.Option(help="Training shards (the same as the dump's)")],
    out: Annotated[Path, typer.Option(help="Run directory: config.json, metrics.jsonl, checkpoint.pt")],
    cache: Annotated[Optional[str], typer.Option(help="The teacher cache (a folder or s3:// prefix)")] = None,
    checkpoint_url: Annotated[Optional[str], typer.Option(
        help="Also put each checkpoint there (s3:// prefix or folder); --resume fetches it when --out has none")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Pipeline TOML ([train] table)")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Student architecture")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch, split over ranks")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate at --lr-batch; the lr used is lr x batch-size / lr-batch")] = None,
    lr_batch: Annotated[Optional[int], typer.Option(help="The batch size --lr is given for (default 512)")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="TCKD weight")] = None,
    beta: Annotated[Optional[float], typer.Option(help="NCKD weight")] = None,
    temperature: Annotated[Optional[float], typer.Option()] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="DKD ramps in over this many epochs")] = None,
    loss: Annotated[Optional[LossKind], typer.Option(help="dkd, or ce for the no-teacher baseline")] = None,
    live_teacher: Annotated[Optional[Path], typer.Option(help="Run this teacher online instead of the cache")] = None,
    teacher_arch: Annotated[Optional[str], typer.Option(help="Architecture of --live-teacher")] = None,
    residual_rule: Annotated[Optional[Rule], typer.Option(help="Top-k codecs: how the tail mass is spread")] = None,
    val_shards: Annotated[Optional[str], typer.Option(help="Validation shards, evaluated each epoch")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers")] = None,
    amp: Annotated[Optional[Amp], typer.Option(help="bf16 autocast")] = None,
    device: Annotated[Optional[Device], typer.Option()] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Only without a cache")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Also checkpoint every N steps")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N steps (quick checks)")] = None,
    renderer: Annotated[Optional[RendererName], typer.Option(
        help="Renderer (default: the cache's); another than the cache's needs --allow-other-renderer")] = None,
    allow_other_renderer: Annotated[Optional[bool], typer.Option(
        "--allow-other-renderer", help="Train with another renderer than the cache's (see verify --renderer)")] = None,
    strict: Annotated[Optional[bool], typer.Option(
        "--strict", help="Refuse a cache whose recorded fidelity does not vouch for --temperature and --beta "
                         "(without it: a warning)")] = None,
    views_per_decode: Annotated[Optional[int], typer.Option(
        help="M stored views per decoded image in one pass; a pass counts as M epochs")] = None,
    image_size: Annotated[Optional[int], typer.Option(
        help="The student's input size (default: the cache's); boxes are re-rendered at it")] = None,
    image_size_schedule: Annotated[Optional[str], typer.Option(
        help="Per-epoch student size, EPOCH:SIZE pairs from epoch 0, e.g. 0:160,30:192,90:224")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps between metrics records and log lines")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        help="Epochs between validations on --val-shards (the last epoch is always validated)")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option(
        "--tensorboard", help="Also write TensorBoard scalars to OUT/tensorboard (needs: pip install tensorboard)")] = None,
    wait_seconds: Annotated[Optional[float], typer.Option(
        help="Under torchrun: how long ranks wait for rank 0's long phases, e.g. scanning shards on object storage "
             "(seconds; default 14400)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train a student with DKD from the cache (or CE only, or with a live teacher); works under torchrun."""
    from .config import load_toml, merge
    from .train import TrainConfig, train_student

    try:
        file = load_toml(config)
        cfg = merge(TrainConfig, file["train"], _flags(
            arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, lr_batch=lr_batch, alpha=alpha, beta=beta, temperature=temperature,
            warmup_epochs=warmup_epochs, loss=loss, live_teacher=str(live_teacher) if live_teacher else None,
            teacher_arch=teacher_arch,
            residual_rule=residual_rule, val_shards=val_shards, workers=workers, amp=amp, device=device,
            num_classes=num_classes, seed=seed, checkpoint_every=checkpoint_every, max_steps=max_steps,
            cache=str(cache) if cache else None, renderer=renderer, allow_other_renderer=allow_other_renderer,
            strict=strict, views_per_decode=views_per_decode, image_size=image_size, image_size_schedule=image_size_schedule,
            checkpoint_url=checkpoint_url,
            log_every=log_every, eval_every=eval_every, tensorboard=tensorboard, wait_seconds=wait_seconds,
        ), where=f"{config} [train]", fixed={"shards": shards, "out": str(out),
                                             **({"recipe": file["recipe"]} if file["recipe"] else {})})
        result = train_student(cfg, resume=resume, progress=progress)
    except DKDCacheError as e:
        _fail(e)
    if result and result.get("rank", 0) == 0:  # one summary per run, not one per rank
        typer.echo(json.dumps({k: v for k, v in result.items() if k not in ("event", "rank")}))


@app.command("inspect")
def inspect_cmd(
    cache: Annotated[str, typer.Argument(help="A cache made by dump-teacher (a folder or s3:// prefix)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text")] = False,
    deep: Annotated[bool, typer.Option(help="Also read every chunk (checksums, fill values)")] = False,
) -> None:
    """Recipe, teacher, shards, completeness, integrity findings, size on disk and bytes per view; exit 1 when a
    finding fails."""
    from .inspect import describe, render_text

    info = _run(describe, cache, deep=deep)
    typer.echo(json.dumps(info, indent=2) if as_json else render_text(info))
    if any(not f["ok"] and not f["warning"] for f in info["findings"]):
        raise typer.Exit(code=1)


@app.command("plan")
def plan_cmd(
    samples: Annotated[int, typer.Option(help="Samples in the training set")],
    views: Annotated[int, typer.Option(help="Views per sample to dump")],
    classes: Annotated[int, typer.Option(help="The teacher's classes")],
    codec: Annotated[str, typer.Option(help="Logit codec (as dump-teacher's --codec)")] = "topk:10+q4",
    temperatures: Annotated[int, typer.Option(help="How many --temperature values are dumped")] = 1,
    epochs: Annotated[int, typer.Option(help="Training epochs")] = 100,
    device: Annotated[str, typer.Option(help="Device whose measured rates to use: h200, h100 or cpu")] = "h200",
    rate: Annotated[Optional[float], typer.Option(help="Views/s one rank dumps (instead of the measured rate)")] = None,
    train_rate: Annotated[Optional[float], typer.Option(help="Images/s one rank trains (instead of measured)")] = None,
    ranks: Annotated[int, typer.Option(help="Ranks (GPUs) dumping and training")] = 8,
    workers: Annotated[int, typer.Option(help="DataLoader workers per rank")] = 12,
    batch_size: Annotated[int, typer.Option(help="Batch per rank")] = 256,
    image_size: Annotated[int, typer.Option(help="Image size (px)")] = 224,
    shard_size: Annotated[int, typer.Option(help="Samples per tar shard")] = 1252,
    jpeg_bytes: Annotated[Optional[float], typer.Option(help="Mean JPEG bytes (instead of the measured)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text")] = False,
) -> None:
    """Before a run: the cache's size on disk, the dump's and training's time, the shared memory per rank and the
    storage read rate training needs, each figure with the measurement it comes from."""
    from .plan import PlanInputs, as_dict, format_plan, make_plan

    inputs = PlanInputs(samples=samples, views=views, classes=classes, codec=codec, temperatures=temperatures,
                        epochs=epochs, device=None if device == "none" else device, rate=rate, train_rate=train_rate,
                        ranks=ranks, workers=workers, batch_size=batch_size, image_size=image_size,
                        shard_size=shard_size, jpeg_bytes=jpeg_bytes)
    plan = _run(make_plan, inputs)
    typer.echo(json.dumps(as_dict(inputs, plan), indent=2) if as_json else format_plan(inputs, plan))


@app.command("verify")
def verify_cmd(
    cache: Annotated[str, typer.Option(help="The cache to check (a folder or s3:// prefix)")],
    shards: Annotated[str, typer.Option(help="The shards it was dumped from")],
    weights: Annotated[Path, typer.Option(help="The teacher's weights")],
    samples: Annotated[int, typer.Option(help="(view, sample) entries to re-render and compare")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the entry draw and the random student")] = 0,
    student: Annotated[Optional[Path], typer.Option(help="A student checkpoint for the loss comparison")] = None,
    train_steps: Annotated[int, typer.Option(help="Also train N steps live and from the cache, and compare")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here")] = None,
    logit_tol: Annotated[Optional[float], typer.Option(help="Max |stored - live| logit error allowed")] = None,
    loss_tol: Annotated[Optional[float], typer.Option(help="Max relative DKD loss error allowed")] = None,
    cosine_tol: Annotated[Optional[float], typer.Option(help="Min median gradient cosine allowed")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="The recipe's DKD alpha")] = None,
    beta: Annotated[Optional[float], typer.Option(help="The recipe's DKD beta")] = None,
    temperature: Annotated[Optional[list[float]], typer.Option(
        help="The recipe's temperature(s): lossy codecs must follow exact DKD there (default: every stored one)")] = None,
    live_cosine_tol: Annotated[Optional[float], typer.Option(
        help="Lossy codecs: min median gradient cosine against live exact DKD")] = None,
    live_p5_tol: Annotated[Optional[float], typer.Option(
        help="Lossy codecs: min 5th-percentile gradient cosine against live exact DKD")] = None,
    live_loss_tol: Annotated[Optional[float], typer.Option(
        help="Lossy codecs: max relative DKD loss error against live exact DKD")] = None,
    device: Annotated[Device, typer.Option()] = Device.cpu,
    renderer: Annotated[Optional[RendererName], typer.Option(
        help="Also render the entries with this renderer and report the logit and gradient drift against the "
             "cache's renderer")] = None,
) -> None:
    """Re-render stored views, run the live teacher, and report how far the cache is from it (exit 1 if too far)."""
    from .verify import VerifySettings, render_report, verify

    try:
        kw = {k: v for k, v in dict(logit_tol=logit_tol, loss_tol=loss_tol, cosine_tol=cosine_tol, alpha=alpha,
                                    beta=beta, temperatures=tuple(temperature) if temperature else None,
                                    live_cosine_tol=live_cosine_tol, live_p5_tol=live_p5_tol,
                                    live_loss_tol=live_loss_tol).items() if v is not None}
        settings = VerifySettings(cache=str(cache), shards=shards, weights=str(weights), samples=samples, seed=seed,
                                  student=str(student) if student else None, train_steps=train_steps,
                                  device=device.value, renderer=renderer.value if renderer else None, **kw)
        report = verify(settings)
    except DKDCacheError as e:
        _fail(e)
    typer.echo(render_report(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        typer.echo("verify FAILED: " + "; ".join(report["failures"]), err=True)
        raise typer.Exit(code=1)


@app.command("plot")
def plot_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="train-student run directories (config.json + metrics.jsonl)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write")],
    title: Annotated[Optional[str], typer.Option(help="Figure title")] = None,
) -> None:
    """Validation top-1 and training loss against epochs; runs of one mode drawn thin, their mean bold."""
    from .plot import plot_runs

    path = _run(plot_runs, run_dirs, out, title=title)
    typer.echo(f"wrote {path}")


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Argument(help="Folder for shards, teacher, cache and runs")],
    config: Annotated[Optional[Path], typer.Option(help="Demo recipe (default: the shipped pipelines/demo.toml)")] = None,
    stop_after: Annotated[Optional[str], typer.Option(help="Stop after this stage, e.g. make-shards")] = None,
) -> None:
    """The whole pipeline on a synthetic dataset: shards, teacher, dump, three students, verify, a table."""
    from .demo import run_demo

    _run(run_demo, workdir, config, stop_after=stop_after)

