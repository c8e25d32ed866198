"""The eager op's launch cache (``triton_kernels/_launch_cache.py``): the second call of a key
replays the first call's launches on new tensors, bit for bit what a fresh plan computes, and
anything the kernels were specialised on gets its own entry.

The comparison is against a fresh plan of the same inputs (cache cleared), not a tolerance: the
kernels are deterministic (split-K included, see test_kernel_rmsnorm_mlp), so a replay that fed
one tensor where another belongs, or kept a stale size, shows up as a difference. On the CPU
the replay launches through the interpreter's JIT functions; on CUDA through the compiled kernel.
"""

import dataclasses

import pytest
import torch
from test_kernel_rmsnorm_mlp import (
    DEVICE_DTYPES,
    EDGE_CONFIGS,
    HAS_CUDA,
    M1_CASE,
    _launch_config,
    _nan_filled_empty,
    make_inputs,
)

from inductor_fusion.triton_kernels import _launch_cache, launch_config
from inductor_fusion.triton_kernels import rmsnorm_mlp as module
from inductor_fusion.triton_kernels.rmsnorm_mlp import rmsnorm_mlp_triton

CASE = dataclasses.replace(M1_CASE, lead=(2, 5), hidden_size=72, inter_size=136)
PLANS = module._EAGER_PLANS


@pytest.fixture(autouse=True)
def _fresh_cache():
    PLANS.clear()
    yield
    PLANS.clear()


@pytest.fixture
def plans_made(monkeypatch):
    """How many times the op planned (checks, configuration, launch arguments) from scratch."""
    calls = []
    real = module._region_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_region_plan", counting)
    return calls


def _call(inputs, case, config=None, **overrides):
    kwargs = {**inputs.kwargs, **overrides}
    args = list(inputs.args)
    for index, name in enumerate(("hidden", "norm_weight", "gate_weight", "up_weight")):
        if name in kwargs:
            args[index] = kwargs.pop(name)
    eps = kwargs.pop("eps", case.eps)
    return rmsnorm_mlp_triton(*args, **kwargs, eps=eps, config=config)


def _fresh(inputs, case, config=None, **overrides):
    """The same call planned from scratch, leaving the cache as it was."""
    saved = dict(PLANS._plans)
    PLANS.clear()
    try:
        return _call(inputs, case, config, **overrides)
    finally:
        PLANS._plans.clear()
        PLANS._plans.update(saved)


CONFIG_NAMES = [None, *(c.name for c in EDGE_CONFIGS)]


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("config", CONFIG_NAMES)
@pytest.mark.parametrize("residual", [False, True])
def test_replay_equals_a_fresh_plan(device, dtype, config, residual, plans_made):
    """Every configuration kind (GEMV, pointer GEMM, TMA, pre-norm, split-K buffers): the second
    and third calls of a key plan nothing and compute what a fresh plan of their inputs does."""
    case = dataclasses.replace(CASE, residual=residual)
    forced = _launch_config(config, device, dtype)
    first = make_inputs(case, device, dtype)
    _call(first, case, forced)
    assert len(PLANS) == 1 and PLANS.get(next(iter(PLANS._plans))) is not None
    assert len(plans_made) == 1
    for seed in (1, 2):
        inputs = make_inputs(dataclasses.replace(case, seed=seed), device, dtype)
        planned = len(plans_made)
        # NaN-filled buffers: a replayed launch that reads a buffer no earlier launch wrote shows.
        with _nan_filled_empty():
            replayed = _call(inputs, case, forced)
        assert len(plans_made) == planned, "the replay planned again"
        expected = _fresh(inputs, case, forced)
        assert replayed.shape == inputs.args[0].shape and replayed.is_contiguous()
        assert torch.equal(replayed, expected)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES[:2] + DEVICE_DTYPES[3:4])
