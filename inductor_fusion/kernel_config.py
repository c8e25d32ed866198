"""KernelConfig for our fusions: which ones a model gets, and where, chosen at ``from_pretrained``.

Hugging Face users describe n-to-1 kernel fusion with ``transformers.KernelConfig``; the same
syntax selects our compile-time fusions when the value names one of our patterns::

    from inductor_fusion import KernelConfig

    # Inline form: a tuple of (layer name, module glob) pairs.
    cfg = KernelConfig({
        (("RMSNorm", "model.layers.*.post_attention_layernorm"), ("MLP", "model.layers.*.mlp")):
            "inductor_fusion:rmsnorm_mlp",
    })
    # Registry form: the names only; the model class declares where those modules live
    # (`register_fusable_modules`; Llama, Mistral, Qwen2 and Qwen3 come registered).
    cfg = KernelConfig({("RMSNorm", "MLP"): "inductor_fusion:rmsnorm_mlp"})

    model = AutoModelForCausalLM.from_pretrained(path, kernel_config=cfg)
    model = torch.compile(model, backend="inductor_fusion")

Values of our entries:

- ``"inductor_fusion:<pattern>"`` turns ``<pattern>`` on at the key's modules (several entries for
  one pattern add up). A config that turns any pattern on selects exactly those patterns, at
  exactly those places, for this model.
- ``"inductor_fusion:<pattern>:off"`` switches ``<pattern>`` off for this model; the key is
  checked but its paths are not used. A config with only ``:off`` entries keeps every other
  pattern on, everywhere.
- ``"inductor_fusion:<pattern>:eager"`` (``rmsnorm_mlp``, ``layernorm_mlp``, ``mlp_postnorm``)
  also swaps our eager fused layer in at the key's modules when the config is applied
  (`apply_eager_layers`, `inductor_fusion.layers`), so the region runs as our op without
  torch.compile; for the compile plan it counts as ``"inductor_fusion:<pattern>"``.

Key names are the pattern's layer names (`KERNEL_LAYER_NAMES`; ``rmsnorm_mlp``: ``"RMSNorm"`` for
the norm, ``"MLP"`` for the MLP), in any order. Globs are ``fnmatch`` patterns over module paths
relative to the loaded model (``*`` also crosses dots: ``model.layers.1*`` is layers 1 and 10-19);
compile that model, not a submodule, or the paths will not line up.

Every other entry is transformers': it keeps its upstream meaning and reaches transformers
untouched. The resolved plan travels with the model (`attach_plan`); our backend looks it up when
it compiles. Per `inductor_fusion.config.resolve_plan`, it beats ``INDUCTOR_FUSION_PATTERNS``,
and loses to backend options and to ``INDUCTOR_FUSION_DISABLE``.

How this hooks into ``from_pretrained`` (transformers 5.17 to 5.24). Given ``kernel_config``,
``from_pretrained`` turns ``use_kernels`` on, hands ``kernel_config.kernel_mapping`` to the hub
loader before the model is built (``register_kernel_replacements_and_fusions``), then calls
``model.set_use_kernels(True, kernel_config)`` on the loaded model, which requires ``kernels`` in a
narrow version range, sanitizes the mapping and kernelizes. Our `KernelConfig` is a
``transformers.KernelConfig`` whose ``kernel_mapping`` holds only transformers' entries, so ours
never reach the loader; ours are kept aside and applied to the built model in
``set_use_kernels``. That last step needs one wrapper around ``PreTrainedModel.set_use_kernels``
(see `_install_load_hook` for why no method of the config object can do it).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import inspect
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from inductor_fusion import registry
from inductor_fusion.config import FusionPlan

if TYPE_CHECKING:
    from transformers import KernelConfig as _HFKernelConfig

log = logging.getLogger("inductor_fusion")

PLAN_ATTRIBUTE = "_inductor_fusion_plan"
FUSION_PREFIX = "inductor_fusion"
OFF = "off"
EAGER = "eager"
# Training regions save only the input and its row statistic, and recompute the rest in the
# backward (config.MEMORY_MODES); the family fuses as it would without it.
RECOMPUTE = "recompute"
# Patterns with an eager layer (`inductor_fusion.layers`) that ":eager" entries swap in, and the
# norm kind (`RegionSpec.norm`) of the modules each may swap: an entry fuses in eager mode what
# the same entry would fuse under torch.compile, never another family's region.
_EAGER_NORM = {"rmsnorm_mlp": "rms", "layernorm_mlp": "layer", "mlp_postnorm": "none"}
EAGER_PATTERNS = tuple(_EAGER_NORM)

# The names KernelConfig keys use for each pattern's modules, aligned with the family's roles
# (registry.PatternFamily.roles). They follow transformers' kernel layer names. A family missing
# here is keyed by its role names.
KERNEL_LAYER_NAMES: Mapping[str, tuple[str, ...]] = {
    "rmsnorm_mlp": ("RMSNorm", "MLP"),
    "layernorm_mlp": ("LayerNorm", "MLP"),
    "mlp_postnorm": ("MLP",),
    "gqa_decode": ("Attention",),
}


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

# Shipped defaults, keyed by the class's dotted name so that nothing imports transformers' model
# modules for them. Registered on the base models; a head class (…ForCausalLM, …ForQuestionAnswering)
# inherits them under its base_model_prefix (see `fusable_modules`).
_DEFAULT_FUSABLE: dict[str, dict[str, str]] = (
    {
        f"transformers.models.{module}.modeling_{module}.{prefix}Model": {
            "RMSNorm": "layers.*.post_attention_layernorm",
            "MLP": "layers.*.mlp",
        }
        for module, prefix in (
            ("llama", "Llama"),
            ("mistral", "Mistral"),
            ("qwen2", "Qwen2"),
            ("qwen3", "Qwen3"),
            ("gemma", "Gemma"),
            ("phi3", "Phi3"),
            ("granite", "Granite"),
        )
    }
    | {
        # A second norm follows their MLP; the region fused is the pre-feedforward norm -> MLP.
        f"transformers.models.{module}.modeling_{module}.{prefix}": {
            "RMSNorm": "layers.*.pre_feedforward_layernorm",
            "MLP": "layers.*.mlp",
        }
        for module, prefix in (("gemma2", "Gemma2Model"), ("gemma3", "Gemma3TextModel"))
    }
    | {
        f"transformers.models.{module}.modeling_{module}.{prefix}Model": {
            "LayerNorm": "layers.*.post_attention_layernorm",
            "MLP": "layers.*.mlp",
        }
        for module, prefix in (
            ("gpt_neox", "GPTNeoX"),
            ("starcoder2", "Starcoder2"),
            ("nemotron", "Nemotron"),
        )
    }
    | {"transformers.models.olmo2.modeling_olmo2.Olmo2Model": {"MLP": "layers.*.mlp"}}
)


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
    found: dict[str, str] = {}
    for klass in reversed(model_class.__mro__):  # subclasses override their bases
        found.update(_DEFAULT_FUSABLE.get(f"{klass.__module__}.{klass.__qualname__}", {}))
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


# --- parsing entries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionEntry:
    """One KernelConfig entry of ours, normalised (names and globs in the family's role order)."""

    pattern: str
    enabled: bool
    names: tuple[str, ...]
    globs: tuple[str, ...] | None  # None: registry form, resolved against the model class
    key: Any  # as written, for messages
    value: str
    eager: bool = False  # ":eager": also swap the eager fused layer in at from_pretrained

    @property
    def memory(self) -> str:
        """The memory mode of the entry's training regions (":recompute" or "default")."""
        return RECOMPUTE if self.value.rpartition(":")[2] == RECOMPUTE else "default"

    def describe(self) -> str:
        return f"KernelConfig entry {self.key!r}: {self.value!r}"


def layer_names(pattern: str) -> tuple[str, ...]:
    """The names a KernelConfig key uses for ``pattern``'s modules, in role order."""
    return KERNEL_LAYER_NAMES.get(pattern, registry.get_family(pattern).roles)


def _forms(pattern: str) -> str:
    names = layer_names(pattern)
    pairs = ", ".join(f"({name!r}, '<glob>')" for name in names)
    return f"{names!r} (paths registered for the model class) or ({pairs})"


def _is_ours(text: str) -> bool:
    head = text.partition(":")[0].strip().lower().replace("-", "_")
    return head == FUSION_PREFIX


def _mentions_ours(value: Any) -> bool:
    if isinstance(value, str):
        return _is_ours(value)
    if isinstance(value, Mapping):
        return any(_mentions_ours(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_mentions_ours(v) for v in value)
    return False


def _parse_value(key: Any, value: Any) -> tuple[str, bool, bool] | None:
    """(pattern, enabled, eager) for a value of ours, None for transformers' values."""
    if value is None or isinstance(value, (bool, int, float)):
        # No kernel mapping takes a number: transformers would fail on it much later.
        raise TypeError(
            f"KernelConfig entry {key!r}: {value!r}: expected a string value such as "
            f"'{FUSION_PREFIX}:<pattern>' (or transformers' 'org/repo:layer')"
        )
    if isinstance(value, str) and not _is_ours(value):
        bare = value.partition(":")[0].strip()
        if bare in registry.FAMILIES:  # our pattern name without our prefix
            raise ValueError(
                f"KernelConfig entry {key!r}: {value!r}: our entries are prefixed: did you mean "
                f"'{FUSION_PREFIX}:{value.strip()}'?"
            )
    if not isinstance(value, str):
        if _mentions_ours(value):
            raise TypeError(
                f"KernelConfig entry {key!r}: {value!r}: our entries take one string value, "
                f"'{FUSION_PREFIX}:<pattern>' or '{FUSION_PREFIX}:<pattern>:{OFF}'; per-device "
                "dicts and metadata tuples are for hub kernels (our patterns check the device "
                "when they compile)"
            )
        return None
    if not _is_ours(value):
        return None
    valid = ", ".join(registry.pattern_names())
    head, _, rest = value.partition(":")
    name, _, state = rest.partition(":")
    if head != FUSION_PREFIX or not name or state not in ("", OFF, EAGER, RECOMPUTE):
        raise ValueError(
            f"KernelConfig entry {key!r}: {value!r}: expected '{FUSION_PREFIX}:<pattern>', "
            f"'{FUSION_PREFIX}:<pattern>:{OFF}', '{FUSION_PREFIX}:<pattern>:{EAGER}' or "
            f"'{FUSION_PREFIX}:<pattern>:{RECOMPUTE}' with <pattern> one of: {valid}"
        )
    if name not in registry.FAMILIES:
        raise ValueError(
            f"KernelConfig entry {key!r}: {value!r}: unknown inductor_fusion pattern {name!r}; "
            f"valid names: {valid}"
        )
    if state == EAGER and name not in EAGER_PATTERNS:
        raise ValueError(
            f"KernelConfig entry {key!r}: {value!r}: {name} has no eager layer; ':{EAGER}' is "
            f"available for: {', '.join(EAGER_PATTERNS)}"
        )
    return name, state != OFF, state == EAGER


def _parse_key(
    key: Any, pattern: str, value: str
) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(names, globs) in role order; globs None for the registry form."""
    where = f"KernelConfig entry {key!r}: {value!r}"
    if not isinstance(key, tuple) or not key:
        raise ValueError(
            f"{where}: {pattern} spans {len(layer_names(pattern))} modules, so its key is a tuple "
            f"naming them: {_forms(pattern)}"
        )
    if (
        len(layer_names(pattern)) == 1
        and len(key) == 2
        and all(isinstance(item, str) for item in key)
        and key[0] in layer_names(pattern)
    ):
        # ("Attention", "model.layers.*.self_attn"): one (name, glob) pair written without the
        # tuple around it, as a single-module family's key naturally is.
        names, globs = [key[0]], [key[1]]
    elif all(isinstance(item, str) for item in key):
        names, globs = list(key), None
    elif all(
        isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)
        for item in key
    ):
        names, globs = [item[0] for item in key], [item[1] for item in key]
        if not all(globs):
            raise ValueError(f"{where}: empty module glob; expected {_forms(pattern)}")
    else:
        raise ValueError(
            f"{where}: a key is a tuple of layer names or of (layer name, module glob) pairs: "
            f"{_forms(pattern)}"
        )
    valid = layer_names(pattern)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            f"{where}: {pattern} has no module named {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(valid)}"
        )
    if len(names) != len(set(names)) or len(names) != len(valid):
        raise ValueError(
            f"{where}: name each of {pattern}'s modules {valid} exactly once; "
            f"expected {_forms(pattern)}"
        )
    order = [names.index(name) for name in valid]
    return valid, None if globs is None else tuple(globs[i] for i in order)


def split_kernel_mapping(
    mapping: Mapping[Any, Any],
) -> tuple[dict[Any, Any], tuple[FusionEntry, ...]]:
    """Separates transformers' entries (deep-copied, in order) from ours (parsed, validated).

    Raises ValueError/TypeError naming the entry for anything of ours that is malformed.
    ``mapping`` is not modified.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"KernelConfig mapping must be a dict, got {type(mapping).__name__}")
    hub: dict[Any, Any] = {}
    ours: list[FusionEntry] = []
    for key, value in mapping.items():
        parsed = _parse_value(key, value)
        if parsed is None:
            hub[key] = copy.deepcopy(value)
            continue
        pattern, enabled, eager = parsed
        names, globs = _parse_key(key, pattern, value)
        ours.append(FusionEntry(pattern, enabled, names, globs, key, value, eager))
    for pattern in sorted({entry.pattern for entry in ours}):
        states = {entry.enabled: entry for entry in ours if entry.pattern == pattern}
        if len(states) == 2:
            raise ValueError(
                f"{states[True].describe()} and {states[False].describe()} turn {pattern} both on "
                "and off; keep one"
            )
        modes = {entry.memory: entry for entry in ours if entry.pattern == pattern}
        if len(modes) == 2:  # a memory mode is the model's, per family
            raise ValueError(
                f"{modes[RECOMPUTE].describe()} and {modes['default'].describe()} give "
                f"{pattern}'s training regions two memory modes; keep one"
            )
    return hub, tuple(ours)


# --- resolution against a built model -------------------------------------------------------------


def _registered_globs(model: torch.nn.Module, entry: FusionEntry) -> tuple[str, ...]:
    found = fusable_modules(model)
    missing = [name for name in entry.names if name not in found]
    if missing:
        cls = type(model).__name__
        example = ", ".join(f"{name!r}: '<glob>'" for name in entry.names)
        raise ValueError(
            f"{entry.describe()}: {cls} registers no fusable module named "
            f"{', '.join(map(repr, missing))} (registered: {', '.join(sorted(found)) or 'none'}); "
            f"register them with inductor_fusion.register_fusable_modules({cls}, {{{example}}}) "
            f"or write the paths in the key: {_forms(entry.pattern)}"
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
        globs = entry.globs if entry.globs is not None else _registered_globs(model, entry)
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
    if entry.pattern != "rmsnorm_mlp":
        return
    norm_glob, mlp_glob = globs
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
        "the RMSNorm glob matches MLP modules or the MLP glob matches norms (roles swapped?)"
        if swapped
        else "no matched norm sits in the same block as a matched MLP"
    )
    warnings.warn(
        f"{entry.describe()}: RMSNorm glob {norm_glob!r} and MLP glob {mlp_glob!r} never pair "
        f"in {type(model).__name__}: {why}; {entry.pattern} will fuse nothing there",
        UserWarning,
        stacklevel=4,
    )


def _eager_pairs(
    model: torch.nn.Module, entries: Iterable[FusionEntry]
) -> list[tuple[str, str, str, FusionEntry]]:
    """(parent path, norm name, MLP name, entry) for each region the ":eager" entries fuse: a
    module the norm glob matches and its one sibling the MLP glob matches (norm name None for an
    MLP alone). Raises ValueError when a pairing is ambiguous (a norm with two matched sibling
    MLPs, an MLP claimed by two norms)."""
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[str, str | None, str, FusionEntry]] = {}  # MLP path -> pair
    for entry in entries:
        if not entry.eager:
            continue
        globs = entry.globs if entry.globs is not None else _registered_globs(model, entry)
        if len(globs) == 1:  # the MLP alone (mlp_postnorm): no norm to pair
            for path in modules:
                if path and fnmatch.fnmatchcase(path, globs[0]):
                    parent, _, name = path.rpartition(".")
                    pairs[path] = (parent, None, name, entry)
            continue
        norm_glob, mlp_glob = globs
        mlps = [path for path in modules if path and fnmatch.fnmatchcase(path, mlp_glob)]
        for norm_path in modules:
            if not norm_path or not fnmatch.fnmatchcase(norm_path, norm_glob):
                continue
            parent, _, norm_name = norm_path.rpartition(".")
            siblings = [m for m in mlps if m.rpartition(".")[0] == parent and m != norm_path]
            if len(siblings) > 1:
                raise ValueError(
                    f"{entry.describe()}: the norm {norm_path} has several sibling modules "
                    f"matching the MLP glob {mlp_glob!r} ({', '.join(siblings)}); an eager "
                    "region is one norm and the one MLP it feeds"
                )
            if not siblings:
                continue
            mlp_path = siblings[0]
            other = pairs.get(mlp_path)
            if other is not None and other[1] != norm_name:
                raise ValueError(
                    f"{entry.describe()}: the MLP {mlp_path} pairs with both "
                    f"{_join(parent, other[1])} and {norm_path}; narrow the RMSNorm glob "
                    f"{norm_glob!r} to the norm that feeds the MLP"
                )
            pairs[mlp_path] = (parent, norm_name, mlp_path.rpartition(".")[2], entry)
    return list(pairs.values())


