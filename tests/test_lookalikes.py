"""Lookalikes of the families' regions stay unfused and correct.

Each case takes a tiny model of a family whose region fuses (tests/test_families.py), swaps every
layer's norm or MLP for a module that computes something else with nearly the same graph, and
compiles it with our backend: no region may fuse, and the logits must stay within the tolerance
rule against the modified model in fp64. A pattern that matched one of these would replace the
modified computation by the family's and give a wrong result; the families' own cases fuse with
the same model classes, so these tests fail if the legality checks are loosened.

bf16, where rounding differences between the lookalike and the family's formula are largest.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import assert_within_tolerance, fp64_logits, fresh_compile, tiny_model, token_ids
from torch import nn

pytestmark = pytest.mark.slow


class _GemmaNormLookalike(nn.Module):
    """Gemma's RMSNorm (``1 + w`` in fp32, one cast back) with another normalisation."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def normalize(self, x32: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        return (self.normalize(x.float()) * (1.0 + self.weight.float())).type_as(x)


class _GemmaEpsOutsideSqrt(_GemmaNormLookalike):
    """eps added after the square root: x / (rms(x) + eps)."""

    def normalize(self, x32):
        return x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


class _GemmaMeanOverSequence(_GemmaNormLookalike):
    """The mean over the sequence dimension instead of the features."""

    def normalize(self, x32):
        return x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + self.eps)


class _LayerNormWithoutCentering(nn.Module):
    """A LayerNorm that forgets to subtract the mean (var about 0, then the bias)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float() + self.bias.float()).type_as(x)


class _NeoXMLPWithInnerNorm(nn.Module):
    """GPT-NeoX's MLP with a LayerNorm between the activation and the down projection."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h, self.act = (
            mlp.dense_h_to_4h,
            mlp.dense_4h_to_h,
            mlp.act,
        )
        inner = self.dense_h_to_4h.out_features
        self.inner_norm = nn.LayerNorm(inner).to(self.dense_h_to_4h.weight.dtype)
        with torch.no_grad():
            self.inner_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.dense_4h_to_h(self.inner_norm(self.act(self.dense_h_to_4h(x))))


class _Phi3MLPHalvesSwapped(nn.Module):
    """Phi-3's MLP with the activation on the *second* half of gate_up_proj's output."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj

    def forward(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class _GemmaMLPActOnUp(nn.Module):
    """Gemma's MLP with the activation on up_proj instead of gate_proj."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


NORM_MLP_FAMILIES = ("rmsnorm_mlp", "layernorm_mlp", "mlp_postnorm")

# family, config overrides, the module replaced ("norm" or "mlp"), its replacement
CASES = {
    "gemma_eps_outside_sqrt": ("gemma", {}, "norm", _GemmaEpsOutsideSqrt),
    "gemma_mean_over_sequence": ("gemma", {}, "norm", _GemmaMeanOverSequence),
    "gemma_act_on_up": ("gemma", {}, "mlp", _GemmaMLPActOnUp),
    "starcoder2_norm_without_centering": ("starcoder2", {}, "norm", _LayerNormWithoutCentering),
    "gpt_neox_extra_norm_in_mlp": ("gpt_neox", {"hidden_act": "gelu"}, "mlp", _NeoXMLPWithInnerNorm),
    "phi3_gate_up_halves_swapped": ("phi3", {}, "mlp", _Phi3MLPHalvesSwapped),
    # Other activations through the config: quick GELU (x * sigmoid(1.702 x)) and plain ReLU.
    "starcoder2_quick_gelu": ("starcoder2", {"hidden_act": "quick_gelu"}, None, None),
    "nemotron_plain_relu": ("nemotron", {"hidden_act": "relu"}, None, None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_lookalike_stays_unfused_and_correct(case: str) -> None:
    family, overrides, role, replacement = CASES[case]
    model = tiny_model(family, torch.bfloat16, **overrides)
    if role is not None:
        for layer in model.base_model.layers:
            name = "mlp" if role == "mlp" else "post_attention_layernorm"
            setattr(layer, name, replacement(getattr(layer, name)))
    ids = token_ids()
    with torch.no_grad():
        eager = model(ids).logits
    with fresh_compile() as report, torch.no_grad():
        ours = torch.compile(model, backend="inductor_fusion")(ids).logits
    norm_mlp = [r for r in report if r.pattern in NORM_MLP_FAMILIES]
    assert norm_mlp == [], report.summary()
    assert_within_tolerance(ours, eager, fp64_logits(model, ids))
