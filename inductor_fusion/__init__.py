"""inductor-fusion: a torch.compile Inductor plugin fusing norm -> MLP regions into Triton kernels.

    torch.compile(model, backend="inductor_fusion")          # after pip install
    torch.compile(model, backend=inductor_fusion.backend(patterns=["rmsnorm_mlp"]))
    inductor_fusion.install()                                # every backend="inductor" compile
    inductor_fusion.explain(model_or_config)                 # what would fuse, without compiling

Importing this package changes no torch configuration and registers nothing with Inductor: the
patterns are traced and registered the first time the backend compiles a graph, and only
`install()` changes Inductor's global configuration (`uninstall()` restores it).
"""

from inductor_fusion.backend import InductorFusionBackend, backend, inductor_fusion_backend
from inductor_fusion.config import (
    ENV_DISABLE,
    ENV_PATTERNS,
    OPTIONS_KEY,
    FusionOptions,
    FusionPlan,
    resolve_plan,
)
from inductor_fusion.kernel_config import apply_kernel_config, fusion_config
from inductor_fusion.kernel_layer import kernel_layer
from inductor_fusion.model_plans import fusable_modules, register_fusable_modules
from inductor_fusion.registry import pattern_names
from inductor_fusion.report import FusedRegion, FusionReport, get_report, reset_report

__all__ = [
    "ENV_DISABLE",
    "ENV_PATTERNS",
    "OPTIONS_KEY",
    "Explanation",
    "FusedRegion",
    "FusionOptions",
    "FusionPlan",
    "FusionReport",
    "InductorFusionBackend",
    "Installation",
    "KernelConfig",
    "apply_kernel_config",
    "backend",
    "explain",
    "fusable_modules",
    "fusion_config",
    "get_report",
    "inductor_fusion_backend",
    "install",
    "installed",
    "kernel_layer",
    "pattern_names",
    "register_fusable_modules",
    "reset_report",
    "resolve_plan",
    "uninstall",
]

# Loaded on first use: they import Inductor's pass machinery (~1 s) or transformers.
_LAZY = {
    "Explanation": "inductor_fusion.explainer",
    "explain": "inductor_fusion.explainer",
    "Installation": "inductor_fusion.global_pass",
    "install": "inductor_fusion.global_pass",
    "installed": "inductor_fusion.global_pass",
    "uninstall": "inductor_fusion.global_pass",
}


def __getattr__(name: str):
    # KernelConfig subclasses transformers.KernelConfig: built on first use, so that importing
    # inductor_fusion does not import transformers.
    if name == "KernelConfig":
        from inductor_fusion.kernel_config import KernelConfig

        return KernelConfig
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
