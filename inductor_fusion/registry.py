"""The named pattern families, and their lazily built matcher passes.

A family is what users switch on and off by name (environment variables, backend options,
KernelConfig). It is declared here with the modules that implement it, so names can be
validated and sources hashed without importing torch's pattern matcher or tracing anything.
The matcher pass of a family is built once, the first time a compile needs it.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch._inductor.pattern_matcher import PatternMatcherPass

    from inductor_fusion.report import FusedRegion


class FamilyModule(Protocol):
    """What a family's pattern module provides (`PatternFamily.pattern_module`): ``register``,
    and any of `OPTIONAL_HOOKS` (`family_hook`): ``register_training(pass_, on_match=...)``
    (joint-graph variants), ``prepare_graph(graph)`` before matching, and
    ``unmatched_candidates(graph) -> list`` after it (regions that look fusable but were not).
    The norm -> MLP families also list their table rows as ``FORMS``."""

    def register(self, pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None: ...


OPTIONAL_HOOKS = ("register_training", "prepare_graph", "unmatched_candidates")


@dataclass(frozen=True)
class PatternFamily:
    """One named fusion: where its patterns and its op live, and which modules it spans."""

    name: str
    # Module holding the plain-PyTorch search/replacement pairs (a `FamilyModule`).
    pattern_module: str
    # Modules holding the custom op(s) the replacement calls. They must be imported before a
    # graph from the FX cache runs, because a cache hit skips our pass entirely.
    op_modules: tuple[str, ...]
    # The module roles a match spans, in the order KernelConfig keys name them.
    roles: tuple[str, ...]
    description: str
    # The names KernelConfig keys use for the roles' modules, aligned with them; they follow
    # transformers' kernel layer names ("RMSNorm", "MLP"). Empty: the role names.
    layer_names: tuple[str, ...] = ()
    # The norm kind (`RegionSpec.norm`) of the modules a ":eager" entry may swap our eager layer
    # in for (`inductor_fusion.layers`): it fuses in eager mode what the same entry fuses under
    # torch.compile, never another family's region. None: the family has no eager layer.
    eager_norm: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"pattern family name must be an identifier, got {self.name!r}")
        if not self.roles:
            raise ValueError(f"pattern family {self.name!r} declares no roles")
        if self.layer_names and len(self.layer_names) != len(self.roles):
            raise ValueError(f"pattern family {self.name!r}: one layer name per role")

    @property
    def kernel_layer_names(self) -> tuple[str, ...]:
        """The names a KernelConfig key uses for the family's modules, in role order."""
        return self.layer_names or self.roles


FAMILIES: dict[str, PatternFamily] = {
    family.name: family
    for family in (
        PatternFamily(
            name="rmsnorm_mlp",
            pattern_module="inductor_fusion.patterns.rmsnorm_mlp",
            op_modules=(
                "inductor_fusion.triton_kernels.rmsnorm_mlp",
                "inductor_fusion.triton_kernels.silu_mul",  # training regions
                "inductor_fusion.triton_kernels.rmsnorm_mlp_train",  # the eager layer
            ),
            roles=("norm", "mlp"),
            layer_names=("RMSNorm", "MLP"),
            eager_norm="rms",
            description=(
                "RMSNorm (Llama's, Gemma's 1 + w) -> gated MLP (SiLU or GELU-tanh; separate or "
                "fused gate/up), with or without the (scaled) residual add that follows"
            ),
        ),
        PatternFamily(
            name="layernorm_mlp",
            pattern_module="inductor_fusion.patterns.layernorm_mlp",
            op_modules=("inductor_fusion.triton_kernels.rmsnorm_mlp",),
            roles=("norm", "mlp"),
            layer_names=("LayerNorm", "MLP"),
            eager_norm="layer",
            description=(
                "LayerNorm (with bias, or Nemotron's 1 + w) -> non-gated MLP (GELU, GELU-tanh, "
                "ReLU^2), with or without the residual add that follows"
            ),
        ),
        PatternFamily(
            name="mlp_postnorm",
            pattern_module="inductor_fusion.patterns.mlp_postnorm",
            op_modules=("inductor_fusion.triton_kernels.rmsnorm_mlp",),
            roles=("mlp",),
            layer_names=("MLP",),
            eager_norm="none",
            description=(
                "gated SiLU MLP on the residual stream whose output a second norm takes before "
                "the add (OLMo-2); the MLP fuses, the post-norm and the add stay Inductor's"
            ),
        ),
        PatternFamily(
            name="gqa_decode",
            pattern_module="inductor_fusion.patterns.gqa_attention",
            op_modules=(),
            roles=("attention",),
            layer_names=("Attention",),
            description=(
                "grouped-query attention at decode (<= 16 query tokens): SDPA on the key/value "
                "heads with the query heads packed as rows, instead of repeat_kv copies of the cache"
            ),
        ),
    )
}


