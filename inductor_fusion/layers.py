"""Eager fused layers: the norm -> MLP region run through our op without torch.compile.

transformers' n-to-1 kernel fusion replaces the first module of a region (the norm) with a
layout module that holds every module's weights, and the rest (the MLP) with ``nn.Identity``.
Done literally, that moves the MLP's parameters under the norm's path and changes the model's
``state_dict`` keys, so checkpoints would no longer load. Here the swap keeps every key:

- `NormMLP` takes the norm's place. It *shares* the norm's parameter and buffer dicts (the same
  dict objects, not copies), so the norm's keys stay ``...post_attention_layernorm.weight`` and
  anything that assigns a parameter (``load_state_dict(assign=True)``, ``.to()``) is seen by both.
  Its forward is ``mlp(norm(h))`` in one call of ``torch.ops.inductor_fusion.rmsnorm_mlp`` (no
  residual: the decoder layer adds it after calling the MLP).
- `FusedAway` takes the MLP's place and returns its input. It shares the MLP's module, parameter
  and buffer dicts, so ``...mlp.gate_proj.weight`` and the rest stay where they were.

The decoder layer's ``h = residual + self.mlp(self.post_attention_layernorm(h))`` therefore
computes ``residual + identity(fused(h))``: the same thing, with the same keys.

Which modules qualify (the rows of `inductor_fusion.catalogue`), per family of the compile patterns
(`RegionSpec` axes):

- norms, by class: the Llama-style RMSNorms (Llama, Mistral, Qwen2/3, Phi-3, Granite), the
  Gemma-style ones (Gemma, Gemma2, Gemma3: ``1 + w`` in fp32), ``nn.LayerNorm`` (GPT-NeoX,
  Starcoder2) and ``NemotronLayerNorm1P``;
- MLPs, by their children: gated with separate ``gate_proj``/``up_proj`` (Llama, Gemma, Granite),
  gated with one ``gate_up_proj`` whose halves are gate then up (Phi-3), and non-gated
  ``dense_h_to_4h``/``dense_4h_to_h`` (GPT-NeoX), ``c_fc``/``c_proj`` (Starcoder2),
  ``up_proj``/``down_proj`` (Nemotron); activations SiLU, GELU (erf), GELU-tanh and ReLU².

When autograd records the region (grad mode on and the input or a weight requiring grad),
Llama's row (Llama-style RMSNorm, SiLU, separate gate/up, no biases) runs
``torch.ops.inductor_fusion.rmsnorm_mlp_train``, the op with our backward that compiled training
steps use (`triton_kernels.rmsnorm_mlp_train`); it saves ``h``, the row statistic and gate/up,
not the normalised activations. On CUDA it stays off (``FUSED_TRAINING_ON_CUDA``: its backward
measured slower than the modules under torch.compile).

Where no op can stand for the modules, `NormMLP` runs the original norm and MLP instead:
- when autograd records any other region (the inference op has no autograd formula), or Llama's
  on CUDA until the switch above is on: training then computes exactly what the unfused model
  computes;
- under ``torch.autocast`` on the input's device: the modules mix dtypes there as autocast
  decides (NemotronLayerNorm1P even turns it off), which one op call in one dtype cannot follow;
- when the MLP's dropout is active (Starcoder2's ``residual_dropout`` in training mode);
- when a weight's dtype is not the input's (a norm kept in fp32 by ``_keep_in_fp32_modules``):
  the op takes one dtype; one INFO line per layer says so;
- when a projection is no longer a plain ``nn.Linear`` (PEFT's LoRA layers or a quantized linear
  put in its place after the swap): the op would read its base weight and drop the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch
from torch import Tensor, nn

from inductor_fusion import catalogue
from inductor_fusion.catalogue import MLPLayout
from inductor_fusion.triton_kernels.region import LLAMA, RegionSpec
from inductor_fusion.triton_kernels.rmsnorm_mlp import _rmsnorm_mlp_cuda

log = logging.getLogger("inductor_fusion")

__all__ = ["FusedAway", "NormMLP", "fuse_mlp", "fuse_norm_mlp", "region_spec"]


class EagerFusionError(ValueError):
    """A module an eager fusion entry points at is not the norm or MLP the layer expects."""


F_GELU = nn.functional.gelu


def _activation(act: Any) -> str | None:
    """The op's activation name for an MLP's activation module, None if unsupported."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if isinstance(act, nn.SiLU):
        return "silu"
    if type(act).__module__.startswith("torch."):
        return None  # torch's other modules, or a subclass of nn.SiLU's name elsewhere in torch
    name = catalogue.ACTIVATION_CLASSES.get(type(act).__name__)
    # transformers' GELU modules run F.gelu unless built with their Python formula (another
    # rounding); GELUTanh's F.gelu is a partial with approximate="tanh".
    inner = getattr(act, "act", None)
    if name == "gelu" and inner is not F_GELU:
        return None
    if name == "gelu_tanh" and not (
        isinstance(inner, functools.partial)
        and inner.func is F_GELU
        and inner.keywords == {"approximate": "tanh"}
    ):
        return None
    return name


