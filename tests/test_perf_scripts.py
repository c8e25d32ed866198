"""The GPU harness under perf/ runs only on the device machine, a few minutes per session: a
typo there costs a whole session's measurement (2026-12-03: ``bench.reference_fp32`` did not
exist). This checks on CPU what can be checked without a GPU: every script imports, and every
attribute it takes from a sibling perf module exists."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch

PERF = Path(__file__).resolve().parent.parent / "perf"
SCRIPTS = sorted(p for p in PERF.glob("*.py"))


@pytest.fixture(scope="module")
def perf_path():
    sys.path.insert(0, str(PERF))
    try:
        yield
    finally:
        sys.path.remove(str(PERF))


def _sibling_uses(tree: ast.Module) -> set[tuple[str, str]]:
    """(module, attribute) for each ``alias.attribute`` where ``alias`` names an imported sibling
    (``import bench`` or ``import bench_e2e as e2e``)."""
    siblings = {p.stem for p in SCRIPTS}
    imported = {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name in siblings
    }
    return {
        (imported[node.value.id], node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in imported
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_perf_script_imports_and_uses_what_exists(script: Path, perf_path) -> None:
    module = importlib.import_module(script.stem)
    tree = ast.parse(script.read_text())
    missing = [
        f"{mod}.{attr}"
        for mod, attr in sorted(_sibling_uses(tree))
        if not hasattr(importlib.import_module(mod), attr)
    ]
    assert not missing, f"{script.name} uses names its sibling modules lack: {missing}"
    # Names it imports from a sibling exist too (``from perf_common import x``).
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {p.stem for p in SCRIPTS}:
            source = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(source, alias.name), f"{script.name}: {node.module}.{alias.name}"
    assert module is not None


@pytest.mark.parametrize("kind", ["llama", "llama_tp", "neox"])
def test_bench_op_call_computes_the_kinds_region(kind: str, perf_path) -> None:
    """bench.py's direct op call computes what the kind's HF region computes (the tensor-parallel
    shard's has no residual add: its all-reduce comes first), on the CPU, where the op's body is
    the PyTorch reference."""
    import bench

    shape = bench.Shape.parse(f"{kind}:48x80")
    region = bench.build_region(shape, "cpu", seed=0, dtype=torch.float32)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    expected = bench.region_function(region.norm, region.mlp, region.kind.residual)(x)
    torch.testing.assert_close(bench._op_call(region)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "tokens", "expected"),
    [
        ("llama:2048x8192", 64, 1),
        ("llama:2048x8192", 65, 0),
        ("llama_tp:4096x3584", 16, 1),
        ("llama_tp:4096x3584", 32, 0),
        ("llama_tp:4096x1792", 1, 0),
        ("neox:2560x10240", 1, 0),
    ],
)
def test_bench_expects_what_should_fuse_decides(spec, tokens, expected, perf_path) -> None:
    """bench.py fails ``ours`` where it fused a different number of regions than expected: the
    expectation must follow should_fuse's per-shape bounds (2026-12-03: the tensor-parallel
    shards with a bound below 64 were reported as failures) and its refusal of non-gated MLPs."""
    import types

    import bench
    from torch._subclasses.fake_tensor import FakeTensorMode

    from inductor_fusion.patterns.norm_mlp_checks import RegionArgs, should_fuse

    shape = bench.Shape.parse(spec)
    region = types.SimpleNamespace(shape=shape, kind=bench.KINDS[shape.kind])
    h, i = shape.hidden, shape.inter
    with FakeTensorMode():
        x = torch.empty(1, tokens, h, device="cuda", dtype=torch.bfloat16)
        weights = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in [(h,), (i, h)]]
        up = torch.empty(i, h, device="cuda", dtype=torch.bfloat16) if region.kind.gated else None
        down = torch.empty(h, i, device="cuda", dtype=torch.bfloat16)
        assert bench.expected_regions(x, region) == expected
        decided = should_fuse(RegionArgs(x, *weights, up, down, None, None, None, eps=1e-5))
        assert (decided is None) == bool(expected), decided
    assert bench.expected_regions(torch.empty(1, tokens, h), region) == 1  # CPU always fuses


def test_bench_fuse_every_m_lifts_every_bound_and_should_fuse_follows(perf_path, monkeypatch):
    """--fuse-every-m (issue #27's measurement) makes compiled graphs fuse at any M on CUDA, the
    shapes with a measured bound below 64 included, and bench expects exactly that."""
    import types

    import bench
    from torch._subclasses.fake_tensor import FakeTensorMode

    from inductor_fusion.patterns.norm_mlp_checks import RegionArgs, should_fuse
    from inductor_fusion.triton_kernels import _rmsnorm_mlp_tuned, launch_config

    monkeypatch.setattr(launch_config, "MAX_PROFITABLE_TOKENS", launch_config.MAX_PROFITABLE_TOKENS)
    monkeypatch.setattr(launch_config, "LOWERED_TMA", launch_config.LOWERED_TMA)
    monkeypatch.setattr(
        _rmsnorm_mlp_tuned, "PROFITABLE_TOKENS", dict(_rmsnorm_mlp_tuned.PROFITABLE_TOKENS)
    )
    bench.experiment(fuse_every_m=True, lowered_tma=True)
    assert launch_config.LOWERED_TMA
    for spec in ("llama:2048x8192", "llama_tp:4096x1792"):
        shape = bench.Shape.parse(spec)
        region = types.SimpleNamespace(shape=shape, kind=bench.KINDS[shape.kind])
        h, i = shape.hidden, shape.inter
        with FakeTensorMode():
            x = torch.empty(1, 4096, h, device="cuda", dtype=torch.bfloat16)
            w = [
                torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in [(h,), (i, h), (i, h)]
            ]
            down = torch.empty(h, i, device="cuda", dtype=torch.bfloat16)
            assert bench.expected_regions(x, region) == 1
            assert should_fuse(RegionArgs(x, *w, down, None, None, None, eps=1e-5)) is None


@pytest.mark.slow
def test_bench_tp_runs_two_gloo_ranks(tmp_path: Path) -> None:
    """perf/bench_tp.py waits for a multi-GPU machine (issue #13); its CPU smoke (2 gloo ranks,
    the tiny Llama) runs the same code: every rank fuses every layer with ours and none with
    Inductor, logits within the tolerance rule's bound, decode measured without recompiles."""
    import json
    import subprocess

    command = [sys.executable, str(PERF / "bench_tp.py"), "--out", str(tmp_path), "--cpu-smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    (run,) = data["runs"]
    assert run["status"] == 0 and len(run["ranks"]) == 2
    for rank in run["ranks"]:
        by_provider = {r["provider"]: r for r in rank}
        assert set(by_provider) == {"ours", "inductor"}
        for provider, record in by_provider.items():
            assert "error" not in record, record
            assert record["fused"] == (data["meta"]["layers"] if provider == "ours" else 0)
            assert record["rel_err"] <= record["bound"]
            assert record["tok_s_b1"] > 0 and record["recompiles_b1"] == 0
            assert record["graph_breaks_b1"] == 0
