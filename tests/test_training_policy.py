"""The memory policy of compiled training regions (`inductor_fusion.patterns.training`) and its
``silu_mul`` op: which forward values are saved, which recomputed, and that the recomputed
activation computes what the Hugging Face module computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_models import rel_l2
from torch.utils.checkpoint import CheckpointPolicy

from inductor_fusion.patterns import norm_mlp, training
from inductor_fusion.triton_kernels.silu_mul import silu_mul_reference, silu_mul_triton

SILU_MUL = torch.ops.inductor_fusion.silu_mul.default


def _llama_training_graph(lowp: bool, ndim: int) -> torch.fx.Graph:
    from torch._inductor.pattern_matcher import joint_fwd_bwd

    variant = next(
        v
        for v in norm_mlp.variants()
        if v.training and v.lowp == lowp and v.ndim == ndim and v.residual == "left"
        and not v.bias and not v.autocast
    )  # fmt: skip
    fn = norm_mlp._positional(variant.search, variant.argnames)
    return joint_fwd_bwd(fn, variant.example_inputs()).graph


def _policies(graph: torch.fx.Graph) -> dict[str, list[object]]:
    out: dict[str, list[object]] = {}
    for node in graph.nodes:
        out.setdefault(str(node.target), []).append(node.meta.get("recompute"))
    return out


@pytest.mark.parametrize("lowp,ndim", [(True, 3), (False, 2)])
def test_default_mode_saves_rstd_and_projections_and_recomputes_the_rest(lowp, ndim):
    graph = _llama_training_graph(lowp, ndim)
    assert training.tag_saved(graph, "default") > 0
    policies = _policies(graph)
    assert policies["aten.rsqrt.default"] == [CheckpointPolicy.MUST_SAVE]
    mm = policies["aten.mm.default"]
    # gate and up saved; the down projection and the backward's GEMMs untagged.
    assert mm.count(CheckpointPolicy.MUST_SAVE) == 2 and mm.count(None) == len(mm) - 2
    # The activation (exp of silu's decomposition) and the norm's products are recomputed.
    assert CheckpointPolicy.MUST_RECOMPUTE in policies["aten.exp.default"]
    assert CheckpointPolicy.MUST_RECOMPUTE in policies["aten.mul.Tensor"]
    # The residual add (the region's output, the next layer's input) is the partitioner's.
    assert policies["aten.add.Tensor"].count(CheckpointPolicy.MUST_RECOMPUTE) == 2  # eps, silu


def test_recompute_mode_recomputes_the_projections_too():
    graph = _llama_training_graph(True, 3)
    training.tag_saved(graph, "recompute")
    mm = _policies(graph)["aten.mm.default"]
    assert mm.count(CheckpointPolicy.MUST_RECOMPUTE) == 2 and CheckpointPolicy.MUST_SAVE not in mm


def test_unknown_mode_and_non_training_graphs_are_refused():
    with pytest.raises(ValueError, match="unknown memory mode 'recompte'"):
        training.tag_saved(_llama_training_graph(True, 3), "recompte")
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("x"))
    with pytest.raises(ValueError, match="not a traced training region"):
        training.tag_saved(graph, "default")


@pytest.mark.parametrize("lowp,ndim", [(True, 3), (False, 2)])
def test_the_weight_gradient_reads_its_own_activation_op(lowp, ndim):
    """The down projection's weight gradient reads `silu_mul` of the gate/up projections, tagged
    for the backward; the forward still computes its activation with Inductor's ops."""
    graph = _llama_training_graph(lowp, ndim)
    assert training.recompute_activation_apart(graph) is True
    (node,) = graph.find_nodes(op="call_function", target=SILU_MUL)
    assert node.meta["recompute"] == CheckpointPolicy.MUST_RECOMPUTE
    assert all(a.target == torch.ops.aten.mm.default for a in node.args)
    (user,) = node.users
    assert user.target == torch.ops.aten.mm.default  # dy^T @ silu(g) * u
    assert graph.find_nodes(op="call_function", target=torch.ops.aten.exp.default)
    val = node.meta["val"]
    assert (
        val.shape == node.args[0].meta["val"].shape and val.dtype == node.args[0].meta["val"].dtype
    )


def test_the_traced_replacement_carries_the_metadata_the_matcher_copies():
    """torch 2.11's pattern matcher asserts that each replacement node with a tensor "val" also
    has "tensor_meta" (its GPU run failed on the inserted op without it)."""
    variant = next(v for v in norm_mlp.variants() if v.training and v.lowp and v.ndim == 3)
    fn = norm_mlp._positional(variant.search, variant.argnames)
    gm = training.trace_region(lambda: "default")(fn, variant.example_inputs())
    nodes = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert any(n.target == SILU_MUL for n in nodes)
    missing = [n.name for n in nodes if n.op == "call_function" and "tensor_meta" not in n.meta]
    assert not missing


