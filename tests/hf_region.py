"""The post-attention region as Hugging Face computes it: the truth our op is tested against.

`hf_region` runs the transformers modules themselves (``LlamaRMSNorm`` + ``LlamaMLP``, or Qwen3's)
with given tensors as their parameters, then the residual add as the decoder layers write it.
`hf_formula_fp64` is the same formula evaluated in float64 throughout (the HF modules would take
the norm statistics in fp32 even for float64 inputs), the exact value the rounding steps
approximate. Neither uses anything from ``inductor_fusion``, so a change to our reference cannot
move the truth along with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

HF_FAMILIES = {
    "llama": (LlamaConfig, LlamaRMSNorm, LlamaMLP),
    "qwen3": (Qwen3Config, Qwen3RMSNorm, Qwen3MLP),
}


def hf_modules(
    family: str, *, hidden_size: int, intermediate_size: int, eps: float, bias: bool
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The family's RMSNorm and MLP for these sizes, built on the meta device (parameters are
    assigned afterwards, so no random init is paid for)."""
    config_cls, norm_cls, mlp_cls = HF_FAMILIES[family]
    extra = {"mlp_bias": bias} if family == "llama" else {}
    if bias and family != "llama":
        raise ValueError(f"{family} MLPs have no biases")
    # One head of an even size keeps the config valid for any (odd) hidden size.
    config = config_cls(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        rms_norm_eps=eps,
        hidden_act="silu",
        **extra,
    )
    with torch.device("meta"):
        return norm_cls(hidden_size, eps=eps), mlp_cls(config)


def _set(module: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is not None:
        # Parameter() keeps the tensor's storage and strides: the modules read the test's layout.
        setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def hf_region(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float,
    family: str = "llama",
) -> torch.Tensor:
    """``residual + mlp(post_attention_layernorm(hidden))`` through the transformers modules."""
    norm, mlp = hf_modules(
        family,
        hidden_size=hidden.shape[-1],
        intermediate_size=gate_weight.shape[0],
        eps=eps,
        bias=gate_bias is not None,
    )
    _set(norm, "weight", norm_weight)
    for proj, weight, bias in (
        (mlp.gate_proj, gate_weight, gate_bias),
        (mlp.up_proj, up_weight, up_bias),
        (mlp.down_proj, down_weight, down_bias),
    ):
        _set(proj, "weight", weight)
        _set(proj, "bias", bias)
    with torch.no_grad():
        out = mlp(norm(hidden))
        # LlamaDecoderLayer / Qwen3DecoderLayer: `hidden_states = residual + hidden_states`.
        return out if residual is None else residual + out


def hf_formula_fp64(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float,
) -> torch.Tensor:
    """The HF modules' formula with every step in float64 (the inputs are upcast first)."""

    def d(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.double()

    x = hidden.double()
    n = d(norm_weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    gate = F.linear(n, d(gate_weight), d(gate_bias))
    up = F.linear(n, d(up_weight), d(up_bias))
    out = F.linear(F.silu(gate) * up, d(down_weight), d(down_bias))
    return out if residual is None else d(residual) + out
