"""Regions that match the pattern's structure but must not fuse: `can_fuse` and the pattern's check.

Two levels. `can_fuse` is called directly on region arguments built as real, fake (CUDA without a
GPU) or meta tensors, which reaches every one of its checks, device and ``supports`` included.
Then real compiled graphs whose region matches structurally (same ops, same literals) but whose
arguments are illegal, so the refusal comes through the pattern's `_check`: nothing fuses, the
pass logs the reason once, and the numbers are Inductor's own, right to the tolerance rule.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from hf_region import hf_formula_fp64
from tiny_models import Region, assert_within_tolerance, fresh_compile, region_hidden
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from inductor_fusion.patterns.norm_mlp_checks import RegionArgs, can_fuse

HID, INTER = 32, 48  # hidden and intermediate size of the direct cases


def region_args(
    device: str = "cpu", dtype: torch.dtype = torch.float32, *, bias: bool = False
) -> RegionArgs:
    """A legal region's arguments. "cuda" tensors are fake (no GPU needed: only metadata is
    read), "meta" ones have no data at all."""

    def make() -> RegionArgs:
        def t(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device=device, dtype=dtype)

        return RegionArgs(
            hidden=t(2, 3, HID),
            norm_weight=t(HID),
            gate_weight=t(INTER, HID),
            up_weight=t(INTER, HID),
            down_weight=t(HID, INTER),
            gate_bias=t(INTER) if bias else None,
            up_bias=t(INTER) if bias else None,
            down_bias=t(HID) if bias else None,
            eps=1e-5,
        )

    if device == "cuda":
        with FakeTensorMode():
            return make()
    return make()


def _like(t: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """``t`` with one property changed (shape=..., dtype=..., device=...), same kind of tensor."""
    shape = kwargs.pop("shape", t.shape)
    spec = {"dtype": t.dtype, "device": t.device, **kwargs}
    if t.device.type == "cuda" or spec["device"] == "cuda":
        with FakeTensorMode():
            return torch.empty(shape, **spec)
    return torch.empty(shape, **spec)


LEGAL = [
    pytest.param(device, dtype, bias, id=f"{device}-{str(dtype)[6:]}-{'bias' if bias else 'plain'}")
    for device in ("cpu", "cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
    for bias in (False, True)
]


@pytest.mark.parametrize(("device", "dtype", "bias"), LEGAL)
def test_can_fuse_accepts_legal_regions(device, dtype, bias):
    assert can_fuse(region_args(device, dtype, bias=bias)) is None


# (id, base device, base dtype, bias, {field: new value or a function of the legal args}, reason)
ILLEGAL = [
    # eps: a tensor or graph node means Inductor computes it at run time; our op takes a float.
    ("eps-tensor", "cpu", torch.float32, False, {"eps": torch.tensor(1e-5)}, "eps is not a Python float (Tensor)"),
    ("eps-node", "cpu", torch.bfloat16, False, {"eps": torch.fx.Graph().placeholder("eps")}, "eps is not a Python float (Node)"),
    ("scalar-weight", "cpu", torch.float32, False, {"norm_weight": 1.0}, "no tensor metadata"),
    ("float64", "cpu", torch.float64, False, {}, "unsupported dtype torch.float64"),
    ("float64-cuda", "cuda", torch.float64, False, {}, "unsupported dtype torch.float64"),
    ("mixed-norm-weight", "cpu", torch.float32, False, {"norm_weight": lambda a: _like(a.norm_weight, dtype=torch.bfloat16)}, "mixed dtypes"),
    ("mixed-mlp-weight", "cuda", torch.bfloat16, False, {"up_weight": lambda a: _like(a.up_weight, dtype=torch.float16)}, "mixed dtypes"),
    ("mixed-bias", "cpu", torch.float16, True, {"down_bias": lambda a: _like(a.down_bias, dtype=torch.float32)}, "mixed dtypes"),
    ("meta-device", "meta", torch.float16, False, {}, "unsupported device meta"),
    ("weight-elsewhere", "cpu", torch.float32, False, {"gate_weight": lambda a: _like(a.gate_weight, device="meta")}, "different devices"),
    ("cuda-and-cpu", "cuda", torch.bfloat16, False, {"norm_weight": lambda a: _like(a.norm_weight, device="cpu")}, "different devices"),
    ("hidden-1d", "cpu", torch.float32, False, {"hidden": lambda a: _like(a.hidden, shape=(HID,))}, "hidden has 1 dims"),
    ("hidden-width", "cpu", torch.float32, False, {"hidden": lambda a: _like(a.hidden, shape=(6, HID + 1))}, "hidden[-1] has shape"),
    ("norm-weight-broadcast", "cpu", torch.float32, False, {"norm_weight": lambda a: _like(a.norm_weight, shape=(1,))}, "norm_weight has shape (1,)"),
    ("up-weight-rows", "cuda", torch.float16, False, {"up_weight": lambda a: _like(a.up_weight, shape=(INTER + 1, HID))}, "up_weight has shape"),
    ("down-weight-transposed", "cpu", torch.float32, False, {"down_weight": lambda a: _like(a.down_weight, shape=(INTER, HID))}, "down_weight has shape"),
    ("gate-bias", "cpu", torch.float32, True, {"gate_bias": lambda a: _like(a.gate_bias, shape=(HID,))}, "gate_bias has shape"),
    ("up-bias", "cpu", torch.float32, True, {"up_bias": lambda a: _like(a.up_bias, shape=(1,))}, "up_bias has shape"),
    ("down-bias", "cuda", torch.bfloat16, True, {"down_bias": lambda a: _like(a.down_bias, shape=(INTER,))}, "down_bias has shape"),
    # Consistent shapes that the kernels refuse (`supports`, consulted on CUDA only).
    ("empty-intermediate", "cuda", torch.float16, False, {
        "gate_weight": lambda a: _like(a.gate_weight, shape=(0, HID)),
        "up_weight": lambda a: _like(a.up_weight, shape=(0, HID)),
        "down_weight": lambda a: _like(a.down_weight, shape=(HID, 0)),
    }, "empty weights"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("device", "dtype", "bias", "changes", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in ILLEGAL],
)
def test_can_fuse_refuses(device, dtype, bias, changes, reason):
    args = region_args(device, dtype, bias=bias)
    changed = {k: v(args) if callable(v) else v for k, v in changes.items()}
    got = can_fuse(dataclasses.replace(args, **changed))
    assert got is not None and reason in got, got


# --- through compiled graphs --------------------------------------------------------------------


def _compile_refused(fn, *inputs, reason: str, caplog) -> torch.Tensor:
    """Compiles and runs ``fn``; asserts nothing fused and one INFO line gave ``reason``."""
    with (
        caplog.at_level(logging.INFO, logger="inductor_fusion"),
        # Caches off: the reason line comes from the pass, which a cache hit does not run.
        fresh_compile(caches=False) as report,
        torch.no_grad(),
    ):
        out = torch.compile(fn, backend="inductor_fusion")(*inputs)
    assert report.count("rmsnorm_mlp") == 0
    lines = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    # One line per region, although each of its variants (with and without the add) was tried.
    assert len(lines) == 1, lines
    assert reason in lines[0], lines[0]
    return out


class _TensorEpsNorm(LlamaRMSNorm):
    """LlamaRMSNorm with eps kept as a 0-d buffer: the graph's add reads a tensor input."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps=eps)
        self.register_buffer("eps_tensor", torch.tensor(eps))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps_tensor)
        return self.weight * hidden_states.to(input_dtype)


