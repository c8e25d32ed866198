"""Launch plans of ``inductor_fusion::rmsnorm_mlp``: the kernel launches that compute one call.

`plan_region` turns the region's tensors and a `launch_config.Config` into a `Plan`: the
buffers the launches write (allocated here) and the `Launch` of each kernel of
``_rmsnorm_mlp_jit`` with every argument by name (`norm_launch`, `gate_up_launch`,
`down_launch` build them; perf/tune.py times them one by one). One plan runs two ways: eagerly
(`Launch.run`, the op's CUDA kernel) or traced into a compiled graph (`emit`), where each launch
becomes a ``triton_kernel_wrapper_functional`` node that Inductor launches from its own wrapper.
`Launch`, `Plan` and `emit` serve other ops' kernels too (``silu_mul``).
"""

import dataclasses
import functools
from typing import Any

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from triton.tools.tensor_descriptor import TensorDescriptor

from inductor_fusion.triton_kernels import _rmsnorm_mlp_jit as _jit
from inductor_fusion.triton_kernels.launch_config import Blocks, Config
from inductor_fusion.triton_kernels.region import LLAMA, RegionSpec

__all__ = [
    "Launch",
    "Plan",
    "as_rows",
    "down_launch",
    "emit",
    "gate_up_launch",
    "norm_launch",
    "plan_region",
]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of the plan: every kernel argument by name, tensors included.

    ``writes`` names the tensor arguments the kernel stores to. The same plan runs eagerly
    (`run`) or becomes nodes of a compiled graph (`emit`), where the written tensors are what the
    functional form of the launch returns.
    """

    kernel: Any  # a @triton.jit function
    grid: tuple[Any, ...]  # ints, or SymInts while tracing a graph with dynamic shapes
    args: dict[str, Any]
    writes: tuple[str, ...]
    num_warps: int
    num_stages: int

    def run(self) -> Any:
        """Launches now (the eager path); returns what Triton's launch returns (the compiled
        kernel, which `_launch_cache` replays)."""
        return self.kernel[self.grid](
            **self.args, num_warps=self.num_warps, num_stages=self.num_stages
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The launches of one call, in order, and the tensor that holds the result."""

    launches: tuple[Launch, ...]
    out: Tensor  # [M, H], written by the last launch


def plan_region(
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
    config: Config,
    *,
    tma: bool,
    norm_bias: Tensor | None = None,
    residual_scale: float = 1.0,
    spec: RegionSpec = LLAMA,
) -> Plan:
    """The launches that compute the region, and the buffers they write (allocated here).

    ``tma=False`` gives a plan made of pointer-based kernels only: the "tma" configurations run
    their pointer-kernel form, with the same tiles and split-K. Compiled graphs take that form
    unless ``launch_config.LOWERED_TMA``: a graph carries a descriptor as its tensor and block
    shape (`emit`), and Inductor's wrapper builds it on the host before every launch.
    """
    hidden_size = hidden.shape[-1]
    inter_size = gate_weight.shape[0]
    x = as_rows(hidden)
    m = x.shape[0]
    out = torch.empty((m, hidden_size), dtype=hidden.dtype, device=hidden.device)
    res = None if residual is None else as_rows(residual)
    inter = torch.empty((m, inter_size), dtype=hidden.dtype, device=hidden.device)
    # fp32 must not silently become TF32: our tolerance rule compares with eager fp32. For 16-bit
    # inputs the setting has no effect; "ieee" is the spelling both Triton 3.6 and 3.9 accept.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    # Split-K arrival counters: a fresh buffer per call (in a compiled graph, one of Inductor's
    # planned buffers), zeroed by the gate/up launch (see ``_jit._zero_counters`` for why).
    split_k, tiles = _down_split(config.down, m, hidden_size, inter_size)
    locks = None
    if split_k > 1:
        locks = torch.empty(tiles, dtype=torch.int32, device=hidden.device)
    launches = []
    # Without a norm the tiled kernels read hidden as they would read pre-normalised rows.
    prenorm = config.prenorm or spec.norm == "none"
    if config.prenorm and spec.norm != "none":
        normed = torch.empty((m, hidden_size), dtype=hidden.dtype, device=hidden.device)
        launches.append(norm_launch(x, norm_weight, normed, eps, bias=norm_bias, spec=spec))
        x = normed
    gate_up = gate_up_launch(
        config.gate_up, x, norm_weight, gate_weight, up_weight, gate_bias, up_bias, inter,
        eps, precision, norm_in_loop=not prenorm, zero_locks=locks, tma=tma,
        norm_bias=norm_bias, spec=spec,
    )  # fmt: skip
    launches.append(gate_up)
    down = down_launch(
        config.down, inter, down_weight, down_bias, res, out, precision, locks, tma,
        residual_scale=residual_scale,
    )  # fmt: skip
    launches.append(down)
    return Plan(tuple(launches), out)


