"""The KernelConfig entries of ours: telling them from transformers' and parsing them.

A KernelConfig mapping is transformers' (``"org/repo:Layer"`` values, per-device dicts) except
where a value names one of our patterns:

- ``"inductor_fusion:<pattern>"`` turns ``<pattern>`` on at the key's modules (several entries for
  one pattern add up). A config that turns any pattern on selects exactly those patterns, at
  exactly those places, for this model.
- ``"inductor_fusion:<pattern>:off"`` switches ``<pattern>`` off for this model; the key is
  checked but its paths are not used. A config with only ``:off`` entries keeps every other
  pattern on, everywhere.
- ``"inductor_fusion:<pattern>:eager"`` (families with an eager layer:
  `registry.PatternFamily.eager_norm`) also swaps our eager fused layer in at
  the key's modules when the config is applied (`inductor_fusion.eager_swap`), so the region runs
  as our op without torch.compile; for the compile plan it counts as ``"inductor_fusion:<pattern>"``.
- ``"inductor_fusion:<pattern>:recompute"`` is ``"inductor_fusion:<pattern>"`` whose training
  regions save less and recompute in the backward.

Key names are the pattern's layer names (`registry.PatternFamily.layer_names`; ``rmsnorm_mlp``:
``"RMSNorm"`` for the norm, ``"MLP"`` for the MLP), in any order: alone (the registry form,
resolved against the model class by `inductor_fusion.model_plans`) or each paired with an
``fnmatch`` glob over module paths of the loaded model (the inline form; ``*`` also crosses dots:
``model.layers.1*`` is layers 1 and 10-19).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inductor_fusion import registry

FUSION_PREFIX = "inductor_fusion"
OFF = "off"
EAGER = "eager"
# Training regions save only the input and its row statistic, and recompute the rest in the
# backward (config.MEMORY_MODES); the family fuses as it would without it.
RECOMPUTE = "recompute"


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
    return registry.get_family(pattern).kernel_layer_names


def key_forms(pattern: str) -> str:
    """The two ways to write a key for ``pattern``, for error messages."""
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
    if state == EAGER and registry.FAMILIES[name].eager_norm is None:
        raise ValueError(
            f"KernelConfig entry {key!r}: {value!r}: {name} has no eager layer; ':{EAGER}' is "
            f"available for: {', '.join(registry.eager_patterns())}"
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
            f"naming them: {key_forms(pattern)}"
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
            raise ValueError(f"{where}: empty module glob; expected {key_forms(pattern)}")
    else:
        raise ValueError(
            f"{where}: a key is a tuple of layer names or of (layer name, module glob) pairs: "
            f"{key_forms(pattern)}"
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
            f"expected {key_forms(pattern)}"
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
