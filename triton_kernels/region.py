"""The contract of ``inductor_fusion::rmsnorm_mlp``: what the region computes and what it accepts.

`RegionSpec` names the region's axes (norm kind, activation, gated or not) after what the models
write; `rmsnorm_mlp_reference` is the region in plain PyTorch, the definition every kernel must
meet; `supports` says which cases the Triton kernels handle and `check_args` which arguments are
consistent. Launch configurations (`launch_config`) and launch plans (`launch_plan`) build on
this; the op itself lives in `rmsnorm_mlp`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_FUNCTIONS",
    "LLAMA",
    "NORMS",
    "SUPPORTED_DTYPES",
    "RegionSpec",
    "check_args",
    "rmsnorm_mlp_reference",
    "supports",
    "token_count",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORMS = ("rms", "layer", "none")
# Each activation name as PyTorch computes it: the reference here, and the search functions of
# the pattern table (`patterns.norm_mlp`), which must write what the models write.
ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),
}
ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)


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
    act = ACTIVATION_FUNCTIONS[spec.activation](gate)
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


def token_count(hidden: Tensor) -> Any:
    """The rows the region computes: every dimension of ``hidden`` but the last (H). A SymInt in
    a graph with a dynamic token count; comparing it there guards on the comparison."""
    return hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0


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


def _check(cond: Any, message: Callable[[], str]) -> None:
    """``torch._check_value`` for the region's argument checks, with a fast path: a plain ``True``
    (every check on real tensors) returns at once, where ``torch._check_value`` spends ~1.6 µs
    (measured on the CPU machine) on its symbolic-shape machinery, 14 times per region call: host
    cost of the eager op. A SymBool (fake tensors while tracing) still becomes a guard."""
    if cond is True:
        return
    torch._check_value(cond, message)


def check_args(
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
