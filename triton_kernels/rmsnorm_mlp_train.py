"""``inductor_fusion::rmsnorm_mlp_train``: the Llama region with a backward, for training graphs.

The region is the one of ``rmsnorm_mlp`` in its Llama form (LlamaRMSNorm -> SwiGLU with separate
gate/up projections -> down, optionally ``hidden +`` the result):

    rstd = rsqrt(mean(h.float()**2, -1) + eps)           (per row, fp32)
    n    = (h.float() * rstd).to(h.dtype) * norm_weight
    g, u = n @ Wg.T, n @ Wu.T
    out  = [h +] (silu(g) * u) @ Wd.T

Why an op of its own beside ``rmsnorm_mlp``: ``torch.library.register_autograd`` can only save
inputs and outputs of the op for the backward, so the forward must *return* what the backward
needs besides its inputs: the per-row ``rstd`` and, in the default memory mode, the gate/up
pre-activations. The inference op keeps its one-output contract (and its lowered CUDA form).

Memory modes (``recompute``):

- default (False): saved for the backward are ``h`` (an input), ``rstd`` ([M] fp32) and ``g``,
  ``u`` ([M, I] each). The normalised activations ``n`` are never saved: the backward recomputes
  them from ``h`` and ``rstd`` (one pointwise pass over [M, H]).
- recompute (True): only ``h`` and ``rstd`` are saved (``g``/``u`` come back empty, [0, I]); the
  backward recomputes ``n`` and then ``g``/``u`` with two GEMMs, i.e. selective activation
  checkpointing of the region.

The backward is an op too (``rmsnorm_mlp_train_backward``), so that the joint graph shows one
node Inductor cannot trace into, with a fake implementation for the compiler. Both ops' bodies
are the plain-PyTorch references below, which define what any kernel must compute; on CUDA the
backward runs `train_backward_triton` (the SwiGLU backward in a GEMM epilogue and the fused
RMSNorm backward, ``_rmsnorm_mlp_train_jit``). The forward op runs the reference everywhere (our
fused forward kernels do not write the gate/up pre-activations the backward needs).

This op is the eager layer's (`inductor_fusion.layers`). Compiled training graphs do not use it:
their regions keep Inductor's own forward and backward with another saved set
(`inductor_fusion.patterns.training`), where Inductor fuses and plans the whole backward.

Importing this module registers the two ops and their autograd formula, and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from inductor_fusion.triton_kernels.region import SUPPORTED_DTYPES, token_count

__all__ = [
    "FUSED_TRAINING_ON_CUDA",
    "rmsnorm_mlp_train",
    "rmsnorm_mlp_train_backward",
    "train_backward_reference",
    "train_backward_triton",
    "train_forward_reference",
]


# Whether the eager layer (`inductor_fusion.layers`) trains through these ops on CUDA. Their
# backward (Triton kernels beside torch.mm) measured 0.85-0.92x torch.compile's and raised the
# peak 1.5x on an H200 (perf/NOTES.md, 2026-12-02), so on CUDA the layer trains through the HF
# modules. Elsewhere (the CPU) the ops run their references. Compiled training graphs have their
# own switch (`inductor_fusion.patterns.training.CUDA_MODES`).
FUSED_TRAINING_ON_CUDA = False


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _caster(compute_dtype: torch.dtype | None) -> Any:
    """Casts a GEMM operand to ``compute_dtype`` (no-op without one)."""
    return (lambda t: t) if compute_dtype is None else (lambda t: t.to(compute_dtype))


def _stat(t: Tensor) -> Tensor:
    """``t`` in the statistic's dtype: fp32 as LlamaRMSNorm's ``.to(float32)``, but never below
    the input's (so fp64 stays fp64, which finite-difference gradient checks need)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def train_forward_reference(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    eps: float,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, rstd, gate, up), rounding as the Hugging Face modules round (see the module
    docstring); ``gate``/``up`` are [0, I] in recompute mode. ``compute_dtype`` (autocast): the
    GEMMs' operands are cast to it, as ``torch.autocast`` casts them (None: hidden's dtype)."""
    cast = _caster(compute_dtype)
    x32 = _stat(_rows(hidden))
    rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
    n = (x32 * rstd[:, None]).to(hidden.dtype) * norm_weight
    gate = F.linear(cast(n), cast(gate_weight))
    up = F.linear(cast(n), cast(up_weight))
    y = F.linear(F.silu(gate) * up, cast(down_weight)).view(hidden.shape)
    out = hidden + y if residual else y
    if recompute:
        gate, up = gate.new_empty((0, gate.shape[1])), up.new_empty((0, up.shape[1]))
    return out, rstd, gate, up


def train_backward_reference(
    grad_out: Tensor,
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    rstd: Tensor,
    gate: Tensor,
    up: Tensor,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_hidden, d_norm_weight, d_gate_weight, d_up_weight, d_down_weight).

    Each step rounds to the input dtype where eager autograd's does (the products and GEMMs),
    and the norm's backward runs in fp32 as the forward's statistic does. With a
    ``compute_dtype`` the GEMMs run in it and their gradients are cast back, as autocast's are.
    """
    cast = _caster(compute_dtype)
    x32 = _stat(_rows(hidden))
    xhat = x32 * rstd[:, None]  # fp32 normalised rows, recomputed rather than saved
    nhat = xhat.to(hidden.dtype)
    n = cast(nhat * norm_weight)
    if recompute:
        gate, up = F.linear(n, cast(gate_weight)), F.linear(n, cast(up_weight))
    dy = _rows(grad_out)
    act = F.silu(gate)
    d_down = (cast(dy).t() @ (act * up)).to(down_weight.dtype)
    d_inter = cast(dy) @ cast(down_weight)
    d_up = d_inter * act
    # silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g), in fp32 as eager's silu_backward.
    g32 = _stat(gate)
    s = torch.sigmoid(g32)
    d_gate = (_stat(d_inter) * _stat(up) * (s * (1 + g32 * (1 - s)))).to(gate.dtype)
    d_gate_weight = (d_gate.t() @ n).to(gate_weight.dtype)
    d_up_weight = (d_up.t() @ n).to(up_weight.dtype)
    d_n = (d_gate @ cast(gate_weight) + d_up @ cast(up_weight)).to(hidden.dtype)
    d_norm_weight = (d_n * nhat).sum(0)
    # The RMSNorm backward: dx = rstd * (dxhat - xhat * mean(dxhat * xhat)).
    d_xhat = _stat(d_n * norm_weight)
    d_x = rstd[:, None] * (d_xhat - xhat * (d_xhat * xhat).mean(-1, keepdim=True))
    d_hidden = d_x.to(hidden.dtype)
    if residual:  # The residual's gradient is the output's, added to the norm path's.
        d_hidden = d_hidden + dy.to(hidden.dtype)
    return d_hidden.view(hidden.shape), d_norm_weight, d_gate_weight, d_up_weight, d_down


