"""``inductor_fusion.explain(model_or_config)``: what would fuse where, and why not, without compiling.

For each decoder layer it lists the candidate region of every pattern family and whether a
compile with our pass fuses it (``family[variant]``) or, in one line, why not: the same patterns,
checks (legality, profitability) and plan (options, environment, KernelConfig) as a compile.
Nothing is allocated or computed; a model given as a config is built on the meta device.

Norm -> MLP families (``rmsnorm_mlp``, ``layernorm_mlp``, ``mlp_postnorm``): the decoder layer
itself is traced, on fake tensors with Inductor's decompositions, with its attention module
replaced by a stand-in whose output is a graph input. The graph is then the form the layer
writes after attention (``h + mlp(norm(h))``, Granite's scaled residual, GPT-NeoX's parallel
``mlp(norm(h)) + attn + h``, Gemma2/3's and OLMo-2's second norm before the add...), and our
matchers run over it in a compile's order. Layers with the same structure (module classes,
parameter shapes and dtypes, scalars such as eps) are traced once, so an 8B config takes a few
seconds, most of it transformers building the meta model.

Attention (``gqa_decode``) is decided from the module and its config, not traced: tracing would
need a static cache, position embeddings and Dynamo's own code path in transformers' SDPA
integration (outside Dynamo it takes its eager ``pack_gqa`` path, which the compile never
sees). What the compile needs, and this checks: the module has ``num_key_value_groups > 1``
(else transformers' SDPA path makes no ``repeat_kv`` copies: multi-head attention is no
candidate), the model uses the ``sdpa`` attention implementation (eager attention has no SDPA op;
flash attention reads the key/value heads itself) and nothing made transformers call SDPA with
``enable_gqa``. The region then fuses in a decode graph (<= 16 query tokens) that passes a mask,
which a static cache always does; the variant name a compile reports starts with the SDPA backend
torch picks there (e.g. ``flash_attention_for_cpu_mask``), written here as ``mask``.

What it explains is an inference (no_grad) compile; training compiles fuse in the joint graph
(docs/training.md), which this does not trace: its regime lines say per memory mode whether a
family's training regions fuse on CUDA.
Regions it cannot see: a residual add that the model writes outside the decoder layer (e.g. after
a tensor-parallel all-reduce, where the compile fuses the region without its residual).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inductor_fusion import config as fusion_config
from inductor_fusion import registry
from inductor_fusion.config import FusionOptions, FusionPlan
from inductor_fusion.graph_paths import join_module_path

log = logging.getLogger("inductor_fusion")

# The norm -> MLP families, in the order a compile applies them (sorted names).
NORM_MLP_FAMILIES = ("layernorm_mlp", "mlp_postnorm", "rmsnorm_mlp")
ATTENTION_FAMILY = "gqa_decode"
# How a reason starts for a module listed for completeness that the family never matches (an
# attention without grouped key/value heads): it never fuses, whatever the toggles.
NOT_A_CANDIDATE = "not a candidate"
# Tokens of the traced activation [1, TRACE_TOKENS, hidden]; any count traces the same graph.
TRACE_TOKENS = 8
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
# The norm feeding the MLP, by the names models give it, most specific first.
_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm", "ln_2")
# A norm on the MLP's output, before the add: with no norm in front it is OLMo-2's form.
_POST_NORM_NAMES = ("post_feedforward_layernorm",)
# Layer attributes only the attention reads (Gemma3's layer_idx picks sliding or global
# attention): left out of a layer's structure, so that identical layers are traced once.
_ATTENTION_ONLY_ATTRIBUTES = ("layer_idx",)
# transformers' activation modules, by the names of our rows' activations (norm_mlp._ACTIVATIONS).
_ACTIVATION_CLASSES = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLUSquaredActivation": "relu2",
}


@dataclass(frozen=True)
class Candidate:
    """One region of a decoder layer a family could fuse, and whether a compile fuses it.

    ``modules`` are (role, module path) pairs in the family's role order (`registry`): norm and
    mlp, mlp alone (``mlp_postnorm``), or attention (``gqa_decode``)."""

    layer: str
    family: str
    modules: tuple[tuple[str, str], ...]
    fuses: bool
    variant: str | None = None  # the registered variant that matches, where one does
    reason: str | None = None  # one line, when it does not fuse

    def path(self, role: str) -> str | None:
        return dict(self.modules).get(role)

    @property
    def norm(self) -> str | None:
        return self.path("norm")

    @property
    def mlp(self) -> str | None:
        return self.path("mlp")

    @property
    def attention(self) -> str | None:
        return self.path("attention")

    @property
    def is_candidate(self) -> bool:
        """False for a module listed only to say why the family never matches it (MHA)."""
        return not (self.reason or "").startswith(NOT_A_CANDIDATE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "family": self.family,
            "modules": dict(self.modules),
            "fuses": self.fuses,
            "variant": self.variant,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        where = " -> ".join(_relative(path, self.layer) for _, path in self.modules)
        if self.fuses:
            return f"{self.layer}: {where}: fuses as {self.family}[{self.variant}]"
        if not self.is_candidate:
            return f"{self.layer}: {where}: {self.family} {self.reason}"
        return f"{self.layer}: {where}: {self.family} not fused: {self.reason}"


@dataclass(frozen=True)
class Regime:
    """What runs a family's fused region for a range of token counts on a device."""

    family: str
    device: str
    tokens: str
    runs: str


