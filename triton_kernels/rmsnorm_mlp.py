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
import functools
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from inductor_fusion.triton_kernels import _launch_cache
from inductor_fusion.triton_kernels import _rmsnorm_mlp_jit as _jit
from inductor_fusion.triton_kernels import _rmsnorm_mlp_tuned as _tuned

__all__ = [
    "LLAMA",
    "RegionSpec",
    "rmsnorm_mlp",
    "rmsnorm_mlp_lowered",
    "rmsnorm_mlp_reference",
    "rmsnorm_mlp_triton",
    "supports",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Token counts up to which the fused kernels beat Inductor's own code for the region on the GPUs
# we measured (H200, 2026-12-02, perf/results/host): there the region streams the weights, and
# ours streams them once with the norm, activation and residual folded in. Above it the region is
# compute-bound: Inductor's cuBLAS GEMMs ran 3-20 % faster than our pointer-based tiled kernels
# (e.g. 4096x14336 at M=4096: 2163 vs 2628 us), so a compiled graph keeps Inductor's code there.
MAX_PROFITABLE_TOKENS = 64
# The tuning tables' key suffix for a non-gated MLP's rows (see ``_tuned_configs``).
NON_GATED = "non-gated"


NORMS = ("rms", "layer", "none")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2")


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """What the region computes besides its tensors: the op's axes, named after what the models
    write. Defaults are Llama's (LlamaRMSNorm -> SwiGLU).

    ``norm``: "rms" (the RMSNorms), "layer" (``F.layer_norm``, optional bias) or "none" (the MLP
    reads ``hidden`` itself, OLMo-2). ``norm_weight_offset``: the norm multiplies by
    ``weight + offset`` (1.0 for Gemma's ``1 + w`` and Nemotron's LayerNorm1P). ``norm_weight_fp32``
    (RMS only): the weight multiplies the fp32 normalised value before the one cast back (Gemma)
    rather than the value already cast back (Llama); F.layer_norm always does the former.
    ``activation``: "silu", "gelu" (erf), "gelu_tanh" (``gelu_pytorch_tanh``) or "relu2"
    (``relu(x)**2``). ``gated``: ``down(act(gate(n)) * up(n))``, else ``down(act(gate(n)))``
    with ``gate`` the only up-projection (GPT-NeoX's dense_h_to_4h, Starcoder2's c_fc)."""

    norm: str = "rms"
    norm_weight_offset: float = 0.0
    norm_weight_fp32: bool = False
    activation: str = "silu"
    gated: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.norm == "none" and (self.norm_weight_offset or self.norm_weight_fp32):
            raise ValueError("norm='none' takes no weight offset and no weight placement")

    def op_kwargs(self) -> dict[str, Any]:
        """The op's keyword arguments that spell this spec."""
        return dataclasses.asdict(self)


LLAMA = RegionSpec()


@functools.cache
def _spec(
    norm: str, norm_weight_offset: float, norm_weight_fp32: bool, activation: str, gated: bool
) -> RegionSpec:
    """The op's keyword axes as a `RegionSpec`, built (and validated) once per combination: the op
    bodies run this on every call, and a dataclass with ``__post_init__`` costs ~8 µs to build."""
    return RegionSpec(norm, norm_weight_offset, norm_weight_fp32, activation, gated)


def rmsnorm_mlp_reference(
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
) -> Tensor:
    """The region exactly as the Hugging Face modules compute it (``spec`` says which).

    Norms round as the modules do: LlamaRMSNorm takes the statistics in fp32 and rounds the
    normalised value to the input dtype *before* the weight multiply; GemmaRMSNorm multiplies by
    ``1 + w`` in fp32 and rounds once; F.layer_norm rounds once. Every later intermediate is
    rounded to the input dtype: this rounding is what "same-dtype eager" means in our tolerance
    rule.
    """
    n = _norm_reference(hidden, norm_weight, norm_bias, eps, spec)
    gate = F.linear(n, gate_weight, gate_bias)
    act = _ACTIVATION_REFERENCE[spec.activation](gate)
    if spec.gated:
        act = act * F.linear(n, up_weight, up_bias)
    y = F.linear(act, down_weight, down_bias)
    if residual is None:
        return y
    return residual + (y if residual_scale == 1.0 else y * residual_scale)


def _norm_reference(
    hidden: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, spec: RegionSpec
) -> Tensor:
    if spec.norm == "none":
        return hidden
    offset = spec.norm_weight_offset
    if spec.norm == "layer":
        # NemotronLayerNorm1P adds its 1 in the weight's dtype, then calls F.layer_norm.
        w = weight if offset == 0.0 else weight + offset
        return F.layer_norm(hidden, (hidden.shape[-1],), w, bias, eps)
    x32 = hidden.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if spec.norm_weight_fp32:  # GemmaRMSNorm
        return (n * (weight.float() + offset)).to(hidden.dtype)
    return n.to(hidden.dtype) * (weight if offset == 0.0 else weight + offset)  # LlamaRMSNorm


_ACTIVATION_REFERENCE = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),
}


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


