"""MLP with no norm in front, whose output a second norm takes before the residual add: OLMo-2.

``Olmo2DecoderLayer`` computes ``h + post_feedforward_layernorm(mlp(h))``: the SwiGLU MLP reads
the residual stream ``h`` itself. The MLP is the region fused (the op with norm "none"); the
post-norm and the add stay Inductor's, because a row norm over H cannot sit in the down GEMM's
epilogue, whose programs each see only part of a row.

An MLP with no norm in front looks like the MLP half of every norm -> MLP region, so this family
matches only where OLMo-2's shape is (`norm_mlp.RegionForm.post_norm`): the MLP's input is the residual
stream (also used outside the region) and its output goes into a norm. An MLP fed by a norm is
left to its norm's family (``rmsnorm_mlp``, ``layernorm_mlp``), which fuses the norm too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inductor_fusion.patterns import norm_mlp, norm_mlp_graph
from inductor_fusion.patterns.norm_mlp import RegionForm
from inductor_fusion.report import FusedRegion

NAME = "mlp_postnorm"

FORMS: tuple[RegionForm, ...] = (
    RegionForm(
        "olmo2", "none", "silu", "separate", ("none",), post_norm=True,
        models="OLMo-2 (h + post_feedforward_layernorm(mlp(h)): the MLP fuses)",
    ),
)  # fmt: skip


def register(pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None:
    norm_mlp.register(pass_, family=NAME, forms=FORMS, on_match=on_match)


def prepare_graph(graph: Any) -> None:
    """Run by the pass before matching: see `norm_mlp_graph.prepare_graph`."""
    norm_mlp_graph.prepare_graph(graph)
