"""Pipeline configs: TOML files with [recipe], [dump] and [train] tables; unknown keys are errors.

Precedence, lowest first: the dataclass defaults, the TOML file, command-line flags. The resolved
config is what every stage saves (cache metadata, run directory, checkpoints).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

SECTIONS = ("recipe", "dump", "train", "demo")


def load_toml(path: str | Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {s: {} for s in SECTIONS}
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{p}: unknown table(s) {sorted(unknown)}; allowed: {list(SECTIONS)}")
    return {s: dict(data.get(s, {})) for s in SECTIONS}


def merge(cls, file_values: dict[str, Any], flags: dict[str, Any], *, where: str, fixed: dict[str, Any] | None = None):
    """Build dataclass `cls` from file values overridden by the flags that were given (not None)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(file_values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    values = {**file_values, **{k: v for k, v in flags.items() if v is not None}, **(fixed or {})}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)