def _cdiv(a: Any, b: int) -> Any:
    """``ceil(a / b)`` in plain Python: ``triton.cdiv`` is a JIT-callable in newer Triton (~4 µs a
    call on the CPU machine), and this also takes the SymInt token counts of the lowered path."""
    return (a + b - 1) // b


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _check(cond: Any, message: Callable[[], str]) -> None:
    """``torch._check_value`` for the region's argument checks, with a fast path: a plain ``True``
    (every check on real tensors) returns at once, where ``torch._check_value`` spends ~1.6 µs
    (measured on the CPU machine) on its symbolic-shape machinery, 14 times per region call: host
    cost of the eager op. A SymBool (fake tensors while tracing) still becomes a guard."""
    if cond is True:
        return
    torch._check_value(cond, message)


def _check_args(
    hidden: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor,
    up_weight: Tensor | None,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    residual: Tensor | None,
    norm_bias: Tensor | None = None,
    spec: RegionSpec = LLAMA,
) -> None:
    """Raise ``ValueError`` naming the offending argument when shapes, dtypes or devices disagree.

    `_check` (``torch._check_value``) rather than ``if ...: raise`` so that the checks also work on
    symbolic shapes inside the fake implementation (they become guards or runtime asserts).
    """
    _check(hidden.dim() >= 1, lambda: "rmsnorm_mlp: hidden must have a last dimension")
    hidden_size = hidden.shape[-1]
    _check(
        gate_weight.dim() == 2,
        lambda: (
            f"rmsnorm_mlp: gate_weight must be 2-D [I, H], got shape {tuple(gate_weight.shape)}"
        ),
    )
    inter_size = gate_weight.shape[0]
    present = {
        "norm_weight": (norm_weight, spec.norm != "none"),
        "norm_bias": (norm_bias, None if spec.norm == "layer" else False),
        "up_weight": (up_weight, spec.gated),
        "up_bias": (up_bias, None if spec.gated else False),
    }
    for name, (tensor, wanted) in present.items():
        if wanted is not None and (tensor is not None) != wanted:
            what = "needs" if wanted else "takes no"
            raise ValueError(f"rmsnorm_mlp: {spec} {what} {name}")
    expected = {
        "norm_weight": (norm_weight, (hidden_size,)),
        "norm_bias": (norm_bias, (hidden_size,)),
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
        _check(
            tensor.dim() == len(shape)
            and all(a == b for a, b in zip(tensor.shape, shape, strict=True)),
            lambda name=name, tensor=tensor, shape=shape: (
                f"rmsnorm_mlp: {name} must have shape {shape} for hidden of shape "
                f"{tuple(hidden.shape)} and gate_weight of shape {tuple(gate_weight.shape)}, "
                f"got {tuple(tensor.shape)}"
            ),
        )
        _check(
            tensor.dtype == hidden.dtype,
            lambda name=name, tensor=tensor: (
                f"rmsnorm_mlp: {name} has dtype {tensor.dtype} but hidden has {hidden.dtype}; "
                "all tensors must share one dtype"
            ),
        )
        _check(
            tensor.device == hidden.device,
            lambda name=name, tensor=tensor: (
                f"rmsnorm_mlp: {name} is on {tensor.device} but hidden is on {hidden.device}"
            ),
        )


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Kernel choice, tile shape and launch options of one of the two GEMM launches.

    ``kind`` is ``"gemv"`` (swapped operands: BLOCK_N weight rows by BLOCK_M tokens per program,
    for small M), ``"gemm"`` (classic [BLOCK_M, BLOCK_N] tiles in grouped order, pointer loads)
    or ``"tma"`` (the same tiles loaded by the tensor-memory accelerator; gate/up only after the
    norm pre-pass). ``split_k`` applies to the down GEMV only, ``group_m`` to the tiled kinds.
    """

    kind: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1

    def constexprs(self) -> dict[str, int]:
        """The kernels' block-size constexprs (launch options travel apart: see `_Launch`)."""
        values = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}
        if self.kind != "gemv":
            values["GROUP_M"] = self.group_m
        return values

    def key(self) -> str:
        """Compact text form, as the tuning table stores it."""
        text = f"{self.kind}:{self.block_m}x{self.block_n}x{self.block_k}"
        text += f":w{self.num_warps}s{self.num_stages}"
        if self.kind != "gemv":
            text += f"g{self.group_m}"
        if self.split_k > 1:
            text += f"k{self.split_k}"
        return text

    @classmethod
    def parse(cls, text: str) -> "_Blocks":
        """Inverse of :meth:`key`."""
        kind, tile, opts = text.split(":")
        block_m, block_n, block_k = (int(v) for v in tile.split("x"))
        values = {letter: int(number) for letter, number in re.findall(r"([a-z])(\d+)", opts)}
        return cls(
            kind,
            block_m,
            block_n,
            block_k,
            num_warps=values["w"],
            num_stages=values["s"],
            group_m=values.get("g", 8),
            split_k=values.get("k", 1),
        )