def as_rows(t: Tensor) -> Tensor:
    """``t`` as 2-D rows with a unit inner stride (a view where the layout allows one)."""
    rows = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    # The kernels take strides, so a reshape view is fine; only an inner stride other than 1
    # (e.g. a transposed view) would make every load a gather, and that one is copied.
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@functools.cache
def _single_config_kernel(kernel: Any, num_warps: int, num_stages: int) -> Any:
    """``kernel`` with its launch options attached, as Inductor takes user kernels' options (one
    ``triton.Config``: Inductor launches it without benchmarking). Cached, so that each variant is
    one entry of torch's kernel side table and one kernel in Inductor's generated code."""
    return triton.autotune(
        configs=[triton.Config({}, num_warps=num_warps, num_stages=num_stages)], key=[]
    )(kernel)


def emit(plan: Plan) -> Tensor:
    """Records the plan's launches as functional launch nodes (while tracing) and returns the
    tensor holding the result. Each launch reads the versions of its tensors that earlier
    launches wrote, which is what orders them in the graph."""
    from torch._higher_order_ops.triton_kernel_wrap import (
        kernel_side_table,
        triton_kernel_wrapper_functional,
    )

    latest: dict[int, Tensor] = {}
    no_constants = kernel_side_table.add_constant_args({})
    for launch in plan.launches:
        kwargs: dict[str, Any] = {}
        descriptors: dict[str, Any] = {}
        for name, value in launch.args.items():
            if isinstance(value, TensorDescriptor):
                # A graph carries the tensor and the block shape; Inductor's wrapper builds the
                # descriptor before each launch (torch's "stable" TMA metadata for user kernels).
                descriptors[name] = ("stable", (list(value.block_shape),))
                value = value.base
            kwargs[name] = latest.get(id(value), value) if isinstance(value, Tensor) else value
        kernel = _single_config_kernel(launch.kernel, launch.num_warps, launch.num_stages)
        written = triton_kernel_wrapper_functional(
            kernel_idx=kernel_side_table.add_kernel(kernel),
            constant_args_idx=no_constants,
            grid=[tuple(launch.grid) + (1,) * (3 - len(launch.grid))],
            tma_descriptor_metadata=descriptors,
            kwargs=kwargs,
            tensors_to_clone=list(launch.writes),
        )
        for name in launch.writes:
            latest[id(launch.args[name])] = written[name]
    return latest[id(plan.out)]


def norm_launch(
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    eps: float,
    *,
    bias: Tensor | None = None,
    spec: RegionSpec = LLAMA,
) -> Launch:
    """The norm pre-pass: ``out`` gets the rows of ``x`` normalised (and weighted) as ``spec``
    says, for the tiled gate/up kernels to read."""
    m, k = x.shape
    block_k = min(_next_power_of_2(k), 4096)
    args = {
        "x_ptr": x,
        "w_ptr": weight,
        "b_ptr": weight if bias is None else bias,  # unread without a bias
        "out_ptr": out,
        "M": m,
        "K": k,
        "eps": float(eps),
        "weight_offset": float(spec.norm_weight_offset),
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_w": weight.stride(0),
        "stride_b": 0 if bias is None else bias.stride(0),
        "stride_om": out.stride(0),
        "stride_ok": out.stride(1),
        "NORM": spec.norm,
        "HAS_BIAS": bias is not None,
        "WEIGHT_FP32": spec.norm_weight_fp32,
        "BLOCK_K": block_k,
    }
    return Launch(_jit.norm_kernel, (m,), args, ("out_ptr",), 8 if block_k >= 2048 else 4, 1)


