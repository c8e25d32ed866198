"""Inductor's caches: never a graph compiled under other toggles, and the report lists what a cache
hit serves (from our records), marked as such. Real processes in a row, sharing one cache dir."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import child_environ, run_child

from inductor_fusion import records
from inductor_fusion.report import FusedRegion, FusionReport

_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model, token_ids
    import inductor_fusion

    # As many key/value heads as query heads: no grouped attention, so the regions counted are the
    # norm -> MLP ones under every transformers version (5.17 passes SDPA a mask at prefill, and
    # gqa_decode would fuse the attention too).
    model = tiny_model("llama", torch.float32, num_key_value_heads=4)
    ids = token_ids()
    if {install}:
        installation = inductor_fusion.install()
    with torch.no_grad():
        compiled = torch.compile(model, backend={backend!r})
        compiled(ids)  # compile (or load from the cache)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = compiled(ids).logits
        ok = torch.allclose(out, model(ids).logits, atol=1e-4, rtol=1e-4)
    calls = sum(e.count for e in prof.key_averages() if e.key == "inductor_fusion::rmsnorm_mlp")
    report = inductor_fusion.get_report()
    print(json.dumps({{
        "op_calls": calls,
        "reported": report.count("rmsnorm_mlp"),
        "from_cache": report.count_from_cache(),
        "regions": sorted([r.pattern, r.variant, r.paths] for r in report),
        "summary": report.summary(),
        "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "matches_eager": bool(ok),
        "installation": installation.report.count_from_cache() if {install} else None,
    }}))
    """
)


def _child(tag: str, *, install: bool = False, **env: str) -> dict:
    """One process compiling the tiny Llama: with our backend, or with ``backend="inductor"``
    after ``inductor_fusion.install()``. Children of one ``tag`` share cache entries
    (`child_environ`)."""
    tests = os.path.dirname(__file__)
    code = _CHILD.format(
        tests=tests, install=install, backend="inductor" if install else "inductor_fusion"
    )
    return run_child(code, tag, **env)


def _counts(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("regions", "summary", "installation")}


@pytest.mark.slow
def test_cache_respects_toggles_and_reports_hits_from_the_records(tmp_path):
    tag = str(tmp_path)
    first = _child(tag)
    assert _counts(first) == {
        "op_calls": 2,
        "reported": 2,
        "from_cache": 0,
        "cache_hits": 0,
        "matches_eager": True,
    }
    assert len(first["regions"]) == 2 and "from cache" not in first["summary"]
    # Same model and shapes, other toggles: must not be served the fused graph.
    disabled = _child(tag, INDUCTOR_FUSION_DISABLE="all")
    assert disabled["op_calls"] == 0 and disabled["matches_eager"]
    assert disabled["cache_hits"] == 0 and disabled["reported"] == 0
    # Back to the first toggles, in another process: a cache hit, so our pass does not run, but
    # the report lists the regions the first compile recorded, as served from the cache; the
    # cached code calls our op, registered by the backend before the cached graph runs.
    again = _child(tag)
    assert _counts(again) == {
        "op_calls": 2,
        "reported": 2,
        "from_cache": 2,
        "cache_hits": 1,
        "matches_eager": True,
    }
    assert again["regions"] == first["regions"]
    assert "(2 served from Inductor's cache)" in again["summary"]


@pytest.mark.slow
def test_install_reports_cache_hits_as_the_backend_does(tmp_path):
    # backend="inductor" under install(): no backend call of ours around the compile, so the
    # records are keyed and closed by the installed pass (see global_pass).
    tag = str(tmp_path)
    first = _child(tag, install=True)
    second = _child(tag, install=True)
    assert first["cache_hits"] == 0 and first["from_cache"] == 0
    assert first["reported"] == 2 and first["op_calls"] == 2
    assert second["cache_hits"] >= 1 and second["op_calls"] == 2 and second["matches_eager"]
    assert second["regions"] == first["regions"]
    assert second["from_cache"] == second["reported"] == second["installation"] == 2
    assert "(2 served from Inductor's cache)" in second["summary"]


