"""Fusion plans attached to models, and what they are resolved from.

- A plan travels with the model object (`attach_plan`); our backend, and a pass installed without
  a backend call, find it again for the graph being compiled (`find_model_plan`,
  `current_model_plan`), through the model's parameters or the module tree Dynamo traces.
- Where a model class keeps the modules our fusions span, by layer name
  (`register_fusable_modules`, `fusable_modules`): what a registry-form KernelConfig key resolves to.
- `resolve_entries`: the plan a model gets from our KernelConfig entries (`fusion_entries`).
"""

from __future__ import annotations

import fnmatch
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from inductor_fusion import catalogue, registry
from inductor_fusion.config import FusionPlan
from inductor_fusion.fusion_entries import FusionEntry, key_forms, layer_names

PLAN_ATTRIBUTE = "_inductor_fusion_plan"


# --- per-model plans -----------------------------------------------------------------------------

# A plan travels with the model object: `attach_plan` stores it on the model and indexes it by the
# model's parameters, because what a torch.compile backend receives is a graph and its example
# inputs; with Dynamo lifting parameters to graph inputs, those are the model's own tensors.
#
# id(parameter) -> (weak reference to it, plan). Keyed by id because tensors compare elementwise;
# the weak reference both checks the id was not recycled and drops the entry with the tensor.
_PLANS_BY_PARAM: dict[int, tuple[weakref.ref[torch.Tensor], FusionPlan]] = {}


def attach_plan(model: torch.nn.Module, plan: FusionPlan) -> None:
    """Makes ``plan`` the one our backend applies when it compiles ``model``."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    for param in model.parameters():
        key = id(param)
        _PLANS_BY_PARAM[key] = (
            weakref.ref(param, lambda _, key=key: _PLANS_BY_PARAM.pop(key, None)),
            plan,
        )


def model_plan(model: torch.nn.Module) -> FusionPlan | None:
    return getattr(model, PLAN_ATTRIBUTE, None)


def find_model_plan(example_inputs: Sequence[Any]) -> FusionPlan | None:
    """The plan of the model whose parameters feed this graph, if one was attached.

    First by parameter identity (cheap). Parameters do not survive what users do to models:
    ``copy.deepcopy``, ``load_state_dict(..., assign=True)``, ``.half()`` or ``.to()`` with
    ``set_overwrite_module_params_on_conversion(True)`` all install new tensors, while the plan
    attribute stays on (or is copied with) the module. So, failing that, the module tree the
    graph was captured from is searched (`_plan_from_dynamo_frame`).
    """
    for value in example_inputs:
        entry = _PLANS_BY_PARAM.get(id(value)) if isinstance(value, torch.Tensor) else None
        if entry is not None and entry[0]() is value:
            return entry[1]
    return _plan_from_dynamo_frame()


def _current_tx() -> Any:
    """Dynamo's tracer of the frame being compiled (a private API, present in torch 2.11 and 2.13),
    or None outside Dynamo."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None


def current_dynamo_graph() -> torch.fx.Graph | None:
    """The FX graph Dynamo is handing to its backend (None outside Dynamo): the graph of the
    GraphModule a backend receives, for a pass run without a backend call."""
    tx = _current_tx()
    return getattr(getattr(tx, "output", None), "graph", None)


def current_model_plan() -> FusionPlan | None:
    """`find_model_plan` for a pass run without a backend call (`inductor_fusion.install`): the
    graph inputs are those of the frame Dynamo is compiling (None outside Dynamo)."""
    tx = _current_tx()
    if tx is None:
        return None
    examples = []
    for arg in getattr(tx.output, "graphargs", ()):
        try:
            examples.append(arg.example)
        except Exception:  # an expired weak reference: that input cannot carry a plan
            continue
    return find_model_plan(examples)


