"""Eager fused layers: the norm -> MLP region run through our op without torch.compile.

transformers' n-to-1 kernel fusion replaces the first module of a region (the norm) with a
layout module that holds every module's weights, and the rest (the MLP) with ``nn.Identity``.
Done literally, that moves the MLP's parameters under the norm's path and changes the model's
``state_dict`` keys, so checkpoints would no longer load. Here the swap keeps every key:

- `RMSNormMLP` takes the norm's place. It *shares* the norm's parameter and buffer dicts (the same
  dict objects, not copies), so the norm's keys stay ``...post_attention_layernorm.weight`` and
  anything that assigns a parameter (``load_state_dict(assign=True)``, ``.to()``) is seen by both.
  Its forward is ``mlp(norm(h))`` in one call of ``torch.ops.inductor_fusion.rmsnorm_mlp`` (no
  residual: the decoder layer adds it after calling the MLP).
- `FusedAway` takes the MLP's place and returns its input. It shares the MLP's module, parameter
  and buffer dicts, so ``...mlp.gate_proj.weight`` and the rest stay where they were.

The decoder layer's ``h = residual + self.mlp(self.post_attention_layernorm(h))`` therefore
computes ``residual + identity(fused(h))``: the same thing, with the same keys.

Where the op cannot stand for the modules, `RMSNormMLP` runs the original norm and MLP instead:
- when autograd would record the region (grad mode on and the input or a weight requiring grad):
  the op has no autograd formula yet, and this way training computes exactly what the unfused
  model computes;
- when a projection is no longer a plain ``nn.Linear`` (PEFT's LoRA layers or a quantized linear
  put in its place after the swap): the op would read its base weight and drop the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor, nn

from inductor_fusion.triton_kernels.rmsnorm_mlp import LLAMA, RegionSpec

__all__ = ["FusedAway", "RMSNormMLP", "fuse_norm_mlp", "region_spec"]

# Norm classes whose forward the op's reference reproduces bit for bit, by class name (no
# transformers import here), with the attribute holding eps and the spec's norm axes.
_NORMS: dict[str, tuple[str, RegionSpec]] = {
    **{
        f"{prefix}RMSNorm": ("variance_epsilon", LLAMA)
        for prefix in ("Llama", "Mistral", "Qwen2", "Qwen3")
    },
    "GemmaRMSNorm": ("eps", RegionSpec(norm_weight_offset=1.0, norm_weight_fp32=True)),
}
_MLP_CHILDREN = ("gate_proj", "up_proj", "down_proj")


class EagerFusionError(ValueError):
    """A module an eager fusion entry points at is not the norm or MLP the layer expects."""


def _activation(act: Any) -> str | None:
    """The op's activation name for an MLP's ``act_fn``, None if unsupported."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    # transformers' GELUTanh runs F.gelu(approximate="tanh") unless built with its Python formula.
    inner = getattr(act, "act", None)
    if (
        name == "GELUTanh"
        and isinstance(inner, functools.partial)
        and inner.keywords == {"approximate": "tanh"}
    ):
        return "gelu_tanh"
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def region_spec(norm: nn.Module, mlp: nn.Module, *, where: str = "") -> tuple[RegionSpec, float]:
    """The op's `RegionSpec` and eps for ``mlp(norm(h))``; `EagerFusionError` naming what is
    missing when these modules are not a supported RMSNorm and SwiGLU-style MLP."""
    at = f" at {where}" if where else ""
    kind = _NORMS.get(type(norm).__name__)
    weight = getattr(norm, "weight", None)
    if kind is None or not isinstance(weight, Tensor) or weight.dim() != 1:
        raise EagerFusionError(
            f"eager rmsnorm_mlp: the norm{at} is a {type(norm).__name__}; expected one of "
            f"{', '.join(sorted(_NORMS))} with a 1-D weight"
        )
    for role, module in (("norm", norm), ("MLP", mlp)):
        if _hooked(module):
            raise EagerFusionError(
                f"eager rmsnorm_mlp: the {role}{at} ({type(module).__name__}) has forward hooks "
                "(accelerate's device_map offloading adds some); swapping it would drop them"
            )
    eps_attribute, spec = kind
    eps = getattr(norm, eps_attribute, None)
    if not isinstance(eps, float):
        raise EagerFusionError(
            f"eager rmsnorm_mlp: the norm{at} ({type(norm).__name__}) has no float "
            f"{eps_attribute!r}"
        )
    children = dict(mlp.named_children())
    missing = [name for name in _MLP_CHILDREN if not isinstance(children.get(name), nn.Linear)]
    if missing:
        raise EagerFusionError(
            f"eager rmsnorm_mlp: the MLP{at} ({type(mlp).__name__}) lacks nn.Linear "
            f"{', '.join(missing)}; expected gate_proj, up_proj and down_proj (a SwiGLU-style MLP)"
        )
    gate, up, down = (children[name] for name in _MLP_CHILDREN)
    hidden = weight.shape[0]
    if not (
        gate.in_features == up.in_features == hidden == down.out_features
        and gate.out_features == up.out_features == down.in_features
    ):
        raise EagerFusionError(
            f"eager rmsnorm_mlp: shapes{at} do not chain: norm {hidden}, gate_proj "
            f"{gate.in_features}->{gate.out_features}, up_proj {up.in_features}->"
            f"{up.out_features}, down_proj {down.in_features}->{down.out_features}"
        )
    activation = _activation(getattr(mlp, "act_fn", None))
    if activation is None:
        raise EagerFusionError(
            f"eager rmsnorm_mlp: the MLP{at} ({type(mlp).__name__}) has act_fn "
            f"{type(getattr(mlp, 'act_fn', None)).__name__}; supported: SiLU, GELUTanh"
        )
    return dataclasses.replace(spec, activation=activation), eps


