"""Whole transformers models compiled with backend="inductor_fusion": what fuses, and numerics."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    DEVICES,
    FP32_VS_EAGER,
    assert_fused,
    assert_within_tolerance,
    fp64_logits,
    fresh_compile,
    layer_paths,
    rel_l2,
    tiny_model,
    token_ids,
)

pytestmark = pytest.mark.slow


def _compile_run(model, ids, **compile_kwargs):
    compiled = torch.compile(model, backend="inductor_fusion", **compile_kwargs)
    with torch.no_grad():
        return compiled(ids).logits


def _eager_and_ours(model, ids):
    """Eager logits, our compiled logits, and the report of that one compile."""
    with torch.no_grad():
        eager = model(ids).logits
    with fresh_compile() as report:
        ours = _compile_run(model, ids)
    return eager, ours, report


@pytest.mark.parametrize(
    ("family", "dtype"),
    [
        ("llama", torch.float32),
        ("llama", torch.bfloat16),
        ("llama", torch.float16),
        ("mistral", torch.bfloat16),
        ("qwen2", torch.float32),
        ("qwen2", torch.bfloat16),
        ("qwen3", torch.float32),
        ("qwen3", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_every_post_attention_region_fuses(family, dtype, device):
    model = tiny_model(family, dtype, device=device)
    ids = token_ids(device=device)
    eager, ours, report = _eager_and_ours(model, ids)
    # Exactly one region per decoder layer, at the post-attention norm and the MLP: the
    # input_layernorm -> attention, the final norm -> lm_head and Qwen3's q_norm/k_norm stay.
    assert report.count("rmsnorm_mlp") == model.config.num_hidden_layers
    assert sorted(report.paths("rmsnorm_mlp", "norm")) == layer_paths("post_attention_layernorm")
    assert sorted(report.paths("rmsnorm_mlp", "mlp")) == layer_paths("mlp")
    # rmsnorm_mlp's only: the attention fuses too (gqa_decode) where the transformers version
    # passes SDPA a mask at prefill (5.17 on the CPU; 5.24 passes none).
    assert {r.variant for r in report if r.pattern == "rmsnorm_mlp"} == {
        ("fp32" if dtype == torch.float32 else "lowp") + "_3d_residual_left"
    }
    assert_within_tolerance(ours, eager, fp64_logits(model, ids))


def test_mlp_bias_variant_fuses():
    model = tiny_model("llama", torch.bfloat16, mlp_bias=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()  # zeros would hide a dropped bias
    ids = token_ids()
    eager, ours, report = _eager_and_ours(model, ids)
    assert report.count("rmsnorm_mlp") == 2
    assert {r.variant for r in report if r.pattern == "rmsnorm_mlp"} == {
        "lowp_3d_bias_residual_left"
    }
    assert_within_tolerance(ours, eager, fp64_logits(model, ids))


def test_gelu_mlp_is_not_matched():
    model = tiny_model("llama", torch.float32, hidden_act="gelu")
    ids = token_ids()
    eager, ours, report = _eager_and_ours(model, ids)
    assert report.count("rmsnorm_mlp") == 0
    assert rel_l2(ours, eager) < FP32_VS_EAGER


def test_mark_dynamic_token_count():
    model = tiny_model("llama", torch.float32)
    compiled = torch.compile(model, backend="inductor_fusion")
    with fresh_compile() as report, torch.no_grad():
        for seq in (257, 9):  # odd token counts; the second must reuse the dynamic graph
            ids = token_ids(batch=1, seq=seq, seed=seq)
            torch._dynamo.mark_dynamic(ids, 1)
            ours = compiled(ids).logits
            assert rel_l2(ours, model(ids).logits) < FP32_VS_EAGER
    assert report.count("rmsnorm_mlp") == 2  # one dynamic graph, compiled once


def test_automatic_dynamic_token_count():
    model = tiny_model("qwen2", torch.float32)
    compiled = torch.compile(model, backend="inductor_fusion")
    with fresh_compile() as report, torch.no_grad():
        for seq in (5, 11, 13):  # the second shape recompiles as dynamic, the third reuses it
            ids = token_ids(batch=1, seq=seq, seed=seq)
            assert rel_l2(compiled(ids).logits, model(ids).logits) < FP32_VS_EAGER
    assert report.count("rmsnorm_mlp") == 4  # the static graph, then the dynamic one


def test_dynamic_true_with_eps_as_input_fuses():
    # With dynamic=True Dynamo lifts eps to a graph input; the backend specializes it (guarded)
    # and every layer fuses with the model's eps, never a wrong one.
    model = tiny_model("llama", torch.float32, rms_norm_eps=0.25)
    ids = token_ids()
    with fresh_compile() as report:
        ours = _compile_run(model, ids, dynamic=True)
    with torch.no_grad():
        assert rel_l2(ours, model(ids).logits) < FP32_VS_EAGER
    assert_fused(report, model.config.num_hidden_layers)