def _plan_from_dynamo_frame() -> FusionPlan | None:
    """The plan attached to a module that the graph Dynamo is compiling reads from.

    A backend runs while Dynamo's tracer of the frame is still current; each graph input has a
    source (``L['self']._modules['model']..._parameters['weight']``, ``G['m']...``) that Dynamo's
    guards evaluate against the frame's locals ``L`` and globals ``G``. We evaluate the sources'
    prefixes the same way, outermost first, and return the plan of the first module carrying one.
    """
    tx = _current_tx()
    if tx is None:
        return None
    scope = {"L": tx.f_locals, "G": tx.f_globals}
    seen: set[str] = set()
    for arg in getattr(tx.output, "graphargs", ()):
        chain = []
        source = getattr(arg, "source", None)
        while source is not None:
            chain.append(source)
            source = getattr(source, "base", None)
        for source in reversed(chain):  # the root first
            name = source.name() if callable(source.name) else source.name
            if name in seen:
                continue
            seen.add(name)
            try:
                value = eval(name, {"__builtins__": {}}, scope)  # a guard expression, as Dynamo's
            except Exception:
                break
            plan = model_plan(value) if isinstance(value, torch.nn.Module) else None
            if plan is not None:
                return plan
    return None


# --- where model classes keep their fusable modules ----------------------------------------------

# Registered by users, per class. Weak keys: a class defined and dropped (e.g. in a test) goes.
_FUSABLE: weakref.WeakKeyDictionary[type, dict[str, str]] = weakref.WeakKeyDictionary()


def register_fusable_modules(model_class: type, modules: Mapping[str, str]) -> None:
    """Declares, by name, where ``model_class`` keeps modules our fusions span.

    ``modules`` maps a layer name to a glob over module paths of an instance, e.g.
    ``register_fusable_modules(MyForCausalLM, {"RMSNorm": "model.layers.*.post_attention_layernorm",
    "MLP": "model.layers.*.mlp"})``; a KernelConfig key ``("RMSNorm", "MLP")`` then resolves to those
    globs for this class and its subclasses. Later calls override names given earlier.
    """
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        raise TypeError(
            f"register_fusable_modules: expected an nn.Module subclass, got {model_class!r}"
        )
    if not isinstance(modules, Mapping) or not modules:
        raise TypeError(
            "register_fusable_modules: expected a non-empty mapping of layer name -> module glob, "
            f"got {modules!r}"
        )
    known = sorted({n for p in registry.pattern_names() for n in layer_names(p)})
    for name, glob in modules.items():
        if not isinstance(name, str) or not name or not isinstance(glob, str) or not glob:
            raise ValueError(
                f"register_fusable_modules({model_class.__name__}): entry {name!r}: {glob!r} must "
                "map a non-empty layer name to a non-empty module glob"
            )
        # KernelConfig keys name only these: any other name could never be looked up.
        if name not in known:
            raise ValueError(
                f"register_fusable_modules({model_class.__name__}): unknown layer name {name!r}; "
                f"KernelConfig keys use {', '.join(known)}"
            )
    _FUSABLE.setdefault(model_class, {}).update(modules)


def _registered_for_class(model_class: type) -> dict[str, str]:
    # The catalogue's rows name base models by dotted name, so that nothing imports transformers'
    # model modules for them; a head class inherits them under its base_model_prefix.
    shipped = catalogue.default_fusable()
    found: dict[str, str] = {}
    for klass in reversed(model_class.__mro__):  # subclasses override their bases
        found.update(shipped.get(f"{klass.__module__}.{klass.__qualname__}", {}))
        found.update(_FUSABLE.get(klass, {}))
    return found


def fusable_modules(model: torch.nn.Module) -> dict[str, str]:
    """Layer name -> module glob registered for ``model``: its class's registrations, over those of
    its base model (transformers' ``base_model_prefix`` submodule) with the prefix prepended."""
    found: dict[str, str] = {}
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if isinstance(base, torch.nn.Module) and base is not model:
        for name, glob in _registered_for_class(type(base)).items():
            found[name] = f"{prefix}.{glob}"
    found.update(_registered_for_class(type(model)))
    return found


# --- resolution against a built model -------------------------------------------------------------


