"""The installed package: one import name, subpackages importable from anywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CODE = """
import importlib.util, pathlib
import inductor_fusion.patterns.rmsnorm_mlp as p
import inductor_fusion.triton_kernels.rmsnorm_mlp as k
# The repository's patterns/ and triton_kernels/ are what the subpackages load...
assert pathlib.Path(p.__file__).parent.name == "patterns", p.__file__
assert pathlib.Path(k.__file__).parent.name == "triton_kernels", k.__file__
# ...and their bare names are not ours to install (Triton ships its own triton_kernels).
spec = importlib.util.find_spec("patterns")
assert spec is None or "inductor_fusion" not in str(spec.origin), spec
print("ok")
"""


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_subpackages_import_from_anywhere(where, tmp_path):
    from pathlib import Path

    cwd = Path(__file__).resolve().parents[1] if where == "repo root" else tmp_path
    result = subprocess.run(
        [sys.executable, "-c", _CODE], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
