"""The norm -> MLP half of `inductor_fusion.explain`: which family's region a decoder layer holds,
and what our matchers make of it, found by tracing the layer rather than compiling it.

The layer is traced on fake tensors with Inductor's decompositions, its attention replaced by a
stand-in whose output is a graph input, so the graph is the form the layer writes after attention;
then each norm -> MLP family's matcher runs over it as in a compile, recording a fused variant or
the first structured rejection. Apart from the explainer because this is the part that imports
torch's tracing machinery and our pass state, while the explainer only assembles the answer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inductor_fusion import catalogue, registry
from inductor_fusion.config import FusionPlan
from inductor_fusion.graph_paths import join_module_path
from inductor_fusion.triton_kernels.region import SUPPORTED_DTYPES

log = logging.getLogger("inductor_fusion")

# Tokens of the traced activation [1, TRACE_TOKENS, hidden]; any count traces the same graph.
TRACE_TOKENS = 8
# Layer attributes only the attention reads (Gemma3's layer_idx picks sliding or global
# attention): left out of a layer's structure, so that identical layers are traced once.
_ATTENTION_ONLY_ATTRIBUTES = ("layer_idx",)


def child_name(layer: torch.nn.Module, names: Sequence[str]) -> str | None:
    children = dict(layer.named_children())
    return next((n for n in names if n in children), None)


def region_modules(
    model: torch.nn.Module, layer_path: str, layer: torch.nn.Module
) -> tuple[str, dict[str, str]] | None:
    """(the family the layer's norm -> MLP region belongs to, its role -> module path), or None.

    Where the model class registers the family's modules by name (``("RMSNorm", "MLP")``,
    ``("LayerNorm", "MLP")``, ``("MLP",)``: `fusion_entries.layer_names`), those decide; else the
    layer's children (`catalogue`'s child names): an MLP with a post-norm and no norm in front is
    OLMo-2's form (``mlp_postnorm``), otherwise the sibling norm that feeds the MLP, whose class
    names the family (a norm of no row: a LayerNorm if it has a bias, else an RMSNorm).
    """
    import fnmatch

    from inductor_fusion.fusion_entries import layer_names
    from inductor_fusion.model_plans import fusable_modules

    registered = fusable_modules(model)
    children = {join_module_path(layer_path, n): n for n, _ in layer.named_children()}
    # Two-role families first: Llama registers "MLP" too, but its region has a norm.
    for family in registry.norm_mlp_patterns():
        names = layer_names(family)
        if not all(n in registered for n in names):
            continue
        roles = registry.get_family(family).roles
        paths = {}
        for role, name in zip(roles, names, strict=True):
            path = next((p for p in children if fnmatch.fnmatchcase(p, registered[name])), None)
            if path is not None:
                paths[role] = path
        if len(paths) == len(roles):
            return family, paths
    mlp = child_name(layer, catalogue.MLP_CHILD_NAMES)
    if mlp is None:
        return None
    if child_name(layer, catalogue.POST_NORM_CHILD_NAMES) and not child_name(
        layer, ("pre_feedforward_layernorm",)
    ):
        return "mlp_postnorm", {"mlp": join_module_path(layer_path, mlp)}
    norm = child_name(layer, catalogue.NORM_CHILD_NAMES)
    if norm is None:
        return None
    # The catalogue's row for the norm's class; a norm it does not name is taken for a LayerNorm
    # if it has a bias (RMSNorms have none).
    family = catalogue.pattern_of_norm(type(getattr(layer, norm)).__name__)
    if family is None:
        layer_norm = getattr(getattr(layer, norm), "bias", None) is not None
        family = "layernorm_mlp" if layer_norm else "rmsnorm_mlp"
    return family, {
        "norm": join_module_path(layer_path, norm),
        "mlp": join_module_path(layer_path, mlp),
    }


@dataclass(frozen=True)
class Traced:
    """What our matchers did with one traced layer: the family that fused its region and the
    variant, or the family and one-line reason of the first rejection, or neither."""

    family: str | None
    variant: str | None
    reason: str | None


def layer_structure(layer: torch.nn.Module, attention: str | None) -> Any:
    """What the traced graph depends on: module classes, parameter and buffer shapes and dtypes,
    and scalar attributes (eps, Granite's residual multiplier, GPT-NeoX's parallel residual),
    of the layer without its attention (which the trace replaces)."""
    parts = []
    for name, module in layer.named_modules():
        if attention is not None and (name == attention or name.startswith(f"{attention}.")):
            continue
        scalars = sorted(
            (k, v)
            for k, v in vars(module).items()
            if isinstance(v, (bool, int, float)) and k not in _ATTENTION_ONLY_ATTRIBUTES
        )
        parts.append(
            (
                name,
                type(module),
                tuple(
                    (n, tuple(p.shape), p.dtype) for n, p in module.named_parameters(recurse=False)
                ),
                tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers(recurse=False)),
                repr(scalars),
            )
        )
    return tuple(parts)


class _AttentionStandIn(torch.nn.Module):
    """Takes the attention module's place in a traced layer: returns ``output`` (a graph input
    of the hidden states' shape) as HF attention modules return theirs, ``(output, weights)``."""

    def __init__(self) -> None:
        super().__init__()
        self.output: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, None]:
        return self.output, None


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Keeps the matchers' INFO lines (a rejection each) out of the user's log: explaining a
    model is not compiling it."""
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


def trace_layer(layer: torch.nn.Module, attention: str | None, guess: str) -> Traced:
    """Traces ``layer`` (attention stood in for) and runs the norm -> MLP matchers over it,
    ``guess`` (the family `region_modules` names) first."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    from inductor_fusion.pass_state import PassRun, running

    # A shallow copy with its own children dict: the caller's model is never modified.
    stand_in = _AttentionStandIn()
    traced = copy.copy(layer)
    traced._modules = dict(layer._modules)
    if attention is not None:
        traced._modules[attention] = stand_in
    hidden_size = _hidden_size(layer)
    if hidden_size is None:
        return Traced(None, None, "no hidden size found (no linear projection in the MLP)")
    dtype = first_dtype(layer)
    with FakeTensorMode() as mode:
        # Fake CPU tensors: the device decides nothing the patterns check but the CUDA regimes,
        # which `_regimes` reports for every token count.
        fakes = {
            name: torch.empty(t.shape, dtype=t.dtype, device="cpu")
            for name, t in (*traced.named_parameters(), *traced.named_buffers())
        }
        shape = (1, TRACE_TOKENS, hidden_size)
        hidden = torch.empty(shape, dtype=dtype, device="cpu")
        attention_output = torch.empty(shape, dtype=dtype, device="cpu")

    def forward(
        tensors: dict[str, torch.Tensor], h: torch.Tensor, attended: torch.Tensor
    ) -> torch.Tensor:
        stand_in.output = attended
        # What decoder layers take besides the hidden states: the stand-in ignores it all.
        kwargs = {"attention_mask": None, "position_ids": None, "position_embeddings": None}
        out = functional_call(traced, tensors, (h,), kwargs)
        return out[0] if isinstance(out, tuple) else out

    try:
        with mode, torch.no_grad():
            gm = make_fx(forward, select_decomp_table())(fakes, hidden, attention_output)
    except Exception as error:  # a layer that does not trace on fake tensors
        return Traced(
            None,
            None,
            "the decoder layer does not trace on fake tensors with its attention stood in for "
            f"({type(error).__name__}: {error})",
        )
    gm.graph.eliminate_dead_code()  # e.g. the input norm, whose output only attention read
    # The structured rejections of the runs, not their INFO lines: the explanation is the same
    # whatever the logging configuration.
    first = None
    # Every norm -> MLP family, whatever the plan, so that one trace serves every plan (the
    # plan is applied per candidate). Their regions never overlap (a norm kind each; an MLP
    # fed by a norm is never mlp_postnorm's), so a family switched off hides no other, and
    # the structural guess may go first: the others' patterns (seconds to register) are
    # needed only where it neither fuses nor refuses the region.
    for family in dict.fromkeys((guess, *registry.norm_mlp_patterns())):
        prepare = registry.family_hook(family, "prepare_graph")
        if prepare is not None:
            prepare(gm.graph)
        run = PassRun(plan=FusionPlan(frozenset({family}), source="explain"))
        with running(run), _quiet(log):
            registry.matcher_pass(family).apply(gm.graph)
        if run.regions:
            return Traced(family, run.regions[0].variant, None)
        if run.rejections:
            first = run.rejections[0]
            break
    if first is not None:
        return Traced(
            first.family if first.family in registry.norm_mlp_patterns() else None,
            None,
            first.reason,
        )
    return Traced(None, None, None)