@dataclasses.dataclass(frozen=True)
class _Config:
    """Launch configuration of one call: gate/up (with or without the norm pre-pass) and down."""

    name: str
    gate_up: _Blocks
    down: _Blocks
    prenorm: bool = False  # gemm gate/up only: norm_kernel first, plain A tiles in the loop

    def __post_init__(self) -> None:
        if self.prenorm and self.gate_up.kind == "gemv":
            raise ValueError("the norm pre-pass pairs with the tiled gate/up kernels only")
        if self.gate_up.kind == "tma" and not self.prenorm:
            raise ValueError("the TMA gate/up kernel reads pre-normalised activations")


def _config(name: str, gate_up: str, down: str, prenorm: bool = False) -> _Config:
    return _Config(name, _Blocks.parse(gate_up), _Blocks.parse(down), prenorm)


# Fallback configurations by token count M for 16-bit inputs, for shapes the tuning table
# (``_rmsnorm_mlp_tuned``) has no entry for: the choices perf/tune.py made for 2048x8192 on an
# H100, which were also the best or within a few % for 3072x8192 and 4096x14336. Up to M=64 the
# swapped-operand GEMVs stream the weights with many narrow programs (split-K for down, whose
# N = H is small); from M=128 the norm runs as a pre-pass and both GEMMs are TMA-fed tiles,
# down still split along K up to a few hundred tokens.
_DEFAULT_CONFIGS: tuple[tuple[int, _Config], ...] = (
    (16, _config("gemv16", "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4")),
    (64, _config("gemv64", "gemv:64x64x128:w8s4", "gemv:64x64x128:w4s4k4")),
    (256, _config("tma256", "tma:128x64x64:w4s3g8", "tma:64x128x64:w4s4g8k2", prenorm=True)),
    (1024, _config("tma1024", "tma:128x128x64:w8s4g8", "tma:128x128x64:w4s4g8", prenorm=True)),
    (2**62, _config("tma", "tma:128x128x64:w8s3g8", "tma:128x256x64:w8s3g8", prenorm=True)),
)

