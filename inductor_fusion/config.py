"""Which patterns are active, and where: every toggle source resolved into one frozen plan.

Sources, and how they combine (this function, `resolve_plan`, is the only place that decides):

1. ``INDUCTOR_FUSION_DISABLE`` (environment): comma-separated pattern names, or ``all``. It is the
   operator's kill switch and always wins: the named patterns are removed from whatever the other
   sources selected.
2. The positive selection comes from the most specific source present, in this order:
   a. backend options: ``torch.compile(..., options={"inductor_fusion": {"patterns": [...]}})`` or
      ``inductor_fusion.backend(patterns=[...])`` (the compile call site is the most explicit);
   b. the model's KernelConfig, attached by ``from_pretrained(..., kernel_config=...)``: names
      patterns *and* the module globs where each may fuse;
   c. ``INDUCTOR_FUSION_PATTERNS`` (environment): comma-separated names, ``all`` or ``none``;
   d. otherwise every registered pattern, everywhere.
   Backend options may also list ``"disable": [...]``, removed like the environment's.

Every name is validated; an unknown one is a ValueError that lists the valid names. Nothing here
reads the environment at import time: `resolve_plan` reads it when a compile starts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inductor_fusion import registry

ENV_PATTERNS = "INDUCTOR_FUSION_PATTERNS"
ENV_DISABLE = "INDUCTOR_FUSION_DISABLE"
OPTIONS_KEY = "inductor_fusion"
# Training regions: "default" saves what the backward needs (the region's input, its per-row
# statistic and the gate/up pre-activations); "recompute" saves the input and the statistic
# only and recomputes gate/up in the backward (selective activation checkpointing).
MEMORY_MODES = ("default", "recompute")

# A scope is a tuple of glob tuples; each glob tuple is aligned with the family's roles
# (e.g. ("model.layers.*.post_attention_layernorm", "model.layers.*.mlp") for norm, mlp).
Scope = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class FusionOptions:
    """Our own backend options: which patterns to enable (None: leave it to other sources), and
    the memory mode of training regions: one of `MEMORY_MODES` for every family, or a mapping
    from family name to mode (None: leave it to the model's KernelConfig)."""

    patterns: tuple[str, ...] | None = None
    disable: tuple[str, ...] = ()
    memory: Mapping[str, str] | str | None = None

    def __post_init__(self) -> None:
        # Each accepts a list of names or a comma-separated string (see `parse_names`).
        if self.patterns is not None:
            object.__setattr__(
                self,
                "patterns",
                parse_names(self.patterns, source="inductor_fusion option 'patterns'"),
            )
        object.__setattr__(
            self,
            "disable",
            parse_names(
                self.disable, source="inductor_fusion option 'disable'", empty_text_ok=True
            ),
        )
        if self.memory is not None:
            memory = self.memory
            if isinstance(memory, str):
                memory = dict.fromkeys(registry.pattern_names(), memory)
            if not isinstance(memory, Mapping):
                raise TypeError(
                    "inductor_fusion option 'memory': expected a mode name or a dict from pattern "
                    f"name to mode, got {type(self.memory).__name__}"
                )
            # FusionPlan validates names and modes, with the same messages everywhere.
            FusionPlan(frozenset(), modes=memory, source="inductor_fusion option 'memory'")
            object.__setattr__(self, "memory", dict(sorted(memory.items())))

    @classmethod
    def from_value(cls, value: Any) -> FusionOptions:
        """Parses the value stored under ``options["inductor_fusion"]``."""
        if value is None:
            return cls()
        if isinstance(value, FusionOptions):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"options[{OPTIONS_KEY!r}] must be a dict with keys 'patterns', 'disable' and/or "
                f"'memory', got {type(value).__name__}"
            )
        unknown = set(value) - {"patterns", "disable", "memory"}
        if unknown:
            raise ValueError(
                f"options[{OPTIONS_KEY!r}]: unknown key(s) {sorted(unknown)}; "
                "valid keys: 'patterns', 'disable', 'memory'"
            )
        # __post_init__ validates and normalizes them.
        return cls(
            patterns=value.get("patterns"),
            disable=value.get("disable", ()),
            memory=value.get("memory"),
        )

    @classmethod
    def merged(
        cls,
        options: Mapping[str, Any],
        patterns: Sequence[str] | str | None = None,
        disable: Sequence[str] | str = (),
    ) -> FusionOptions:
        """What `inductor_fusion.backend` and `install` take: ``options[OPTIONS_KEY]`` with the
        call's own ``patterns`` (replacing the options') and ``disable`` (added to them); the
        options' memory mode is kept. The one merge both entry points use."""
        ours = cls.from_value(options.get(OPTIONS_KEY))
        if patterns is None and not disable:
            return ours
        given = cls(patterns=patterns, disable=disable)
        return cls(
            patterns=given.patterns if patterns is not None else ours.patterns,
            disable=(*ours.disable, *given.disable),
            memory=ours.memory,
        )


