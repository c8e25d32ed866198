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

Importing this module registers the op and does nothing else: no Inductor config edits, no GPU
probing, no compilation (Triton compiles a kernel on its first launch).
"""

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from inductor_fusion.triton_kernels import _rmsnorm_mlp_jit as _jit

__all__ = [
    "rmsnorm_mlp",
    "rmsnorm_mlp_reference",
    "rmsnorm_mlp_triton",
    "supports",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rmsnorm_mlp_reference(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    *,
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float,
) -> Tensor:
    """The region exactly as Hugging Face's LlamaRMSNorm + LlamaMLP (+ residual) compute it.

    The statistics are taken in fp32, the normalised value is rounded to the input dtype *before*
    the weight multiply, and every intermediate is rounded to the input dtype: this rounding is
    what "same-dtype eager" means in our tolerance rule.
    """
    x32 = hidden.float()
    n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    n = n * norm_weight
    gate = F.linear(n, gate_weight, gate_bias)
    up = F.linear(n, up_weight, up_bias)
    y = F.linear(F.silu(gate) * up, down_weight, down_bias)
    return y if residual is None else residual + y


def supports(
    dtype: torch.dtype, device_type: str, hidden_size: int, intermediate_size: int
) -> str | None:
    """Whether the Triton path handles this case: ``None`` if it does, else a short reason.

    This is legality only (whether it pays is the patterns' business); it is cheap and never
    touches the GPU, so patterns may call it from ``extra_check`` on every match.
    """
    if device_type != "cuda":
        return f"the Triton kernels run on CUDA devices only, not {device_type!r}"
    if dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {dtype} (supported: float16, bfloat16, float32)"
    if hidden_size < 1 or intermediate_size < 1:
        return f"empty weights (hidden_size={hidden_size}, intermediate_size={intermediate_size})"
    return None


def _check_args(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the offending argument when shapes, dtypes or devices disagree.

    ``torch._check_value`` rather than ``if ...: raise`` so that the checks also work on symbolic
    shapes inside the fake implementation (they become guards or runtime asserts).
    """
    torch._check_value(hidden.dim() >= 1, lambda: "rmsnorm_mlp: hidden must have a last dimension")
    hidden_size = hidden.shape[-1]
    torch._check_value(
        gate_weight.dim() == 2,
        lambda: (
            f"rmsnorm_mlp: gate_weight must be 2-D [I, H], got shape {tuple(gate_weight.shape)}"
        ),
    )
    inter_size = gate_weight.shape[0]
    expected = {
        "norm_weight": (norm_weight, (hidden_size,)),
        "gate_weight": (gate_weight, (inter_size, hidden_size)),
        "up_weight": (up_weight, (inter_size, hidden_size)),
        "down_weight": (down_weight, (hidden_size, inter_size)),
        "gate_bias": (gate_bias, (inter_size,)),
        "up_bias": (up_bias, (inter_size,)),
        "down_bias": (down_bias, (hidden_size,)),
        "residual": (residual, tuple(hidden.shape)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        torch._check_value(
            tensor.dim() == len(shape)
            and all(a == b for a, b in zip(tensor.shape, shape, strict=True)),
            lambda name=name, tensor=tensor, shape=shape: (
                f"rmsnorm_mlp: {name} must have shape {shape} for hidden of shape "
                f"{tuple(hidden.shape)} and gate_weight of shape {tuple(gate_weight.shape)}, "
                f"got {tuple(tensor.shape)}"
            ),
        )
        torch._check_value(
            tensor.dtype == hidden.dtype,
            lambda name=name, tensor=tensor: (
                f"rmsnorm_mlp: {name} has dtype {tensor.dtype} but hidden has {hidden.dtype}; "
                "all tensors must share one dtype"
            ),
        )
        torch._check_value(
            tensor.device == hidden.device,
            lambda name=name, tensor=tensor: (
                f"rmsnorm_mlp: {name} is on {tensor.device} but hidden is on {hidden.device}"
            ),
        )


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Tile shape and launch options of one kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict[str, int]:
        """The kernels' block-size constexprs plus Triton's launch options."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


@dataclasses.dataclass(frozen=True)
class _Config:
    """Launch configuration of both kernels for one call."""

    name: str
    gate_up: _Blocks
    down: _Blocks


# Fixed configurations by token count M, sized for H100 (227 KiB of shared memory per block) with
# 16-bit inputs; fp32 halves BLOCK_K (see ``_pick_config``). Small M is weight-bandwidth bound:
# narrow N tiles spread the weights over more SMs. The gate_up kernel keeps two accumulators, so
# its larger tiles get twice the warps of the down GEMM's. Compiled offline for sm_90 with Triton
# 3.9 (I=14336, H=4096), every configuration stays under 132 KiB of shared memory with no register
# spills. Proper autotuning is later work.
_GPU_CONFIGS: tuple[tuple[int, _Config], ...] = (
    (16, _Config("m16", _Blocks(16, 64, 64, 4, 4), _Blocks(16, 32, 64, 4, 4))),
    (32, _Config("m32", _Blocks(32, 64, 64, 4, 4), _Blocks(32, 64, 64, 4, 4))),
    # gate_up holds two accumulators: at BLOCK_N 128 the m64/m128 tiles compiled to 251-255
    # registers per thread for sm_90 (offline compile, Triton 3.9), so they take BLOCK_N 64 (128
    # effective columns) and down's 128x128 accumulator gets 8 warps.
    (64, _Config("m64", _Blocks(64, 64, 64, 4, 4), _Blocks(64, 128, 64, 4, 3))),
    (2**62, _Config("m128", _Blocks(128, 64, 64, 8, 3), _Blocks(128, 128, 64, 8, 3))),
)

# The CPU interpreter executes every program in Python, so few, small programs keep tests fast;
# 16 is the smallest block ``tl.dot`` accepts.
_INTERPRET_CONFIG = _Config("interpret", _Blocks(16, 32, 32, 1, 1), _Blocks(16, 32, 32, 1, 1))


def _pick_config(
    m: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype, interpret: bool
) -> _Config:
    """The launch configuration for ``m`` tokens.

    fp32 tiles take twice the shared memory per pipeline stage, so fp32 halves BLOCK_K to stay
    under the H100's limit (three stages of the m128 gate_up tiles would need 288 KiB otherwise).
    """
    del hidden_size, intermediate_size  # reserved for shape-aware tuning
    if interpret:
        return _INTERPRET_CONFIG
    config = next(cfg for max_m, cfg in _GPU_CONFIGS if m <= max_m)
    if dtype == torch.float32:
        config = dataclasses.replace(
            config,
            name=f"{config.name}-fp32",
            gate_up=dataclasses.replace(config.gate_up, block_k=32),
            down=dataclasses.replace(config.down, block_k=32),
        )
    return config


def rmsnorm_mlp_triton(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    *,
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float,
    _config: _Config | None = None,
) -> Tensor:
    """Launch the two Triton kernels; same contract as :func:`rmsnorm_mlp_reference`.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). ``_config``
    forces a launch configuration, so that tests can reach every branch of ``_pick_config``.
    """
    _check_args(
        hidden,
        norm_weight,
        gate_weight,
        up_weight,
        down_weight,
        gate_bias,
        up_bias,
        down_bias,
        residual,
    )
    hidden_size = hidden.shape[-1]
    inter_size = gate_weight.shape[0]
    # The kernels take strides, so a reshape view is fine; only an inner stride other than 1
    # (e.g. a transposed view) would make every load a gather, and that one is copied.
    x = hidden.reshape(-1, hidden_size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if m == 0:
        return out.view(hidden.shape)
    res = None
    if residual is not None:
        res = residual.reshape(-1, hidden_size)
        if res.stride(-1) != 1:
            res = res.contiguous()
    inter = torch.empty((m, inter_size), dtype=hidden.dtype, device=hidden.device)

    interpret = hidden.device.type == "cpu"
    config = _config or _pick_config(m, hidden_size, inter_size, hidden.dtype, interpret)
    # fp32 must not silently become TF32: our tolerance rule compares with eager fp32. For 16-bit
    # inputs the setting has no effect; "ieee" is the spelling both Triton 3.6 and 3.9 accept.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    # Unused pointer arguments still need a tensor; the constexpr flags keep them unread.
    dummy = out

    blocks = config.gate_up
    grid = (triton.cdiv(m, blocks.block_m), triton.cdiv(inter_size, blocks.block_n))
    with _device_guard(hidden):
        _jit.gate_up_kernel[grid](
            x,
            norm_weight,
            gate_weight,
            up_weight,
            dummy if gate_bias is None else gate_bias,
            dummy if up_bias is None else up_bias,
            inter,
            m,
            inter_size,
            hidden_size,
            float(eps),
            x.stride(0),
            x.stride(1),
            norm_weight.stride(0),
            gate_weight.stride(0),
            gate_weight.stride(1),
            up_weight.stride(0),
            up_weight.stride(1),
            0 if gate_bias is None else gate_bias.stride(0),
            0 if up_bias is None else up_bias.stride(0),
            inter.stride(0),
            inter.stride(1),
            HAS_GATE_BIAS=gate_bias is not None,
            HAS_UP_BIAS=up_bias is not None,
            DOT_PRECISION=precision,
            **blocks.launch_options(),
        )
        blocks = config.down
        grid = (triton.cdiv(m, blocks.block_m), triton.cdiv(hidden_size, blocks.block_n))
        _jit.down_kernel[grid](
            inter,
            down_weight,
            dummy if down_bias is None else down_bias,
            dummy if res is None else res,
            out,
            m,
            hidden_size,
            inter_size,
            inter.stride(0),
            inter.stride(1),
            down_weight.stride(0),
            down_weight.stride(1),
            0 if down_bias is None else down_bias.stride(0),
            0 if res is None else res.stride(0),
            0 if res is None else res.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_BIAS=down_bias is not None,
            HAS_RESIDUAL=res is not None,
            DOT_PRECISION=precision,
            **blocks.launch_options(),
        )
    return out.view(hidden.shape)


def _device_guard(tensor: Tensor):
    """Triton launches on the current CUDA device; make that the tensor's device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# The schema keeps every argument positional and the optional tensors explicit: that is the form
# a post-grad replacement calls, and what ``register_fake`` and ``opcheck`` see.
@torch.library.custom_op("inductor_fusion::rmsnorm_mlp", mutates_args=())
def rmsnorm_mlp(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
) -> Tensor:
    """``residual + down(silu(gate(n)) * up(n))`` with ``n = rmsnorm(hidden) * norm_weight``.

    This body is the implementation for every device without a registered kernel (CPU
    included): the reference itself, contiguous to match the fake implementation.
    """
    _check_args(
        hidden,
        norm_weight,
        gate_weight,
        up_weight,
        down_weight,
        gate_bias,
        up_bias,
        down_bias,
        residual,
    )
    out = rmsnorm_mlp_reference(
        hidden,
        norm_weight,
        gate_weight,
        up_weight,
        down_weight,
        gate_bias=gate_bias,
        up_bias=up_bias,
        down_bias=down_bias,
        residual=residual,
        eps=eps,
    )
    return out.contiguous()


@rmsnorm_mlp.register_kernel("cuda")
def _rmsnorm_mlp_cuda(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
) -> Tensor:
    # Patterns only insert the op where ``supports`` agrees, but a direct call may bring any
    # dtype (e.g. float64); that gets the reference rather than an error.
    impl = rmsnorm_mlp_triton
    if supports(hidden.dtype, hidden.device.type, hidden.shape[-1], gate_weight.shape[0]):
        impl = rmsnorm_mlp_reference
    out = impl(
        hidden,
        norm_weight,
        gate_weight,
        up_weight,
        down_weight,
        gate_bias=gate_bias,
        up_bias=up_bias,
        down_bias=down_bias,
        residual=residual,
        eps=eps,
    )
    return out.contiguous()


@rmsnorm_mlp.register_fake
def _rmsnorm_mlp_fake(
    hidden: Tensor,
    norm_weight: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
) -> Tensor:
    _check_args(
        hidden,
        norm_weight,
        gate_weight,
        up_weight,
        down_weight,
        gate_bias,
        up_bias,
        down_bias,
        residual,
    )
    return hidden.new_empty(hidden.shape)
