"""Fault-injecting wrapper around the dkd-cache CLI, for tests/test_faults.py (test code, not product code).

    python fault_harness.py CLI-ARGS...   run the CLI with the faults in $DKD_FAULT (JSON)
    python fault_harness.py --serve       a fork server: imports once, then for each request line (JSON: a list
                                          of runs, each {"args", "fault", "env"}) forks one child per run
                                          (all at once) and answers one line: [{"rc", "output", "t"}] (rc < 0:
                                          killed by that signal; t: time.monotonic() when it was reaped)
Each fault patches one low-level call in the child only (Zarr's file write and dump-teacher's chunk-file write, os.replace, torch.save, the optimizer
step, the file size limit); the product code runs unchanged.
"""

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import zarr.storage._local as zlocal

import dkd_cache.cache as cache_mod
import dkd_cache.cache_writer as cache_writer
import dkd_cache.store as store_mod
from dkd_cache.cli import app


def apply(spec: dict) -> None:
    def die():
        if spec.get("marker"):
            Path(spec["marker"]).write_text("killed")
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    # optionally only on one rank, and only on one torchrun attempt
    rank_ok = spec.get("rank") is None or int(os.environ.get("RANK", "0")) == spec["rank"]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    armed = rank_ok and (spec.get("attempt") is None or attempt == spec["attempt"])

    if armed and "put" in spec:  # SIGKILL half way through the Nth Zarr file write matching `match` / `contains`
        real_put, puts = zlocal._put, [0]

        def put(path, value, exclusive=False):
            data = bytes(value.as_buffer_like())
            if spec["put"].get("match", "") in str(path) and spec["put"].get("contains", "").encode() in data:
                puts[0] += 1
                if puts[0] == spec["put"]["n"]:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with zlocal._atomic_write(path, "wb") as f:  # zarr's own write path, cut half way
                        f.write(data[: len(data) // 2])
                        f.flush()
                        die()
            return real_put(path, value, exclusive=exclusive)

        zlocal._put = put
        real_files = store_mod.DiskLocation.write_files

        def write_files(self, files):  # dump-teacher's own chunk writes (zarr_chunks): the same count, cut alike
            for key, data in files.items():
                path = self.path / key
                if spec["put"].get("match", "") in str(path) and spec["put"].get("contains", "").encode() in data:
                    puts[0] += 1
                    if puts[0] == spec["put"]["n"]:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with open(f"{path}.{os.getpid()}.partial", "wb") as f:  # its temporary file, half written
                            f.write(data[: len(data) // 2])
                            f.flush()
                            die()
                real_files(self, {key: data})

        store_mod.DiskLocation.write_files = write_files

    if armed and "record" in spec:  # SIGKILL after the Nth shard record is written, before it is linked in place
        real_link, records = os.link, [0]

        def link(src, dst, *a, **k):
            if str(src).endswith(".partial") and "_dkd" in str(src):
                records[0] += 1
                if records[0] == spec["record"]:
                    die()
            return real_link(src, dst, *a, **k)

        os.link = link

    if "fsize" in spec:  # a file size limit: writes past it fail with EFBIG (SIGXFSZ ignored), like a full disk
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        if spec.get("fsize_at_shard"):
            real_ws, shard_writes = cache_writer.write_shard, [0]

            def write_shard(*a, **k):
                shard_writes[0] += 1
                if shard_writes[0] == spec["fsize_at_shard"]:
                    limit()
                return real_ws(*a, **k)

            cache_writer.write_shard = write_shard
        else:
            limit()

    if "slow_shard" in spec:  # hold the writer lock longer: every shard write sleeps first
        real_ws2 = cache_writer.write_shard

        def slow_write_shard(*a, **k):
            time.sleep(spec["slow_shard"])
            return real_ws2(*a, **k)

        cache_writer.write_shard = slow_write_shard

    if armed and "late_listing" in spec:  # this rank lists the done records only once another rank recorded one
        real_pending = cache_mod.Cache.pending_shards

        def late_pending(self):
            deadline = time.monotonic() + spec["late_listing"]
            while not self.location.keys("_dkd/done") and time.monotonic() < deadline:
                time.sleep(0.05)
            return real_pending(self)

        cache_mod.Cache.pending_shards = late_pending

    if armed and "step" in spec:  # SIGKILL right after the Nth optimizer step of this process
        real_step, steps = torch.optim.SGD.step, [0]

        def step(self, *a, **k):
            out = real_step(self, *a, **k)
            steps[0] += 1
            if steps[0] == spec["step"]:
                die()
            return out

        torch.optim.SGD.step = step

    if armed and "save" in spec:  # SIGKILL half way through writing the Nth torch.save of this process
        import io

        real_save, saves = torch.save, [0]

        def save(obj, f, *a, **k):
            saves[0] += 1
            if saves[0] == spec["save"]:
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                die()
            return real_save(obj, f, *a, **k)

        torch.save = save


def cli(args: list[str]) -> int:
    """The real CLI, as `python -m dkd_cache` runs it: its exit code, or 1 after a traceback."""
    try:
        app(args, prog_name="dkd-cache")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    import threading

    for line in sys.stdin:
        runs, children, pipes = json.loads(line), {}, []
        sys.stdout.flush()
        for i, run in enumerate(runs):
            r, w = os.pipe()  # output through a pipe, as from a terminal: a file size limit does not apply to it
            pid = os.fork()
            if pid == 0:  # the child: its own output, environment and faults, then the real CLI
                code = 1
                try:
                    os.close(r)
                    os.dup2(w, 1)
                    os.dup2(w, 2)
                    os.environ.update(run.get("env", {}))
                    apply(run.get("fault", {}))
                    code = cli(run["args"])
                finally:
                    os._exit(code)
            os.close(w)
            children[pid] = i
            pipes.append(r)
        outputs = [b""] * len(runs)

        def drain(i: int, fd: int) -> None:
            with os.fdopen(fd, "rb") as f:
                outputs[i] = f.read()

        readers = [threading.Thread(target=drain, args=(i, fd)) for i, fd in enumerate(pipes)]
        for t in readers:
            t.start()
        results = [None] * len(runs)
        while children:
            pid, status = os.wait()
            i = children.pop(pid)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            results[i] = {"rc": rc, "t": time.monotonic()}
        for t in readers:
            t.join()
        for i, res in enumerate(results):
            res["output"] = outputs[i].decode(errors="replace")
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        apply(json.loads(os.environ.get("DKD_FAULT") or "{}"))
        sys.exit(cli(sys.argv[1:]))