def _share_state(target: nn.Module, source: nn.Module, *, modules: bool) -> None:
    # The same dict objects, so both views see every later assignment (see the module docstring).
    target._parameters = source._parameters
    target._buffers = source._buffers
    if modules:
        target._modules = source._modules


class FusedAway(nn.Module):
    """Stands where a fused MLP stood: returns its input, keeps the MLP's parameters at its path.

    The computation happened in the `RMSNormMLP` that replaced the norm before it."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        _share_state(self, mlp, modules=True)
        self.fused_class = type(mlp).__name__

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden

    def extra_repr(self) -> str:
        return f"{self.fused_class} computed by the preceding RMSNormMLP"


class RMSNormMLP(nn.Module):
    """``mlp(norm(h))`` through ``torch.ops.inductor_fusion.rmsnorm_mlp``, in the norm's place.

    Build it with `fuse_norm_mlp`, which also puts `FusedAway` in the MLP's place. Runs the
    original modules instead when autograd would record the region (the op has no backward yet)
    or a projection is no longer a plain ``nn.Linear``."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, *, where: str = "") -> None:
        super().__init__()
        self.spec, self.eps = region_spec(norm, mlp, where=where)
        _share_state(self, norm, modules=False)
        # Not registered as submodules: their parameters are already registered at their own
        # paths (here and in the FusedAway), and registering them again would add state_dict keys.
        self.__dict__["_unfused"] = (norm, mlp)

    @property
    def norm(self) -> nn.Module:
        return self._unfused[0]

    @property
    def mlp(self) -> nn.Module:
        return self._unfused[1]

    def forward(self, hidden: Tensor) -> Tensor:
        norm, mlp = self._unfused
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        # A projection replaced after the swap (a PEFT LoRA layer, a quantized linear) computes
        # more than its weight says, and the op has no backward: the modules' own forwards then.
        if not all(type(proj) is nn.Linear for proj in (gate, up, down)) or (
            torch.is_grad_enabled()
            and any(
                t.requires_grad for t in (hidden, self.weight, gate.weight, up.weight, down.weight)
            )
        ):
            return mlp(norm(hidden))
        return torch.ops.inductor_fusion.rmsnorm_mlp(
            hidden, self.weight, gate.weight, up.weight, down.weight,
            gate.bias, up.bias, down.bias, None, self.eps, **self.spec.op_kwargs(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{type(self.norm).__name__} -> {type(self.mlp).__name__}, eps={self.eps}, {self.spec}"
        )


def fuse_norm_mlp(parent: nn.Module, norm_name: str, mlp_name: str, *, where: str = "") -> bool:
    """Replaces ``parent.<norm_name>`` with `RMSNormMLP` and ``parent.<mlp_name>`` with `FusedAway`.

    Returns False (and changes nothing) if the pair is already fused; raises `EagerFusionError`
    if the modules are not a supported pair. ``where`` names the pair in messages."""
    norm, mlp = getattr(parent, norm_name), getattr(parent, mlp_name)
    if isinstance(norm, RMSNormMLP) or isinstance(mlp, FusedAway):
        return False
    fused = RMSNormMLP(norm, mlp, where=where)
    setattr(parent, norm_name, fused)
    setattr(parent, mlp_name, FusedAway(mlp))
    return True
