"""Each Hugging Face decoder family's norm -> MLP region fuses, once per layer, at the right
modules, with logits within the tolerance rule (our error vs fp64 <= 2x eager's + atol).

On the CPU the op runs its reference. One compile per case (~15 s each on 2 cores): bf16 for every
family, fp32 where the fp32 graph differs in more than its casts (Gemma's ``1 + w``, Phi-3's
split).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    assert_within_tolerance,
    fp64_logits,
    fresh_compile,
    layer_paths,
    tiny_model,
    token_ids,
)

import inductor_fusion

pytestmark = pytest.mark.slow
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NON_GATED = ("gpt_neox", "starcoder2", "nemotron")  # one up-projection


def norm_mlp_regions(report: inductor_fusion.FusionReport) -> list[inductor_fusion.FusedRegion]:
    """The report's regions but gqa_decode's. The attention of these GQA models fuses too where
    the transformers version passes SDPA a materialised mask at prefill (5.17 does on the CPU;
    5.24 passes none, so nothing matches): tests/test_gqa_attention.py holds that family to
    account, and the logits checked here cover both."""
    return [r for r in report if r.pattern != "gqa_decode"]


# family, config overrides, dtype, pattern, expected variant, norm module, model prefix
CASES = [
    ("gemma", {}, torch.bfloat16, "rmsnorm_mlp", "gemma_lowp_3d_residual_left", "post_attention_layernorm", "model"),
    ("gemma", {}, torch.float32, "rmsnorm_mlp", "gemma_fp32_3d_residual_left", "post_attention_layernorm", "model"),
    # A second norm on the MLP output: fused up to the MLP output, post-norm + add stay Inductor's.
    ("gemma2", {}, torch.bfloat16, "rmsnorm_mlp", "gemma_lowp_3d_no_residual", "pre_feedforward_layernorm", "model"),
    ("gemma3", {}, torch.bfloat16, "rmsnorm_mlp", "gemma_lowp_3d_no_residual", "pre_feedforward_layernorm", "model"),
    ("granite", {}, torch.bfloat16, "rmsnorm_mlp", "granite_lowp_3d_residual_scaled", "post_attention_layernorm", "model"),
    ("granite", {}, torch.float32, "rmsnorm_mlp", "granite_fp32_3d_residual_scaled", "post_attention_layernorm", "model"),
    ("phi3", {}, torch.bfloat16, "rmsnorm_mlp", "phi3_lowp_3d_residual_left", "post_attention_layernorm", "model"),
    ("phi3", {}, torch.float32, "rmsnorm_mlp", "phi3_fp32_3d_residual_left", "post_attention_layernorm", "model"),
    ("nemotron", {}, torch.bfloat16, "layernorm_mlp", "nemotron_lowp_3d_residual_left", "post_attention_layernorm", "model"),
    ("starcoder2", {}, torch.bfloat16, "layernorm_mlp", "starcoder2_lowp_3d_bias_residual_left", "post_attention_layernorm", "model"),
    # Parallel residual, mlp + attn + h: the add of attn joins the region, the add of h does not.
    ("gpt_neox", {"hidden_act": "gelu"}, torch.bfloat16, "layernorm_mlp", "gpt_neox_lowp_3d_bias_residual_parallel", "post_attention_layernorm", "gpt_neox"),
    ("gpt_neox", {"hidden_act": "gelu"}, torch.float32, "layernorm_mlp", "gpt_neox_fp32_3d_bias_residual_parallel", "post_attention_layernorm", "gpt_neox"),
    ("gpt_neox", {"hidden_act": "gelu", "use_parallel_residual": False}, torch.float32, "layernorm_mlp", "gpt_neox_fp32_3d_bias_residual_right", "post_attention_layernorm", "gpt_neox"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("family", "overrides", "dtype", "pattern", "variant", "norm", "prefix"),
    CASES,
    ids=[
        f"{c[0]}-{'seq-' if c[1].get('use_parallel_residual') is False else ''}{str(c[2])[6:]}"
        for c in CASES
    ],
)
def test_family_region_fuses_once_per_layer(
    family, overrides, dtype, pattern, variant, norm, prefix
):
    # On the GPU machine the same cases run our Triton kernels in bf16 (issue #10's GPU proof).
    model = tiny_model(family, dtype, device=DEVICE, **overrides)
    ids = token_ids(device=DEVICE)
    with torch.no_grad():
        eager = model(ids).logits
    with fresh_compile() as report, torch.no_grad():
        ours = torch.compile(model, backend="inductor_fusion")(ids).logits
    layers = model.config.num_hidden_layers
    regions = norm_mlp_regions(report)
    if DEVICE == "cuda" and family in NON_GATED:
        # Profitability: on CUDA these regions stay Inductor's (see should_fuse).
        assert report.count(pattern) == 0, report.summary()
        assert_within_tolerance(ours, eager, fp64_logits(model, ids))
        return
    assert report.count(pattern) == layers, report.summary()
    assert len(regions) == layers, report.summary()  # no other norm -> MLP region anywhere
    assert {r.variant for r in regions} == {variant}
    paths = [p.replace("model.", f"{prefix}.", 1) for p in layer_paths(norm)]
    assert sorted(report.paths(pattern, "norm")) == paths
    assert sorted(report.paths(pattern, "mlp")) == [p.rsplit(".", 1)[0] + ".mlp" for p in paths]
    assert_within_tolerance(ours, eager, fp64_logits(model, ids))


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("gemma", {"RMSNorm": "model.layers.*.post_attention_layernorm"}),
        ("gemma2", {"RMSNorm": "model.layers.*.pre_feedforward_layernorm"}),
        ("gemma3", {"RMSNorm": "model.layers.*.pre_feedforward_layernorm"}),
        ("phi3", {"RMSNorm": "model.layers.*.post_attention_layernorm"}),
        ("granite", {"RMSNorm": "model.layers.*.post_attention_layernorm"}),
        ("gpt_neox", {"LayerNorm": "gpt_neox.layers.*.post_attention_layernorm"}),
        ("starcoder2", {"LayerNorm": "model.layers.*.post_attention_layernorm"}),
        ("nemotron", {"LayerNorm": "model.layers.*.post_attention_layernorm"}),
        ("olmo2", {}),  # no norm in front of the MLP: the region is the MLP alone
    ],
)
def test_kernel_config_registry_names_each_family(family, expected):
    import inductor_fusion

    mlp = next(iter(expected.values()), "model.layers.*.x").rsplit(".", 1)[0] + ".mlp"
    assert inductor_fusion.fusable_modules(tiny_model(family)) == {**expected, "MLP": mlp}


# --- OLMo-2: h + post_feedforward_layernorm(mlp(h)), no norm in front of the MLP ------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_olmo2_mlp_fuses_once_per_layer(dtype):
    # The MLP alone is the region (norm "none"); the post-norm and the add stay Inductor's.
    model = tiny_model("olmo2", dtype)
    ids = token_ids()
    with torch.no_grad():
        eager = model(ids).logits
    with fresh_compile() as report, torch.no_grad():
        ours = torch.compile(model, backend="inductor_fusion")(ids).logits
    kind = "lowp" if dtype == torch.bfloat16 else "fp32"
    regions = norm_mlp_regions(report)
    assert [r.variant for r in regions] == [f"olmo2_{kind}_3d_no_residual"] * 2, report.summary()
    assert sorted(report.paths("mlp_postnorm", "mlp")) == layer_paths("mlp")
    assert all([role for role, _ in r.paths] == ["mlp"] for r in regions)
    assert_within_tolerance(ours, eager, fp64_logits(model, ids))


@pytest.mark.parametrize("patterns", ["rmsnorm_mlp,mlp_postnorm", "mlp_postnorm"])
def test_mlp_postnorm_never_takes_the_mlp_of_a_norm_mlp_region(patterns):
    # A Llama MLP looks like OLMo-2's without its norm; it is rmsnorm_mlp's region, with its
    # norm, whatever order the families run in, and mlp_postnorm alone fuses nothing there.
    model, ids = tiny_model("llama", torch.bfloat16), token_ids()
    with fresh_compile() as report, torch.no_grad():
        torch.compile(model, backend=inductor_fusion.backend(patterns=patterns))(ids)
    if patterns == "mlp_postnorm":
        assert len(report) == 0, report.summary()
    else:
        assert [r.pattern for r in report] == ["rmsnorm_mlp"] * 2, report.summary()
        assert sorted(report.paths("rmsnorm_mlp", "norm")) == layer_paths(
            "post_attention_layernorm"
        )


def test_olmo2_kernel_config_selects_one_layer():
    # The inline (name, glob) form of a one-module family.
    model, ids = tiny_model("olmo2", torch.bfloat16), token_ids()
    inductor_fusion.apply_kernel_config(
        model, {(("MLP", "model.layers.1.mlp"),): "inductor_fusion:mlp_postnorm"}
    )
    with fresh_compile() as report, torch.no_grad():
        torch.compile(model, backend="inductor_fusion")(ids)
    assert report.paths("mlp_postnorm", "mlp") == ["model.layers.1.mlp"], report.summary()


class _ParallelRegion(torch.nn.Module):
    """GPT-NeoX's parallel form around its MLP: ``mlp(ln(h)) + other`` (other: the attention
    output), with ``other`` of hidden's shape or broadcast over the tokens."""

    def __init__(self):
        super().__init__()
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP

        config = tiny_model("gpt_neox", hidden_act="gelu").config
        self.post_attention_layernorm = torch.nn.LayerNorm(config.hidden_size, eps=0.1)
        self.mlp = GPTNeoXMLP(config)
        with torch.no_grad():
            for param in self.parameters():
                param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)

    def forward(self, h, other):
        return self.mlp(self.post_attention_layernorm(h)) + other


