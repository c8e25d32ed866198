"""On CUDA the fused region becomes launches of our Triton kernels in Inductor's own code.

The replacement emits one ``triton_kernel_wrapper_functional`` node per launch; Inductor
reinplaces them and launches our kernels from its generated wrapper, like its own, so a region
costs the host no dispatcher call. On a CPU machine the pass runs on a graph of fake CUDA
tensors (tracing needs no GPU); the CUDA tests compile real models and read the generated code.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import fresh_compile, rel_l2, tiny_model, token_ids
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from inductor_fusion.config import FusionPlan
from inductor_fusion.fusion_pass import FusionPass
from inductor_fusion.triton_kernels import rmsnorm_mlp as kernels
from inductor_fusion.triton_kernels.launch_config import MAX_PROFITABLE_TOKENS

HAS_CUDA = torch.cuda.is_available()
OP = torch.ops.inductor_fusion.rmsnorm_mlp.default
HOP = torch.ops.higher_order.triton_kernel_wrapper_functional
H, INTER = 128, 352  # not multiples of the GEMV tiles


def _region(h, norm_w, gate_w, up_w, down_w):
    # LlamaRMSNorm + LlamaMLP + the residual add, as the decoder layer writes them.
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    n = norm_w * x.to(h.dtype)
    gate = torch.nn.functional.linear(n, gate_w)
    up = torch.nn.functional.linear(n, up_w)
    return h + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_w)


def _fused_graph(
    tokens: int, dtype: torch.dtype, *, dynamic: bool = False, device="cuda", batch: int = 2
):
    """The region traced as Inductor's post-grad graph shows it, on fake tensors (CUDA unless
    told), after our pass; with ``dynamic`` the token count is symbolic."""
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.pattern_matcher import fwd_only

    shape_env = ShapeEnv() if dynamic else None
    seq = tokens // max(batch, 1)
    if dynamic:
        # A backed symbol with a hint, as Dynamo makes for a dynamic sequence length.
        symbol = shape_env.create_symbol(seq, ConstantSource("seq"), dynamic_dim=DimDynamic.DYNAMIC)
        seq = shape_env.create_symintnode(symbol, hint=seq)
    with FakeTensorMode(shape_env=shape_env):
        lead = (batch, seq) if batch else (seq,)  # batch 0: 2-D activations
        h = torch.empty(*lead, H, dtype=dtype, device=device)
        weights = [
            torch.empty(s, dtype=dtype, device=device)
            for s in ((H,), (INTER, H), (INTER, H), (H, INTER))
        ]
        gm = fwd_only(_region, [h, *weights])
        view_to_reshape(gm)
        fusion = FusionPass(FusionPlan(frozenset({"rmsnorm_mlp"})), stage="post_grad")
        fusion(gm.graph)
    return gm, fusion.last_counts.get("rmsnorm_mlp", 0), shape_env


def _launched(gm: torch.fx.GraphModule) -> list[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = []
    for node in gm.graph.find_nodes(op="call_function", target=HOP):
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        names.append(getattr(kernel, "fn", kernel).__name__)
    return names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_region_becomes_inductor_launches(dtype):
    gm, fused, _ = _fused_graph(16, dtype)
    assert fused == 1
    assert _launched(gm) == ["gate_up_gemv_kernel", "down_gemv_kernel"]
    # No call of the op through the dispatcher is left, and nothing of the unfused region.
    assert not gm.graph.find_nodes(op="call_function", target=OP)
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.rsqrt.default)


def test_many_tokens_stay_inductors(caplog):
    """Above MAX_PROFITABLE_TOKENS Inductor's GEMMs win (measured): the region is left alone,
    with one INFO line saying why."""
    with caplog.at_level("INFO", logger="inductor_fusion"):
        gm, fused, _ = _fused_graph(MAX_PROFITABLE_TOKENS + 2, torch.bfloat16)
    assert fused == 0
    assert not gm.graph.find_nodes(op="call_function", target=HOP)
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)) == 3
    reasons = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    assert len(reasons) == 1 and "Inductor's code is faster" in reasons[0]


def _tiled_graph() -> torch.fx.GraphModule:
    with FakeTensorMode():
        args = [
            torch.empty(s, dtype=torch.bfloat16, device="cuda")
            for s in ((512, H), (H,), (INTER, H), (INTER, H), (H, INTER))
        ]
        return make_fx(lambda *a: kernels.rmsnorm_mlp_lowered(*a, None, None, None, a[0], 1e-5))(
            *args
        )


def test_tiled_kernels_lower_too():
    """The lowered form of the tiled regime (reachable by calling the lowered op directly): the
    "tma" configuration's pointer-kernel form, with no descriptors in the graph."""
    gm = _tiled_graph()
    assert _launched(gm) == ["norm_kernel", "gate_up_gemm_kernel", "down_gemm_kernel"]
    for node in gm.graph.find_nodes(op="call_function", target=HOP):
        assert node.kwargs["tma_descriptor_metadata"] == {}