def test_what_the_kernels_specialise_on_gets_its_own_entry(device, dtype, plans_made):
    inputs = make_inputs(CASE, device, dtype)
    _call(inputs, CASE)
    hidden = inputs.args[0]
    # A base that is not 16-byte aligned (Triton specialises pointers on alignment), another
    # token count, another eps, no residual: each is a new key, planned and right.
    spare = torch.empty(hidden.numel() + 1, dtype=dtype, device=device)
    misaligned = spare[1:].view(hidden.shape).copy_(hidden)
    assert misaligned.data_ptr() % 16 != 0
    variants = [
        {"hidden": misaligned},
        {"hidden": hidden[:1], "residual": inputs.kwargs["residual"][:1]},
        {"eps": 0.5},
        {"residual": None},
    ]
    for overrides in variants:
        planned = len(plans_made)
        out = _call(inputs, CASE, **overrides)
        assert len(plans_made) == planned + 1, overrides
        # ... and the entry replays.
        assert torch.equal(_call(inputs, CASE, **overrides), out)
        assert len(plans_made) == planned + 1
        assert torch.equal(out, _fresh(inputs, CASE, **overrides))
    assert len(PLANS) == 1 + len(variants)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES[:1] + DEVICE_DTYPES[3:4])
def test_one_tensor_passed_twice_is_not_recorded(device, dtype, plans_made):
    """gate_weight passed as up_weight too: the recording could not tell the two places apart,
    so nothing is recorded; a later call with distinct tensors records, and the aliased call
    then replays right (each place reads its own argument)."""
    inputs = make_inputs(CASE, device, dtype)
    gate = inputs.args[2]
    aliased = _call(inputs, CASE, up_weight=gate)
    assert len(PLANS) == 0 and len(plans_made) == 1
    _call(inputs, CASE)
    assert len(PLANS) == 1 and len(plans_made) == 2
    assert torch.equal(_call(inputs, CASE, up_weight=gate), aliased)
    assert len(plans_made) == 2


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES[:1] + DEVICE_DTYPES[3:4])
def test_rows_copied_for_the_kernels_are_never_replayed(device, dtype, plans_made):
    """A transposed hidden is copied to unit-stride rows for the kernels: a replay would read
    the caller's tensor instead, so the key is remembered as not replayable."""
    case = dataclasses.replace(CASE, layout="transposed")
    inputs = make_inputs(case, device, dtype)
    assert inputs.args[0].stride(-1) != 1
    first = _call(inputs, case)
    assert list(PLANS._plans.values()) == [None]
    second_inputs = make_inputs(dataclasses.replace(case, seed=3), device, dtype)
    second = _call(second_inputs, case)
    assert len(plans_made) == 2
    assert torch.equal(second, _fresh(second_inputs, case))
    assert not torch.equal(first, second)