# The CPU interpreter executes every program in Python, so few, small programs keep tests fast;
# 16 is the smallest block ``tl.dot`` accepts.
_INTERPRET_CONFIG = _config("interpret", "gemm:16x32x32:w1s1g1", "gemm:16x32x32:w1s1g1")


def _tuned_configs(
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    device_name: str | None = None,
    gated: bool = True,
) -> tuple[tuple[int, _Config], ...] | None:
    """The measured table for this shape (``perf/tune.py`` writes it), if there is one.

    ``device_name`` picks the table measured on that GPU model; GPUs without their own table
    (and callers that name none) get the H100's, measured on the same Hopper architecture the
    kernels were written for. Shapes no table has take the defaults. A non-gated MLP (one
    up-projection) has its own rows, keyed ``(H, I, "non-gated")``: its gate/up launch streams
    half the weights per tile, so the gated tiles leave it short of bytes in flight.
    """
    if dtype == torch.float32:
        return None
    table = _tuned.TUNED_BY_DEVICE.get(device_name or "", _tuned.TUNED)
    key = (hidden_size, intermediate_size) if gated else (hidden_size, intermediate_size, NON_GATED)
    entry = table.get(key)
    if entry is None:
        return None
    suffix = "" if gated else "-non-gated"
    return _parse_table(f"tuned-{hidden_size}x{intermediate_size}{suffix}", entry)


def max_profitable_tokens(hidden_size: int, intermediate_size: int) -> int:
    """The largest token count at which the fused region of this shape beats Inductor's code on
    CUDA (``MAX_PROFITABLE_TOKENS`` unless a measurement says less; see ``_tuned``). 0: it lost
    at every token count measured, so compiled graphs leave the shape to Inductor on CUDA."""
    return _tuned.PROFITABLE_TOKENS.get((hidden_size, intermediate_size), MAX_PROFITABLE_TOKENS)