def _refuse_hooked(role: str, module: nn.Module, at: str) -> None:
    if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
        raise EagerFusionError(
            f"eager norm -> MLP: the {role}{at} ({type(module).__name__}) has forward hooks "
            "(accelerate's device_map offloading adds some); swapping it would drop them"
        )


def _mlp_layout(mlp: nn.Module) -> MLPLayout | None:
    """The first layout whose projections the MLP has, whatever their type (`region_spec` then
    requires plain ``nn.Linear``). Matching on names alone matters: a Llama MLP whose
    ``gate_proj`` is a LoRA layer must not pass for Nemotron's non-gated (up_proj, down_proj)."""
    children = dict(mlp.named_children())
    for layout in catalogue.MLP_LAYOUTS:
        if all(name in children for name in layout.children):
            return layout
    return None


def region_spec(
    norm: nn.Module | None, mlp: nn.Module, *, where: str = ""
) -> tuple[RegionSpec, float]:
    """The op's `RegionSpec` and eps for ``mlp(norm(h))`` (``mlp(h)`` without a norm: OLMo-2's
    region); `EagerFusionError` naming what is missing when these modules are not a supported
    norm and MLP."""
    at = f" at {where}" if where else ""
    if norm is None:
        return _mlp_spec(mlp, RegionSpec(norm="none"), at), 0.0
    # By class name (no transformers import here): the catalogue's norms, whose forward the op's
    # reference reproduces bit for bit.
    known = catalogue.norm_class(type(norm).__name__)
    if type(norm).__name__ == "LayerNorm" and type(norm) is not nn.LayerNorm:
        known = None  # another library's LayerNorm: its forward is unknown
    weight = getattr(norm, "weight", None)
    if known is None or not isinstance(weight, Tensor) or weight.dim() != 1:
        raise EagerFusionError(
            f"eager norm -> MLP: the norm{at} is a {type(norm).__name__}; expected one of "
            f"{', '.join(catalogue.norm_class_names())} with a 1-D weight"
        )
    if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) != tuple(weight.shape):
        raise EagerFusionError(
            f"eager norm -> MLP: the norm{at} normalizes over {tuple(norm.normalized_shape)}, "
            "not the last dimension alone"
        )
    _refuse_hooked("norm", norm, at)
    eps_attribute, form = known
    spec = RegionSpec(
        norm=form.kind, norm_weight_offset=form.weight_offset, norm_weight_fp32=form.weight_fp32
    )
    eps = getattr(norm, eps_attribute, None)
    if not isinstance(eps, float):
        raise EagerFusionError(
            f"eager norm -> MLP: the norm{at} ({type(norm).__name__}) has no float "
            f"{eps_attribute!r}"
        )
    return _mlp_spec(mlp, spec, at, hidden=weight.shape[0]), eps


def _mlp_spec(mlp: nn.Module, spec: RegionSpec, at: str, hidden: int | None = None) -> RegionSpec:
    """``spec`` completed with the MLP's activation and gating; raises if the MLP is not one we
    take (``hidden``: the norm's size the MLP must read)."""
    _refuse_hooked("MLP", mlp, at)
    layout = _mlp_layout(mlp)
    if layout is None:
        expected = "; ".join(", ".join(layout.children) for layout in catalogue.MLP_LAYOUTS)
        raise EagerFusionError(
            f"eager norm -> MLP: the MLP{at} ({type(mlp).__name__}) lacks the nn.Linear "
            f"projections of a supported MLP (one of: {expected})"
        )
    other = [
        f"{name} ({type(child).__name__})"
        for name in layout.children
        if type(child := getattr(mlp, name)) is not nn.Linear
    ]
    if other:
        raise EagerFusionError(
            f"eager norm -> MLP: the MLP{at} ({type(mlp).__name__}) has projections that are not "
            f"plain nn.Linear: {', '.join(other)} (an adapter or a quantized layer computes "
            "more than its weight; merge or remove it before the swap)"
        )
    gate, up, down = _projections(mlp, layout)
    hidden = down.out_features if hidden is None else hidden
    inter = down.in_features
    gate_out = 2 * inter if layout.fused_gate_up else inter
    if not (
        gate.in_features == hidden == down.out_features
        and gate.out_features == gate_out
        and (up is None or (up.in_features, up.out_features) == (hidden, inter))
    ):
        present = [proj for proj in (gate, up, down) if proj is not None]
        shapes = ", ".join(
            f"{name} {proj.in_features}->{proj.out_features}"
            for name, proj in zip(layout.children, present, strict=True)
        )
        raise EagerFusionError(
            f"eager norm -> MLP: shapes{at} do not chain: hidden {hidden}, {shapes}"
        )
    act = getattr(mlp, layout.act, None)
    activation = _activation(act)
    if activation is None:
        raise EagerFusionError(
            f"eager norm -> MLP: the MLP{at} ({type(mlp).__name__}) has {layout.act} "
            f"{type(act).__name__}; supported: SiLU, GELU, GELUTanh, ReLUSquared"
        )
    return dataclasses.replace(spec, activation=activation, gated=layout.gated)