def test_lowered_tma_carries_each_descriptor_as_its_tensor_and_block(monkeypatch):
    """With LOWERED_TMA (issue #27's measurement) the graph launches the TMA kernels, each
    descriptor argument a graph tensor with torch's "stable" metadata: the tensor the eager plan
    describes and the same block shape (Inductor builds the descriptor before each launch)."""
    from inductor_fusion.triton_kernels import launch_config

    monkeypatch.setattr(launch_config, "LOWERED_TMA", True)
    gm = _tiled_graph()
    assert _launched(gm) == ["norm_kernel", "gate_up_tma_kernel", "down_tma_kernel"]
    config = launch_config.pick_config(512, H, INTER, torch.bfloat16, interpret=False)
    up, down = config.gate_up, config.down
    norm, gate_up, down_node = gm.graph.find_nodes(op="call_function", target=HOP)
    assert norm.kwargs["tma_descriptor_metadata"] == {}
    assert gate_up.kwargs["tma_descriptor_metadata"] == {
        "x_desc": ("stable", ([up.block_m, up.block_k],)),
        "gate_desc": ("stable", ([up.block_n, up.block_k],)),
        "up_desc": ("stable", ([up.block_n, up.block_k],)),
    }
    assert down_node.kwargs["tma_descriptor_metadata"] == {
        "a_desc": ("stable", ([down.block_m, down.block_k],)),
        "w_desc": ("stable", ([down.block_n, down.block_k],)),
    }
    args = gate_up.kwargs["kwargs"]
    # The normalised rows (what the norm launch wrote) and the weights, as placeholders.
    assert args["x_desc"] is args["x_ptr"] and args["x_desc"].args[0] is norm
    assert [args[k].op for k in ("gate_desc", "up_desc")] == ["placeholder", "placeholder"]
    # The intermediate the gate/up launch wrote.
    assert down_node.kwargs["kwargs"]["a_desc"].args[0] is gate_up


def test_launch_buffers_belong_to_the_graph():
    """The intermediate, the split-K counters and partial sums are graph allocations (Inductor
    plans and reuses them), written by the launches that declare them."""
    gm, _, _ = _fused_graph(16, torch.bfloat16)
    launches = gm.graph.find_nodes(op="call_function", target=HOP)
    written = [set(node.kwargs["tensors_to_clone"]) for node in launches]
    assert written == [{"out_ptr", "lock_ptr"}, {"out_ptr", "ws_ptr", "lock_ptr"}]
    for node in launches:
        for name in node.kwargs["tensors_to_clone"]:
            source = node.kwargs["kwargs"][name]
            # A fresh buffer, or what the previous launch wrote into one.
            assert source.target in (torch.ops.aten.empty.memory_format, HOP) or (
                source.op == "call_function" and source.args[0].target is HOP
            )
        # Nothing our kernels write is a graph input (weights and activations stay read-only).
        for name in node.kwargs["tensors_to_clone"]:
            assert node.kwargs["kwargs"][name].op != "placeholder"


@pytest.mark.parametrize(
    ("tokens", "regime_guards", "fused"),
    [(12, {"<= 16", "<= 64"}, True), (40, {"> 16", "<= 64"}, True), (300, {"> 64"}, False)],
)
def test_symbolic_token_count_guards_one_regime(tokens, regime_guards, fused):
    """A symbolic M picks its configuration (or no fusion) by regime and guards on it: one graph
    per regime, never one per M."""
    # 2-D activations: the symbolic size is the token count itself. (3-D ones put it into
    # computed reshape sizes: that matching is tests/test_dynamic.py's subject.)
    gm, count, shape_env = _fused_graph(tokens, torch.bfloat16, dynamic=True, batch=0)
    assert count == int(fused)
    assert bool(_launched(gm)) == fused
    guards = {str(g.expr).split(" ", 1)[1] for g in shape_env.guards}
    assert guards == regime_guards


def test_cpu_region_keeps_the_op():
    """Other devices have no Triton kernels: the replacement is the op (its body, the reference)."""
    gm, fused, _ = _fused_graph(10, torch.float32, device="cpu")
    assert fused == 1
    assert len(gm.graph.find_nodes(op="call_function", target=OP)) == 1
    assert not gm.graph.find_nodes(op="call_function", target=HOP)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU interpreter check; CUDA runs the compiled tests")
def test_lowered_graph_computes_the_region():
    """The lowered launches, traced on CPU tensors and run (the functional launches' eager form,
    our kernels under Triton's interpreter), compute what the op's reference computes."""
    torch.manual_seed(0)
    h = torch.randn(2, 3, H) * 0.5
    weights = [torch.randn(s) * 0.05 for s in ((INTER, H), (INTER, H), (H, INTER))]
    norm_w = 1 + 0.1 * torch.randn(H)
    gm = make_fx(lambda *a: kernels.rmsnorm_mlp_lowered(*a, None, None, None, a[0], 0.1))(
        h, norm_w, *weights
    )
    assert len(gm.graph.find_nodes(op="call_function", target=HOP)) == 2
    ref = kernels.rmsnorm_mlp_reference(h, norm_w, *weights, residual=h, eps=0.1)
    assert rel_l2(gm(h, norm_w, *weights), ref) < 1e-5


