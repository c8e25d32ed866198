"""inductor-fusion's fused RMSNorm -> MLP as a `kernels` layer repository (universal variant).

`kernels` imports this package from the folder (``LocalLayerRepository`` /
``get_local_kernel``) and looks the layer up in its ``layers``; transformers' n-to-1 kernel
fusion then takes ``<Layer>Layout`` from the layer class's module. Both classes live in
``inductor_fusion.kernel_layer`` and are re-exported here, so the classes are the same objects
however often, and under whatever name, `kernels` imports this folder.
"""

from . import layers
from .layers import RMSNormMLP, RMSNormMLPLayout

__all__ = ["RMSNormMLP", "RMSNormMLPLayout", "layers"]