def registered_globs(model: torch.nn.Module, entry: FusionEntry) -> tuple[str, ...]:
    """The globs ``model``'s class registers for a registry-form entry's names, in role order."""
    found = fusable_modules(model)
    missing = [name for name in entry.names if name not in found]
    if missing:
        cls = type(model).__name__
        example = ", ".join(f"{name!r}: '<glob>'" for name in entry.names)
        raise ValueError(
            f"{entry.describe()}: {cls} registers no fusable module named "
            f"{', '.join(map(repr, missing))} (registered: {', '.join(sorted(found)) or 'none'}); "
            f"register them with inductor_fusion.register_fusable_modules({cls}, {{{example}}}) "
            f"or write the paths in the key: {key_forms(entry.pattern)}"
        )
    return tuple(found[name] for name in entry.names)


def resolve_entries(model: torch.nn.Module, entries: Iterable[FusionEntry]) -> FusionPlan | None:
    """The plan our entries give ``model`` (None without entries). Warns for a glob that matches
    no module of the model; raises ValueError for registry names the model class lacks."""
    entries = tuple(entries)
    if not entries:
        return None
    enabled = [entry for entry in entries if entry.enabled]
    if not enabled:
        off = {entry.pattern for entry in entries}
        return FusionPlan(frozenset(registry.pattern_names()) - off, source="kernel_config")
    paths = [name for name, _ in model.named_modules()]
    scopes: dict[str, list[tuple[str, ...]]] = {}
    for entry in enabled:
        globs = entry.globs if entry.globs is not None else registered_globs(model, entry)
        for name, glob in zip(entry.names, globs, strict=True):
            if not any(fnmatch.fnmatchcase(path, glob) for path in paths):
                warnings.warn(
                    f"{entry.describe()}: {name} glob {glob!r} matches no module of "
                    f"{type(model).__name__}; {entry.pattern} will not fuse there",
                    UserWarning,
                    stacklevel=3,
                )
        _warn_unpaired(model, entry, globs)
        scopes.setdefault(entry.pattern, [])
        if globs not in scopes[entry.pattern]:
            scopes[entry.pattern].append(globs)
    return FusionPlan(
        frozenset(scopes),
        scopes={name: tuple(globs) for name, globs in scopes.items()},
        source="kernel_config",
        modes={entry.pattern: entry.memory for entry in enabled},
    )


def _is_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return not any(True for _ in module.children()) and getattr(weight, "dim", lambda: 0)() == 1


def _is_mlp(module: torch.nn.Module) -> bool:
    return sum(isinstance(m, torch.nn.Linear) for m in module.modules()) >= 2


def _warn_unpaired(model: torch.nn.Module, entry: FusionEntry, globs: tuple[str, ...]) -> None:
    """Warns when an entry's globs each match modules but no norm and MLP ever meet: a region is
    a norm and the MLP it feeds, siblings in one block (``layers.0.post_attention_layernorm`` with
    ``layers.0.mlp``). Globs that pair only across blocks, or name the roles the other way round,
    would silently fuse nothing."""
    if len(globs) != 2:
        return  # an MLP alone pairs with nothing
    (norm_name, _), (norm_glob, mlp_glob) = entry.names, globs
    modules = dict(model.named_modules())
    norms = [p for p, m in modules.items() if fnmatch.fnmatchcase(p, norm_glob)]
    mlps = [p for p, m in modules.items() if fnmatch.fnmatchcase(p, mlp_glob)]
    if not norms or not mlps:
        return  # already warned: a glob matching nothing
    parents = {n.rpartition(".")[0] for n in norms if _is_norm(modules[n])}
    if any(m.rpartition(".")[0] in parents and _is_mlp(modules[m]) for m in mlps):
        return
    swapped = any(_is_mlp(modules[n]) for n in norms) or any(_is_norm(modules[m]) for m in mlps)
    why = (
        f"the {norm_name} glob matches MLP modules or the MLP glob matches norms (roles swapped?)"
        if swapped
        else "no matched norm sits in the same block as a matched MLP"
    )
    warnings.warn(
        f"{entry.describe()}: {norm_name} glob {norm_glob!r} and MLP glob {mlp_glob!r} never pair "
        f"in {type(model).__name__}: {why}; {entry.pattern} will fuse nothing there",
        UserWarning,
        stacklevel=4,
    )
