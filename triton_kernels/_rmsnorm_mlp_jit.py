"""Triton kernels behind ``inductor_fusion::rmsnorm_mlp`` (private: use ``rmsnorm_mlp.py``).

Over 600 lines on purpose: the norm pre-pass and six variants of the two GEMM launches (gate/up,
down) share the ``@triton.jit`` helpers below (norm prologue, activation, epilogues, tile order,
split-K reduction), and this docstring describes them as one design.

The region ``residual + down(silu(gate(n)) * up(n))`` with ``n = rmsnorm(hidden) * w_norm`` runs
as two launches (three for large token counts) instead of eager's six. Which kernels run is
decided by the launcher from the token count M (see ``launch_config.pick_config``):

Small M (decode, speculative verification): the region is a stream over the three weight
matrices, and a GEMM tiled over M would give the chip only I/BLOCK_N (gate/up) and H/BLOCK_N (down)
programs, too few to keep enough loads in flight. The *GEMV* kernels therefore swap the operands:
the weight rows are the tile's long side (``acc[n, m] = W[n, :] . a[m, :]``), so a narrow block of
weight rows per program gives hundreds of programs, and the few token rows ride along as the
small side of the dot. ``down_gemv_kernel`` can also split K over programs (split-K) for the
down GEMM, whose N = H is small; the partial sums meet in a workspace and the last program of
each tile adds them in a fixed order (so the result is deterministic), then runs the epilogue.

1. ``gate_up_gemv_kernel`` / ``gate_up_gemm_kernel``: RMSNorm folded into the gate and up GEMMs,
   with SiLU·mul in the epilogue. Normalisation is a per-row scale, so
   ``n @ W.T == rstd * ((x * w_norm) @ W.T)``: the kernels feed ``x * w_norm`` to the dots and
   apply ``rstd`` to the fp32 accumulators at the end. The sum of squares that ``rstd`` needs
   comes from the very x tiles the K loop already loads, so the norm costs no extra pass over
   ``hidden``. Gate and up share the A tile: two dots per K step, two fp32 accumulators.
   With ``NORM="none"`` the GEMM instead reads activations that ``norm_kernel`` normalised
   beforehand (see 3.).
2. ``down_gemv_kernel`` / ``down_gemm_kernel``: the down GEMM with the bias and the residual add in
   its epilogue.
3. ``norm_kernel`` (large M only): a pre-pass that writes ``n`` once, rounded exactly as the
   Hugging Face norm module rounds it. At large M the GEMMs are compute-bound; scaling the A
   tile inside the K loop would route every A tile through registers and stall the tensor-core
   pipeline, while the pre-pass costs 2·M·H·2 bytes, about 1% of the GEMM time from M=1024 on.
   The statistics are still computed once per row, never per output column.

The [M, I] intermediate is the one tensor that round-trips through memory (2·M·I·2 bytes:
nothing at small M, a few % of the GEMM time at large M).

Precision: every accumulator is fp32; low-precision values are rounded once, when stored. In the
in-loop form the dot operand is ``round(x * w_norm)`` without ``rstd`` (Hugging Face rounds
``x * rstd`` before the weight multiply): the same relative rounding error, but its magnitude is
that of the un-normalised hidden state, so an fp16 hidden state whose ``|x * w_norm|`` exceeds
65504 would overflow where eager does not (bf16 and fp32 have the range to spare). The pre-pass
form rounds exactly as eager does.

Family axes (``tl.constexpr`` switches, see ``region.RegionSpec``): ``NORM`` is "rms"
(folded as above), "layer" (F.layer_norm: the mean shift does not commute with the dot, so a
pre-loop over the few KB of ``x`` takes mean and 1/std and the K loop feeds the finished
``(x - mean) * rstd * w + b``) or "none" (OLMo-2; also how the tiled kernels read pre-normalised
rows); ``weight_offset`` (runtime) makes the weight ``offset + w`` (Gemma, Nemotron);
``ACTIVATION`` and ``GATED`` pick the epilogue ``act(gate) * up`` or ``act(gate)``; the down
epilogue computes ``residual + y * residual_scale`` (Granite). Gate and up weights are read
through their own strides, so Phi-3's fused ``gate_up_proj`` arrives as two views of one tensor.

Scalars: Inductor may hand Python floats over as fp64; ``eps``, ``weight_offset`` and ``residual_scale``
are cast to fp32 so the math is never promoted to fp64.

Weights are read through their strides (nn.Linear layout [out, in]), so no weight is ever copied
or repacked. Row offsets are int64 because M * I exceeds 2**31 for long prefills with large
intermediate sizes.
"""

