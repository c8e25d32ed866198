"""LayerNorm -> non-gated MLP (-> residual add): GPT-NeoX, Starcoder2, Nemotron.

The rows of the `norm_mlp` table this family registers. GPT-NeoX's parallel residual
(``mlp(ln(h)) + attn + h``) fuses with its first add, of the attention output (the "parallel"
residual form); the add of ``h`` stays Inductor's. Its sequential form adds the MLP output on the
left of the norm's input (``mlp + h``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inductor_fusion.patterns import norm_mlp, norm_mlp_graph
from inductor_fusion.patterns.norm_mlp import RegionForm
from inductor_fusion.report import FusedRegion

NAME = "layernorm_mlp"

FORMS: tuple[RegionForm, ...] = (
    RegionForm(
        "gpt_neox", "layer", "gelu", "plain", ("right", "parallel", "none"), biases=(True,),
        models="GPT-NeoX (sequential: mlp + h; parallel: mlp + attn, then + h)",
    ),
    RegionForm(
        "starcoder2", "layer", "gelu_tanh", "plain", ("left", "none"), biases=(True, False),
        models="Starcoder2 (use_bias=True or False)",
    ),
    RegionForm(
        "nemotron", "layer_1p", "relu2", "plain", ("left", "none"), biases=(False, True),
        models="Nemotron (LayerNorm1P, ReLU^2)",
    ),
)  # fmt: skip


def register(pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None:
    norm_mlp.register(pass_, family=NAME, forms=FORMS, on_match=on_match)


def prepare_graph(graph: Any) -> None:
    """Run by the pass before matching: see `norm_mlp_graph.prepare_graph`."""
    norm_mlp_graph.prepare_graph(graph)