def gate_up_launch(
    blocks: Blocks,
    x: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    inter: Tensor,
    eps: float,
    precision: str,
    norm_in_loop: bool,
    zero_locks: Tensor | None = None,
    tma: bool = True,
    *,
    norm_bias: Tensor | None = None,
    spec: RegionSpec = LLAMA,
) -> Launch:
    """The gate/up launch; it also zeroes ``zero_locks``, the down launch's split-K counters.

    ``norm_in_loop=False``: ``x`` holds the norm's output (or the region has no norm)."""
    m, k = x.shape
    n = inter.shape[1]
    gated = spec.gated
    if not gated:
        up_weight = gate_weight  # unread
    if norm_weight is None:
        norm_weight = gate_weight  # unread: no norm
    # Arguments by name, grouped by what the kernels share. Unused pointer arguments still need a
    # tensor; the constexpr flags keep them unread. They get a weight, never a buffer the launch
    # writes: in a compiled graph an alias of a written buffer would stop Inductor from reusing
    # that buffer in place.
    shared = {
        "gate_b_ptr": gate_weight if gate_bias is None else gate_bias,
        "up_b_ptr": gate_weight if up_bias is None else up_bias,
        "out_ptr": inter,
        "lock_ptr": gate_weight if zero_locks is None else zero_locks,
        "num_locks": 0 if zero_locks is None else zero_locks.numel(),
        "M": m,
        "N": n,
        "K": k,
        "stride_gate_b": 0 if gate_bias is None else gate_bias.stride(0),
        "stride_up_b": 0 if up_bias is None else up_bias.stride(0),
        "stride_om": inter.stride(0),
        "stride_on": inter.stride(1),
        "ACTIVATION": spec.activation,
        "GATED": gated,
        "HAS_GATE_BIAS": gate_bias is not None,
        "HAS_UP_BIAS": up_bias is not None,
        "ZERO_LOCKS": zero_locks is not None,
        "DOT_PRECISION": precision,
        **blocks.constexprs(),
    }
    writes = ("out_ptr",) if zero_locks is None else ("out_ptr", "lock_ptr")
    options = (blocks.num_warps, blocks.num_stages)
    grid = (_cdiv(m, blocks.block_m) * _cdiv(n, blocks.block_n),)
    use_tma = tma and blocks.kind == "tma" and not norm_in_loop
    if use_tma and _tma_ok(x, gate_weight, up_weight):
        # The copy engine zero-fills past the edges: no masks, no EVEN_K.
        args = {
            "x_desc": _descriptor(x, blocks.block_m, blocks.block_k),
            "gate_desc": _descriptor(gate_weight, blocks.block_n, blocks.block_k),
            "up_desc": _descriptor(up_weight, blocks.block_n, blocks.block_k),
            "x_ptr": x,
            **shared,
        }
        return Launch(_jit.gate_up_tma_kernel, grid, args, writes, *options)
    pointers = {
        "x_ptr": x,
        "norm_w_ptr": norm_weight,
        "norm_b_ptr": norm_weight if norm_bias is None else norm_bias,
        "gate_w_ptr": gate_weight,
        "up_w_ptr": up_weight,
        "eps": float(eps),
        "weight_offset": float(spec.norm_weight_offset),
        "stride_xm": x.stride(0),
        "stride_xk": x.stride(1),
        "stride_norm_w": norm_weight.stride(0),
        "stride_norm_b": 0 if norm_bias is None else norm_bias.stride(0),
        "stride_gate_n": gate_weight.stride(0),
        "stride_gate_k": gate_weight.stride(1),
        "stride_up_n": up_weight.stride(0),
        "stride_up_k": up_weight.stride(1),
        "EVEN_K": k % blocks.block_k == 0,
        # The kernels apply the norm in their K loop, unless the rows come normalised.
        "NORM": spec.norm if norm_in_loop else "none",
        "HAS_NORM_BIAS": norm_in_loop and norm_bias is not None,
    }
    if blocks.kind == "gemv":
        if not norm_in_loop and spec.norm != "none":
            raise ValueError("the gate/up GEMV always computes the norm in its loop")
        grid = (_cdiv(n, blocks.block_n), _cdiv(m, blocks.block_m))
        return Launch(_jit.gate_up_gemv_kernel, grid, {**pointers, **shared}, writes, *options)
    args = {**pointers, **shared}
    return Launch(_jit.gate_up_gemm_kernel, grid, args, writes, *options)


def _tma_ok(*tensors: Tensor) -> bool:
    """Whether the copy engine can read these 2-D tensors: unit inner stride, 16-byte aligned base
    and row stride (its hardware constraints). Other layouts take the pointer-based kernels."""
    return all(
        t.stride(1) == 1 and _base_aligned(t) and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors
    )