def _hidden_size(layer: torch.nn.Module) -> int | None:
    """The layer's hidden size: the input features of its MLP's first projection (a LoRA-wrapped
    linear has them too), else the config's."""
    mlp = child_name(layer, catalogue.MLP_CHILD_NAMES)
    for module in getattr(layer, mlp).modules() if mlp else ():
        features = getattr(module, "in_features", None)
        if isinstance(features, int):
            return features
    return getattr(getattr(layer, "config", None), "hidden_size", None)


def no_match_reason(family: str, norm: torch.nn.Module | None, mlp: torch.nn.Module) -> str:
    """Why the region's graph has none of the family's rows' shapes, from the modules' structure."""
    adapters = [
        f"{name or type(mlp).__name__} ({_adapter_kind(m)})"
        for name, m in mlp.named_modules()
        if type(m).__module__.startswith("peft.") and hasattr(m, "base_layer")
    ]
    if adapters:
        return (
            f"an adapter inside the region: {', '.join(adapters)} add their own matmuls; merge "
            "them into the weights to fuse (peft: model.merge_and_unload())"
        )
    rows = registry.pattern_module(family).FORMS
    if sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) < 2:
        return f"{type(mlp).__name__} has no two nn.Linear projections: not an MLP {family} fuses"
    act_names = {layout.act for layout in catalogue.MLP_LAYOUTS}
    act = next((m for n, m in mlp.named_children() if n in act_names), None)
    takes = sorted({row.activation for row in rows})
    if act is not None and catalogue.ACTIVATION_CLASSES.get(type(act).__name__) not in takes:
        return f"unsupported activation {type(act).__name__}: {family} fuses {', '.join(takes)}"
    weight = next((p for p in mlp.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {weight.dtype}: {family} fuses float16, bfloat16 and float32"
    return (
        f"{type(norm).__name__ + ' -> ' if norm is not None else ''}{type(mlp).__name__} does not "
        f"compute the math of a {family} row ({'; '.join(row.models for row in rows)})"
    )


def _adapter_kind(module: torch.nn.Module) -> str:
    """``peft lora.Linear`` for peft's ``peft.tuners.lora.layer.Linear``."""
    parts = type(module).__module__.split(".")
    tuner = f"{parts[2]}." if len(parts) > 2 and parts[1] == "tuners" else ""
    return f"{parts[0]} {tuner}{type(module).__name__}"


def first_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
