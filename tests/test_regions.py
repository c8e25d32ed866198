"""The pattern on lone norm -> MLP regions: every variant, the checks, and what must not fuse."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_models import DEVICES, Region, assert_within_tolerance, fresh_compile, region_hidden
from transformers.models.llama.modeling_llama import LlamaRMSNorm

pytestmark = pytest.mark.slow

# Floor of the tolerance rule where the output is stored in the dtype: one rounding to it.
ATOL = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _run(region: Region, *inputs: torch.Tensor, caches: bool = True):
    with fresh_compile(caches=caches) as report, torch.no_grad():
        out = torch.compile(region, backend="inductor_fusion")(*inputs)
    return out, report


@pytest.mark.parametrize(
    ("ndim", "bias", "residual", "dtype"),
    [
        (2, False, "left", torch.float32),
        (2, True, "none", torch.bfloat16),
        (2, False, "right", torch.bfloat16),
        (3, False, "right", torch.float16),
        (3, True, "none", torch.float32),
        (3, False, "none", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_variant_fuses_with_eager_numerics(ndim, bias, residual, dtype, device):
    region = Region(bias=bias, residual=residual).to(device=device, dtype=dtype)
    h = region_hidden(ndim, dtype, device=device)
    out, report = _run(region, h)
    assert report.count("rmsnorm_mlp") == 1
    (fused,) = report.regions
    lowp = "fp32" if dtype == torch.float32 else "lowp"
    tail = "no_residual" if residual == "none" else f"residual_{residual}"
    assert fused.variant == "_".join([lowp, f"{ndim}d", *(["bias"] if bias else []), tail])
    assert fused.path("norm") == "post_attention_layernorm"
    assert fused.path("mlp") == "mlp"
    with torch.no_grad():
        eager = region(h)
    if device == "cpu":
        # On the CPU the fused op runs the reference, the HF modules' own ATen ops in their
        # order (tests/test_fidelity.py): the compiled region is eager bit for bit.
        assert torch.equal(out, eager)
    else:
        assert_within_tolerance(out, eager, region.fp64(h), atol=ATOL[dtype])


def test_single_token():
    region = Region(bias=False, residual="left").to(torch.bfloat16)
    h = region_hidden(3, torch.bfloat16, tokens=1)
    out, report = _run(region, h)
    assert report.count("rmsnorm_mlp") == 1
    with torch.no_grad():
        assert torch.equal(out, region(h))  # CPU: the fused op is the HF math (see above)


def test_residual_of_another_tensor_keeps_the_add():
    region = Region(bias=False, residual="other")
    h, other = region_hidden(3, torch.float32), region_hidden(3, torch.float32) * 3
    out, report = _run(region, h, other)
    assert [r.variant for r in report] == ["fp32_3d_no_residual"]
    with torch.no_grad():
        # The op computes the MLP exactly as eager; Inductor's add of two fp32 tensors is one
        # correctly rounded add, as eager's is.
        assert torch.equal(out, region(h, other))


class _Float64StatsNorm(LlamaRMSNorm):
    def forward(self, h):  # same graph shape as LlamaRMSNorm, but statistics in float64
        x = h.to(torch.float64)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(h.dtype)


class _SequenceMeanNorm(LlamaRMSNorm):
    def forward(self, h):  # mean over the sequence dim: a different function, same op shapes
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(h.dtype)


@pytest.mark.parametrize("norm_cls", [_Float64StatsNorm, _SequenceMeanNorm])
def test_literals_are_checked(norm_cls):
    region = Region(bias=False, residual="left").to(torch.bfloat16)
    norm = norm_cls(80, eps=region.post_attention_layernorm.variance_epsilon).to(torch.bfloat16)
    norm.load_state_dict(region.post_attention_layernorm.state_dict())
    region.post_attention_layernorm = norm
    h = region_hidden(3, torch.bfloat16)
    out, report = _run(region, h)
    assert report.count("rmsnorm_mlp") == 0
    with torch.no_grad():
        # Truth: this (modified) region in float64; region.fp64 would be the HF formula.
        reference = copy.deepcopy(region).double()(h.double())
        assert_within_tolerance(out, region(h), reference, atol=ATOL[torch.bfloat16])


def test_float64_is_left_to_inductor():
    # A float64 graph matches no variant (its norm has the casts, its SiLU none), so this
    # checks only that nothing fuses and Inductor's numbers are right; tests/test_legality.py
    # checks that can_fuse refuses float64.
    region = Region(bias=False, residual="left").to(torch.float64)
    h = region_hidden(3, torch.float64)
    out, report = _run(region, h)
    assert report.count("rmsnorm_mlp") == 0
    with torch.no_grad():
        # LlamaRMSNorm takes its statistics in fp32 even here: eager's own error is ~1e-7.
        assert_within_tolerance(out, region(h), region.fp64(h), atol=1e-9)


def test_illegal_region_falls_back_with_one_log_line(monkeypatch, caplog):
    from inductor_fusion.patterns import norm_mlp_checks

    # The engine's check, which every family's match calls.
    monkeypatch.setattr(norm_mlp_checks, "can_fuse", lambda args: "pretend the kernel cannot do it")
    region = Region(bias=False, residual="left").to(torch.bfloat16)
    h = region_hidden(3, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="inductor_fusion"):
        # Caches off: the monkeypatched check is no part of the pass's uuid, so a cache entry
        # of the fused graph would be served, and the log line comes only from the pass itself.
        out, report = _run(region, h, caches=False)
    assert report.count("rmsnorm_mlp") == 0
    lines = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    assert len(lines) == 1 and "pretend the kernel cannot do it" in lines[0]
    with torch.no_grad():
        assert_within_tolerance(out, region(h), region.fp64(h), atol=ATOL[torch.bfloat16])


def test_post_grad_graph_loses_the_mms_and_gains_one_op():
    """vLLM-style graph check: capture the post-grad graph after our pre-pass."""
    graphs = []

    def capture(graph):
        graphs.append(
            {
                "mm": len(graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)),
                "ours": len(
                    graph.find_nodes(
                        op="call_function", target=torch.ops.inductor_fusion.rmsnorm_mlp.default
                    )
                ),
                "rsqrt": len(
                    graph.find_nodes(op="call_function", target=torch.ops.aten.rsqrt.default)
                ),
            }
        )

    region = Region(bias=False, residual="left")
    with torch._inductor.config.patch(post_grad_custom_post_pass=capture):
        _, report = _run(region, region_hidden(3, torch.float32))
    assert report.count("rmsnorm_mlp") == 1
    assert graphs == [{"mm": 0, "ours": 1, "rsqrt": 0}]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 16, 64, 300])
def test_reduce_overhead_cuda_graphs_replay(tokens):
    from inductor_fusion.triton_kernels.launch_config import MAX_PROFITABLE_TOKENS

    region = Region(bias=False, residual="left").to(device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(region, backend="inductor_fusion", mode="reduce-overhead")
    with fresh_compile() as report, torch.no_grad():
        for step in range(3):  # warm-up, record, replay
            h = region_hidden(3, torch.bfloat16, tokens=tokens, device="cuda") * (step + 1)
            out = compiled(h).clone()
            assert_within_tolerance(out, region(h), region.fp64(h), atol=ATOL[torch.bfloat16])
    # Past MAX_PROFITABLE_TOKENS the region stays Inductor's (its GEMMs are faster there).
    assert report.count("rmsnorm_mlp") == int(tokens <= MAX_PROFITABLE_TOKENS)