def test_other_activations_keep_the_forward_nodes():
    """A GELU MLP's activation is no silu(gate) * up: the op would compute another function."""
    from torch._inductor.pattern_matcher import joint_fwd_bwd

    def gelu_region(h, wg, wu, wd):
        return h + F.linear(F.gelu(F.linear(h, wg), approximate="tanh") * F.linear(h, wu), wd)

    args = [torch.empty(s, requires_grad=True) for s in [(6, 32), (48, 32), (48, 32), (32, 48)]]
    graph = joint_fwd_bwd(gelu_region, args).graph
    assert training.recompute_activation_apart(graph) is False
    assert not graph.find_nodes(op="call_function", target=SILU_MUL)


_DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if torch.cuda.is_available() else [])]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from([(1,), (7, 5), (3, 2049), (2, 3, 333)]),
    dtype=st.sampled_from(_DTYPES),
    scale=st.sampled_from([1.0, 8.0]),
)
@example(shape=(1,), dtype=torch.float16, scale=1.0)
def test_silu_mul_kernel_matches_the_module_within_tolerance(shape, dtype, scale):
    """The Triton kernel (Triton's interpreter on CPU: fp32/fp16) against fp64, within twice
    eager's own error plus one rounding; sizes off the block size, one element."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(shape, generator=g) * scale).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    truth = F.silu(gate.double()) * up.double()
    eager = silu_mul_reference(gate, up)
    ours = silu_mul_triton(gate.to(device), up.to(device)).cpu()
    assert ours.dtype == dtype and ours.shape == gate.shape
    atol = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    assert rel_l2(ours, truth) <= 2 * rel_l2(eager, truth) + atol


def test_silu_mul_opcheck():
    gate, up = torch.randn(5, 7), torch.randn(5, 7)
    torch.library.opcheck(SILU_MUL, (gate, up))
    assert torch.equal(SILU_MUL(gate, up), silu_mul_reference(gate, up))


def _silu_mul_graph(device: str, dynamic: bool) -> tuple[torch.fx.GraphModule, object]:
    """A post-grad graph holding one ``silu_mul`` call on fake tensors of ``device`` (the batch
    symbolic with ``dynamic``), as a training backward holds it, after our op lowering."""
    from torch._dynamo.source import ConstantSource
    from torch._inductor.pattern_matcher import fwd_only
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from inductor_fusion.op_lowering import lower_op_calls

    shape_env = ShapeEnv() if dynamic else None
    rows: object = 6
    if dynamic:
        symbol = shape_env.create_symbol(6, ConstantSource("m"), dynamic_dim=DimDynamic.DYNAMIC)
        rows = shape_env.create_symintnode(symbol, hint=6)
    with FakeTensorMode(shape_env=shape_env):
        gate, up = (torch.empty(rows, 352, dtype=torch.bfloat16, device=device) for _ in "gu")
        gm = fwd_only(lambda g, u: SILU_MUL(g, u) * 2, [gate, up])
    lowered = lower_op_calls(gm.graph)
    gm.recompile()
    return gm, lowered


@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_silu_mul_becomes_a_launch_in_inductors_code(dynamic):
    """On CUDA the op call is a functional launch of its kernel (Inductor launches it from its
    own code: no dispatcher call per backward), a dynamic batch included."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    hop = torch.ops.higher_order.triton_kernel_wrapper_functional
    gm, lowered = _silu_mul_graph("cuda", dynamic)
    assert lowered == 1
    assert not gm.graph.find_nodes(op="call_function", target=SILU_MUL)
    (launch,) = gm.graph.find_nodes(op="call_function", target=hop)
    kernel = kernel_side_table.get_kernel(launch.kwargs["kernel_idx"])
    assert getattr(kernel, "fn", kernel).__name__ == "silu_mul_kernel"
    assert launch.kwargs["tensors_to_clone"] == ["out_ptr"]


def test_cpu_silu_mul_stays_the_op():
    gm, lowered = _silu_mul_graph("cpu", False)
    assert lowered == 0 and len(gm.graph.find_nodes(op="call_function", target=SILU_MUL)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter check")
def test_lowered_silu_mul_computes_the_op():
    """The functional launch traced on CPU tensors and run (the kernel under Triton's
    interpreter) computes the reference; a size off the block."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from inductor_fusion.triton_kernels.silu_mul import silu_mul_lowered

    gate, up = torch.randn(3, 2100), torch.randn(3, 2100)
    gm = make_fx(silu_mul_lowered)(gate, up)
    assert rel_l2(gm(gate, up), silu_mul_reference(gate, up)) < 1e-6