def _device_name(device: torch.device) -> str | None:
    """The GPU model's name, as tuning tables are keyed (None off CUDA, and where the device is
    only described, e.g. fake CUDA tensors traced on a machine without one)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_device_name(device.index if device.index is not None else 0)


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _parse_table(
    prefix: str, entry: tuple[tuple[int, str, str, bool], ...]
) -> tuple[tuple[int, _Config], ...]:
    """Table rows as configurations, parsed once per table rather than on every op call (the
    table itself is the key, so a replaced table is parsed anew)."""
    return tuple(
        (max_m, _config(f"{prefix}-{_m_text(max_m)}", gate_up, down, prenorm))
        for max_m, gate_up, down, prenorm in entry
    )


def _m_text(max_m: int) -> str:
    return "mmax" if max_m >= 2**62 else f"m{max_m}"


def _pick_config(
    m: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    interpret: bool,
    device_name: str | None = None,
    gated: bool = True,
) -> _Config:
    """The launch configuration for ``m`` tokens.

    Tuned shapes take their measured table; any other shape (and any M past the table) the
    defaults. fp32 gets smaller tiles (``_fp32_form``) to stay under the H100's 227 KiB of shared
    memory per block.
    """
    if interpret:
        return _INTERPRET_CONFIG
    tuned = _tuned_configs(hidden_size, intermediate_size, dtype, device_name, gated) or ()
    # A table tuned up to some M only covers that far; larger M take the defaults.
    config = next((cfg for max_m, cfg in tuned if m <= max_m), None)
    if config is None:
        config = next(cfg for max_m, cfg in _DEFAULT_CONFIGS if m <= max_m)
    if dtype == torch.float32:
        config = _fp32_form(config)
    return config


def _fp32_form(config: _Config) -> _Config:
    """``config`` with tiles that fit fp32: half (tiled kinds) or a quarter (GEMV) of BLOCK_K and
    at most three pipeline stages, since fp32 tiles take twice the shared memory of 16-bit ones."""

    def shrink(blocks: _Blocks) -> _Blocks:
        block_k = 32 if blocks.kind != "gemv" else max(32, blocks.block_k // 4)
        return dataclasses.replace(blocks, block_k=block_k, num_stages=min(3, blocks.num_stages))

    return dataclasses.replace(
        config,
        name=f"{config.name}-fp32",
        gate_up=shrink(config.gate_up),
        down=shrink(config.down),
    )


def _down_split(blocks: _Blocks, m: int, n: int, k: int) -> tuple[int, int]:
    """(number of K splits, output tiles) of the down launch. Each split walks whole K blocks;
    only splits that get any count (K=160, BLOCK_K=32 and 4 splits make splits of 64, so the
    fourth would be empty)."""
    tiles = _cdiv(n, blocks.block_n) * _cdiv(m, blocks.block_m)
    if blocks.split_k == 1:
        return 1, tiles
    k_per_split = _cdiv(_cdiv(k, blocks.split_k), blocks.block_k) * blocks.block_k
    return _cdiv(k, k_per_split), tiles


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One kernel launch of the plan: every kernel argument by name, tensors included.

    ``writes`` names the tensor arguments the kernel stores to. The same plan runs eagerly
    (`_run`) or becomes nodes of a compiled graph (`_emit`), where the written tensors are what
    the functional form of the launch returns.
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
class _Plan:
    launches: tuple[_Launch, ...]
    out: Tensor  # [M, H], written by the last launch


def _plan(
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
    config: _Config,
    *,
    tma: bool,
    norm_bias: Tensor | None = None,
    residual_scale: float = 1.0,
    spec: RegionSpec = LLAMA,
) -> _Plan:
    """The launches that compute the region, and the buffers they write (allocated here).

    ``tma=False`` gives a plan made of pointer-based kernels only: a compiled graph cannot carry
    the host-side TMA descriptors (they would be rebuilt in Python on every call), so there the
    "tma" configurations run their pointer-kernel form, with the same tiles and split-K.
    """
    hidden_size = hidden.shape[-1]
    inter_size = gate_weight.shape[0]
    x = _rows(hidden)
    m = x.shape[0]
    out = torch.empty((m, hidden_size), dtype=hidden.dtype, device=hidden.device)
    res = None if residual is None else _rows(residual)
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
        launches.append(_norm_launch(x, norm_weight, normed, eps, bias=norm_bias, spec=spec))
        x = normed
    gate_up = _gate_up_launch(
        config.gate_up, x, norm_weight, gate_weight, up_weight, gate_bias, up_bias, inter,
        eps, precision, norm_in_loop=not prenorm, zero_locks=locks, tma=tma,
        norm_bias=norm_bias, spec=spec,
    )  # fmt: skip
    launches.append(gate_up)
    down = _down_launch(
        config.down, inter, down_weight, down_bias, res, out, precision, locks, tma,
        residual_scale=residual_scale,
    )  # fmt: skip
    launches.append(down)
    return _Plan(tuple(launches), out)


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
    _config: _Config | None = None,
) -> Tensor:
    """Launch the Triton kernels now; same contract as :func:`rmsnorm_mlp_reference`.

    The eager path (the op's CUDA kernel). Runs on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1`` (tests). ``_config`` forces a launch configuration, so that tests
    can reach every kernel and branch.

    The first call of a key (shapes, strides, dtypes, devices, alignments, scalars: see
    `_launch_cache`) checks, plans and launches through Triton's JIT functions; later calls of the
    same key replay the recorded launches on the new tensors, which skips all of that.
    """
    tensors = (norm_weight, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    inputs = (hidden, *tensors, residual, norm_bias)
    # A forced configuration (tests) keeps its TMA kernels; otherwise see `eager_tma`.
    tma = _config is not None or eager_tma(hidden)
    key = (*map(_launch_cache.tensor_key, inputs), eps, residual_scale, spec, _config, tma)
    cached = _EAGER_PLANS.get(key)
    if cached is not None:
        return cached(inputs)
    # Checked on the caller's shapes, so that errors name them; the plan gets 2-D rows.
    _check_args(hidden, *tensors, residual, norm_bias, spec)
    x = _rows(hidden)
    res = None if residual is None else _rows(residual)
    plan = _region_plan(
        x, tensors, res, eps, norm_bias, residual_scale, spec, tma=tma, config=_config
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
    1.03x at 1024 and 0.98x at 4096; at 2048 both 0.99x (earlier: TMA 0.97x, pointer 1.04x at
    M = 256). The host time the TMA form adds shows up in the ops *after* the layer
    (perf/NOTES.md), not in the layer's own calls. The GPU time of the TMA form is 3-11% lower
    (graph replay), so it is kept where the GPU is what counts: from ``EAGER_TMA_MIN_ROWS`` rows,
    and while a CUDA graph is captured (a replay costs no host time).
    """
    features = hidden.shape[-1]
    if features and hidden.numel() // features >= EAGER_TMA_MIN_ROWS:
        return True
    return hidden.is_cuda and torch.cuda.is_current_stream_capturing()


def _rows(t: Tensor) -> Tensor:
    """``t`` as 2-D rows with a unit inner stride (a view where the layout allows one)."""
    rows = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    # The kernels take strides, so a reshape view is fine; only an inner stride other than 1
    # (e.g. a transposed view) would make every load a gather, and that one is copied.
    return rows if rows.stride(-1) == 1 else rows.contiguous()


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
    dispatcher call, no Python config pick, no descriptors built per call.

    The configuration is chosen while tracing: from the exact token count when it is static,
    else from the regime its size hint falls in, with a guard (so a token count from another
    regime recompiles once: at most one graph per regime, never one per M).
    """
    tensors = (norm_weight, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    plan = _region_plan(hidden, tensors, residual, eps, norm_bias, residual_scale, spec, tma=False)
    if plan is None:  # a static token count of 0 (a symbolic one is never 0 here)
        return hidden.new_empty(hidden.shape)
    return _emit(plan).view(hidden.shape)


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
    config: _Config | None = None,
) -> _Plan | None:
    """What both paths share: the arguments checked, the configuration picked (by `_graph_config`:
    the exact token count when it is an int, the regime otherwise), the launches planned. None
    for an empty input. ``tensors`` are the weights and biases in the op's order."""
    _check_args(hidden, *tensors, residual, norm_bias, spec)
    m = hidden.numel() // hidden.shape[-1]
    if isinstance(m, int) and m == 0:
        return None
    gate_weight = tensors[1]
    config = config or _graph_config(
        m, hidden.shape[-1], gate_weight.shape[0], hidden.dtype, hidden.device.type == "cpu",
        _device_name(hidden.device), spec.gated,
    )  # fmt: skip
    return _plan(
        hidden, *tensors, residual, eps, config, tma=tma, norm_bias=norm_bias,
        residual_scale=residual_scale, spec=spec,
    )  # fmt: skip


# Token-count regimes of a graph whose M is symbolic: (upper bound, M the configuration is picked
# for). Within a regime one configuration serves every M; its tiles are those of the regime's
# largest M, because a GEMV tile narrower than M would stream the weights several times.
_GRAPH_REGIMES = ((16, 16), (64, 64))


def _graph_config(
    m: Any,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    interpret: bool,
    device_name: str | None = None,
    gated: bool = True,
) -> _Config:
    def pick(tokens: int) -> _Config:
        return _pick_config(
            tokens, hidden_size, intermediate_size, dtype, interpret, device_name, gated
        )

    if isinstance(m, int):
        return pick(m)
    for upper, tokens in _GRAPH_REGIMES:
        # bool() of a symbolic comparison guards on it: the graph is valid for this regime only.
        if bool(m <= upper):
            return pick(tokens)
    # Tiled regime: every configuration is right for any M; pick by the size hint, no guard.
    hint = m.node.shape_env.size_hint(m.node.expr) if hasattr(m, "node") else int(m)
    return pick(max(int(hint), _GRAPH_REGIMES[-1][0] + 1))


@functools.cache
def _single_config_kernel(kernel: Any, num_warps: int, num_stages: int) -> Any:
    """``kernel`` with its launch options attached, as Inductor takes user kernels' options (one
    ``triton.Config``: Inductor launches it without benchmarking). Cached, so that each variant is
    one entry of torch's kernel side table and one kernel in Inductor's generated code."""
    return triton.autotune(
        configs=[triton.Config({}, num_warps=num_warps, num_stages=num_stages)], key=[]
    )(kernel)


def _emit(plan: _Plan) -> Tensor:
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
        kwargs = {
            name: latest.get(id(value), value) if isinstance(value, Tensor) else value
            for name, value in launch.args.items()
        }
        kernel = _single_config_kernel(launch.kernel, launch.num_warps, launch.num_stages)
        written = triton_kernel_wrapper_functional(
            kernel_idx=kernel_side_table.add_kernel(kernel),
            constant_args_idx=no_constants,
            grid=[tuple(launch.grid) + (1,) * (3 - len(launch.grid))],
            tma_descriptor_metadata={},
            kwargs=kwargs,
            tensors_to_clone=list(launch.writes),
        )
        for name in launch.writes:
            latest[id(launch.args[name])] = written[name]
    return latest[id(plan.out)]


def _norm_launch(
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    eps: float,
    *,
    bias: Tensor | None = None,
    spec: RegionSpec = LLAMA,
) -> _Launch:
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
    return _Launch(_jit.norm_kernel, (m,), args, ("out_ptr",), 8 if block_k >= 2048 else 4, 1)


def _gate_up_launch(
    blocks: _Blocks,
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
) -> _Launch:
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
        return _Launch(_jit.gate_up_tma_kernel, grid, args, writes, *options)
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
        return _Launch(_jit.gate_up_gemv_kernel, grid, {**pointers, **shared}, writes, *options)
    args = {**pointers, **shared}
    return _Launch(_jit.gate_up_gemm_kernel, grid, args, writes, *options)


def _tma_ok(*tensors: Tensor) -> bool:
    """Whether the copy engine can read these 2-D tensors: unit inner stride, 16-byte aligned base
    and row stride (its hardware constraints). Other layouts take the pointer-based kernels."""
    return all(
        t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors
    )


def _descriptor(t: Tensor, block_rows: int, block_cols: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])


