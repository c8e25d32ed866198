"""The layers `kernels` finds in this repository (``kernel.layers.<name>``)."""

from inductor_fusion.kernel_layer import RMSNormMLP, RMSNormMLPLayout

__all__ = ["RMSNormMLP", "RMSNormMLPLayout"]