# The CPU interpreter runs every program in Python: few, small programs keep tests fast (16 is
# the smallest block tl.dot takes). On CUDA, tiles for the SwiGLU backward GEMM as Inductor's
# mm templates pick them for 16-bit inputs; fp32 halves BLOCK_K for shared memory.
_INTERPRET_BLOCKS = (16, 32, 32)
_CUDA_BLOCKS = (64, 128, 64)
_NORM_ROWS_PER_PROGRAM = 16


def train_backward_triton(
    grad_out: Tensor,
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    rstd: Tensor,
    gate: Tensor,
    up: Tensor,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward with our two Triton kernels (``_rmsnorm_mlp_train_jit``) and torch.mm for
    the GEMMs that are plain GEMMs (the weight gradients and ``dn``); same contract as
    `train_backward_reference`. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    import triton

    from inductor_fusion.triton_kernels import _rmsnorm_mlp_train_jit as _jit

    hidden_size, inter_size = hidden.shape[-1], gate_weight.shape[0]
    cast = _caster(compute_dtype)
    dtype = compute_dtype or hidden.dtype  # the GEMMs' (autocast: not the parameters')
    x = _rows(hidden).contiguous()
    dy = _rows(grad_out).contiguous()
    dy_c = cast(dy)
    down_c = cast(down_weight)
    m = x.shape[0]
    # n = (x * rstd).to(dtype) * w: the GEMMs' input, recomputed (never saved).
    n = cast((_stat(x) * rstd[:, None]).to(hidden.dtype) * norm_weight)
    if recompute:
        gate, up = n @ cast(gate_weight).t(), n @ cast(up_weight).t()
    d_gate = torch.empty((m, inter_size), dtype=dtype, device=x.device)
    d_up = torch.empty_like(d_gate)
    inter = torch.empty_like(d_gate)
    interpret = x.device.type == "cpu"
    block_m, block_n, block_k = _INTERPRET_BLOCKS if interpret else _CUDA_BLOCKS
    if dtype == torch.float32 and not interpret:
        block_k //= 2
    grid = (triton.cdiv(m, block_m), triton.cdiv(inter_size, block_n))
    _jit.silu_mul_backward_kernel[grid](
        dy_c, down_c, gate, up, d_gate, d_up, inter, m, inter_size, hidden_size,
        dy_c.stride(0), dy_c.stride(1), down_c.stride(0), down_c.stride(1),
        gate.stride(0), gate.stride(1), up.stride(0), up.stride(1),
        d_gate.stride(0), d_gate.stride(1),
        # fp32 must not silently become TF32: the tolerance rule compares with eager fp32.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    # Weight gradients and dn stay GEMMs of cuBLAS's (the issue allows it where that is faster).
    d_down = (dy_c.t() @ inter).to(down_weight.dtype)
    d_gate_weight = (d_gate.t() @ n).to(gate_weight.dtype)
    d_up_weight = (d_up.t() @ n).to(up_weight.dtype)
    d_n = torch.addmm(d_gate @ cast(gate_weight), d_up, cast(up_weight)).to(hidden.dtype)
    programs = triton.cdiv(m, _NORM_ROWS_PER_PROGRAM)
    d_x = torch.empty_like(x)
    dw_partial = torch.empty((programs, hidden_size), dtype=torch.float32, device=x.device)
    _jit.rmsnorm_backward_kernel[(programs,)](
        x, d_n, dy, norm_weight, rstd, d_x, dw_partial, m, hidden_size, 1.0 / hidden_size,
        _NORM_ROWS_PER_PROGRAM, x.stride(0), d_n.stride(0), dy.stride(0), d_x.stride(0),
        HAS_RESIDUAL=residual, BLOCK_H=triton.next_power_of_2(hidden_size),
    )  # fmt: skip
    d_norm_weight = dw_partial.sum(0).to(norm_weight.dtype)
    return d_x.view(hidden.shape), d_norm_weight, d_gate_weight, d_up_weight, d_down


# Every argument positional (no keyword-only ones): the form register_autograd's setup_context
# receives the same way on torch 2.11 and 2.13, and the form a pattern replacement calls.
@torch.library.custom_op("inductor_fusion::rmsnorm_mlp_train", mutates_args=())
def rmsnorm_mlp_train(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    eps: float,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[hidden +] down(silu(gate(n)) * up(n))``, ``n = rmsnorm(hidden) * norm_weight``; also
    returns what the backward needs: (out, rstd, gate, up) (see the module docstring)."""
    out, rstd, gate, up = train_forward_reference(
        hidden, norm_weight, gate_weight, up_weight, down_weight, eps, residual, recompute,
        compute_dtype,
    )  # fmt: skip
    return out.contiguous(), rstd, gate.contiguous(), up.contiguous()


@rmsnorm_mlp_train.register_fake
def _rmsnorm_mlp_train_fake(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    eps: float,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m = token_count(hidden)
    inter = gate_weight.shape[0]
    saved = (0 if recompute else m, inter)
    dtype = compute_dtype or hidden.dtype
    # hidden + y promotes (autocast: fp32 hidden + 16-bit y); y alone stays in the GEMMs' dtype.
    out_dtype = torch.promote_types(hidden.dtype, dtype) if residual else dtype
    return (
        hidden.new_empty(hidden.shape, dtype=out_dtype),
        hidden.new_empty((m,), dtype=torch.promote_types(hidden.dtype, torch.float32)),
        hidden.new_empty(saved, dtype=dtype),
        hidden.new_empty(saved, dtype=dtype),
    )


@torch.library.custom_op("inductor_fusion::rmsnorm_mlp_train_backward", mutates_args=())
def rmsnorm_mlp_train_backward(
    grad_out: Tensor,
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    rstd: Tensor,
    gate: Tensor,
    up: Tensor,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `rmsnorm_mlp_train`'s ``out`` w.r.t. (hidden, norm_weight, gate_weight,
    up_weight, down_weight)."""
    grads = train_backward_reference(
        grad_out, hidden, norm_weight, gate_weight, up_weight, down_weight, rstd, gate, up,
        residual, recompute, compute_dtype,
    )  # fmt: skip
    return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]


@rmsnorm_mlp_train_backward.register_kernel("cuda")
def _rmsnorm_mlp_train_backward_cuda(
    grad_out: Tensor,
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    rstd: Tensor,
    gate: Tensor,
    up: Tensor,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Direct calls may bring dtypes the kernels do not take (float64): those get the reference.
    impl = train_backward_triton
    if hidden.dtype not in SUPPORTED_DTYPES or hidden.numel() == 0:
        impl = train_backward_reference
    grads = impl(
        grad_out, hidden, norm_weight, gate_weight, up_weight, down_weight, rstd, gate, up,
        residual, recompute, compute_dtype,
    )  # fmt: skip
    return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]


@rmsnorm_mlp_train_backward.register_fake
def _rmsnorm_mlp_train_backward_fake(
    grad_out: Tensor,
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    rstd: Tensor,
    gate: Tensor,
    up: Tensor,
    residual: bool,
    recompute: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (
        hidden.new_empty(hidden.shape),
        norm_weight.new_empty(norm_weight.shape),
        gate_weight.new_empty(gate_weight.shape),
        up_weight.new_empty(up_weight.shape),
        down_weight.new_empty(down_weight.shape),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    hidden, norm_weight, gate_weight, up_weight, down_weight, _eps, residual, recompute = inputs[:8]
    compute_dtype = inputs[8] if len(inputs) > 8 else None
    _out, rstd, gate, up = output
    ctx.save_for_backward(hidden, norm_weight, gate_weight, up_weight, down_weight, rstd, gate, up)
    ctx.residual, ctx.recompute, ctx.compute_dtype = residual, recompute, compute_dtype
    # The saved activations are outputs only so that they can be saved: no gradient flows
    # into them, and none is materialised as zeros for them.
    ctx.mark_non_differentiable(rstd, gate, up)
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, grad_out: Tensor | None, *_unused: Tensor | None) -> tuple[Any, ...]:
    # The gradients of rstd, gate and up are never used: those outputs are non-differentiable.
    hidden, norm_weight, gate_weight, up_weight, down_weight, rstd, gate, up = ctx.saved_tensors
    if grad_out is None:  # `out` did not reach the loss
        return (None,) * 9
    grads = rmsnorm_mlp_train_backward(
        grad_out, hidden, norm_weight, gate_weight, up_weight, down_weight, rstd, gate, up,
        ctx.residual, ctx.recompute, ctx.compute_dtype,
    )  # fmt: skip
    return (*grads, None, None, None, None)


rmsnorm_mlp_train.register_autograd(_backward, setup_context=_setup_context)