def _eager_pattern_for(norm: str) -> str:
    return next(name for name, kind in _EAGER_NORM.items() if kind == norm)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def apply_eager_layers(model: torch.nn.Module, entries: Iterable[FusionEntry]) -> list[str]:
    """Swaps the eager fused layer in where ":eager" entries say (`inductor_fusion.layers`);
    returns the norm paths fused now. Checks every pair before changing any module, so a bad
    module leaves the model as it was; pairs already fused are left alone."""
    from inductor_fusion import layers

    pairs = _eager_pairs(model, entries)
    if not pairs:
        return []
    fused = []
    plan = []
    for parent_path, norm_name, mlp_name, entry in pairs:
        parent = model.get_submodule(parent_path)
        mlp = getattr(parent, mlp_name)
        if norm_name is None:
            if isinstance(mlp, (layers.NormMLP, layers.FusedAway)):
                continue  # fused already, alone or with its norm
            where = _join(parent_path, mlp_name)
            layers.region_spec(None, mlp, where=where)  # raises before any swap
            plan.append((parent, None, mlp_name, where))
            continue
        norm = getattr(parent, norm_name)
        if isinstance(norm, layers.NormMLP) or isinstance(mlp, layers.FusedAway):
            continue
        where = f"{_join(parent_path, norm_name)} -> {_join(parent_path, mlp_name)}"
        # Raises, naming the module, before any swap.
        spec, _ = layers.region_spec(norm, mlp, where=where)
        if spec.norm != _EAGER_NORM[entry.pattern]:
            raise layers.EagerFusionError(
                f"{entry.describe()}: the norm at {where} is a {type(norm).__name__}, which "
                f"{entry.pattern} does not fuse; "
                f"use '{FUSION_PREFIX}:{_eager_pattern_for(spec.norm)}:{EAGER}'"
            )
        plan.append((parent, norm_name, mlp_name, where))
    for parent, norm_name, mlp_name, where in plan:
        if norm_name is None:
            layers.fuse_mlp(parent, mlp_name, where=where)
        else:
            layers.fuse_norm_mlp(parent, norm_name, mlp_name, where=where)
        fused.append(where)
    return fused


