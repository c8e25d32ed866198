"""The FX graph cache never serves a graph compiled under other toggles (two real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model, token_ids
    import inductor_fusion

    model = tiny_model("llama", torch.float32)
    ids = token_ids()
    with torch.no_grad():
        compiled = torch.compile(model, backend="inductor_fusion")
        compiled(ids)  # compile (or load from the cache)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = compiled(ids).logits
        ok = torch.allclose(out, model(ids).logits, atol=1e-4, rtol=1e-4)
    calls = sum(e.count for e in prof.key_averages() if e.key == "inductor_fusion::rmsnorm_mlp")
    print(json.dumps({{
        "op_calls": calls,
        "reported": inductor_fusion.get_report().count("rmsnorm_mlp"),
        "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "matches_eager": bool(ok),
    }}))
    """
)


def _child(cache_dir: str, **env: str) -> dict:
    tests = os.path.dirname(__file__)
    # Start from no toggles of ours, whatever the outer environment sets.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("INDUCTOR_FUSION_")}
    environ = {
        **inherited,
        "TORCHINDUCTOR_CACHE_DIR": cache_dir,
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", _CHILD.format(tests=tests)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cache_respects_toggles(tmp_path):
    cache = str(tmp_path / "inductor-cache")
    first = _child(cache)
    assert first == {"op_calls": 2, "reported": 2, "cache_hits": 0, "matches_eager": True}
    # Same model and shapes, other toggles: must not be served the fused graph.
    disabled = _child(cache, INDUCTOR_FUSION_DISABLE="all")
    assert disabled["op_calls"] == 0 and disabled["matches_eager"]
    assert disabled["cache_hits"] == 0
    # Back to the first toggles: a cache hit, so our pass does not run (nothing reported), but
    # the cached code calls our op, registered by the backend before the cached graph runs.
    again = _child(cache)
    assert again == {"op_calls": 2, "reported": 0, "cache_hits": 1, "matches_eager": True}
