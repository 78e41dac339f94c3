"""The built wheel holds what an installed dkd-cache needs: the shipped recipes and every direct dependency.

.ci/run goes further: it installs the wheel into a fresh virtual environment and runs the demo's first stage."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "nvidia": "nvidia-nvimgcodec-cu13"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("dkd_cache-*.whl")
    return whl


def test_the_wheel_ships_the_pipeline_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in sorted((ROOT / "pipelines").glob("*.toml")):
        assert f"dkd_cache/pipelines/{recipe.name}" in names, recipe.name


def _direct_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in (ROOT / "dkd_cache").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in stdlib and m != "dkd_cache"}


# train-student --tensorboard: pip install "dkd-cache[tensorboard]"; the gpu renderer's nvImageCodec (`from nvidia
# import nvimgcodec`): pip install "dkd-cache[gpu]"
OPTIONAL = {"tensorboard", "nvidia"}


def test_every_direct_import_is_a_declared_dependency(wheel):
    meta = zipfile.ZipFile(wheel).read(next(n for n in zipfile.ZipFile(wheel).namelist()
                                            if n.endswith(".dist-info/METADATA"))).decode()
    def names(extra: bool) -> set[str]:
        return {re.split(r"[<>=!~ ;\[]", line.split(":", 1)[1].strip())[0].lower().replace("_", "-")
                for line in meta.splitlines() if line.startswith("Requires-Dist:") and ("extra ==" in line) == extra}

    declared, in_extras = names(extra=False), names(extra=True)
    imports = _direct_imports()
    assert {"torch", "zarr", "rich", "braceexpand", "tensorboard"} <= imports  # the scan sees the imports
    # An optional feature's package (imported only when the feature is asked for) is declared in an extra.
    missing = sorted(m for m in imports - OPTIONAL if DISTRIBUTION.get(m, m).lower().replace("_", "-") not in declared)
    assert not missing, f"imported by dkd_cache but not declared in pyproject.toml: {missing}"
    optional = {DISTRIBUTION.get(m, m) for m in OPTIONAL}
    assert optional <= in_extras, f"optional imports not declared in an extra: {sorted(optional - in_extras)}"

