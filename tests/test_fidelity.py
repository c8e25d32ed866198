"""Our reference and the op's CPU path against the transformers modules they claim to compute.

The kernel tests measure the Triton kernels against HF-derived truth; these pin down the other
end: on the CPU, ``rmsnorm_mlp_reference`` and ``torch.ops.inductor_fusion.rmsnorm_mlp`` must be
the HF region bit for bit (same ATen ops in the same order on the same CPU, so nothing excuses a
difference). Inputs are small (hidden ~ 0.05·N(0,1): mean square 2.5e-3) and eps is large, so
where eps goes and when the normalised value is rounded to the input dtype both show.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_region import hf_region
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_models import rel_l2

from inductor_fusion.triton_kernels.rmsnorm_mlp import rmsnorm_mlp_reference

OP = torch.ops.inductor_fusion.rmsnorm_mlp.default
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # "llama" or "qwen3": whose RMSNorm and MLP classes give the truth
    dtype: torch.dtype
    lead: tuple[int, ...]  # leading dims of hidden: (M,) or (B, S)
    hidden_size: int
    inter_size: int
    eps: float
    bias: bool  # Llama's mlp_bias=True (Qwen3's MLP has none)
    residual: bool  # the decoder layer's `residual + mlp(...)`, residual being the norm's input
    seed: int


def _tensors(case: Case) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(case.seed)
    h, i = case.hidden_size, case.inter_size

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(case.dtype)

    def bias(n: int) -> torch.Tensor | None:
        return randn(n, std=0.1) if case.bias else None

    return {
        "hidden": randn(*case.lead, h, std=0.05),
        "norm_weight": 1.0 + randn(h, std=0.1),
        "gate_weight": randn(i, h, std=h**-0.5),
        "up_weight": randn(i, h, std=h**-0.5),
        "down_weight": randn(h, i, std=i**-0.5),
        "gate_bias": bias(i),
        "up_bias": bias(i),
        "down_bias": bias(h),
    }


def _hf(case: Case, t: dict[str, torch.Tensor | None]) -> torch.Tensor:
    residual = t["hidden"] if case.residual else None
    return hf_region(**t, residual=residual, eps=case.eps, family=case.family)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    family = draw(st.sampled_from(("llama", "qwen3")))
    if draw(st.booleans()):
        lead = (draw(st.integers(1, 9)),)
    else:
        lead = (draw(st.integers(1, 2)), draw(st.integers(1, 5)))
    return Case(
        family=family,
        dtype=draw(st.sampled_from(DTYPES)),
        lead=lead,
        hidden_size=draw(st.integers(1, 67)),
        inter_size=draw(st.integers(1, 71)),
        # 1e-6 is Llama's default; 0.1 and 1.0 dominate the mean square of these inputs.
        eps=draw(st.sampled_from((1e-6, 0.1, 1.0))),
        bias=family == "llama" and draw(st.booleans()),
        residual=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


BASE = Case("llama", torch.bfloat16, (1,), 33, 47, 0.1, False, True, 0)


# Each example costs a couple of milliseconds; 40 cover every family x dtype x eps cell a few
# times over. The explicit examples are the decode shape (M=1) in each dtype at each large eps.
@settings(derandomize=True, database=None, max_examples=40, deadline=None)
@given(case=cases())
@example(case=BASE)
@example(case=dataclasses.replace(BASE, dtype=torch.float16, eps=1.0, bias=True))
@example(case=dataclasses.replace(BASE, dtype=torch.float32, lead=(2, 3), family="qwen3"))
@example(case=dataclasses.replace(BASE, family="qwen3", eps=1.0, residual=False))
def test_reference_and_cpu_op_are_the_hf_region(case):
    t = _tensors(case)
    expected = _hf(case, t)
    residual = t["hidden"] if case.residual else None
    ours = rmsnorm_mlp_reference(**t, residual=residual, eps=case.eps)
    assert torch.equal(ours, expected), f"reference differs from {case.family} modules: {case}"
    op = OP(*t.values(), residual, case.eps)
    assert op.dtype == case.dtype and op.shape == expected.shape
    assert torch.equal(op, expected), f"CPU op differs from {case.family} modules: {case}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_inputs_make_the_near_misses_visible(dtype, eps):
    """The bit-exact test above has teeth only if plausible wrong formulas give other bits on
    these inputs: eps dropped or added after the rsqrt, and the weight multiplied before the
    rounding to the input dtype (what a fused kernel does naturally, and Gemma's order)."""
    case = dataclasses.replace(BASE, dtype=dtype, eps=eps, lead=(4,))
    t = _tensors(case)
    hf = _hf(case, t)
    x = t["hidden"].float()
    mean_sq = x.pow(2).mean(-1, keepdim=True)
    variants = {
        "no eps": x * torch.rsqrt(mean_sq),
        "eps after rsqrt": x * (torch.rsqrt(mean_sq) + eps),
        "weight before rounding": (x * torch.rsqrt(mean_sq + eps) * t["norm_weight"].float()),
    }
    for what, normed in variants.items():
        if what != "weight before rounding":
            normed = normed.to(dtype) * t["norm_weight"]
        normed = normed.to(dtype)
        wrong = torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(normed, t["gate_weight"]))
            * torch.nn.functional.linear(normed, t["up_weight"]),
            t["down_weight"],
        )
        assert not torch.equal(t["hidden"] + wrong, hf), what
    # eps is large against the inputs' mean square: it changes the output by whole percents.
    small_eps = _hf(dataclasses.replace(case, eps=1e-6), t)
    assert rel_l2(hf, small_eps) > 0.05