import triton
import triton.language as tl


def _gate_up_metadata(grid, metadata, args):
    """Bytes and flops of one gate/up launch, for Triton's profiler hooks."""
    m, n, k = args["M"], args["N"], args["K"]
    size = args["x_ptr"].element_size()
    projections = 2 if args.get("GATED", True) else 1
    bytes_moved = size * (m * k + k + projections * n * k + m * n)
    bytes_moved += size * n * (int(args["HAS_GATE_BIAS"]) + int(args["HAS_UP_BIAS"]))
    return {
        "name": f"rmsnorm_gate_up[M={m},N={n},K={k}]",
        f"flops{8 * size}": 2 * projections * m * n * k,
        "bytes": bytes_moved,
    }


def _down_metadata(grid, metadata, args):
    """Bytes and flops of one down launch, for Triton's profiler hooks."""
    m, n, k = args["M"], args["N"], args["K"]
    size = args["a_ptr"].element_size()
    bytes_moved = size * (m * k + n * k + m * n)
    bytes_moved += size * (n * int(args["HAS_BIAS"]) + m * n * int(args["HAS_RESIDUAL"]))
    return {
        "name": f"rmsnorm_mlp_down[M={m},N={n},K={k}]",
        f"flops{8 * size}": 2 * m * n * k,
        "bytes": bytes_moved,
    }


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """The MLP's activation in fp32, as transformers' ACT2FN entries define it."""
    if ACTIVATION == "silu":
        y = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":  # erf form (nn.GELU(), "gelu")
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":  # "gelu_pytorch_tanh"
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(u) = 2 sigmoid(2u) - 1: sigmoid exists on every backend and in the interpreter.
        y = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    else:  # "relu2": relu(x) ** 2 (Nemotron)
        r = tl.maximum(x, 0.0)
        y = r * r
    return y


@triton.jit
def _gate_up_epilogue(gate, up, ACTIVATION: tl.constexpr, GATED: tl.constexpr):
    """act(gate) * up for gated MLPs, act(gate) for the others (``gate`` is then the only
    up-projection, e.g. GPT-NeoX's dense_h_to_4h); fp32 in, fp32 out."""
    y = _activation(gate, ACTIVATION)
    if GATED:
        y = y * up
    return y