# --- on a GPU: the generated code ------------------------------------------------------------------

needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_generated_code_launches_our_kernels(family, mode, cpp_wrapper):
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    if mode and cpp_wrapper:
        pytest.skip("one of the two is enough per case")
    from torch._inductor.utils import run_and_get_code

    model = tiny_model(family, torch.bfloat16, device="cuda")
    ids = token_ids(device="cuda")
    options = {"cpp_wrapper": True} if cpp_wrapper else None
    with torch.no_grad():
        eager = model(ids).logits
        with fresh_compile() as report:
            compiled = torch.compile(
                model, backend="inductor_fusion", mode=mode, options=options, dynamic=False
            )
            ours, code = run_and_get_code(compiled, ids)
            ours = ours.logits.clone()  # a CUDA-graph replay reuses the output's memory
            again = compiled(ids).logits  # a CUDA-graph replay under reduce-overhead
    source = "\n".join(code)
    assert report.count("rmsnorm_mlp") == model.config.num_hidden_layers
    assert "gate_up_gemv_kernel" in source and "down_gemv_kernel" in source
    assert "inductor_fusion.rmsnorm_mlp" not in source
    assert rel_l2(ours, eager) < 2e-2
    assert torch.equal(again, ours)


@pytest.mark.slow
def test_dynamic_tokens_compile_once_per_regime():
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    from torch._dynamo.utils import counters

    model = tiny_model("llama", torch.bfloat16, device="cuda")
    with torch.no_grad(), fresh_compile():
        counters.clear()
        compiled = torch.compile(model, backend="inductor_fusion")
        for seq in (8, 5, 7, 20, 30, 50, 200, 300):
            ids = token_ids(batch=2, seq=seq, device="cuda")
            assert rel_l2(compiled(ids).logits, model(ids).logits) < 2e-2
    # 2x8 static, then one symbolic graph per regime: M <= 16, 16 < M <= 64, M > 64.
    assert counters["stats"]["unique_graphs"] <= 4


def _op_call_graph(tokens: int, gated: bool, device: str = "cuda") -> torch.fx.GraphModule:
    """A post-grad graph holding a call of our op itself (an eager-layer model compiled), after
    our pass."""
    from torch._inductor.pattern_matcher import fwd_only

    def call(h, norm_w, gate_w, up_w, down_w):
        up_w = up_w if gated else None
        extra = {} if gated else {"gated": False, "activation": "gelu"}
        return OP(h, norm_w, gate_w, up_w, down_w, None, None, None, h, 1e-5, **extra) * 2

    with FakeTensorMode():
        h = torch.empty(1, tokens, H, dtype=torch.bfloat16, device=device)
        weights = [
            torch.empty(s, dtype=torch.bfloat16, device=device)
            for s in ((H,), (INTER, H), (INTER, H), (H, INTER))
        ]
        gm = fwd_only(call, [h, *weights])
    # Outside the fake mode, as Inductor runs its post-grad passes: the nodes' values are fake
    # tensors whose mode is not entered (a pass that traces must enter it itself).
    FusionPass(FusionPlan(frozenset({"rmsnorm_mlp"})), stage="post_grad")(gm.graph)
    return gm


@pytest.mark.parametrize(
    ("tokens", "gated", "launched", "mms"),
    [
        (16, True, ["gate_up_gemv_kernel", "down_gemv_kernel"], 0),  # ours wins: our launches
        (MAX_PROFITABLE_TOKENS + 1, True, [], 3),  # Inductor's GEMMs win: the reference
        (16, False, [], 2),  # non-gated: Inductor's on CUDA (should_fuse)
    ],
    ids=["gated-16", "gated-65", "non-gated-16"],
)
def test_op_calls_already_in_a_cuda_graph_are_lowered(tokens, gated, launched, mms):
    """A call of the op itself becomes what a fused region becomes: no dispatcher call left."""
    gm = _op_call_graph(tokens, gated)
    assert not gm.graph.find_nodes(op="call_function", target=OP)
    assert _launched(gm) == launched
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)) == mms


def test_op_calls_elsewhere_stay_calls():
    gm = _op_call_graph(16, True, device="cpu")
    assert len(gm.graph.find_nodes(op="call_function", target=OP)) == 1
    assert not _launched(gm)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [16, MAX_PROFITABLE_TOKENS + 1])
def test_compiled_op_call_matches_the_eager_op(tokens):
    from inductor_fusion.backend import inductor_fusion_backend

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(torch.bfloat16)

    args = (randn(1, tokens, H), 1 + randn(H, std=0.1), randn(INTER, H, std=0.02),
            randn(INTER, H, std=0.02), randn(H, INTER, std=0.02))  # fmt: skip

    def call(h, norm_w, gate_w, up_w, down_w):
        return OP(h, norm_w, gate_w, up_w, down_w, None, None, None, h, 1e-5)

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=inductor_fusion_backend, fullgraph=True)(*args)
    assert rel_l2(compiled, call(*args)) < 1e-2