@dataclass(frozen=True)
class FusionPlan:
    """The resolved answer: active pattern families and, per family, where they may fuse.

    A family missing from ``scopes`` may fuse anywhere; one present may fuse only where some glob
    tuple matches the module paths of all its roles.
    """

    patterns: frozenset[str]
    scopes: Mapping[str, Scope] = field(default_factory=dict)
    source: str = "default"
    # Memory mode of a family's training regions (`MEMORY_MODES`); families absent: "default".
    modes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        registry.validate_names(sorted(self.patterns), source=f"fusion plan ({self.source})")
        for name, scope in self.scopes.items():
            roles = registry.get_family(name).roles
            for globs in scope:
                if len(globs) != len(roles):
                    raise ValueError(
                        f"fusion plan: scope {globs!r} of pattern {name!r} must give one glob per "
                        f"role {roles}"
                    )
        # Freeze the mapping so that the plan, and the uuid derived from it, cannot drift.
        object.__setattr__(
            self, "scopes", dict(sorted((k, tuple(map(tuple, v))) for k, v in self.scopes.items()))
        )
        for name, mode in self.modes.items():
            registry.get_family(name)
            if mode not in MEMORY_MODES:
                raise ValueError(
                    f"fusion plan: memory mode {mode!r} of pattern {name!r}; valid modes: "
                    f"{', '.join(MEMORY_MODES)}"
                )
        # "default" is spelled by absence, so that equal plans have equal keys.
        modes = {k: v for k, v in sorted(self.modes.items()) if v != "default"}
        object.__setattr__(self, "modes", modes)

    def memory_mode(self, pattern: str) -> str:
        """How ``pattern``'s training regions trade memory for time (see `MEMORY_MODES`)."""
        return self.modes.get(pattern, "default")

    def allows(self, pattern: str, paths: Mapping[str, str | None]) -> bool:
        if pattern not in self.patterns:
            return False
        scope = self.scopes.get(pattern)
        if scope is None:
            return True
        roles = registry.get_family(pattern).roles
        for globs in scope:
            if all(
                paths.get(role) is not None and fnmatch.fnmatchcase(paths[role], glob)
                for role, glob in zip(roles, globs, strict=True)
            ):
                return True
        return False

    def key(self) -> str:
        """A deterministic description, hashed into the pass's uuid."""
        scopes = ";".join(f"{k}={v!r}" for k, v in self.scopes.items())
        key = f"patterns={sorted(self.patterns)!r};scopes={scopes}"
        if self.modes:  # only when set: the keys of plans without modes stay what they were
            key += ";modes=" + ";".join(f"{k}={v}" for k, v in self.modes.items())
        return key

    def without(self, names: tuple[str, ...], *, source: str) -> FusionPlan:
        if not names:
            return self
        keep = self.patterns - frozenset(names)
        return FusionPlan(
            patterns=keep,
            scopes={k: v for k, v in self.scopes.items() if k in keep},
            source=f"{self.source}+{source}",
            modes={k: v for k, v in self.modes.items() if k in keep},
        )


def parse_names(value: Any, *, source: str, empty_text_ok: bool = False) -> tuple[str, ...]:
    """Pattern names given by a user: a list (or other collection) of names, or one string.

    A string is one name or a comma-separated list, or ``all``/``none``, as the environment
    variables take them. A dict is refused, not read as its keys: ``{"rmsnorm_mlp": False}``
    would otherwise turn on the very pattern it means to turn off.
    """
    if isinstance(value, str):
        return _parse_list(value, source=source, empty_ok=empty_text_ok)
    return registry.validate_names(value, source=source)