def _describe_plan(plan: FusionPlan) -> str:
    if not plan.scopes:
        return f"patterns {sorted(plan.patterns)} everywhere"
    parts = []
    for name, scope in plan.scopes.items():
        roles = registry.get_family(name).roles
        where = "; ".join(
            ", ".join(f"{role}={glob}" for role, glob in zip(roles, globs, strict=True))
            for globs in scope
        )
        parts.append(f"{name} at {where}")
    return "; ".join(parts)


def apply_kernel_config(model: torch.nn.Module, kernel_config: Any) -> FusionPlan | None:
    """Resolves the entries of ours in ``kernel_config`` against ``model`` and attaches the plan.

    ``from_pretrained(..., kernel_config=...)`` calls this for you; call it yourself for a model
    built otherwise. Accepts our `KernelConfig`, a ``transformers.KernelConfig`` or a dict; only our
    entries matter here. Returns the plan, or None if the config holds none of ours.
    """
    if not isinstance(model, torch.nn.Module):
        # Arguments swapped, or a checkpoint name: fail here, not in named_modules() below.
        raise TypeError(
            "inductor_fusion.apply_kernel_config(model, kernel_config): model must be a "
            f"torch.nn.Module, got {type(model).__name__} {model!r:.80}"
        )
    entries = _as_fusion_config(kernel_config).fusion_entries
    plan = resolve_entries(model, entries)
    if plan is None:
        return None
    # The compile plan keeps the eager entries' places: under torch.compile the swapped layers
    # are one op call already (nothing there matches a pattern, so nothing fuses twice) and no
    # other place gets fused behind the config's back.
    eager = apply_eager_layers(model, entries)
    attach_plan(model, plan)
    if eager:
        log.info(
            "inductor_fusion: KernelConfig gives %s %s; eager fused layers swapped in at %s",
            type(model).__name__,
            _describe_plan(plan),
            "; ".join(eager),
        )
    else:
        log.info(
            "inductor_fusion: KernelConfig gives %s %s; the eager model is unchanged, these "
            'fusions apply when it is compiled with torch.compile(model, backend="inductor_fusion")',
            type(model).__name__,
            _describe_plan(plan),
        )
    return plan