def _projections(mlp: nn.Module, layout: MLPLayout) -> tuple[Any, Any, Any]:
    """(gate, up or None, down) modules of ``mlp``."""
    # From the children dict itself: nn.Module.__getattr__ is the slow path of attribute lookup
    # (~1 µs each), and the eager layer runs this on every call.
    children = mlp._modules
    return (
        children[layout.gate],
        children[layout.up] if layout.up else None,
        children[layout.down],
    )


def _share_state(target: nn.Module, source: nn.Module, *, modules: bool) -> None:
    # The same dict objects, so both views see every later assignment (see the module docstring).
    target._parameters = source._parameters
    target._buffers = source._buffers
    if modules:
        target._modules = source._modules


class FusedAway(nn.Module):
    """Stands where a fused MLP stood: returns its input, keeps the MLP's parameters at its path.

    The computation happened in the `NormMLP` that replaced the norm before it."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        _share_state(self, mlp, modules=True)
        self.fused_class = type(mlp).__name__

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden

    def extra_repr(self) -> str:
        return f"{self.fused_class} computed by the preceding NormMLP"


class NormMLP(nn.Module):
    """``mlp(norm(h))`` through ``torch.ops.inductor_fusion.rmsnorm_mlp``, in the norm's place.

    Build it with `fuse_norm_mlp`, which also puts `FusedAway` in the MLP's place. Runs the
    original modules instead where the op cannot stand for them (see the module docstring)."""

    def __init__(self, norm: nn.Module | None, mlp: nn.Module, *, where: str = "") -> None:
        super().__init__()
        self.spec, self.eps = region_spec(norm, mlp, where=where)
        self.layout = _mlp_layout(mlp)
        self._op_kwargs = self.spec.op_kwargs()  # once: asdict costs ~8 µs a call
        self.where = where
        self._told_mixed = False  # one log line per layer, not one per call
        # In the norm's place it shares the norm's state; without a norm it stands in the MLP's
        # place and shares the MLP's, children included, so every key stays where it was.
        if norm is None:
            _share_state(self, mlp, modules=True)
        else:
            _share_state(self, norm, modules=False)
        # Not registered as submodules: their parameters are already registered at their own
        # paths (here and in the FusedAway), and registering them again would add state_dict keys.
        self.__dict__["_unfused"] = (norm, mlp)

    @property
    def norm(self) -> nn.Module | None:
        return self._unfused[0]

    @property
    def mlp(self) -> nn.Module:
        return self._unfused[1]

    def _runs_the_modules(self, hidden: Tensor, projections: tuple[Any, ...]) -> bool:
        mlp = self._unfused[1]
        # A projection replaced after the swap (a PEFT LoRA layer, a quantized linear) computes
        # more than its weight says.
        if not all(proj is None or type(proj) is nn.Linear for proj in projections):
            return True
        if torch.is_autocast_enabled(hidden.device.type):
            return True
        # Starcoder2's dropout on the MLP output is live.
        if self.training and getattr(mlp, "residual_dropout", 0.0):
            return True
        # The op takes one dtype. A model may keep some weights in another (transformers'
        # ``_keep_in_fp32_modules`` keeps norms in fp32; Gemma's norm then still returns the
        # input's dtype): the modules handle that, the op would raise.
        dtype = hidden.dtype
        tensors = [*self._parameters.values()]
        for proj in projections:
            if proj is not None:  # an nn.Linear (checked above): its weight and bias
                tensors += proj._parameters.values()
        if all(t is None or t.dtype == dtype for t in tensors):
            return False
        if not self._told_mixed:  # the message is built on the rare path only
            self._told_mixed = True
            mixed = sorted({str(t.dtype) for t in tensors if t is not None and t.dtype != dtype})
            log.info(
                "inductor_fusion: eager %s runs its modules: input %s, weights %s",
                self.where or type(self.norm).__name__, dtype, ", ".join(mixed),
            )  # fmt: skip
        return True

    def _records_grad(self, hidden: Tensor, projections: tuple[Any, ...]) -> bool:
        return torch.is_grad_enabled() and (
            hidden.requires_grad
            or any(p.requires_grad for p in self._parameters.values() if p is not None)
            or any(proj.weight.requires_grad for proj in projections if proj is not None)
        )

    def _trains_fused(self, hidden: Tensor, projections: tuple[Any, ...]) -> bool:
        """Whether the training op computes this region: Llama's row only, no biases."""
        from inductor_fusion.triton_kernels.rmsnorm_mlp_train import FUSED_TRAINING_ON_CUDA

        return (
            self.spec == LLAMA
            and self.layout.up is not None
            and all(proj.bias is None for proj in projections)
            and (hidden.device.type != "cuda" or FUSED_TRAINING_ON_CUDA)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        norm, mlp = self._unfused
        projections = _projections(mlp, self.layout)
        runs_modules = self._runs_the_modules(hidden, projections)
        if not runs_modules and self._records_grad(hidden, projections):
            if self._trains_fused(hidden, projections):
                gate, up, down = projections
                return torch.ops.inductor_fusion.rmsnorm_mlp_train(
                    hidden, self.weight, gate.weight, up.weight, down.weight, self.eps,
                    False, False,  # no residual (the layer adds it), default memory mode
                )[0]  # fmt: skip
            runs_modules = True
        if runs_modules:
            # The original modules left the module tree, so ``model.train()``/``eval()`` reached
            # their children (shared) but not them: give them this layer's mode first.
            mlp.training = self.training
            if norm is None:
                return mlp(hidden)
            norm.training = self.training
            return mlp(norm(hidden))
        # nn.Linear's parameter dicts (``_runs_the_modules`` checked the type): no __getattr__.
        gate, up, down = (None if p is None else p._parameters for p in projections)
        gate_weight, gate_bias = gate["weight"], gate["bias"]
        up_weight = up_bias = None
        if up is not None:
            up_weight, up_bias = up["weight"], up["bias"]
        elif self.layout.fused_gate_up:
            # Phi-3 chunks the projection's output in two along the features: gate, then up.
            # Row slices of the weight are contiguous views (no copy).
            gate_weight, up_weight = gate_weight.chunk(2, dim=0)
            if gate_bias is not None:
                gate_bias, up_bias = gate_bias.chunk(2, dim=0)
        # Without a norm the parameters this layer shares are the MLP's own, not a norm's.
        norm_weight = norm_bias = None
        if norm is not None:
            norm_weight, norm_bias = self._parameters["weight"], self._parameters.get("bias")
        args = (
            hidden, norm_weight, gate_weight, up_weight, down["weight"],
            gate_bias, up_bias, down["bias"], None, self.eps, norm_bias,
        )  # fmt: skip
        if hidden.device.type in DIRECT_DEVICES and not torch.compiler.is_compiling():
            # The op's own CUDA implementation, without the dispatcher: nothing here needs it
            # (no autograd, no tracing), and it cost ~50 of the op's ~285 µs of host time per
            # call on the H200 machine (perf/NOTES.md).
            return _rmsnorm_mlp_cuda(*args, **self._op_kwargs)
        return torch.ops.inductor_fusion.rmsnorm_mlp(*args, **self._op_kwargs)

    def extra_repr(self) -> str:
        if self.norm is None:
            return f"{type(self.mlp).__name__} alone, {self.spec}"
        return (
            f"{type(self.norm).__name__} -> {type(self.mlp).__name__}, eps={self.eps}, {self.spec}"
        )


# Devices where the layer calls the op's implementation directly rather than through the
# dispatcher (see `NormMLP.forward`). Elsewhere the op's body is the PyTorch reference, and the
# call stays an op call, visible to dispatch modes and profilers.
DIRECT_DEVICES: tuple[str, ...] = ("cuda",)


def fuse_mlp(parent: nn.Module, mlp_name: str, *, where: str = "") -> bool:
    """Replaces ``parent.<mlp_name>`` with `NormMLP` of the MLP alone (a region without a norm,
    OLMo-2's). Returns False if it already is one; raises `EagerFusionError` for an MLP we do
    not take."""
    mlp = getattr(parent, mlp_name)
    if isinstance(mlp, NormMLP):
        return False
    setattr(parent, mlp_name, NormMLP(None, mlp, where=where))
    return True


def fuse_norm_mlp(parent: nn.Module, norm_name: str, mlp_name: str, *, where: str = "") -> bool:
    """Replaces ``parent.<norm_name>`` with `NormMLP` and ``parent.<mlp_name>`` with `FusedAway`.

    Returns False (and changes nothing) if the pair is already fused; raises `EagerFusionError`
    if the modules are not a supported pair. ``where`` names the pair in messages."""
    norm, mlp = getattr(parent, norm_name), getattr(parent, mlp_name)
    if isinstance(norm, NormMLP) or isinstance(mlp, FusedAway):
        return False
    fused = NormMLP(norm, mlp, where=where)
    setattr(parent, norm_name, fused)
    setattr(parent, mlp_name, FusedAway(mlp))
    return True
