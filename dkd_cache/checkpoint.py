"""Files of weights and checkpoints: reading them safely (weights_only, numpy scalars allowed, a refusal that names
the unsafe objects and says how to convert) and writing a run's checkpoint atomically.

`teacher.py` builds models and loads weights into them through `_read_bytes` and `_load_object`; `train.py` saves
and resumes its runs with `save_checkpoint` and `read_run_checkpoint`.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError

_CONVERT_HINT = (
    "If you trust the file's source, convert it once, in a trusted environment: "
    "python -c \"import torch; ck = torch.load('<IN>', map_location='cpu', weights_only=False); "
    "sd = ck.get('model', ck.get('state_dict', ck)) if isinstance(ck, dict) else ck.state_dict(); "
    "torch.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, '<OUT>')\" "
    "(or save model.state_dict() of the loaded model), then pass <OUT>"
)


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars, dtypes and arrays: plain data that mmcv / mmengine checkpoints keep in ``meta`` (e.g. a best
    score as np.float64). Their reconstructors run no code from the file; objects inside object arrays still go
    through torch's restricted unpickler. numpy 1.x pickles name ``numpy.core``, 2.x ``numpy._core``."""
    try:
        import numpy._core.multiarray as mod
    except ImportError:  # numpy < 2
        import numpy.core.multiarray as mod  # type: ignore[no-redef]
    out: list[Any] = [np.ndarray, np.dtype]
    for pkg in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(mod.scalar, f"{pkg}.scalar"), (mod._reconstruct, f"{pkg}._reconstruct")]
    out += [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", ()) if n.endswith("DType")]
    # torchvision's references/classification/train.py saves its argparse.Namespace as "args": a plain
    # attribute bag (restored by __dict__ update, no code from the file runs), so its checkpoints load as they are.
    out.append(argparse.Namespace)
    return out


def _read_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{p}: weights file not found") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"{p}: is a directory, not a weights file") from e
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read the weights file: {e}") from e


def _looks_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 8 + n <= len(data) and data[8:9] == b"{"


def _unpickling_refusal(path: Path, e: Exception, data: bytes) -> CheckpointError:
    msg = str(e)
    if "Weights only load failed" not in msg:
        return CheckpointError(f"{path}: cannot read: not a complete PyTorch weights file, "
                               f"truncated or corrupt? ({msg})")
    if "Unsupported operand" in msg:
        return CheckpointError(f"{path}: cannot read: the pickled data is corrupt (an unknown pickle opcode)")
    names: list[str] = []
    try:
        names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))))
    except Exception:  # legacy (non-zip) format: torch's message names the first refused global
        pass
    if not names:
        names = [m.group(1) for m in re.finditer(r"(?:GLOBAL|got <class) '?([\w.]+)", msg)][:1]
    what = f" ({', '.join(names)})" if names else ""
    out = path.with_name(f"{path.stem}.state_dict.pth")
    hint = _CONVERT_HINT.replace("<IN>", str(path)).replace("<OUT>", str(out))
    return CheckpointError(
        f"{path}: refused: the file contains pickled objects other than tensors{what}, which could run code when "
        f"loaded; for safety only tensors, containers, strings and numbers are read. {hint}")


def _load_object(path: Path, data: bytes) -> tuple[Any, str]:
    """(loaded object, 'safetensors' | 'torch') from the file's bytes."""
    is_zip, is_pickle = data[:4] == b"PK\x03\x04", data[:1] == b"\x80"
    if not is_zip and not is_pickle and (_looks_safetensors(data) or path.suffix == ".safetensors"):
        import safetensors.torch

        try:
            return safetensors.torch.load(data), "safetensors"
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read as safetensors, truncated or corrupt? ({e})") from e
    if not data:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), "torch"
    except pickle.UnpicklingError as e:
        raise _unpickling_refusal(path, e, data) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read: not a complete PyTorch or safetensors weights file, "
                              f"truncated or corrupt? ({type(e).__name__}: {str(e)[:200]})") from e


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A whole checkpoint (e.g. one written by :func:`save_checkpoint`: model, optimizer, config...), read with
    weights_only=True. CheckpointNotFoundError if missing, CheckpointError if unsafe, corrupt or not a dict."""
    p = Path(path)
    obj, kind = _load_object(p, _read_bytes(p))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj



def save_checkpoint(path: str | os.PathLike, **entries: Any) -> None:
    """Write ``entries`` as one dict with torch.save, atomically (temp file in the same folder, fsync, rename).
    Entries must be readable back with weights_only=True (tensors, dicts, lists, tuples, str, numbers, None,
    torch dtypes/devices); anything else raises TypeError and leaves no file."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise CheckpointWriteError(p, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            out = _WriteErrors(f)
            try:
                torch.save(entries, out)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError; out kept the cause
                if out.error is None and not isinstance(e, OSError):
                    raise
                raise CheckpointWriteError(p, out.error or e) from e
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f"{p}: checkpoint entries hold objects that weights_only loading refuses: {unsafe}; "
                            "store plain containers, numbers, strings and tensors")
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(p.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write (a full disk): torch's zip writer replaces it
    with a RuntimeError that does not say what happened."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def read_run_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A run's checkpoint (written by save_checkpoint) for --resume; CheckpointError naming what to do if damaged."""
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} cannot be loaded ({type(e).__name__}: {e}); the checkpoint is damaged. "
                              "Delete it to restart the run, or restore it from a backup") from e