# --- the KernelConfig -------------------------------------------------------------------------------


class FusionKernelConfigMixin:
    """Our half of `KernelConfig` (which also derives from ``transformers.KernelConfig``).

    ``KernelConfig(kernel_mapping=None, use_local_kernel=None, inherit_mapping=None)``:
    ``kernel_mapping`` is a dict, a ``transformers.KernelConfig`` or one of ours; it is read, never
    modified. ``kernel_mapping`` on the result holds only transformers' entries (the view
    transformers sees); ours are in ``fusion_entries``. ``use_local_kernel`` defaults to the given
    config's (else False). ``inherit_mapping`` defaults to False when one of our patterns is on:
    inheriting transformers' default hub mapping would kernelize RMSNorm and SiLU and leave our
    patterns nothing to match; otherwise to the given config's (else True, transformers' default).

    Like transformers' own, a config holding hub entries is rewritten by the ``from_pretrained``
    that uses it; ``KernelConfig(cfg)`` makes a fresh copy for the next model.
    """

    fusion_entries: tuple[FusionEntry, ...]
    source_mapping: dict[Any, Any]
    # Set by transformers.KernelConfig.__init__:
    kernel_mapping: dict[Any, Any]
    use_local_kernel: bool
    inherit_mapping: bool

    def __init__(
        self,
        kernel_mapping: Any = None,
        use_local_kernel: bool | None = None,
        inherit_mapping: bool | None = None,
    ) -> None:
        hf_config = _hf_kernel_config_class()
        source = kernel_mapping
        if isinstance(source, FusionKernelConfigMixin):
            mapping: Mapping[Any, Any] = source.source_mapping
        elif isinstance(source, hf_config):
            mapping = source.kernel_mapping
        elif source is None:
            mapping = {}
        elif isinstance(source, Mapping):
            mapping = source
        else:
            raise TypeError(
                "inductor_fusion.KernelConfig takes a dict or a transformers.KernelConfig, got "
                f"{type(source).__name__}"
            )
        hub, ours = split_kernel_mapping(mapping)
        wrapped = source if isinstance(source, hf_config) else None
        if use_local_kernel is None:
            use_local_kernel = bool(getattr(wrapped, "use_local_kernel", False))
        any_on = any(entry.enabled for entry in ours)
        if inherit_mapping is None:
            inherit_mapping = False if any_on else bool(getattr(wrapped, "inherit_mapping", True))
        elif inherit_mapping and any_on and hub:
            warnings.warn(
                "inductor_fusion.KernelConfig: inherit_mapping=True kernelizes with transformers' "
                "default hub mapping (RMSNorm, SiLU, ...), which replaces the forwards our "
                "patterns match; they may find nothing to fuse",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(  # type: ignore[call-arg]
            kernel_mapping=hub, use_local_kernel=use_local_kernel, inherit_mapping=inherit_mapping
        )
        self.fusion_entries = ours
        # What this config was built from, so that it can be rebuilt after transformers rewrites
        # kernel_mapping in from_pretrained.
        self.source_mapping = {key: copy.deepcopy(value) for key, value in mapping.items()}
        _warn_hub_overlap(hub, ours)
        _install_load_hook()

    def create_compatible_mapping(self, model: Any, compile: bool = False) -> Any:
        """transformers' own, after undoing its loader's rewrite of local entries.

        transformers 5.17-5.24 rewrite each kernel entry to ``(value, {"version": 1, ...})``
        while loading (hub metadata), and with ``use_local_kernel=True`` this method then hands
        that tuple to ``add_to_mapping_local``, which splits it as a ``"folder:Layer"`` string:
        AttributeError on every device transformers lets through (it refuses cpu first). A local
        entry needs the string alone, so e.g. ``inductor_fusion.kernel_layer()`` works through
        this config where a plain ``transformers.KernelConfig`` fails (pinned by
        tests/test_kernel_layer_repo.py)."""
        if self.use_local_kernel:
            self.kernel_mapping = {
                key: value[0] if isinstance(value, tuple) and isinstance(value[0], str) else value
                for key, value in self.kernel_mapping.items()
            }
        return super().create_compatible_mapping(model, compile=compile)  # type: ignore[misc]

    def fusion_plan(self, model: torch.nn.Module) -> FusionPlan | None:
        """The plan our entries give ``model`` (not attached)."""
        return resolve_entries(model, self.fusion_entries)

    def __repr__(self) -> str:
        ours = {entry.key: entry.value for entry in self.fusion_entries}
        return (
            f"{type(self).__name__}(fusions={ours!r}, kernel_mapping={self.kernel_mapping!r}, "
            f"use_local_kernel={self.use_local_kernel!r}, inherit_mapping={self.inherit_mapping!r})"
        )


def _warn_hub_overlap(hub: Mapping[Any, Any], ours: Sequence[FusionEntry]) -> None:
    """A hub kernel on a module one of our enabled patterns spans replaces what we match."""
    targeted = {name: entry for entry in ours if entry.enabled for name in entry.names}
    for key in hub:
        if isinstance(key, str):
            names = [key]
        elif isinstance(key, tuple):
            names = [item[0] if isinstance(item, tuple) and item else item for item in key]
        else:
            continue
        clash = [name for name in names if name in targeted]
        if clash:
            entry = targeted[clash[0]]
            warnings.warn(
                f"KernelConfig entry {key!r} puts a hub kernel on {clash[0]}, a module of "
                f"{entry.describe()}; where it applies, {entry.pattern} finds nothing to fuse",
                UserWarning,
                stacklevel=3,
            )


@functools.cache
def _hf_kernel_config_class() -> type[_HFKernelConfig]:
    from transformers.utils.kernel_config import KernelConfig as HFKernelConfig

    return HFKernelConfig


@functools.cache
def _kernel_config_class() -> type:
    # Built on first use so that importing inductor_fusion does not import transformers (~0.4 s).
    cls = type(
        "KernelConfig",
        (FusionKernelConfigMixin, _hf_kernel_config_class()),
        {"__module__": __name__, "__doc__": FusionKernelConfigMixin.__doc__},
    )
    return cls


if TYPE_CHECKING:

    class KernelConfig(FusionKernelConfigMixin, _HFKernelConfig):  # type: ignore[misc]
        """A ``transformers.KernelConfig`` that also selects our fusions (module docstring)."""

else:

    def __getattr__(name: str) -> Any:
        if name == "KernelConfig":
            cls = _kernel_config_class()
            globals()["KernelConfig"] = cls  # later lookups (and pickle) find it directly
            return cls
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fusion_config(
    kernel_mapping: Any = None,
    *,
    use_local_kernel: bool | None = None,
    inherit_mapping: bool | None = None,
) -> FusionKernelConfigMixin:
    """``inductor_fusion.KernelConfig(...)``: our KernelConfig from a dict or a KernelConfig."""
    return _kernel_config_class()(
        kernel_mapping, use_local_kernel=use_local_kernel, inherit_mapping=inherit_mapping
    )


def _as_fusion_config(kernel_config: Any) -> FusionKernelConfigMixin:
    if isinstance(kernel_config, FusionKernelConfigMixin):
        return kernel_config
    return fusion_config(kernel_config)


# --- the from_pretrained hook ---------------------------------------------------------------------

_HOOK_MARK = "_inductor_fusion_hook"
_hook_lock = threading.Lock()


def _install_load_hook() -> None:
    """Wraps ``PreTrainedModel.set_use_kernels`` once, so that configs of ours apply to the model.

    Why a wrapper, when the config object could hook ``sanitize_kernel_mapping(model)``: in
    transformers 5.17 and 5.24, ``set_use_kernels`` (1) raises unless ``kernels`` is installed in
    the exact range that transformers release wants (5.17: >=0.16,<0.17; 5.24: >=0.18.2,<0.19),
    before it calls any method of the config, although our fusions need no ``kernels`` at all;
    and (2) always ends in ``kernelize``, which for a config holding only ours would apply
    transformers' default hub mapping and replace the very forwards our patterns match.

    Installed when a config of ours is first built, not at import. The wrapper passes every call
    whose ``kernel_config`` is not ours to the original untouched. For ours it resolves and attaches
    our plan, then calls the original only if transformers' entries remain.
    """
    from transformers import modeling_utils

    model_class = modeling_utils.PreTrainedModel
    with _hook_lock:
        original = getattr(model_class, "set_use_kernels", None)
        if original is None:
            raise RuntimeError(
                "inductor_fusion.KernelConfig: this transformers version has no "
                "PreTrainedModel.set_use_kernels to hook into from_pretrained; load the model "
                "without kernel_config and call inductor_fusion.apply_kernel_config(model, cfg)"
            )
        if getattr(original, _HOOK_MARK, False):
            return
        signature = inspect.signature(original)

        @functools.wraps(original)
        def set_use_kernels(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            config = bound.arguments.get("kernel_config")
            if not isinstance(config, FusionKernelConfigMixin) or not bound.arguments.get(
                "use_kernels"
            ):
                return original(self, *args, **kwargs)
            return _set_use_kernels(self, config, lambda: original(self, *args, **kwargs))

        setattr(set_use_kernels, _HOOK_MARK, True)
        model_class.set_use_kernels = set_use_kernels


def _set_use_kernels(
    model: torch.nn.Module, config: FusionKernelConfigMixin, upstream: Callable[[], Any]
) -> Any:
    # Ours first: a bad entry fails before any hub kernel is applied.
    apply_kernel_config(model, config)
    if config.kernel_mapping:
        # transformers' entries, in whatever form its loader left them: its business.
        return upstream()
    # Nothing of transformers' to apply: keep the config visible as transformers would, and do
    # not kernelize (the model's forwards stay exactly as written).
    model.kernel_config = config
    return None
