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

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inductor_fusion import catalogue, layer_trace, registry
from inductor_fusion.config import (
    ENV_DISABLE,
    ENV_PATTERNS,
    FusionOptions,
    FusionPlan,
    resolve_plan,
)
from inductor_fusion.graph_paths import join_module_path

ATTENTION_FAMILY = "gqa_decode"
# How a reason starts for a module listed for completeness that the family never matches (an
# attention without grouped key/value heads): it never fuses, whatever the toggles.
NOT_A_CANDIDATE = "not a candidate"


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
    from inductor_fusion.kernel_config import fusion_config
    from inductor_fusion.model_plans import model_plan

    model = _as_model(model_or_config, dtype)
    attached = model_plan(model)
    if kernel_config is not None:
        attached = fusion_config(kernel_config).fusion_plan(model)
    plan = resolve_plan(
        options=FusionOptions(patterns=patterns, disable=disable), model_plan=attached
    )
    traced: dict[Any, layer_trace.Traced] = {}
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
        dtype=str(layer_trace.first_dtype(model)),
        hidden_size=hidden,
        intermediate_size=inter,
        plan=_describe(plan),
        candidates=tuple(candidates),
        regimes=_regimes(layer_trace.first_dtype(model), hidden, inter, candidates),
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
        if any(n in children for n in catalogue.MLP_CHILD_NAMES) and any(
            n in children for n in (*catalogue.ATTENTION_CHILD_NAMES, *catalogue.NORM_CHILD_NAMES)
        ):
            found.append((path, module))
    return found


# --- attention: gqa_decode -----------------------------------------------------------------------


def _attention_candidate(
    model: torch.nn.Module, layer_path: str, layer: torch.nn.Module, plan: FusionPlan
) -> Candidate | None:
    """The layer's attention as a ``gqa_decode`` candidate, decided from the module and its
    config (see the module docstring for why it is not traced)."""
    name = layer_trace.child_name(layer, catalogue.ATTENTION_CHILD_NAMES)
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


def _norm_mlp_candidate(
    model: torch.nn.Module,
    layer_path: str,
    layer: torch.nn.Module,
    plan: FusionPlan,
    traced: dict[Any, layer_trace.Traced],
) -> Candidate | None:
    found = layer_trace.region_modules(model, layer_path, layer)
    if found is None:
        return None
    family, paths = found
    attention = layer_trace.child_name(layer, catalogue.ATTENTION_CHILD_NAMES)
    key = (family, layer_trace.layer_structure(layer, attention))
    if key not in traced:
        traced[key] = layer_trace.trace_layer(layer, attention, family)
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
        reason = layer_trace.no_match_reason(family, norm, model.get_submodule(paths["mlp"]))
    return Candidate(
        layer=layer_path,
        family=family,
        modules=modules,
        fuses=result.variant is not None and reason is None,
        variant=result.variant,
        reason=reason,
    )


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
        "env": ENV_PATTERNS,
        "options": "the patterns option",
        "kernel_config": "the model's KernelConfig",
        "options.disable": "the disable option",
        ENV_DISABLE: ENV_DISABLE,
    }
    return " + ".join(parts.get(part, part) for part in plan.source.split("+"))


def _describe(plan: FusionPlan) -> str:
    if not plan.patterns:
        return f"no pattern active ({_source(plan)})"
    names = ", ".join(sorted(plan.patterns))
    where = "where the KernelConfig says" if plan.scopes else "everywhere"
    return f"{names} {where} ({_source(plan)})"


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
        if reason is None and not any(r.spec.gated for r in registry.pattern_module(family).FORMS):
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
        forms = [r.name or "llama" for r in registry.pattern_module(family).FORMS if r.training]
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
