"""The Typer app: commands parse options, call the library, and turn typed errors into exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from dkd_cache.cli import app

runner = CliRunner()


def test_make_shards_then_inspect(tmp_path, cache_path):
    r = runner.invoke(app, ["make-shards", str(tmp_path / "d"), "--classes", "3", "--train-per-class", "2",
                            "--val-per-class", "1", "--shard-size", "4", "--writer", "tar"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "d" / "train").glob("*.tar"))) == 2
    r = runner.invoke(app, ["inspect", str(cache_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["state"] == "complete" and info["views"] == 2 and info["bytes_per_view"] > 0
    assert "bytes per view" in runner.invoke(app, ["inspect", str(cache_path)]).output


def test_dump_cli_refuses_bad_flags_before_work(tmp_path, shards, teacher_ckpt):
    base = ["dump-teacher", "--shards", str(Path(shards["train"][0]).parent), "--weights", str(teacher_ckpt),
            "--out", str(tmp_path / "c.zarr"), "--arch", "resnet18", "--no-progress"]
    for extra, words in ((["--views", "0"], "views"), (["--temperature", "-1"], "temperature"),
                         (["--batch-size", "0"], "batch_size"), (["--topk", "11"], "11"),
                         (["--image-size", "-3"], "image_size")):
        r = runner.invoke(app, base + extra)
        assert r.exit_code == 2, (extra, r.output)
        assert words in r.output, (extra, r.output)
    assert not (tmp_path / "c.zarr").exists()


def test_dump_cli_config_with_unknown_key_is_refused(tmp_path, shards, teacher_ckpt):
    cfg = tmp_path / "x.toml"
    cfg.write_text("[dump]\nviewz = 3\n")
    r = runner.invoke(app, ["dump-teacher", "--shards", shards["train"][0], "--weights", str(teacher_ckpt),
                            "--out", str(tmp_path / "c.zarr"), "--config", str(cfg)])
    assert r.exit_code == 2 and "viewz" in r.output


def test_train_cli_errors_are_clear(tmp_path, shards, cache_path):
    r = runner.invoke(app, ["train-student", "--shards", shards["train"][0], "--out", str(tmp_path / "run"),
                            "--no-progress"])
    assert r.exit_code == 2 and "--cache" in r.output  # dkd needs a cache or a live teacher
    r = runner.invoke(app, ["train-student", "--shards", str(tmp_path / "missing-*.tar"), "--cache", str(cache_path),
                            "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 2 and "matched no files" in r.output


def test_ctrl_c_says_how_to_continue_and_rerunning_continues(tmp_path, shards, cache_path, monkeypatch):
    import dkd_cache.dump as dump_mod
    import dkd_cache.train as train_mod

    real_step, steps = train_mod.train_step, []

    def interrupted_at_step_3(*a, **k):  # Ctrl-C during the third step, after the step-2 checkpoint
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    run = tmp_path / "run"
    args = ["train-student", "--shards", str(Path(shards["train"][0]).parent), "--cache", str(cache_path), "--out",
            str(run), "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--workers", "0", "--checkpoint-every",
            "2", "--no-progress"]
    monkeypatch.setattr(train_mod, "train_step", interrupted_at_step_3)
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "Traceback" not in r.output, r.output
    assert "interrupted" in r.output and "rerun the same command with --resume" in r.output, r.output
    monkeypatch.setattr(train_mod, "train_step", real_step)
    r = runner.invoke(app, args + ["--resume"])  # as told: the same command with --resume
    assert r.exit_code == 0, r.output
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "step"]
    assert logged == [1, 2, 3, 4, 5]  # continued from the step-2 checkpoint, each step logged once

    def interrupted_dump(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dump_mod, "dump_teacher", interrupted_dump)
    r = runner.invoke(app, ["dump-teacher", "--shards", str(Path(shards["train"][0]).parent), "--weights",
                            str(cache_path), "--out", str(tmp_path / "c.zarr"), "--no-progress"])
    assert r.exit_code == 130 and "rerun the same command: the dump continues" in r.output, r.output


def test_wait_seconds_flag_and_config_key_reach_dist_init_and_bad_values_exit_2(tmp_path, shards, teacher_ckpt,
                                                                                cache_path, monkeypatch):
    from dkd_cache import dist as dist_mod
    from dkd_cache.errors import ConfigError

    given: list[float] = []

    def init(device, timeout_s=600.0, *, wait_s=dist_mod.DEFAULT_WAIT_S):  # stands in for torchrun's join
        given.append(wait_s)
        raise ConfigError("stopped after dist.init")

    monkeypatch.setattr(dist_mod, "init", init)
    dump = ["dump-teacher", "--shards", shards["train"][0], "--weights", str(teacher_ckpt),
            "--out", str(tmp_path / "c.zarr"), "--arch", "resnet18", "--no-progress"]
    train = ["train-student", "--shards", shards["train"][0], "--out", str(tmp_path / "run"),
             "--cache", str(cache_path), "--no-progress"]
    for base in (dump, train):
        assert "--wait-seconds" in runner.invoke(app, [base[0], "--help"]).output
        for extra in ([], ["--wait-seconds", "90"]):
            r = runner.invoke(app, base + extra)
            assert r.exit_code == 2 and "stopped after dist.init" in r.output, r.output
        for bad in ("0", "-5", "inf", "nan"):
            r = runner.invoke(app, base + ["--wait-seconds", bad])
            assert r.exit_code == 2 and "wait_seconds" in r.output, (bad, r.output)
    assert given == [14400.0, 90.0] * 2  # the default, then the flag; no bad value got as far as init
    for table, base in (("dump", dump), ("train", train)):
        toml = tmp_path / f"{table}.toml"
        toml.write_text(f"[{table}]\nwait_seconds = 30\n")
        r = runner.invoke(app, base + ["--config", str(toml)])
        assert r.exit_code == 2 and "stopped after dist.init" in r.output, r.output
        toml.write_text(f"[{table}]\nwait_seconds = \"soon\"\n")
        r = runner.invoke(app, base + ["--config", str(toml)])
        assert r.exit_code == 2 and "wait_seconds" in r.output and "'soon'" in r.output, r.output
    assert given[-2:] == [30.0, 30.0]
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "run").exists()