def test_recording_refuses_a_tensor_it_cannot_place():
    """A view that is not one of the inputs would be replayed as an uninitialised buffer."""
    hidden = torch.randn(4, 8)

    @dataclasses.dataclass
    class Launch:
        kernel: object
        grid: tuple
        args: dict
        num_warps: int = 4
        num_stages: int = 1

    class Kernel:
        arg_names = ("x_ptr", "out_ptr", "N")

    out = torch.empty(4, 8)
    launch = Launch(Kernel(), (1,), {"x_ptr": hidden[1:], "out_ptr": out, "N": 8})
    with pytest.raises(ValueError, match="neither an input nor a fresh buffer"):
        _launch_cache.record([launch], [None], (hidden,), out, hidden.device)
    ok = Launch(Kernel(), (1,), {"x_ptr": hidden, "out_ptr": out, "N": 8})
    plan = _launch_cache.record([ok], [None], (hidden,), out, hidden.device, out_shape=(2, 16))
    assert plan.buffers == (((2, 16), torch.float32),) and plan.out == 1
    (cached,) = plan.launches
    assert cached.template == (None, None, 8) and cached.fills == ((0, 0), (1, 1))


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_launch_cache, "MAX_ENTRIES", 3)
    cache = _launch_cache.LaunchCache()
    for key in range(7):
        cache.put(key, None)
        assert len(cache) <= 3
    assert 6 in cache


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_replay_launches_the_compiled_kernels_and_captures_in_a_graph(monkeypatch):
    """On CUDA the entry holds each launch's compiled kernel and a replay launches it directly,
    never through JITFunction.run; a replay inside CUDA-graph capture records launches that a
    graph replay reruns on new inputs."""
    case = dataclasses.replace(CASE, lead=(16,))
    inputs = make_inputs(case, "cuda", torch.bfloat16)
    expected = _call(inputs, case)
    (plan,) = PLANS._plans.values()
    assert plan is not None and all(launch.compiled is not None for launch in plan.launches)

    def no_jit(*args, **kwargs):
        raise AssertionError("a replay went through JITFunction.run")

    monkeypatch.setattr(type(plan.launches[0].kernel), "run", no_jit)
    assert torch.equal(_call(inputs, case), expected)
    monkeypatch.undo()
    static = make_inputs(dataclasses.replace(case, seed=5), "cuda", torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _call(static, case)
    fresh_inputs = make_inputs(dataclasses.replace(case, seed=6), "cuda", torch.bfloat16)
    static.args[0].copy_(fresh_inputs.args[0])
    static.kwargs["residual"].copy_(fresh_inputs.kwargs["residual"])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _fresh(static, case))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_replay_honours_triton_launch_hooks():
    """With a launch hook set (a profiler's), replays call it with the launch metadata
    JITFunction.run gives it (a LazyDict in Triton 3.6-3.9); without one they build none."""
    from triton import knobs

    case = dataclasses.replace(CASE, lead=(16,))
    inputs = make_inputs(case, "cuda", torch.float16)
    expected = _call(inputs, case)
    assert _launch_cache._launch_hooks() is None
    seen = []

    def hook(metadata):
        data = metadata.get()  # with the kernel's own launch_metadata (a profiler's names)
        seen.append({k: v for k, v in data.items() if k != "stream"})

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert torch.equal(_call(inputs, case), expected)  # a replay
        assert torch.equal(_fresh(inputs, case), expected)  # planned again: JITFunction.run's
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 4
    assert [d["name"].split("[")[0] for d in seen[:2]] == ["rmsnorm_gate_up", "rmsnorm_mlp_down"]
    assert seen[:2] == seen[2:], "a replay's launch metadata differs from JITFunction.run's"


def test_eager_calls_take_tma_from_two_thousand_rows():
    """Host-bound eager calls take the pointer form of the "tma" tiles (`eager_tma` says why);
    rows, not the leading shape, decide; the choice is part of the launch key."""
    threshold = module.EAGER_TMA_MIN_ROWS
    assert threshold == 2048  # measured (`eager_tma`): 1024 rows lost with TMA, won without
    eager_tma = module.eager_tma
    assert not eager_tma(torch.empty(threshold - 1, 8))
    assert eager_tma(torch.empty(threshold, 8))
    assert eager_tma(torch.empty(2, threshold // 2, 8))
    assert not eager_tma(torch.empty(1, threshold - 1, 8))
    assert not eager_tma(torch.empty(0, 8)) and not eager_tma(torch.empty(4, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_eager_tma_only_from_two_thousand_rows_or_in_capture():
    """On CUDA the "tma" configurations (the defaults from M=128) launch with TMA descriptors only
    from EAGER_TMA_MIN_ROWS rows or under CUDA-graph capture; the pointer form computes the
    same as the TMA form."""

    def descriptors(case, capture=False):
        """TMA descriptors per recorded plan, after a call (and a captured call) of ``case``."""
        PLANS.clear()
        inputs = make_inputs(case, "cuda", torch.bfloat16)
        eager = _call(inputs, case)  # outside a capture: Triton compiles here
        if capture:  # the same key captured: an entry of its own, with TMA
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _call(inputs, case)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.allclose(out.float(), eager.float(), rtol=2e-2, atol=2e-2)
        return sorted(sum(len(x.descriptors) for x in p.launches) for p in PLANS._plans.values())

    small = dataclasses.replace(CASE, lead=(128,))
    large = dataclasses.replace(CASE, lead=(module.EAGER_TMA_MIN_ROWS,))
    assert launch_config.graph_config(128, 72, 136, torch.bfloat16, False).gate_up.kind == "tma"
    assert descriptors(small) == [0]
    assert descriptors(large)[0] > 0
    pointer, captured = descriptors(small, capture=True)
    assert pointer == 0 and captured > 0