def _base_aligned(t: Tensor) -> bool:
    if is_fake(t):
        # Traced into a graph: only the offset into the storage is known. Inductor's buffers are
        # aligned, and the descriptor Inductor builds before each launch checks the address.
        return (t.storage_offset() * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0


def _descriptor(t: Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])


def down_launch(
    blocks: Blocks,
    inter: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    res: Tensor | None,
    out: Tensor,
    precision: str,
    locks: Tensor | None = None,
    tma: bool = True,
    *,
    residual_scale: float = 1.0,
) -> Launch:
    """The down launch. Split-K configurations need ``locks``, int32 counters (at least one per
    output tile) that are zero at launch; without them the launch runs unsplit."""
    m, k = inter.shape
    n = out.shape[1]
    # Arguments by name, grouped by what the kernels share (see gate_up_launch).
    shared = {
        "b_ptr": down_weight if down_bias is None else down_bias,
        "res_ptr": down_weight if res is None else res,
        "out_ptr": out,
        "M": m,
        "N": n,
        "K": k,
        "stride_b": 0 if down_bias is None else down_bias.stride(0),
        "stride_rm": 0 if res is None else res.stride(0),
        "stride_rn": 0 if res is None else res.stride(1),
        "stride_om": out.stride(0),
        "stride_on": out.stride(1),
        "residual_scale": float(residual_scale),
        "HAS_BIAS": down_bias is not None,
        "HAS_RESIDUAL": res is not None,
        "DOT_PRECISION": precision,
        **blocks.constexprs(),
    }
    pointers = {
        "a_ptr": inter,
        "w_ptr": down_weight,
        "stride_am": inter.stride(0),
        "stride_ak": inter.stride(1),
        "stride_wn": down_weight.stride(0),
        "stride_wk": down_weight.stride(1),
    }
    options = (blocks.num_warps, blocks.num_stages)
    tiles_n, tiles_m = _cdiv(n, blocks.block_n), _cdiv(m, blocks.block_m)
    split_k = _down_split(blocks, m, n, k)[0] if locks is not None else 1
    split = {"ws_ptr": down_weight, "lock_ptr": down_weight, "SPLIT_K": 1}  # unread
    writes: tuple[str, ...] = ("out_ptr",)
    if split_k > 1:
        workspace = torch.empty((split_k, m, n), dtype=torch.float32, device=out.device)
        split = {"ws_ptr": workspace, "lock_ptr": locks, "SPLIT_K": split_k}
        # The counters go back to zero, but they are written all the same.
        writes = ("out_ptr", "ws_ptr", "lock_ptr")
    if blocks.kind == "gemv":
        args = {**pointers, **split, **shared, "EVEN_K": k % (blocks.block_k * split_k) == 0}
        return Launch(_jit.down_gemv_kernel, (tiles_n, split_k, tiles_m), args, writes, *options)
    grid = (tiles_m * tiles_n, split_k)
    if tma and blocks.kind == "tma" and _tma_ok(inter, down_weight):
        args = {
            "a_desc": _descriptor(inter, blocks.block_m, blocks.block_k),
            "w_desc": _descriptor(down_weight, blocks.block_n, blocks.block_k),
            "a_ptr": inter,
            **split,
            **shared,
        }
        return Launch(_jit.down_tma_kernel, grid, args, writes, *options)
    even_k = k % (blocks.block_k * split_k) == 0
    args = {**pointers, **split, **shared, "EVEN_K": even_k}
    return Launch(_jit.down_gemm_kernel, grid, args, writes, *options)


def _down_split(blocks: Blocks, m: int, n: int, k: int) -> tuple[int, int]:
    """(number of K splits, output tiles) of the down launch. Each split walks whole K blocks;
    only splits that get any count (K=160, BLOCK_K=32 and 4 splits make splits of 64, so the
    fourth would be empty)."""
    tiles = _cdiv(n, blocks.block_n) * _cdiv(m, blocks.block_m)
    if blocks.split_k == 1:
        return 1, tiles
    k_per_split = _cdiv(_cdiv(k, blocks.split_k), blocks.block_k) * blocks.block_k
    return _cdiv(k, k_per_split), tiles


def _cdiv(a: Any, b: int) -> Any:
    """``ceil(a / b)`` in plain Python: ``triton.cdiv`` is a JIT-callable in newer Triton (~4 µs a
    call on the CPU machine), and this also takes the SymInt token counts of the lowered path."""
    return (a + b - 1) // b


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
