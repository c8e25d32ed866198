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

In a compiled CUDA graph the op call becomes a launch of the kernel from Inductor's own wrapper
(`silu_mul_lowered`, by ``inductor_fusion.op_lowering``): as a dispatcher call it cost the host
about 0.25 ms per training step of one region on the H100.

Importing this module registers the op and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from inductor_fusion.triton_kernels.region import SUPPORTED_DTYPES

__all__ = ["silu_mul", "silu_mul_lowered", "silu_mul_reference", "takes"]

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


def takes(gate: Tensor) -> bool:
    """Whether the kernel takes tensors like ``gate`` (else the reference computes the op)."""
    return gate.dtype in SUPPORTED_DTYPES


@silu_mul.register_kernel("cuda")
def _silu_mul_cuda(gate: Tensor, up: Tensor) -> Tensor:
    if not takes(gate) or gate.numel() == 0:
        return silu_mul_reference(gate, up)
    return silu_mul_triton(gate, up)


def silu_mul_triton(gate: Tensor, up: Tensor) -> Tensor:
    """The Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    launch = _launch(gate, up)
    launch.run()
    return launch.args["out_ptr"]


def silu_mul_lowered(gate: Tensor, up: Tensor) -> Tensor:
    """The kernel as a ``triton_kernel_wrapper_functional`` node, for tracing into a compiled
    graph (same contract as the op): Inductor launches it from its generated code, with no
    dispatcher call, and plans its output buffer with the graph's others."""
    from inductor_fusion.triton_kernels.launch_plan import Plan, emit

    launch = _launch(gate, up)
    return emit(Plan(launches=(launch,), out=launch.args["out_ptr"]))


def _launch(gate: Tensor, up: Tensor) -> Any:
    from inductor_fusion.triton_kernels._silu_mul_jit import silu_mul_kernel
    from inductor_fusion.triton_kernels.launch_plan import Launch

    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()  # a SymInt while tracing a graph with a dynamic batch
    args = {"gate_ptr": gate, "up_ptr": up, "out_ptr": out, "n": n, "BLOCK": _BLOCK}
    grid = ((n + _BLOCK - 1) // _BLOCK,)
    return Launch(silu_mul_kernel, grid, args, writes=("out_ptr",), num_warps=4, num_stages=1)
