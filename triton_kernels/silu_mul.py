"""``inductor_fusion::silu_mul``: ``silu(gate) * up``, the SwiGLU activation, as its own kernel.

Used by training regions (`inductor_fusion.patterns.training`): the backward needs the
activation again for the down projection's weight gradient, and recomputes it from the saved
gate/up projections instead of keeping it. Written with Inductor's own ops, the recomputation
is fused with the SwiGLU backward (which reads gate and up too) into one kernel that holds gate,
up, the down projection's input gradient and three [M, I] outputs at once: six [M, I] buffers,
where Inductor's unfused backward holds four. As an opaque op it runs before that kernel and is
freed after its GEMM, and the SwiGLU backward can write one of its outputs over ``up``.

Rounds as the Hugging Face module rounds in eager mode: ``silu`` computed in fp32 and rounded to
the input dtype, then the product computed in fp32 and rounded once.

Importing this module registers the op and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["silu_mul", "silu_mul_reference"]

_BLOCK = 2048  # elements per program: 16-byte accesses, enough work per program to hide latency


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` in the inputs' dtype, as eager PyTorch computes it."""
    return F.silu(gate) * up


@torch.library.custom_op("inductor_fusion::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` for same-shape, same-dtype tensors (see the module docstring)."""
    return silu_mul_reference(gate, up)


@silu_mul.register_fake
def _silu_mul_fake(gate: Tensor, up: Tensor) -> Tensor:
    torch._check(gate.shape == up.shape, lambda: "silu_mul: gate and up differ in shape")
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@silu_mul.register_kernel("cuda")
def _silu_mul_cuda(gate: Tensor, up: Tensor) -> Tensor:
    if gate.dtype not in (torch.float16, torch.bfloat16, torch.float32) or gate.numel() == 0:
        return silu_mul_reference(gate, up)
    return silu_mul_triton(gate, up)


def silu_mul_triton(gate: Tensor, up: Tensor) -> Tensor:
    """The Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    import triton

    from inductor_fusion.triton_kernels._silu_mul_jit import silu_mul_kernel

    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    silu_mul_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
    return out
