"""Triton kernels behind ``inductor_fusion::rmsnorm_mlp`` (private: use ``rmsnorm_mlp.py``).

The region ``residual + down(silu(gate(n)) * up(n))`` with ``n = rmsnorm(hidden)`` runs as two
launches instead of eager's six:

1. ``gate_up_kernel``: RMSNorm folded into the gate and up GEMMs, with SiLU·mul in the epilogue.
   Normalisation is a per-row scale, so ``n @ W.T == rstd * ((x * w_norm) @ W.T)``: the kernel
   feeds ``x * w_norm`` to the dots and applies ``rstd`` to the fp32 accumulators at the end. The
   sum of squares that ``rstd`` needs comes from the very x tiles the K loop already loads, so the
   norm costs no extra pass over ``hidden`` and the normalised activations never reach memory.
   Gate and up share the A tile: two dots per K step, two fp32 accumulators.
2. ``down_kernel``: a plain GEMM with the down bias and the residual add in its epilogue.

The [M, I] intermediate is the one tensor that round-trips through memory; fusing the down GEMM
as well would need the whole I reduction per output tile (split-K or a persistent kernel), which
is later work.

Precision: every accumulator is fp32; low-precision values are rounded once, when stored. Unlike
Hugging Face's LlamaRMSNorm (which rounds ``x * rstd`` before the weight multiply), the dot
operand here is ``round(x * w_norm)`` without ``rstd``: the same relative rounding error, but its
magnitude is that of the un-normalised hidden state, so an fp16 hidden state whose ``|x * w_norm|``
exceeds 65504 would overflow where eager does not (bf16 and fp32 have the range to spare).

Scalars: Inductor may hand Python floats over as fp64; ``eps`` is cast to fp32 so the epilogue
math is never promoted to fp64.

Weights are read through their strides (nn.Linear layout [out, in]; the B tile is loaded
transposed), so no weight is ever copied or repacked. Row offsets are int64 because M * I
exceeds 2**31 for long prefills with large intermediate sizes.
"""

import triton
import triton.language as tl


def _gate_up_metadata(grid, metadata, args):
    """Bytes and flops of one ``gate_up_kernel`` launch, for Triton's profiler hooks."""
    m, n, k = args["M"], args["N"], args["K"]
    size = args["x_ptr"].element_size()
    bytes_moved = size * (m * k + k + 2 * n * k + m * n)
    bytes_moved += size * n * (int(args["HAS_GATE_BIAS"]) + int(args["HAS_UP_BIAS"]))
    return {
        "name": f"rmsnorm_gate_up[M={m},N={n},K={k}]",
        f"flops{8 * size}": 4 * m * n * k,
        "bytes": bytes_moved,
    }


def _down_metadata(grid, metadata, args):
    """Bytes and flops of one ``down_kernel`` launch, for Triton's profiler hooks."""
    m, n, k = args["M"], args["N"], args["K"]
    size = args["a_ptr"].element_size()
    bytes_moved = size * (m * k + n * k + m * n)
    bytes_moved += size * (n * int(args["HAS_BIAS"]) + m * n * int(args["HAS_RESIDUAL"]))
    return {
        "name": f"rmsnorm_mlp_down[M={m},N={n},K={k}]",
        f"flops{8 * size}": 2 * m * n * k,
        "bytes": bytes_moved,
    }


@triton.jit(launch_metadata=_gate_up_metadata)
def gate_up_kernel(
    x_ptr,  # [M, K] hidden states (K = H, the hidden size)
    norm_w_ptr,  # [K]
    gate_w_ptr,  # [N, K] (N = I, the intermediate size)
    up_w_ptr,  # [N, K]
    gate_b_ptr,  # [N] (unused unless HAS_GATE_BIAS)
    up_b_ptr,  # [N] (unused unless HAS_UP_BIAS)
    out_ptr,  # [M, N] silu(gate) * up, in the input dtype
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_xk,
    stride_norm_w,
    stride_gate_n,
    stride_gate_k,
    stride_up_n,
    stride_up_k,
    stride_gate_b,
    stride_up_b,
    stride_om,
    stride_on,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 (the fastest-varying one) walks M, so neighbouring programs share a weight tile and
    # the weights, the big operand, are fetched from DRAM about once.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    norm_w_ptrs = norm_w_ptr + offs_k * stride_norm_w
    # W is [N, K]; the dot wants W.T tiles [BLOCK_K, BLOCK_N], read in place through the strides.
    gate_w_ptrs = gate_w_ptr + offs_k[:, None] * stride_gate_k + cols[None, :] * stride_gate_n
    up_w_ptrs = up_w_ptr + offs_k[:, None] * stride_up_k + cols[None, :] * stride_up_n

    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        # Masked lanes load 0, so they add nothing to the statistics or to the dots.
        sum_sq += tl.sum(x * x, axis=1)
        norm_w = tl.load(norm_w_ptrs, mask=mask_k, other=0.0).to(tl.float32)
        a = (x * norm_w[None, :]).to(x_ptr.dtype.element_ty)
        gate_w = tl.load(gate_w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        up_w = tl.load(up_w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, up_w, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        norm_w_ptrs += BLOCK_K * stride_norm_w
        gate_w_ptrs += BLOCK_K * stride_gate_k
        up_w_ptrs += BLOCK_K * stride_up_k

    # Same statistic as LlamaRMSNorm: mean of squares in fp32, plus eps, reciprocal square root.
    rstd = tl.rsqrt(sum_sq / K + tl.cast(eps, tl.float32))
    gate = acc_gate * rstd[:, None]
    up = acc_up * rstd[:, None]
    if HAS_GATE_BIAS:
        gate_b = tl.load(gate_b_ptr + cols * stride_gate_b, mask=mask_n, other=0.0)
        gate += gate_b.to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        up_b = tl.load(up_b_ptr + cols * stride_up_b, mask=mask_n, other=0.0)
        up += up_b.to(tl.float32)[None, :]
    act = gate * tl.sigmoid(gate) * up

    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(launch_metadata=_down_metadata)
def down_kernel(
    a_ptr,  # [M, K] the gate_up output (K = I)
    w_ptr,  # [N, K] down weight (N = H)
    b_ptr,  # [N] (unused unless HAS_BIAS)
    res_ptr,  # [M, N] (unused unless HAS_RESIDUAL)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_b,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