def _parse_list(text: str, *, source: str, empty_ok: bool = False) -> tuple[str, ...]:
    """``"a, b"`` -> ("a", "b"); ``all`` -> every pattern; ``none`` -> ().

    Text naming nothing (``""``, ``",,"``) is an error unless ``empty_ok`` (a disable list): as a
    selection it would silently switch every pattern off, more likely a mistake than a wish.
    """
    items = [part.strip() for part in text.split(",") if part.strip()]
    lowered = [item.lower() for item in items]
    if not items:
        if empty_ok:
            return ()
        raise ValueError(
            f"{source}: {text!r} names no pattern; write 'none' to switch every pattern off, "
            f"'all' for every pattern, or names from: {', '.join(registry.pattern_names())}"
        )
    if lowered == ["all"]:
        return registry.pattern_names()
    if lowered == ["none"]:
        return ()
    if "all" in lowered or "none" in lowered:
        raise ValueError(f"{source}: 'all'/'none' cannot be combined with names, got {text!r}")
    return registry.validate_names(items, source=source)


def env_patterns(environ: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_PATTERNS)
    return None if text is None else _parse_list(text, source=ENV_PATTERNS)


def env_disable(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    environ = os.environ if environ is None else environ
    # Unset or empty: nothing is disabled.
    return _parse_list(environ.get(ENV_DISABLE, ""), source=ENV_DISABLE, empty_ok=True)


ENV_PREFIX = "INDUCTOR_FUSION_"


def check_env_names(environ: Mapping[str, str] | None = None) -> None:
    """An ``INDUCTOR_FUSION_*`` variable we do not read is a typo (``INDUCTOR_FUSION_PATTERN``
    would otherwise be ignored without a word): a ValueError naming the ones we read."""
    environ = os.environ if environ is None else environ
    known = (ENV_PATTERNS, ENV_DISABLE)
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ValueError(
            f"unknown environment variable {unknown[0]}; inductor_fusion reads "
            f"{' and '.join(known)}"
        )


def resolve_plan(
    *,
    options: FusionOptions | None = None,
    model_plan: FusionPlan | None = None,
    environ: Mapping[str, str] | None = None,
) -> FusionPlan:
    """Resolves all toggle sources into one frozen plan (precedence: see the module docstring)."""
    options = options or FusionOptions()
    check_env_names(environ)
    # Parse both environment variables first so a typo is reported even when unused.
    from_env = env_patterns(environ)
    killed = env_disable(environ)
    if options.patterns is not None:
        plan = FusionPlan(frozenset(options.patterns), source="options")
    elif model_plan is not None:
        plan = model_plan
    elif from_env is not None:
        plan = FusionPlan(frozenset(from_env), source="env")
    else:
        plan = FusionPlan(frozenset(registry.pattern_names()), source="default")
    if options.memory is not None:  # the compile call site's modes win over the model's
        plan = dataclasses.replace(
            plan, modes={**plan.modes, **options.memory}, source=f"{plan.source}+options.memory"
        )
    plan = plan.without(options.disable, source="options.disable")
    return plan.without(killed, source=ENV_DISABLE)


def inductor_config_patches(mode: str | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Inductor config for ``mode``/``options``, validated as ``backend="inductor"`` validates."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    patches: dict[str, Any] = {}
    if mode and mode != "default":
        patches.update(list_mode_options(mode))
    known = inductor_config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise RuntimeError(
                f"Unexpected optimization option {key!r} for backend 'inductor_fusion'; "
                f"our own options go under options[{OPTIONS_KEY!r}]"
            )
        value_type = inductor_config.get_type(name)
        # As backend="inductor" checks (torch's _TorchCompileInductorWrapper.apply_options):
        # generic types (Optional, unions, lists) cannot be isinstance-checked and are let through.
        if typing.get_origin(value_type) is None and not isinstance(value, value_type):
            raise RuntimeError(
                f"Unexpected type of attr {key}, got {type(value).__name__} should be "
                f"{type(known[name]).__name__}"
            )
        patches[name] = value
    return patches