def _refit_norm(region: Region, norm: torch.nn.Module) -> Region:
    with torch.no_grad():
        norm.weight.copy_(region.post_attention_layernorm.weight.float())
    region.post_attention_layernorm = norm
    return region


@pytest.mark.slow
def test_mixed_dtype_region_is_refused(caplog):
    # fp32 activations and MLP with a bf16 norm weight: `weight * x` promotes to fp32, so the
    # graph is the fp32 variant's, op for op, but the op would need one dtype for all inputs.
    # (bf16 activations with fp32 weights do not reach can_fuse: their SiLU has no casts.)
    region = Region(bias=False, residual="left")
    region.post_attention_layernorm.to(torch.bfloat16)
    h = region_hidden(3, torch.float32)
    out = _compile_refused(
        region, h, reason="mixed dtypes: torch.bfloat16, torch.float32", caplog=caplog
    )
    with torch.no_grad():
        assert_within_tolerance(out, region(h), region.fp64(h), atol=1e-6)


@pytest.mark.slow
def test_broadcast_norm_weight_is_refused(caplog):
    # A single gain broadcast over the hidden dim: the same graph, a weight our op cannot take.
    region = Region(bias=False, residual="left")
    region.post_attention_layernorm.weight = torch.nn.Parameter(torch.tensor([1.3]))
    h = region_hidden(3, torch.float32)
    out = _compile_refused(
        region, h, reason="norm_weight has shape (1,), expected (80,)", caplog=caplog
    )
    with torch.no_grad():
        assert_within_tolerance(out, region(h), region.fp64(h), atol=1e-6)


