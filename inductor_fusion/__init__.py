"""inductor-fusion: a torch.compile Inductor plugin fusing norm -> MLP regions into Triton kernels.

    torch.compile(model, backend="inductor_fusion")          # after pip install
    torch.compile(model, backend=inductor_fusion.backend(patterns=["rmsnorm_mlp"]))

Importing this package changes no torch configuration and registers nothing with Inductor: the
patterns are traced and registered the first time the backend compiles a graph.
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
from inductor_fusion.registry import pattern_names
from inductor_fusion.report import FusedRegion, FusionReport, get_report, reset_report

__all__ = [
    "ENV_DISABLE",
    "ENV_PATTERNS",
    "OPTIONS_KEY",
    "FusedRegion",
    "FusionOptions",
    "FusionPlan",
    "FusionReport",
    "InductorFusionBackend",
    "backend",
    "get_report",
    "inductor_fusion_backend",
    "pattern_names",
    "reset_report",
    "resolve_plan",
]