@dataclass(frozen=True)
class Explanation:
    model: str
    dtype: str
    hidden_size: int | None
    intermediate_size: int | None
    plan: str
    candidates: tuple[Candidate, ...]
    regimes: tuple[Regime, ...]

    @property
    def fused(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.fuses)

    def of(self, family: str) -> tuple[Candidate, ...]:
        """The candidates of one family, in model order."""
        return tuple(c for c in self.candidates if c.family == family)

    def to_dict(self) -> dict[str, Any]:
        """Every candidate has the same keys, whatever its family (`Candidate.to_dict`)."""
        return {
            "model": self.model,
            "dtype": self.dtype,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "plan": self.plan,
            "candidates": [c.to_dict() for c in self.candidates],
            "regimes": [dataclasses.asdict(r) for r in self.regimes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        sizes = f"hidden {self.hidden_size}, intermediate {self.intermediate_size}"
        lines = [
            f"inductor_fusion explain: {self.model} ({self.dtype}, {sizes})",
            f"plan: {self.plan}; inference graphs (training: see docs/training.md)",
        ]
        lines += [f"  {r.family}: {r.device}, {r.tokens} tokens: {r.runs}" for r in self.regimes]
        lines += [str(c) for c in self.candidates]
        candidates = [c for c in self.candidates if c.is_candidate]
        families = dict.fromkeys(c.family for c in candidates)
        per_family = ", ".join(
            f"{f} {sum(c.fuses for c in candidates if c.family == f)} of "
            f"{sum(c.family == f for c in candidates)}"
            for f in families
        )
        others = len(self.candidates) - len(candidates)
        lines.append(
            f"{len(self.fused)} of {len(candidates)} candidate region(s) fuse"
            + (f": {per_family}" if per_family else "")
            + (f"; {others} module(s) not a candidate" if others else "")
            if self.candidates
            else "no candidate region found (no decoder layer with an MLP or attention child)"
        )
        return "\n".join(lines)


def explain(
    model_or_config: Any,
    *,
    patterns: Sequence[str] | str | None = None,
    disable: Sequence[str] | str = (),
    kernel_config: Any = None,
    dtype: torch.dtype | None = None,
) -> Explanation:
    """Explains what ``torch.compile`` with our pass would fuse in a model, without compiling.

    ``model_or_config``: a model (its weights are never read; a meta-device model works) or a
    ``transformers`` config (built on the meta device, in ``dtype`` or the config's dtype).
    ``patterns``/``disable`` are the backend's (or install()'s) options; ``kernel_config`` a
    KernelConfig to resolve against the model as ``from_pretrained`` would. The environment's
    toggles and a KernelConfig plan already attached to the model apply as in a compile.
    """
    from inductor_fusion.kernel_config import fusion_config as as_fusion_config
    from inductor_fusion.model_plans import model_plan

    model = _as_model(model_or_config, dtype)
    attached = model_plan(model)
    if kernel_config is not None:
        attached = as_fusion_config(kernel_config).fusion_plan(model)
    plan = fusion_config.resolve_plan(
        options=FusionOptions(patterns=patterns, disable=disable), model_plan=attached
    )
    traced: dict[Any, _Traced] = {}
    candidates: list[Candidate] = []
    for layer_path, layer in find_layers(model):
        attention = _attention_candidate(model, layer_path, layer, plan)
        if attention is not None:
            candidates.append(attention)
        region = _norm_mlp_candidate(model, layer_path, layer, plan, traced)
        if region is not None:
            candidates.append(region)
    hidden, inter = _sizes(model)
    return Explanation(
        model=type(model).__name__,
        dtype=str(_dtype(model)),
        hidden_size=hidden,
        intermediate_size=inter,
        plan=_describe(plan),
        candidates=tuple(candidates),
        regimes=_regimes(_dtype(model), hidden, inter, candidates),
    )


# --- models and layers ---------------------------------------------------------------------------


def _as_model(model_or_config: Any, dtype: torch.dtype | None) -> torch.nn.Module:
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import PretrainedConfig

    if not isinstance(model_or_config, PretrainedConfig):
        raise TypeError(
            "inductor_fusion.explain: expected a model (nn.Module) or a transformers config, got "
            f"{type(model_or_config).__name__}"
        )
    return model_from_config(model_or_config, dtype)


def model_from_config(config: Any, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The config's model class (its ``architectures``, else the causal-LM class of its type),
    built on the meta device: no memory, no initialisation. In eval mode, as the inference
    compile we explain runs it (a training-mode dropout would sit inside the regions)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = [*(getattr(config, "architectures", None) or ())]
    names.append(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""))
    model_class = next(
        (getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None
    )
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        if model_class is None:
            model = transformers.AutoModel.from_config(config)
        else:
            model = model_class(config)
    return model.to(dtype).eval()


def find_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every decoder layer, in model order.

    Where the model class registers its MLPs (`register_fusable_modules`, name ``"MLP"``), their
    parents; otherwise every module with an MLP child (``mlp``, ``feed_forward``, ``ffn``) beside
    an attention child (``self_attn``, ``attention``...) or a norm feeding it.
    """
    import fnmatch

    from inductor_fusion.model_plans import fusable_modules

    modules = dict(model.named_modules())
    mlp_glob = fusable_modules(model).get("MLP")
    if mlp_glob is not None:
        parents = dict.fromkeys(
            path.rpartition(".")[0] for path in modules if fnmatch.fnmatchcase(path, mlp_glob)
        )
        return [(path, modules[path]) for path in parents if path in modules]
    found = []
    for path, module in modules.items():
        children = dict(module.named_children())
        if any(n in children for n in _MLP_NAMES) and any(
            n in children for n in (*_ATTENTION_NAMES, *_NORM_NAMES)
        ):
            found.append((path, module))
    return found


def _child(layer: torch.nn.Module, names: Sequence[str]) -> str | None:
    children = dict(layer.named_children())
    return next((n for n in names if n in children), None)


# --- attention: gqa_decode -----------------------------------------------------------------------


def _attention_candidate(
    model: torch.nn.Module, layer_path: str, layer: torch.nn.Module, plan: FusionPlan
) -> Candidate | None:
    """The layer's attention as a ``gqa_decode`` candidate, decided from the module and its
    config (see the module docstring for why it is not traced)."""
    name = _child(layer, _ATTENTION_NAMES)
    if name is None:
        return None
    attention = getattr(layer, name)
    path = join_module_path(layer_path, name)
    config = getattr(attention, "config", None) or getattr(model, "config", None)
    # transformers' sdpa_attention_forward repeats the key/value heads only for a module with
    # num_key_value_groups > 1; without the attribute (GPT-NeoX) it never does.
    n_rep = getattr(attention, "num_key_value_groups", 1)
    implementation = getattr(config, "_attn_implementation", None)
    variant, reason = None, None
    if not isinstance(n_rep, int) or n_rep <= 1:
        reason = (
            f"{NOT_A_CANDIDATE}: multi-head attention ({type(attention).__name__} has one "
            "key/value head per query head): transformers makes no repeat_kv copies to remove"
        )
    elif implementation != "sdpa":
        reason = _implementation_reason(implementation)
    elif os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":
        reason = (
            "already grouped: TRANSFORMERS_SDPA_FORCE_GQA=1 makes transformers call SDPA with "
            "enable_gqa, no repeat_kv copies"
        )
    else:
        variant = "mask"
        reason = _plan_reason(plan, ATTENTION_FAMILY, {"attention": path})
    return Candidate(
        layer=layer_path,
        family=ATTENTION_FAMILY,
        modules=(("attention", path),),
        fuses=reason is None,
        variant=variant,
        reason=reason,
    )


def _implementation_reason(implementation: str | None) -> str:
    if implementation == "eager":
        return (
            "eager attention (attn_implementation='eager'): matmul + softmax, no SDPA op to "
            "pack; load the model with attn_implementation='sdpa'"
        )
    if implementation is not None and "flash" in implementation:
        return (
            f"attn_implementation={implementation!r} reads the key/value heads itself: no "
            "repeat_kv copies to remove"
        )
    return (
        f"attn_implementation={implementation!r}: {ATTENTION_FAMILY} packs transformers' 'sdpa' "
        "path (its repeat_kv copies before a masked SDPA)"
    )


# --- norm -> MLP families ------------------------------------------------------------------------


def region_modules(
    model: torch.nn.Module, layer_path: str, layer: torch.nn.Module
) -> tuple[str, dict[str, str]] | None:
    """(the family the layer's norm -> MLP region belongs to, its role -> module path), or None.

    Where the model class registers the family's modules by name (``("RMSNorm", "MLP")``,
    ``("LayerNorm", "MLP")``, ``("MLP",)``: `fusion_entries.layer_names`), those decide; else the
    layer's children: an MLP with a post-norm and no norm in front is OLMo-2's form
    (``mlp_postnorm``), otherwise the sibling norm that feeds the MLP (``_NORM_NAMES``), a
    LayerNorm (it has a bias) for ``layernorm_mlp``, an RMSNorm for ``rmsnorm_mlp``.
    """
    import fnmatch

    from inductor_fusion.fusion_entries import layer_names
    from inductor_fusion.model_plans import fusable_modules

    registered = fusable_modules(model)
    children = {join_module_path(layer_path, n): n for n, _ in layer.named_children()}
    # Two-role families first: Llama registers "MLP" too, but its region has a norm.
    for family in ("rmsnorm_mlp", "layernorm_mlp", "mlp_postnorm"):
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
    mlp = _child(layer, _MLP_NAMES)
    if mlp is None:
        return None
    if _child(layer, _POST_NORM_NAMES) and not _child(layer, ("pre_feedforward_layernorm",)):
        return "mlp_postnorm", {"mlp": join_module_path(layer_path, mlp)}
    norm = _child(layer, _NORM_NAMES)
    if norm is None:
        return None
    layer_norm = getattr(getattr(layer, norm), "bias", None) is not None
    family = "layernorm_mlp" if layer_norm else "rmsnorm_mlp"
    return family, {
        "norm": join_module_path(layer_path, norm),
        "mlp": join_module_path(layer_path, mlp),
    }


@dataclass(frozen=True)
class _Traced:
    """What our matchers did with one traced layer: the family that fused its region and the
    variant, or the family and one-line reason of the first rejection, or neither."""

    family: str | None
    variant: str | None
    reason: str | None


def _norm_mlp_candidate(
    model: torch.nn.Module,
    layer_path: str,
    layer: torch.nn.Module,
    plan: FusionPlan,
    traced: dict[Any, _Traced],
) -> Candidate | None:
    found = region_modules(model, layer_path, layer)
    if found is None:
        return None
    family, paths = found
    attention = _child(layer, _ATTENTION_NAMES)
    key = (family, _structure(layer, attention))
    if key not in traced:
        traced[key] = _trace_layer(layer, attention, family)
    result = traced[key]
    # The family the matchers name wins over the structural guess (a model not registered).
    family = result.family or family
    roles = registry.get_family(family).roles
    modules = tuple((role, paths[role]) for role in roles if role in paths)
    if result.variant is not None:
        reason = _plan_reason(plan, family, dict(modules))
    elif result.reason is not None:
        reason = result.reason
    else:
        norm = model.get_submodule(paths["norm"]) if "norm" in paths else None
        reason = _no_match_reason(family, norm, model.get_submodule(paths["mlp"]))
    return Candidate(
        layer=layer_path,
        family=family,
        modules=modules,
        fuses=result.variant is not None and reason is None,
        variant=result.variant,
        reason=reason,
    )


def _structure(layer: torch.nn.Module, attention: str | None) -> Any:
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


def _trace_layer(layer: torch.nn.Module, attention: str | None, guess: str) -> _Traced:
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
        return _Traced(None, None, "no hidden size found (no linear projection in the MLP)")
    dtype = _dtype(layer)
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
        return _Traced(
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
    for family in dict.fromkeys((guess, *NORM_MLP_FAMILIES)):
        prepare = getattr(registry.pattern_module(family), "prepare_graph", None)
        if prepare is not None:
            prepare(gm.graph)
        run = PassRun(plan=FusionPlan(frozenset({family}), source="explain"))
        with running(run), _quiet(log):
            registry.matcher_pass(family).apply(gm.graph)
        if run.regions:
            return _Traced(family, run.regions[0].variant, None)
        if run.rejections:
            first = run.rejections[0]
            break
    if first is not None:
        return _Traced(
            first.family if first.family in NORM_MLP_FAMILIES else None, None, first.reason
        )
    return _Traced(None, None, None)


def _hidden_size(layer: torch.nn.Module) -> int | None:
    """The layer's hidden size: the input features of its MLP's first projection (a LoRA-wrapped
    linear has them too), else the config's."""
    mlp = _child(layer, _MLP_NAMES)
    for module in getattr(layer, mlp).modules() if mlp else ():
        features = getattr(module, "in_features", None)
        if isinstance(features, int):
            return features
    return getattr(getattr(layer, "config", None), "hidden_size", None)


def _no_match_reason(family: str, norm: torch.nn.Module | None, mlp: torch.nn.Module) -> str:
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
    rows = registry.pattern_module(family).SHAPES
    if sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) < 2:
        return f"{type(mlp).__name__} has no two nn.Linear projections: not an MLP {family} fuses"
    act = next(
        (m for n, m in mlp.named_children() if n in ("act_fn", "act", "activation_fn")), None
    )
    takes = sorted({row.activation for row in rows})
    if act is not None and _ACTIVATION_CLASSES.get(type(act).__name__) not in takes:
        return f"unsupported activation {type(act).__name__}: {family} fuses {', '.join(takes)}"
    weight = next((p for p in mlp.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
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


# --- plan and regimes ----------------------------------------------------------------------------


def _plan_reason(plan: FusionPlan, family: str, paths: Mapping[str, str]) -> str | None:
    if family not in plan.patterns:
        return f"{family} is switched off ({_source(plan)})"
    if not plan.allows(family, paths):
        return f"outside the places the plan allows ({_source(plan)})"
    return None


def _source(plan: FusionPlan) -> str:
    parts = {
        "default": "default",
        "env": f"{fusion_config.ENV_PATTERNS}",
        "options": "the patterns option",
        "kernel_config": "the model's KernelConfig",
        "options.disable": "the disable option",
        fusion_config.ENV_DISABLE: fusion_config.ENV_DISABLE,
    }
    return " + ".join(parts.get(part, part) for part in plan.source.split("+"))


def _describe(plan: FusionPlan) -> str:
    if not plan.patterns:
        return f"no pattern active ({_source(plan)})"
    names = ", ".join(sorted(plan.patterns))
    where = "where the KernelConfig says" if plan.scopes else "everywhere"
    return f"{names} {where} ({_source(plan)})"


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _sizes(model: torch.nn.Module) -> tuple[int | None, int | None]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)


def _regimes(
    dtype: torch.dtype, hidden: int | None, inter: int | None, candidates: Sequence[Candidate]
) -> tuple[Regime, ...]:
    """What runs each family that fuses somewhere, per device and token count."""
    from inductor_fusion.patterns.gqa_attention import MAX_QUERY_TOKENS
    from inductor_fusion.triton_kernels.launch_config import cuda_token_ranges
    from inductor_fusion.triton_kernels.region import supports

    fusing = dict.fromkeys(c.family for c in candidates if c.fuses)
    regimes: list[Regime] = []
    for family in fusing:
        if family == ATTENTION_FAMILY:
            regimes += [
                Regime(
                    family,
                    "any device",
                    f"1-{MAX_QUERY_TOKENS} query",
                    "SDPA on the key/value heads, query heads packed (decode with a mask, "
                    "e.g. a static cache)",
                ),
                Regime(
                    family,
                    "any device",
                    f"{MAX_QUERY_TOKENS + 1}+ query",
                    "left as transformers writes it (repeat_kv copies + SDPA)",
                ),
            ]
            continue
        # The norm -> MLP families share one op and its kernels.
        ranges = cuda_token_ranges(hidden or 0, inter or 0)
        other = Regime(family, "cpu and other devices", "any", "our op (the PyTorch reference)")
        reason = supports(dtype, "cuda", hidden or 0, inter or 0)
        if reason is None and not any(r.spec.gated for r in registry.pattern_module(family).SHAPES):
            # should_fuse refuses every non-gated MLP on CUDA.
            reason = "non-gated MLP (our kernels measured slower there)"
        if reason is None and not any(r.fused for r in ranges):
            reason = f"{hidden}x{inter} (our kernels measured slower at every token count)"
        if reason is not None:
            regimes += [Regime(family, "cuda", "any", f"left to Inductor: {reason}"), other]
            continue
        runs = {
            True: "our fused GEMV kernels",
            False: "left to Inductor (its GEMMs are faster there)",
        }
        regimes += [Regime(family, "cuda", str(r), runs[r.fused]) for r in ranges] + [other]
    return tuple(regimes) + tuple(_training_regimes(fusing))


def _training_regimes(families: Iterable[str]) -> list[Regime]:
    """How training compiles treat each norm -> MLP family on CUDA (per memory mode)."""
    from inductor_fusion.patterns import training

    out = []
    for family in families:
        if family == ATTENTION_FAMILY:
            continue
        forms = [r.name or "llama" for r in registry.pattern_module(family).SHAPES if r.training]
        if not forms:
            out.append(Regime(family, "any device", "training", "no training variant: unfused"))
            continue
        for mode in training.MEMORY_MODES:
            reason = training.cuda_reason(mode)
            runs = (
                f"memory={mode!r}: Inductor's kernels with our memory policy, for regions of "
                f"the {', '.join(forms)} form (other forms stay unfused; docs/training.md)"
                if reason is None
                else f"memory={mode!r}: left to Inductor: {reason}"
            )
            out.append(Regime(family, "cuda, training", "any", runs))
    return out


def _relative(path: str, layer: str) -> str:
    return path[len(layer) + 1 :] if layer and path.startswith(layer + ".") else path