def pattern_names() -> tuple[str, ...]:
    """Every valid pattern family name, sorted."""
    return tuple(sorted(FAMILIES))


def eager_patterns() -> tuple[str, ...]:
    """The families with an eager layer (":eager" KernelConfig entries), sorted."""
    return tuple(name for name in pattern_names() if FAMILIES[name].eager_norm is not None)


def norm_mlp_patterns() -> tuple[str, ...]:
    """The norm -> MLP families, those that span two roles first (a model registering Llama's
    "RMSNorm" and "MLP" names both is Llama's region, not an MLP alone), then by name."""
    return tuple(sorted(eager_patterns(), key=lambda n: (-len(FAMILIES[n].roles), n)))


def get_family(name: str) -> PatternFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown inductor_fusion pattern {name!r}; valid names: {', '.join(pattern_names())}"
        ) from None


def validate_names(names: object, *, source: str) -> tuple[str, ...]:
    """Checks a collection of pattern names; the error names the source and the valid choices."""
    if isinstance(names, Mapping):
        # Iterating would take the keys: {"rmsnorm_mlp": False} would switch the pattern on.
        raise TypeError(
            f"{source}: expected a list of pattern names, got a {type(names).__name__} "
            f"({names!r}); list the patterns to switch on, and those to switch off under 'disable'"
        )
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(
            f"{source}: expected a list of pattern names (or a comma-separated string where "
            f"strings are accepted), got {type(names).__name__} {names!r}"
        )
    result = []
    for name in names:  # type: ignore[union-attr]
        if not isinstance(name, str) or name not in FAMILIES:
            raise ValueError(
                f"{source}: unknown inductor_fusion pattern {name!r}; "
                f"valid names: {', '.join(pattern_names())}"
            )
        result.append(name)
    return tuple(dict.fromkeys(result))


def import_op_modules(names: tuple[str, ...] | frozenset[str]) -> None:
    """Registers the custom ops the given families' replacements call."""
    for name in sorted(names):
        for module in get_family(name).op_modules:
            importlib.import_module(module)


def pattern_module(name: str) -> ModuleType:
    return importlib.import_module(get_family(name).pattern_module)


def family_hook(name: str, hook: str) -> Callable[..., Any] | None:
    """The family module's optional ``hook`` (one of `OPTIONAL_HOOKS`), None where it has none."""
    if hook not in OPTIONAL_HOOKS:
        raise ValueError(f"unknown family hook {hook!r}; hooks: {', '.join(OPTIONAL_HOOKS)}")
    return getattr(pattern_module(name), hook, None)


_build_lock = threading.Lock()


@functools.cache
def _built_pass(name: str, training: bool = False) -> PatternMatcherPass:
    from torch._inductor.pattern_matcher import PatternMatcherPass

    from inductor_fusion import pass_state

    suffix = ".training" if training else ""
    matcher = PatternMatcherPass(pass_name=f"inductor_fusion.{name}{suffix}")
    if not training:
        pattern_module(name).register(matcher, on_match=pass_state.on_match)
    elif (register := family_hook(name, "register_training")) is not None:
        register(matcher, on_match=pass_state.on_match)  # without training variants: empty
    return matcher


def matcher_pass(name: str, *, training: bool = False) -> PatternMatcherPass:
    """The family's PatternMatcherPass, registering its patterns on first use (traces them).

    ``training``: the family's training (joint forward + backward) variants, a pass of their own
    so that compiles that never see a joint graph never trace them."""
    get_family(name)
    with _build_lock:
        return _built_pass(name, training)
