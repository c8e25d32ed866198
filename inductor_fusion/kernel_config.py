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

What our values and keys mean: `inductor_fusion.fusion_entries`. Globs are over module paths
relative to the loaded model: compile that model, not a submodule, or the paths will not line up.

Every other entry is transformers': it keeps its upstream meaning and reaches transformers
untouched. The resolved plan travels with the model (`inductor_fusion.model_plans`); our backend
looks it up when it compiles. Per `inductor_fusion.config.resolve_plan`, it beats
``INDUCTOR_FUSION_PATTERNS``, and loses to backend options and to ``INDUCTOR_FUSION_DISABLE``.
``from_pretrained`` applies it through one wrapper of transformers' (`inductor_fusion.hf_hooks`).
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from inductor_fusion import hf_hooks, registry
from inductor_fusion.config import FusionPlan
from inductor_fusion.eager_swap import apply_eager_layers
from inductor_fusion.fusion_entries import FusionEntry, split_kernel_mapping
from inductor_fusion.model_plans import attach_plan, resolve_entries

if TYPE_CHECKING:
    from transformers import KernelConfig as _HFKernelConfig

log = logging.getLogger("inductor_fusion")


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
        # Now, not at import: transformers stays as it is until someone builds a config of ours.
        hf_hooks.install_load_hook(FusionKernelConfigMixin, apply_kernel_config)

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
