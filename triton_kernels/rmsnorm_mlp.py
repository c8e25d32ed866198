"""``inductor_fusion::rmsnorm_mlp``: RMSNorm followed by a SwiGLU MLP and a residual add.

Computes the region that Llama-style decoder layers run after attention,

    n   = rmsnorm(hidden) * norm_weight                      (Hugging Face LlamaRMSNorm)
    out = residual + down(silu(gate(n)) * up(n))              (LlamaMLP, then the residual add)

in two Triton launches (see ``_rmsnorm_mlp_jit``) instead of eager's norm kernel, three GEMMs and
two pointwise kernels.

Why a ``torch.library.custom_op`` with a fake implementation: our post-grad patterns replace the
matched subgraph with one call to this op, and Inductor keeps such a call as an opaque extern
kernel (it never traces into it), so the op must tell the compiler its output's shape and dtype
without running. Devices other than CUDA get the plain-PyTorch reference, which is also the
definition of what the kernels must compute.

This module holds the op and its two Triton paths: `rmsnorm_mlp_triton` launches now (the op's
CUDA kernel, with recorded launches replayed per key) and `rmsnorm_mlp_lowered` traces the same
launches into a compiled graph. What the op computes and accepts is `region`'s; which launch
configuration runs is `launch_config`'s; the launches themselves are `launch_plan`'s.

Importing this module registers the op and does nothing else: no Inductor config edits, no GPU
probing, no compilation (Triton compiles a kernel on its first launch).
"""

import contextlib
import functools

import torch
from torch import Tensor

from inductor_fusion.triton_kernels import _launch_cache, launch_config
from inductor_fusion.triton_kernels.launch_config import Config, gpu_name, graph_config
from inductor_fusion.triton_kernels.launch_plan import Plan, as_rows, emit, plan_region
from inductor_fusion.triton_kernels.region import (
    LLAMA,
    RegionSpec,
    check_args,
    rmsnorm_mlp_reference,
    supports,
    token_count,
)

__all__ = [
    "LLAMA",
    "RegionSpec",
    "rmsnorm_mlp",
    "rmsnorm_mlp_lowered",
    "rmsnorm_mlp_reference",
    "rmsnorm_mlp_triton",
    "supports",
]


@functools.cache
def _spec(
    norm: str, norm_weight_offset: float, norm_weight_fp32: bool, activation: str, gated: bool
) -> RegionSpec:
    """The op's keyword axes as a `RegionSpec`, built (and validated) once per combination: the op
    bodies run this on every call, and a dataclass with ``__post_init__`` costs ~8 µs to build."""
    return RegionSpec(norm, norm_weight_offset, norm_weight_fp32, activation, gated)


