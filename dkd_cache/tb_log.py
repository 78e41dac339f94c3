"""TensorBoard scalars beside metrics.jsonl (`train-student --tensorboard`), for users who read runs there.

metrics.jsonl stays the record of a run; this mirrors its records as scalars in RUN_DIR/tensorboard/:

    step record  -> train/loss, train/ce, train/dkd, train/lr           at the step
    epoch record -> val/top1, val/top5 (when validated), speed/images_per_s   at the epoch's last step
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

STEP_SCALARS = (("loss", "train/loss"), ("ce", "train/ce"), ("dkd", "train/dkd"), ("lr", "train/lr"))
EPOCH_SCALARS = (("val_top1", "val/top1"), ("val_top5", "val/top5"), ("images_per_s", "speed/images_per_s"))


def require_tensorboard() -> None:
    """Fail before the first step, not after an epoch, when the package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard, "
                          "or leave --tensorboard out (metrics.jsonl holds the same numbers)") from e


def open_writer(run_dir: Path, resume_step: int) -> tuple[Callable[[dict[str, Any], int], None], Callable[[], None]]:
    """(write(record, step), close): a resumed run purges what its predecessor logged after `resume_step`, as
    metrics.jsonl is trimmed to the checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events at or after it: the checkpoint's own step stays, later ones are logged again
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(record: dict[str, Any], step: int) -> None:
        pairs = STEP_SCALARS if record.get("event") == "step" else EPOCH_SCALARS
        for key, tag in pairs:
            if record.get(key) is not None:
                writer.add_scalar(tag, float(record[key]), step)

    def close() -> None:
        writer.flush()
        writer.close()

    return write, close