@pytest.mark.slow
def test_demo_passes_twice_in_a_row(tmp_path):
    tag = str(tmp_path)
    for run in ("compiles", "served from the cache"):
        result = subprocess.run(
            [sys.executable, "-m", "inductor_fusion.demo"],
            env=child_environ(tag),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{run}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert "demo OK" in result.stdout, run
    assert "served from Inductor's cache" in result.stdout


# --- the records themselves (no compile) ------------------------------------------------------------

_NORM0 = FusedRegion("rmsnorm_mlp", "fp32_3d", (("norm", "layers.0.norm"), ("mlp", "layers.0.mlp")))
_NORM1 = FusedRegion("rmsnorm_mlp", "fp32_3d", (("norm", "layers.1.norm"), ("mlp", "layers.1.mlp")))
_STAGES = ("joint", "post_grad")


@pytest.fixture
def records_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "records_dir", lambda: tmp_path)
    return tmp_path


def test_full_hit_reports_the_saved_regions_from_cache(records_dir):
    compiled = records.CompileRecords("k")
    compiled.add("joint", [_NORM0, _NORM1])
    compiled.add("post_grad", [])
    report = FusionReport()
    compiled.finish(_STAGES, reports=[report])
    assert len(report) == 0  # the pass recorded these itself

    hit = records.CompileRecords("k")  # no stage runs
    hit.finish(_STAGES, reports=[report])
    assert report.regions == (_NORM0, _NORM1)
    assert all(region.from_cache for region in report)


def test_partial_hit_takes_only_the_stages_that_did_not_run(records_dir):
    first = records.CompileRecords("k")
    first.add("joint", [_NORM0])
    first.add("post_grad", [_NORM1])
    first.finish(_STAGES, reports=[])
    # An FX-graph-cache hit: the joint stage runs again, post-grad is served.
    partial = records.CompileRecords("k")
    partial.add("joint", [_NORM0])
    report = FusionReport()
    partial.finish(_STAGES, reports=[report])
    assert [(r, r.from_cache) for r in report] == [(_NORM1, True)]
    # Saved whole again, for the next hit.
    assert sorted(map(str, records.load("k"))) == sorted(
        map(str, [("joint", _NORM0), ("post_grad", _NORM1)])
    )


def test_hit_without_records_logs_and_invents_nothing(records_dir, caplog):
    report = FusionReport()
    with caplog.at_level(logging.INFO, logger="inductor_fusion"):
        records.CompileRecords("missing").finish(_STAGES, reports=[report])
    assert len(report) == 0
    assert any("without records of ours" in r.getMessage() for r in caplog.records)


def test_each_compile_saves_only_its_own_regions(records_dir):
    a, b = records.CompileRecords("a"), records.CompileRecords("b")
    a.add("joint", [_NORM0])
    b.add("joint", [_NORM1])
    a.finish(_STAGES, reports=[])
    b.finish(_STAGES, reports=[])
    assert records.load("a") == [("joint", _NORM0)]
    assert records.load("b") == [("joint", _NORM1)]


def test_regions_equal_whatever_their_origin():
    assert _NORM0.cached() == _NORM0 and hash(_NORM0.cached()) == hash(_NORM0)
    assert _NORM0.cached().from_cache and not _NORM0.from_cache


def test_force_disable_caches_reads_and_writes_nothing():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    inputs = [torch.ones(1, 2)]
    key = records.compile_key(gm, inputs, plan_key="p", pass_uuids=["u"])
    assert key is not None
    assert key == records.compile_key(gm, inputs, plan_key="p", pass_uuids=["u"])
    assert key != records.compile_key(gm, [torch.ones(3, 2)], plan_key="p", pass_uuids=["u"])
    assert records.compile_key(gm, inputs, plan_key="p", pass_uuids=[None]) is None
    with torch._inductor.config.patch(force_disable_caches=True):
        assert records.compile_key(gm, inputs, plan_key="p", pass_uuids=["u"]) is None


def test_installed_compile_without_a_run_or_a_hit_reports_nothing(records_dir, monkeypatch):
    # A compile whose passes never ran: served from a cache only if Inductor or AOTAutograd
    # counted a hit meanwhile (else it failed before our pass, and served nothing).
    from inductor_fusion.config import FusionOptions, resolve_plan
    from inductor_fusion.global_pass import Installation, _CompileState

    saved = records.CompileRecords("k")
    saved.add("post_grad", [_NORM0])
    saved.finish(_STAGES, reports=[])
    installation = Installation(FusionOptions(), {})
    for hit in (False, True):
        state = _CompileState(resolve_plan(options=FusionOptions()), hits=0)
        state.compile_records.key = "k"
        installation._open.append(state)
        with monkeypatch.context() as patch:
            patch.setattr("inductor_fusion.global_pass._cache_hits", lambda hit=hit: int(hit))
            installation.finish_compiles()
        assert [(r, r.from_cache) for r in installation.report] == ([(_NORM0, True)] if hit else [])