@pytest.mark.parametrize("broadcast", [False, True], ids=["same-shape", "broadcast"])
def test_parallel_residual_joins_only_a_tensor_of_hiddens_shape(broadcast):
    region = _ParallelRegion()
    h = torch.randn(2, 5, 80)
    other = torch.randn(80) if broadcast else torch.randn(2, 5, 80)
    with fresh_compile() as report, torch.no_grad():
        out = torch.compile(region, backend="inductor_fusion")(h, other)
        expected = region(h, other)
    residual = "no_residual" if broadcast else "residual_parallel"
    assert [r.variant for r in report] == [f"gpt_neox_fp32_3d_bias_{residual}"], report.summary()
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_non_gated_regions_stay_inductors_on_cuda_only():
    """should_fuse: a non-gated MLP (one up-projection) is refused on CUDA, where our kernels
    measured slower than Inductor's; a gated one of the same shape fuses, and on the CPU both do
    (the op is the reference there, and CPU CI exercises the same graphs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from inductor_fusion.patterns.norm_mlp_checks import RegionArgs, should_fuse

    def args(device: str, gated: bool) -> RegionArgs:
        with FakeTensorMode():
            t = [
                torch.empty(s, device=device) for s in [(1, 3, 8), (8,), (12, 8), (12, 8), (8, 12)]
            ]
        if not gated:
            t[3] = None
        return RegionArgs(*t, None, None, None, eps=1e-5)

    assert "non-gated MLP on CUDA" in should_fuse(args("cuda", False))
    assert should_fuse(args("cuda", True)) is None
    assert should_fuse(args("cpu", False)) is None


@pytest.mark.parametrize(
    ("hidden", "inter", "tokens", "fused"),
    [
        (2304, 9216, 16, True),
        (2304, 9216, 17, False),
        (2048, 8192, 64, True),
        (4096, 7168, 64, True),
        (4096, 3584, 16, True),
        (4096, 3584, 17, False),
        (4096, 1792, 1, False),
    ],
    ids=["gemma2-2b-16", "gemma2-2b-17", "llama-1b-64", "tp2-64", "tp4-16", "tp4-17", "tp8-1"],
)
def test_shapes_measured_slower_stop_fusing_earlier_on_cuda(hidden, inter, tokens, fused):
    """Gemma-2-2B's region lost to torch.compile at M=64 on the H200 even tuned (0.90x): on CUDA
    it fuses up to 16 tokens only; so does one rank's Llama-3-8B region on 4 GPUs (I = 3584),
    and on 8 GPUs (I = 1792) it never fuses; other shapes keep the general bound (64)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from inductor_fusion.patterns.norm_mlp_checks import RegionArgs, should_fuse

    with FakeTensorMode():
        shapes = [(1, tokens, hidden), (hidden,), (inter, hidden), (inter, hidden), (hidden, inter)]
        t = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    reason = should_fuse(RegionArgs(*t, None, None, None, eps=1e-6))
    assert (reason is None) is fused, reason
    if not fused and inter == 1792:
        assert reason.startswith("4096x1792: our kernels measured slower"), reason
    elif not fused:
        assert reason.startswith(f"{tokens} tokens: above 16 "), reason