def _device_guard(tensor: Tensor):
    """Triton launches on the current CUDA device; make that the tensor's device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# The schema keeps the tensors and eps positional and the optional tensors explicit: that is the
# form a post-grad replacement calls, and what ``register_fake`` and ``opcheck`` see. The region's
# kind (`RegionSpec`) and the scale come as keyword arguments whose defaults are Llama's, so a
# Llama region's call names none of them.
@torch.library.custom_op("inductor_fusion::rmsnorm_mlp", mutates_args=())
def rmsnorm_mlp(
    hidden: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor,
    up_weight: Tensor | None,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    norm_bias: Tensor | None = None,  # torch.library refuses keyword-only tensors
    *,
    residual_scale: float = 1.0,
    norm: str = "rms",
    norm_weight_offset: float = 0.0,
    norm_weight_fp32: bool = False,
    activation: str = "silu",
    gated: bool = True,
) -> Tensor:
    """``residual + residual_scale * down(act(gate(n)) * up(n))`` with ``n = norm(hidden)``
    (see `RegionSpec` for the keyword axes).

    This body is the implementation for every device without a registered kernel (CPU
    included): the reference itself, contiguous to match the fake implementation.
    """
    spec = _spec(norm, norm_weight_offset, norm_weight_fp32, activation, gated)
    tensors = (norm_weight, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    check_args(hidden, *tensors, residual, norm_bias, spec)
    out = rmsnorm_mlp_reference(
        hidden, norm_weight, gate_weight, up_weight, down_weight, gate_bias=gate_bias,
        up_bias=up_bias, down_bias=down_bias, residual=residual, eps=eps, norm_bias=norm_bias,
        residual_scale=residual_scale, spec=spec,
    )  # fmt: skip
    return out.contiguous()


@rmsnorm_mlp.register_kernel("cuda")
def _rmsnorm_mlp_cuda(
    hidden: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor,
    up_weight: Tensor | None,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    norm_bias: Tensor | None = None,  # torch.library refuses keyword-only tensors
    *,
    residual_scale: float = 1.0,
    norm: str = "rms",
    norm_weight_offset: float = 0.0,
    norm_weight_fp32: bool = False,
    activation: str = "silu",
    gated: bool = True,
) -> Tensor:
    # Patterns only insert the op where ``supports`` agrees, but a direct call may bring any
    # dtype (e.g. float64); that gets the reference rather than an error.
    spec = _spec(norm, norm_weight_offset, norm_weight_fp32, activation, gated)
    impl = rmsnorm_mlp_triton
    if supports(hidden.dtype, hidden.device.type, hidden.shape[-1], gate_weight.shape[0]):
        impl = rmsnorm_mlp_reference
    out = impl(
        hidden, norm_weight, gate_weight, up_weight, down_weight, gate_bias=gate_bias,
        up_bias=up_bias, down_bias=down_bias, residual=residual, eps=eps, norm_bias=norm_bias,
        residual_scale=residual_scale, spec=spec,
    )  # fmt: skip
    return out.contiguous()


@rmsnorm_mlp.register_fake
def _rmsnorm_mlp_fake(
    hidden: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor,
    up_weight: Tensor | None,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    norm_bias: Tensor | None = None,  # torch.library refuses keyword-only tensors
    *,
    residual_scale: float = 1.0,
    norm: str = "rms",
    norm_weight_offset: float = 0.0,
    norm_weight_fp32: bool = False,
    activation: str = "silu",
    gated: bool = True,
) -> Tensor:
    spec = _spec(norm, norm_weight_offset, norm_weight_fp32, activation, gated)
    tensors = (norm_weight, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    check_args(hidden, *tensors, residual, norm_bias, spec)
    return hidden.new_empty(hidden.shape)


def rmsnorm_mlp_triton(
    hidden: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor,
    up_weight: Tensor | None,
    down_weight: Tensor,
    *,
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float,
    norm_bias: Tensor | None = None,
    residual_scale: float = 1.0,
    spec: RegionSpec = LLAMA,
    config: Config | None = None,
) -> Tensor:
    """Launch the Triton kernels now; same contract as :func:`rmsnorm_mlp_reference`.

    The eager path (the op's CUDA kernel). Runs on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1`` (tests). ``config`` forces a launch configuration, so that tests
    can reach every kernel and branch.

    The first call of a key (shapes, strides, dtypes, devices, alignments, scalars: see
    `_launch_cache`) checks, plans and launches through Triton's JIT functions; later calls of the
    same key replay the recorded launches on the new tensors, which skips all of that.
    """
    tensors = (norm_weight, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    inputs = (hidden, *tensors, residual, norm_bias)
    # A forced configuration (tests) keeps its TMA kernels; otherwise see `eager_tma`.
    tma = config is not None or eager_tma(hidden)
    key = (*map(_launch_cache.tensor_key, inputs), eps, residual_scale, spec, config, tma)
    cached = _EAGER_PLANS.get(key)
    if cached is not None:
        return cached(inputs)
    # Checked on the caller's shapes, so that errors name them; the plan gets 2-D rows.
    check_args(hidden, *tensors, residual, norm_bias, spec)
    x = as_rows(hidden)
    res = None if residual is None else as_rows(residual)
    plan = _region_plan(
        x, tensors, res, eps, norm_bias, residual_scale, spec, tma=tma, config=config
    )
    if plan is None:
        return torch.empty_like(hidden)
    with _device_guard(hidden):
        compiled = [launch.run() for launch in plan.launches]
    # A replay passes the caller's tensors where this call passed ``x`` and ``res``: only right
    # if those are views of them (same data), not copies made for a unit inner stride; such keys
    # are remembered as not replayable.
    same_data = x.data_ptr() == hidden.data_ptr() and (
        residual is None or res.data_ptr() == residual.data_ptr()
    )
    if not same_data:
        _EAGER_PLANS.put(key, None)
    elif key not in _EAGER_PLANS:
        replay = _launch_cache.record(
            plan.launches, compiled, (x, *tensors, res, norm_bias), plan.out, hidden.device,
            out_shape=tuple(hidden.shape),
        )  # fmt: skip
        if replay is not None:  # else the inputs aliased; a later call of the key records
            _EAGER_PLANS.put(key, replay)
    return plan.out.view(hidden.shape)


# The eager op's recorded launches by key (`_launch_cache`); tests clear it to see first calls.
_EAGER_PLANS = _launch_cache.LaunchCache()

# From this many rows the eager op's "tma" configurations load through TMA descriptors; below it
# they run their pointer-kernel form (same tiles and split-K), as compiled graphs always do.
EAGER_TMA_MIN_ROWS = 2048


def eager_tma(hidden: Tensor) -> bool:
    """Whether an eager call on ``hidden`` uses TMA descriptors (where its configuration has them).

    Why not always: an eager model is host-bound up to a couple of thousand tokens, and there the
    TMA form lost although its kernels are faster. H200 machine, 2026-12-03, the 4-layer
    1B-shaped Llama, forward time without CUDA graphs against the unfused model, paired over 21
    interleaved rounds: with TMA 0.99x at M = 1024 and 4096 tokens 1.07x, with the pointer form
    1.03x at 1024 and 0.98x at 4096; at 2048 both 0.99x (another run at M = 256: TMA 0.97x, pointer
    1.04x). The host time the TMA form adds shows up in the ops *after* the layer
    (perf/NOTES.md), not in the layer's own calls. The GPU time of the TMA form is 3-11% lower
    (graph replay), so it is kept where the GPU is what counts: from ``EAGER_TMA_MIN_ROWS`` rows,
    and while a CUDA graph is captured (a replay costs no host time).
    """
    if token_count(hidden) >= EAGER_TMA_MIN_ROWS:
        return True
    return hidden.is_cuda and torch.cuda.is_current_stream_capturing()


def rmsnorm_mlp_lowered(
    hidden: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor,
    up_weight: Tensor | None,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    *,
    norm_bias: Tensor | None = None,
    residual_scale: float = 1.0,
    spec: RegionSpec = LLAMA,
) -> Tensor:
    """The region as Inductor-visible Triton launches, for a compiled graph (same contract).

    Meant to be traced (a post-grad replacement): each launch becomes a
    ``triton_kernel_wrapper_functional`` node, which Inductor reinplaces and lowers to a launch
    of our kernel from its own generated wrapper, with its own launcher and its memory planning
    for the buffers allocated here. So a call costs the host what Inductor's own kernels cost: no
    dispatcher call, no Python config pick, and no TMA descriptors built per call unless
    ``launch_config.LOWERED_TMA`` (then Inductor's wrapper builds them; see `plan_region`).

    The configuration is chosen while tracing: from the exact token count when it is static,
    else from the regime its size hint falls in, with a guard (so a token count from another
    regime recompiles once: at most one graph per regime, never one per M).
    """
    tensors = (norm_weight, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    # Read at call time, so that perf/bench.py --lowered-tma can set it.
    tma = launch_config.LOWERED_TMA
    plan = _region_plan(hidden, tensors, residual, eps, norm_bias, residual_scale, spec, tma=tma)
    if plan is None:  # a static token count of 0 (a symbolic one is never 0 here)
        return hidden.new_empty(hidden.shape)
    return emit(plan).view(hidden.shape)


def _region_plan(
    hidden: Tensor,
    tensors: tuple[Tensor | None, ...],
    residual: Tensor | None,
    eps: float,
    norm_bias: Tensor | None,
    residual_scale: float,
    spec: RegionSpec,
    *,
    tma: bool,
    config: Config | None = None,
) -> Plan | None:
    """What both paths share: the arguments checked, the configuration picked (by `graph_config`:
    the exact token count when it is an int, the regime otherwise), the launches planned. None
    for an empty input. ``tensors`` are the weights and biases in the op's order."""
    check_args(hidden, *tensors, residual, norm_bias, spec)
    m = token_count(hidden)
    if isinstance(m, int) and m == 0:
        return None
    gate_weight = tensors[1]
    config = config or graph_config(
        m, hidden.shape[-1], gate_weight.shape[0], hidden.dtype, hidden.device.type == "cpu",
        gpu_name(hidden.device), spec.gated,
    )  # fmt: skip
    return plan_region(
        hidden, *tensors, residual, eps, config, tma=tma, norm_bias=norm_bias,
        residual_scale=residual_scale, spec=spec,
    )  # fmt: skip
