"""RMSNorm -> gated MLP (-> residual add): Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Granite.

The rows of the `norm_mlp` table this family registers. Gemma2/3 (and any region whose MLP output
goes through a second norm before the add) fuse in their no-residual form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inductor_fusion.patterns import norm_mlp, norm_mlp_graph
from inductor_fusion.patterns.norm_mlp import LLAMA, RegionForm
from inductor_fusion.report import FusedRegion

NAME = "rmsnorm_mlp"

FORMS: tuple[RegionForm, ...] = (
    LLAMA,
    RegionForm(
        "gemma", "gemma_rms", "gelu_tanh", "separate", ("left", "none"),
        models="Gemma (h + mlp); Gemma2, Gemma3 (pre_feedforward_layernorm -> mlp, no residual)",
    ),
    RegionForm("phi3", "llama_rms", "silu", "fused", ("left", "none"), models="Phi-3 (gate_up_proj)"),
    # Granite's unscaled no-residual form is Llama's row.
    RegionForm(
        "granite", "llama_rms", "silu", "separate", ("scaled",), biases=(False, True),
        models="Granite (h + mlp * residual_multiplier)",
    ),
)  # fmt: skip


def register(pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None:
    norm_mlp.register(pass_, family=NAME, forms=FORMS, on_match=on_match)


def register_training(pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None:
    """The rows' training variants (`norm_mlp.RegionForm.training`), for joint graphs."""
    norm_mlp.register(pass_, family=NAME, forms=FORMS, on_match=on_match, training=True)


def prepare_graph(graph: Any) -> None:
    """Run by the pass before matching: see `norm_mlp_graph.prepare_graph`."""
    norm_mlp_graph.prepare_graph(graph)


def unmatched_candidates(graph: Any) -> list[tuple[Any, ...]]:
    """Run by the pass after matching: see `norm_mlp_graph.unmatched_candidates`."""
    return norm_mlp_graph.unmatched_candidates(graph, NAME)
