"""Triton kernel of ``silu_mul`` (private; see ``silu_mul``)."""

import triton
import triton.language as tl


@triton.jit
def silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``out[i] = round(round(silu(gate[i])) * up[i])`` over a flat range of ``BLOCK``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # silu rounded to the dtype before the product, as eager's F.silu(g) * u rounds.
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs, (act * up).to(dtype), mask=mask)
