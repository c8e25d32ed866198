"""The norm -> MLP regions of other Hugging Face decoder families: their modules, and their math
in float64. Like `hf_region`, nothing here uses ``inductor_fusion``: the truth the kernels are held
to is the models' own code (eager, in the test dtype) and their formulas (float64).

Every region takes the same parameter names: ``norm_weight``/``norm_bias`` (absent without a norm
or a bias), ``gate_weight`` (the only up-projection of a non-gated MLP; for Phi-3 the first half
of ``gate_up_proj``), ``up_weight``, ``down_weight`` and the matching ``*_bias``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    GemmaConfig,
    GPTNeoXConfig,
    GraniteConfig,
    NemotronConfig,
    Olmo2Config,
    Phi3Config,
    Starcoder2Config,
)
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
from transformers.models.granite.modeling_granite import GraniteMLP, GraniteRMSNorm
from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P, NemotronMLP
from transformers.models.olmo2.modeling_olmo2 import Olmo2MLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP, Phi3RMSNorm
from transformers.models.starcoder2.modeling_starcoder2 import Starcoder2MLP


@dataclass(frozen=True)
class Family:
    """What one family's region computes, as its modeling file writes it."""

    norm: str  # "rms" (x * rsqrt(mean x^2 + eps)), "layer" (F.layer_norm) or "none"
    norm_offset: float  # the weight is used as (offset + weight)
    norm_bias: bool
    act: str  # ACT2FN name
    gated: bool
    mlp_bias: bool
    residual_scale: float | None  # None: the module region has no residual add here


FAMILIES = {
    "gemma": Family("rms", 1.0, False, "gelu_pytorch_tanh", True, False, 1.0),
    "gemma2": Family("rms", 1.0, False, "gelu_pytorch_tanh", True, False, None),
    "phi3": Family("rms", 0.0, False, "silu", True, False, 1.0),
    "granite": Family("rms", 0.0, False, "silu", True, False, 0.22),
    "gpt_neox": Family("layer", 0.0, True, "gelu", False, True, 1.0),
    "starcoder2": Family("layer", 0.0, True, "gelu_pytorch_tanh", False, True, 1.0),
    "nemotron": Family("layer", 1.0, True, "relu2", False, False, 1.0),
    "olmo2": Family("none", 0.0, False, "silu", True, False, None),
}


def _config(cls, hidden: int, inter: int, act: str, **extra):
    return cls(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        hidden_act=act,
        **extra,
    )


def _set(module: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is not None:
        setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def hf_family_region(
    family: str,
    hidden: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + scale * mlp(norm(hidden))`` through the family's own modules."""
    f = FAMILIES[family]
    h, i = hidden.shape[-1], params["gate_weight"].shape[0]
    with torch.device("meta"):
        if family in ("gemma", "gemma2"):
            norm, mlp = GemmaRMSNorm(h, eps=eps), GemmaMLP(_config(GemmaConfig, h, i, f.act))
        elif family == "phi3":
            norm, mlp = Phi3RMSNorm(h, eps=eps), Phi3MLP(_config(Phi3Config, h, i, f.act))
        elif family == "granite":
            norm, mlp = GraniteRMSNorm(h, eps=eps), GraniteMLP(_config(GraniteConfig, h, i, f.act))
        elif family == "gpt_neox":
            norm, mlp = (
                torch.nn.LayerNorm(h, eps=eps),
                GPTNeoXMLP(_config(GPTNeoXConfig, h, i, f.act)),
            )
        elif family == "starcoder2":
            config = _config(Starcoder2Config, h, i, f.act, use_bias=True, residual_dropout=0.0)
            norm, mlp = torch.nn.LayerNorm(h, eps=eps), Starcoder2MLP(config)
        elif family == "nemotron":
            config = _config(NemotronConfig, h, i, f.act, mlp_bias=False, partial_rotary_factor=0.5)
            norm, mlp = NemotronLayerNorm1P(h, eps=eps), NemotronMLP(config)
        else:
            norm, mlp = None, Olmo2MLP(_config(Olmo2Config, h, i, f.act))
    if norm is not None:
        _set(norm, "weight", params["norm_weight"])
        _set(norm, "bias", params.get("norm_bias"))
    projections = {
        "gpt_neox": (("dense_h_to_4h", "gate"), ("dense_4h_to_h", "down")),
        "starcoder2": (("c_fc", "gate"), ("c_proj", "down")),
        "nemotron": (("up_proj", "gate"), ("down_proj", "down")),
        "phi3": (("down_proj", "down"),),
    }.get(family, (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")))
    for attr, role in projections:
        _set(getattr(mlp, attr), "weight", params[f"{role}_weight"])
        _set(getattr(mlp, attr), "bias", params.get(f"{role}_bias"))
    if family == "phi3":
        fused = torch.cat([params["gate_weight"], params["up_weight"]])
        _set(mlp.gate_up_proj, "weight", fused)
    with torch.no_grad():
        out = mlp(hidden if norm is None else norm(hidden))
        if residual is None:
            return out
        scale = f.residual_scale
        return residual + (out if scale == 1.0 else out * scale)


_ACT64 = {
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_pytorch_tanh": lambda x: (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "relu2": lambda x: torch.relu(x) ** 2,
}


def family_formula_fp64(
    family: str,
    hidden: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same region's formula with every step in float64."""
    f = FAMILIES[family]
    p = {k: v.double() for k, v in params.items()}
    x = hidden.double()
    if f.norm == "rms":
        n = (
            x
            * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            * (f.norm_offset + p["norm_weight"])
        )
    elif f.norm == "layer":
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        n = (x - mean) / torch.sqrt(var + eps) * (f.norm_offset + p["norm_weight"])
        n = n + p["norm_bias"]
    else:
        n = x
    act = _ACT64[f.act](F.linear(n, p["gate_weight"], p.get("gate_bias")))
    if f.gated:
        act = act * F.linear(n, p["up_weight"], p.get("up_bias"))
    out = F.linear(act, p["down_weight"], p.get("down_bias"))
    return out if residual is None else residual.double() + f.residual_scale * out