@triton.jit
def _layer_norm_stats(
    x_ptrs, mask_m, K, eps, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Mean and 1/std of each row of [BLOCK_M, K] activations (F.layer_norm's statistics, in fp32).

    Two passes (mean, then the mean of squared deviations), not E[x^2] - E[x]^2: hidden states
    with a large common offset would cancel there. The rows are a few KB and stay in L1/L2."""
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (offs_k < K - k0)[None, :]
        total += tl.sum(tl.load(x_ptrs + k0 * stride_xk, mask=mask, other=0.0).to(tl.float32), 1)
    mean = total / K
    dev = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (offs_k < K - k0)[None, :]
        x = tl.load(x_ptrs + k0 * stride_xk, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean[:, None], 0.0)
        dev += tl.sum(d * d, 1)
    return mean, tl.rsqrt(dev / K + tl.cast(eps, tl.float32))


@triton.jit
def _normalize_tile(x, norm_w, norm_b, mean, rstd, NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """The K-loop form of the norm: what the gate/up dots read for an fp32 tile ``x``.

    "rms": ``x * w`` without rstd, which the accumulators get at the end (a per-row scale
    commutes with the dot), so the statistics come from the tiles the loop loads anyway.
    "layer": the whole ``(x - mean) * rstd * w + b`` (statistics from a pre-loop: see
    `_layer_norm_stats`), since the mean shift does not commute with the dot.
    "none": ``x``."""
    if NORM == "rms":
        a = x * norm_w[None, :]
    elif NORM == "layer":
        a = (x - mean[:, None]) * rstd[:, None] * norm_w[None, :]
        if HAS_NORM_BIAS:
            a += norm_b[None, :]
    else:
        a = x
    return a


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M consecutive programs share a
    column of weight tiles and walk the same A rows, so both operands are reused from L2 instead of
    re-read from DRAM."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _zero_counters(lock_ptr, num_locks, ZERO_LOCKS: tl.constexpr):
    """Program 0 zeroes the down launch's split-K arrival counters (a fresh buffer per call).

    Done here, in the launch before the down GEMM, because that costs no memset launch and no
    persistent buffer: a buffer kept across calls would be allocated from the CUDA-graph pool when
    the first call happens during a graph's warm-up, which CUDA-graph trees reject."""
    if ZERO_LOCKS:  # noqa: SIM102 - keeps the constexpr test apart
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            offs = tl.arange(0, 1024)
            for start in range(0, num_locks, 1024):
                idx = start + offs
                tl.store(lock_ptr + idx, tl.zeros((1024,), dtype=tl.int32), mask=idx < num_locks)


@triton.jit
def norm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [K] (unused when NORM == "none")
    b_ptr,  # [K] (unused unless HAS_BIAS)
    out_ptr,  # [M, K] normalised, in the input dtype
    M,
    K,
    eps,
    weight_offset,
    stride_xm,
    stride_xk,
    stride_w,
    stride_b,
    stride_om,
    stride_ok,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The norm with the modules' roundings, one row per program: "rms" is
    ``round(round(x * rstd) * w)`` (LlamaRMSNorm) or, with WEIGHT_FP32, ``round(x * rstd * w)``
    (GemmaRMSNorm's fp32 ``(1 + w)``); "layer" is F.layer_norm's single rounding of
    ``(x - mean) * rstd * w + b``. ``w`` is the weight plus ``weight_offset``. Two passes over
    the row for "rms", three for "layer" (the later ones hit L1/L2)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    mean = 0.0
    if NORM == "layer":
        total = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = offs < K - k0
            total += tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / K
    sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)
        sum_sq += d * d
    rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / K + tl.cast(eps, tl.float32))
    dtype = out_ptr.dtype.element_ty
    offset = tl.cast(weight_offset, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_row + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (k0 + offs) * stride_w, mask=mask, other=0.0).to(tl.float32) + offset
        n = (x - mean) * rstd
        if NORM == "rms" and not WEIGHT_FP32:
            n = n.to(dtype).to(tl.float32)
        n = n * w
        if HAS_BIAS:
            n += tl.load(b_ptr + (k0 + offs) * stride_b, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + (k0 + offs) * stride_ok, n.to(dtype), mask=mask)


@triton.jit(launch_metadata=_gate_up_metadata)
def gate_up_gemv_kernel(
    x_ptr,  # [M, K] hidden states (K = H, the hidden size)
    norm_w_ptr,  # [K] (unused when NORM == "none")
    norm_b_ptr,  # [K] (unused unless HAS_NORM_BIAS)
    gate_w_ptr,  # [N, K] (N = I, the intermediate size); the only up-projection unless GATED
    up_w_ptr,  # [N, K] (unused unless GATED)
    gate_b_ptr,  # [N] (unused unless HAS_GATE_BIAS)
    up_b_ptr,  # [N] (unused unless HAS_UP_BIAS)
    out_ptr,  # [M, N] act(gate) * up (or act(gate)), in the input dtype
    lock_ptr,  # int32 split-K counters of the down launch (unused unless ZERO_LOCKS)
    num_locks,
    M,
    N,
    K,
    eps,
    weight_offset,
    stride_xm,
    stride_xk,
    stride_norm_w,
    stride_norm_b,
    stride_gate_n,
    stride_gate_k,
    stride_up_n,
    stride_up_k,
    stride_gate_b,
    stride_up_b,
    stride_om,
    stride_on,
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    ZERO_LOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Small-M gate/up: tiles of BLOCK_N weight rows by BLOCK_M tokens, accumulators [N, M]."""
    _zero_counters(lock_ptr, num_locks, ZERO_LOCKS)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    cols = offs_n.to(tl.int64)
    rows = offs_m.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    norm_w_ptrs = norm_w_ptr + offs_k * stride_norm_w
    norm_b_ptrs = norm_b_ptr + offs_k * stride_norm_b
    # Weight rows are contiguous along K: each warp reads whole 16-byte vectors of a row.
    gate_w_ptrs = gate_w_ptr + cols[:, None] * stride_gate_n + offs_k[None, :] * stride_gate_k
    up_w_ptrs = up_w_ptr + cols[:, None] * stride_up_n + offs_k[None, :] * stride_up_k

    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM == "layer":
        mean, rstd = _layer_norm_stats(x_ptrs, mask_m, K, eps, stride_xk, BLOCK_M, BLOCK_K)
    offset = tl.cast(weight_offset, tl.float32)
    norm_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
    up_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=gate_w_ptr.dtype.element_ty)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0).to(tl.float32)
            norm_w = tl.load(norm_w_ptrs).to(tl.float32) + offset
            if HAS_NORM_BIAS:
                norm_b = tl.load(norm_b_ptrs).to(tl.float32)
            gate_w = tl.load(gate_w_ptrs, mask=mask_n[:, None], other=0.0)
            if GATED:
                up_w = tl.load(up_w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k < K - k0
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            norm_w = tl.load(norm_w_ptrs, mask=mask_k, other=0.0).to(tl.float32) + offset
            if HAS_NORM_BIAS:
                norm_b = tl.load(norm_b_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            gate_w = tl.load(gate_w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if GATED:
                up_w = tl.load(up_w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # Masked lanes load 0, so they add nothing to the statistics; past K the weight tiles
        # are 0, so whatever the norm makes of a masked lane adds nothing to the dots either.
        # Every program recomputes the statistics of its tokens; x is a few KB and stays in L2.
        sum_sq += tl.sum(x * x, axis=1)
        a = _normalize_tile(x, norm_w, norm_b, mean, rstd, NORM, HAS_NORM_BIAS)
        a = a.to(x_ptr.dtype.element_ty)
        acc_gate = tl.dot(gate_w, tl.trans(a), acc_gate, input_precision=DOT_PRECISION)
        if GATED:
            acc_up = tl.dot(up_w, tl.trans(a), acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        norm_w_ptrs += BLOCK_K * stride_norm_w
        norm_b_ptrs += BLOCK_K * stride_norm_b
        gate_w_ptrs += BLOCK_K * stride_gate_k
        up_w_ptrs += BLOCK_K * stride_up_k

    gate = acc_gate
    up = acc_up
    if NORM == "rms":
        # Same statistic as the RMSNorms: mean of squares in fp32, plus eps, 1/sqrt.
        rstd = tl.rsqrt(sum_sq / K + tl.cast(eps, tl.float32))
        gate = gate * rstd[None, :]
        up = up * rstd[None, :]
    if HAS_GATE_BIAS:
        gate_b = tl.load(gate_b_ptr + cols * stride_gate_b, mask=mask_n, other=0.0)
        gate += gate_b.to(tl.float32)[:, None]
    if HAS_UP_BIAS:
        up_b = tl.load(up_b_ptr + cols * stride_up_b, mask=mask_n, other=0.0)
        up += up_b.to(tl.float32)[:, None]
    act = _gate_up_epilogue(gate, up, ACTIVATION, GATED)
    out_ptrs = out_ptr + rows[None, :] * stride_om + cols[:, None] * stride_on
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit(launch_metadata=_gate_up_metadata)
def gate_up_gemm_kernel(
    x_ptr,  # [M, K] hidden states (pre-normalised ones come with NORM == "none")
    norm_w_ptr,  # [K] (unused when NORM == "none")
    norm_b_ptr,  # [K] (unused unless HAS_NORM_BIAS)
    gate_w_ptr,  # [N, K]; the only up-projection unless GATED
    up_w_ptr,  # [N, K] (unused unless GATED)
    gate_b_ptr,  # [N] (unused unless HAS_GATE_BIAS)
    up_b_ptr,  # [N] (unused unless HAS_UP_BIAS)
    out_ptr,  # [M, N]
    lock_ptr,  # int32 split-K counters of the down launch (unused unless ZERO_LOCKS)
    num_locks,
    M,
    N,
    K,
    eps,
    weight_offset,
    stride_xm,
    stride_xk,
    stride_norm_w,
    stride_norm_b,
    stride_gate_n,
    stride_gate_k,
    stride_up_n,
    stride_up_k,
    stride_gate_b,
    stride_up_b,
    stride_om,
    stride_on,
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    ZERO_LOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Tiled gate/up for larger M: [BLOCK_M, BLOCK_N] tiles of both outputs per program."""
    _zero_counters(lock_ptr, num_locks, ZERO_LOCKS)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    norm_w_ptrs = norm_w_ptr + offs_k * stride_norm_w
    norm_b_ptrs = norm_b_ptr + offs_k * stride_norm_b
    # W is [N, K]; the dot wants W.T tiles [BLOCK_K, BLOCK_N], read in place through the strides.
    gate_w_ptrs = gate_w_ptr + offs_k[:, None] * stride_gate_k + cols[None, :] * stride_gate_n
    up_w_ptrs = up_w_ptr + offs_k[:, None] * stride_up_k + cols[None, :] * stride_up_n

    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM == "layer":
        mean, rstd = _layer_norm_stats(x_ptrs, mask_m, K, eps, stride_xk, BLOCK_M, BLOCK_K)
    offset = tl.cast(weight_offset, tl.float32)
    norm_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    norm_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
    up_w = tl.zeros((BLOCK_K, BLOCK_N), dtype=gate_w_ptr.dtype.element_ty)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            gate_w = tl.load(gate_w_ptrs, mask=mask_n[None, :], other=0.0)
            if GATED:
                up_w = tl.load(up_w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            gate_w = tl.load(gate_w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if GATED:
                up_w = tl.load(up_w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if NORM != "none":
            x = a.to(tl.float32)
            sum_sq += tl.sum(x * x, axis=1)
            norm_w = tl.load(norm_w_ptrs, mask=mask_k, other=0.0).to(tl.float32) + offset
            if HAS_NORM_BIAS:
                norm_b = tl.load(norm_b_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            a = _normalize_tile(x, norm_w, norm_b, mean, rstd, NORM, HAS_NORM_BIAS)
            a = a.to(x_ptr.dtype.element_ty)
            norm_w_ptrs += BLOCK_K * stride_norm_w
            norm_b_ptrs += BLOCK_K * stride_norm_b
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision=DOT_PRECISION)
        if GATED:
            acc_up = tl.dot(a, up_w, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        gate_w_ptrs += BLOCK_K * stride_gate_k
        up_w_ptrs += BLOCK_K * stride_up_k

    gate = acc_gate
    up = acc_up
    if NORM == "rms":
        rstd = tl.rsqrt(sum_sq / K + tl.cast(eps, tl.float32))
        gate = gate * rstd[:, None]
        up = up * rstd[:, None]
    if HAS_GATE_BIAS:
        gate_b = tl.load(gate_b_ptr + cols * stride_gate_b, mask=mask_n, other=0.0)
        gate += gate_b.to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        up_b = tl.load(up_b_ptr + cols * stride_up_b, mask=mask_n, other=0.0)
        up += up_b.to(tl.float32)[None, :]
    act = _gate_up_epilogue(gate, up, ACTIVATION, GATED)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_epilogue(
    acc,  # [BLOCK_N, BLOCK_M] fp32, transposed (GEMV) tile
    cols,
    rows,
    mask_n,
    mask_m,
    b_ptr,
    res_ptr,
    out_ptr,
    stride_b,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    residual_scale,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """Bias, then ``residual + y * residual_scale`` (Granite's scaled residual; 1.0 elsewhere,
    an exact multiply), on a transposed (GEMV) tile."""
    mask = mask_n[:, None] & mask_m[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + rows[None, :] * stride_rm + cols[:, None] * stride_rn
        res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * tl.cast(residual_scale, tl.float32) + res
    out_ptrs = out_ptr + rows[None, :] * stride_om + cols[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce(acc, ws_ptrs, mask, lock, pid_s, slice_size, SPLIT_K: tl.constexpr):
    """Split-K fix-up: publish this split's fp32 partial tile, count arrivals on ``lock``; the
    last program to arrive gets ``(True, sum of all partials)``, the others ``(False, zeros)``.

    The sum runs in split order, so the result does not depend on which program came last
    (deterministic). The counters must be zero at launch (see ``_zero_counters``).
    """
    tl.store(ws_ptrs + pid_s * slice_size, acc, mask=mask)
    # Every thread's partial must be stored before the release below publishes them.
    tl.debug_barrier()
    arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for s in range(SPLIT_K):
            # .cg: read from L2, where the other programs' stores landed, never a stale L1.
            total += tl.load(ws_ptrs + s * slice_size, mask=mask, other=0.0, cache_modifier=".cg")
        # Back to zero, so a counter buffer also serves a next launch without re-zeroing.
        tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")
    return last, total


@triton.jit(launch_metadata=_down_metadata)
def down_gemv_kernel(
    a_ptr,  # [M, K] the gate_up output (K = I)
    w_ptr,  # [N, K] down weight (N = H)
    b_ptr,  # [N] (unused unless HAS_BIAS)
    res_ptr,  # [M, N] (unused unless HAS_RESIDUAL)
    out_ptr,  # [M, N]
    ws_ptr,  # [SPLIT_K, M, N] fp32 partial sums (unused unless SPLIT_K > 1)
    lock_ptr,  # int32 per (M tile, N tile), zero at launch (unused unless SPLIT_K > 1)
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
    residual_scale,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Small-M down GEMM with swapped operands; SPLIT_K programs share each output tile."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    cols = offs_n.to(tl.int64)
    rows = offs_m.to(tl.int64)

    # Each split walks a whole number of K blocks; EVEN_K means every split's blocks are full.
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_s * k_per_split
    k_end = min(k_start + k_per_split, K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    w_ptrs = w_ptr + cols[:, None] * stride_wn + (k_start + offs_k)[None, :] * stride_wk

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT_K == 1:
        _down_epilogue(
            acc, cols, rows, mask_n, mask_m, b_ptr, res_ptr, out_ptr, stride_b, stride_rm, stride_rn,
            stride_om, stride_on, residual_scale, HAS_BIAS, HAS_RESIDUAL,
        )  # fmt: skip
    else:
        ws_ptrs = ws_ptr + rows[None, :] * N + cols[:, None]
        lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
        last, acc = _split_k_reduce(acc, ws_ptrs, mask, lock, pid_s, M * N, SPLIT_K)
        if last:
            _down_epilogue(
                acc, cols, rows, mask_n, mask_m, b_ptr, res_ptr, out_ptr, stride_b, stride_rm,
                stride_rn, stride_om, stride_on, residual_scale, HAS_BIAS, HAS_RESIDUAL,
            )  # fmt: skip


@triton.jit(launch_metadata=_down_metadata)
def down_gemm_kernel(
    a_ptr,  # [M, K] the gate_up output (K = I)
    w_ptr,  # [N, K] down weight (N = H)
    b_ptr,  # [N] (unused unless HAS_BIAS)
    res_ptr,  # [M, N] (unused unless HAS_RESIDUAL)
    out_ptr,  # [M, N]
    ws_ptr,  # [SPLIT_K, M, N] fp32 partial sums (unused unless SPLIT_K > 1)
    lock_ptr,  # int32 per output tile, zero at launch (unused unless SPLIT_K > 1)
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
    residual_scale,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Tiled down GEMM for larger M, grouped program order, bias + residual epilogue. With
    SPLIT_K > 1, SPLIT_K programs (grid axis 1) share each output tile's K range: at a few hundred
    tokens N = H gives too few output tiles to fill the chip, and the K = I reduction is long.
    EVEN_K means every split's K blocks are full."""
    tile = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_s * k_per_split
    k_end = min(k_start + k_per_split, K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    w_ptrs = w_ptr + (k_start + offs_k)[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = mask_m[:, None] & mask_n[None, :]
    last = True
    if SPLIT_K > 1:
        ws_ptrs = ws_ptr + rows[:, None] * N + cols[None, :]
        last, acc = _split_k_reduce(acc, ws_ptrs, mask, lock_ptr + tile, pid_s, M * N, SPLIT_K)
    if last:
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols * stride_b, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            res_ptrs = res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn
            res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * tl.cast(residual_scale, tl.float32) + res
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(launch_metadata=_gate_up_metadata)
def gate_up_tma_kernel(
    x_desc,  # [M, K] pre-normalised activations, block [BLOCK_M, BLOCK_K]
    gate_desc,  # [N, K], block [BLOCK_N, BLOCK_K]
    up_desc,  # [N, K], block [BLOCK_N, BLOCK_K]
    gate_b_ptr,
    up_b_ptr,
    out_ptr,  # [M, N]
    lock_ptr,  # int32 split-K counters of the down launch (unused unless ZERO_LOCKS)
    num_locks,
    x_ptr,  # the tensor behind x_desc: only its dtype is used (launch metadata, out dtype)
    M,
    N,
    K,
    stride_gate_b,
    stride_up_b,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    ZERO_LOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Large-M gate/up after the norm pre-pass: tiles arrive through the tensor-memory
    accelerator (TMA), which zero-fills out-of-bounds rows and columns, so the K loop has no
    masks and no address arithmetic, only copies into shared memory and tensor-core dots."""
    _zero_counters(lock_ptr, num_locks, ZERO_LOCKS)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k0])
        gate_w = gate_desc.load([off_n, k0])
        acc_gate = tl.dot(a, gate_w.T, acc_gate, input_precision=DOT_PRECISION)
        if GATED:
            up_w = up_desc.load([off_n, k0])
            acc_up = tl.dot(a, up_w.T, acc_up, input_precision=DOT_PRECISION)

    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    if HAS_GATE_BIAS:
        gate_b = tl.load(gate_b_ptr + cols * stride_gate_b, mask=mask_n, other=0.0)
        acc_gate += gate_b.to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        up_b = tl.load(up_b_ptr + cols * stride_up_b, mask=mask_n, other=0.0)
        acc_up += up_b.to(tl.float32)[None, :]
    act = _gate_up_epilogue(acc_gate, acc_up, ACTIVATION, GATED)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(launch_metadata=_down_metadata)
def down_tma_kernel(
    a_desc,  # [M, K] the gate_up output, block [BLOCK_M, BLOCK_K]
    w_desc,  # [N, K] down weight, block [BLOCK_N, BLOCK_K]
    b_ptr,
    res_ptr,
    out_ptr,  # [M, N]
    ws_ptr,  # [SPLIT_K, M, N] fp32 partial sums (unused unless SPLIT_K > 1)
    lock_ptr,  # int32 per output tile, zero at launch (unused unless SPLIT_K > 1)
    a_ptr,  # the tensor behind a_desc: only its dtype is used (launch metadata)
    M,
    N,
    K,
    stride_b,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    residual_scale,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Tiled down GEMM with TMA tile loads; bias + residual epilogue. With SPLIT_K > 1 the K
    range is shared by SPLIT_K programs per tile: at a few hundred tokens N = H gives too few
    output tiles to fill the chip, and the K = I reduction is long."""
    tile = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_s * k_per_split
    k_end = min(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        a = a_desc.load([off_m, k0])
        w = w_desc.load([off_n, k0])
        acc = tl.dot(a, w.T, acc, input_precision=DOT_PRECISION)

    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    last = True
    if SPLIT_K > 1:
        ws_ptrs = ws_ptr + rows[:, None] * N + cols[None, :]
        last, acc = _split_k_reduce(acc, ws_ptrs, mask, lock_ptr + tile, pid_s, M * N, SPLIT_K)
    if last:
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols * stride_b, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            res_ptrs = res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn
            res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
            acc = acc * tl.cast(residual_scale, tl.float32) + res
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