def _down_launch(
    blocks: _Blocks,
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
) -> _Launch:
    """The down launch. Split-K configurations need ``locks``, int32 counters (at least one per
    output tile) that are zero at launch; without them the launch runs unsplit."""
    m, k = inter.shape
    n = out.shape[1]
    # Arguments by name, grouped by what the kernels share (see _gate_up_launch).
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
        return _Launch(_jit.down_gemv_kernel, (tiles_n, split_k, tiles_m), args, writes, *options)
    grid = (tiles_m * tiles_n, split_k)
    if tma and blocks.kind == "tma" and _tma_ok(inter, down_weight):
        args = {
            "a_desc": _descriptor(inter, blocks.block_m, blocks.block_k),
            "w_desc": _descriptor(down_weight, blocks.block_n, blocks.block_k),
            "a_ptr": inter,
            **split,
            **shared,
        }
        return _Launch(_jit.down_tma_kernel, grid, args, writes, *options)
    even_k = k % (blocks.block_k * split_k) == 0
    args = {**pointers, **split, **shared, "EVEN_K": even_k}
    return _Launch(_jit.down_gemm_kernel, grid, args, writes, *options)


def _device_guard(tensor: Tensor):
    """Triton launches on the current CUDA device; make that the tensor's device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# The schema keeps the tensors and eps positional and the optional tensors explicit: that is the
# form a post-grad replacement calls, and what ``register_fake`` and ``opcheck`` see. The region's
# kind (`RegionSpec`) and the new tensors come as keyword arguments whose defaults are Llama's, so
# calls written before them still mean what they meant.
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
    _check_args(hidden, *tensors, residual, norm_bias, spec)
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
    _check_args(hidden, *tensors, residual, norm_bias, spec)
    return hidden.new_empty(hidden.shape)
