"""Triton kernels of ``rmsnorm_mlp_train_backward`` (private; see ``rmsnorm_mlp_train``).

Two fusions, the rest of the backward being GEMMs that stay on torch.mm (cuBLAS):

- `silu_mul_backward_kernel`: ``d_inter = dy @ Wd`` with the SwiGLU backward in its epilogue.
  Each [BLOCK_M, BLOCK_N] tile of ``d_inter`` meets the same tile of the saved (or recomputed)
  gate/up pre-activations and leaves as ``d_gate``, ``d_up`` and ``inter = silu(gate) * up`` (the
  down projection's input, for its weight gradient): ``d_inter`` itself is never stored, and
  gate/up are read once.
- `rmsnorm_backward_kernel`: the RMSNorm backward of a block of rows, from ``dn`` (the gradient
  of the norm's output), ``h`` and the saved per-row ``rstd``: ``dx = rstd * (dxhat - xhat *
  mean(dxhat * xhat))`` with ``dxhat = dn * w``, plus the residual's gradient ``dy`` added in
  the same pass; the norm weight's gradient ``sum_rows(dn * nhat)`` as one fp32 partial sum per
  program (summed over programs by the launcher).

Everything is computed in fp32 and rounded once when stored. Scalars arrive as fp32 (Inductor
passes Python floats as fp64, which would promote the math).
"""

import triton
import triton.language as tl


@triton.jit
def silu_mul_backward_kernel(
    dy_ptr,
    wd_ptr,
    gate_ptr,
    up_ptr,
    d_gate_ptr,
    d_up_ptr,
    inter_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_gm,
    stride_gn,
    stride_um,
    stride_un,
    stride_om,
    stride_on,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of d_gate, d_up and inter. ``dy``: [M, K=H];
    ``wd``: the down weight [H, I] read as [K, N]; gate/up/outputs: [M, N=I]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + kk[None, :] * stride_dyk,
            mask=mask_m[:, None] & (kk[None, :] < K),
            other=0.0,
        )
        w = tl.load(
            wd_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=(kk[:, None] < K) & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    gate = tl.load(
        gate_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0
    ).to(tl.float32)
    up = tl.load(
        up_ptr + offs_m[:, None] * stride_um + offs_n[None, :] * stride_un, mask=mask, other=0.0
    ).to(tl.float32)
    sig = tl.sigmoid(gate)
    act = gate * sig
    # silu'(g) = s * (1 + g * (1 - s))
    d_gate = acc * up * (sig * (1.0 + gate * (1.0 - sig)))
    d_up = acc * act
    out = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    dtype = d_gate_ptr.dtype.element_ty
    tl.store(d_gate_ptr + out, d_gate.to(dtype), mask=mask)
    tl.store(d_up_ptr + out, d_up.to(dtype), mask=mask)
    # Rounded as eager rounds silu(g) before the product.
    tl.store(inter_ptr + out, (act.to(dtype).to(tl.float32) * up).to(dtype), mask=mask)


@triton.jit
def rmsnorm_backward_kernel(
    x_ptr,
    dn_ptr,
    dy_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    M,
    H,
    inv_h,
    rows_per_program,
    stride_xm,
    stride_dnm,
    stride_dym,
    stride_dxm,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rows ``[pid * rows_per_program, ...)`` of dx, and this program's partial sum of the
    norm weight's gradient (row ``pid`` of ``dw_partial``, fp32 [programs, H]). Rows are
    contiguous in their last dim."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    dtype = dx_ptr.dtype.element_ty
    inv_h = tl.cast(inv_h, tl.float32)  # 1 / H, from the host (see the module docstring)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        if row < M:
            x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
            dn = tl.load(dn_ptr + row * stride_dnm + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row).to(tl.float32)
            xhat = x * rstd
            # The forward rounded the normalised row to the dtype before the weight multiply.
            nhat = xhat.to(dtype).to(tl.float32)
            dw += dn * nhat
            dxhat = (dn * w).to(dtype).to(tl.float32)
            dot = tl.sum(dxhat * xhat, axis=0) * inv_h
            dx = rstd * (dxhat - xhat * dot)
            if HAS_RESIDUAL:
                dx += tl.load(dy_ptr + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * stride_dxm + cols, dx.to(dtype), mask=mask)
    tl.store(dw_partial_ptr + pid * H + cols, dw, mask=mask)