@pytest.mark.slow
def test_tensor_eps_is_refused(caplog):
    region = Region(bias=False, residual="left")
    _refit_norm(region, _TensorEpsNorm(80, eps=0.1))
    h = region_hidden(3, torch.float32)
    out = _compile_refused(region, h, reason="eps is not a Python float", caplog=caplog)
    with torch.no_grad():
        assert_within_tolerance(out, region(h), region.fp64(h), atol=1e-6)


def _hf_region_fn(h, norm_weight, gate_weight, up_weight, down_weight):
    """LlamaRMSNorm (eps 0.1) + LlamaMLP + residual written out, weights as inputs so that their
    sizes can be marked dynamic (module parameters are always static)."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.1)
    n = norm_weight * x.to(h.dtype)
    return h + F.linear(F.silu(F.linear(n, gate_weight)) * F.linear(n, up_weight), down_weight)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", ["intermediate", "hidden"])
def test_symbolic_sizes_are_refused(dynamic, caplog):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, 5, 80, generator=gen) * 0.05
    weights = [
        1.0 + 0.1 * torch.randn(80, generator=gen),
        torch.randn(176, 80, generator=gen) * 80**-0.5,
        torch.randn(176, 80, generator=gen) * 80**-0.5,
        torch.randn(80, 176, generator=gen) * 176**-0.5,
    ]
    # Every dim of that size, so that the graph's shapes agree on one symbol.
    if dynamic == "intermediate":
        marks = [(weights[1], 0), (weights[2], 0), (weights[3], 1)]
    else:
        marks = [(h, 2), (weights[0], 0), (weights[1], 1), (weights[2], 1), (weights[3], 0)]
    for tensor, dim in marks:
        torch._dynamo.mark_dynamic(tensor, dim)
    out = _compile_refused(
        _hf_region_fn, h, *weights, reason="symbolic hidden or intermediate size", caplog=caplog
    )
    truth = hf_formula_fp64(h, *weights, residual=h, eps=0.1)
    assert_within_tolerance(out, _hf_region_fn(h, *weights), truth, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dtype"), [("llama", torch.float64), ("qwen3", torch.float32)])
def test_every_unfused_candidate_gets_one_info_line(family, dtype, caplog):
    """A region that no variant matches (a float64 graph: its SiLU has no casts) is still named,
    once, with the reason; the attention-side and final norms are never taken for candidates."""
    from tiny_models import tiny_model, token_ids

    model = tiny_model(family, dtype)
    ids = token_ids()
    # Caches off: the lines come from the pass, which a cache hit does not run.
    with (
        caplog.at_level(logging.INFO, logger="inductor_fusion"),
        fresh_compile(caches=False) as report,
        torch.no_grad(),
    ):
        ours = torch.compile(model, backend="inductor_fusion")(ids).logits
        eager = model(ids).logits
    lines = [r.getMessage() for r in caplog.records if "candidate" in r.getMessage()]
    layers = model.config.num_hidden_layers
    if dtype == torch.float64:
        assert report.count("rmsnorm_mlp") == 0
        assert len(lines) == layers
        for i in range(layers):
            assert any(f"model.layers.{i}.post_attention_layernorm" in line for line in lines)
        assert all("unsupported dtype torch.float64" in line for line in lines)
    else:
        assert report.count("rmsnorm_mlp") == layers
        assert lines == []
    # Inductor's code (and our op's) rounds the fp32 norm math as eager does, up to reordering.
    assert ((ours - eager).norm() / eager.norm()).item() < 2e-6
