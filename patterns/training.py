"""What a fused training region keeps for its backward: the memory policy of the joint graph.

Why a policy and not a backward kernel: at the token counts training runs (M = B x S, thousands),
the region's forward + backward is nine GEMMs (three forward, six backward) and a few pointwise
passes; cuBLAS does the GEMMs and Inductor's norm and SiLU kernels stream their bytes once. Our
earlier backward (an opaque op: a Triton GEMM with the SwiGLU backward in its epilogue, our
RMSNorm backward, torch.mm for the rest) measured 0.85-0.92x torch.compile with a 1.5x peak on
an H200 (perf/NOTES.md, 2026-12-02), because Inductor could neither fuse nor plan the memory
inside it. What Inductor does not choose well is *what to save*: its partitioner keeps the
normalised rows ``n`` ([M, H]) and the activation ``silu(g) * u`` ([M, I]) beside the gate/up
projections, although both are one pointwise pass away from values the backward has anyway.

So a training region's replacement is its own math (the same aten ops: Inductor generates and
fuses exactly the kernels of an unfused compile, every number equals its), traced forward +
backward, with the partitioner's checkpoint tags (`CheckpointPolicy`) set on the forward nodes:

- ``default``: the per-row ``rstd`` and the gate/up projections are saved (``MUST_SAVE``); every
  other value between the region's input and its down projection is recomputed in the backward
  (``MUST_RECOMPUTE``), where Inductor fuses the recomputation into the kernels that read it (the
  SiLU into the SwiGLU backward, the norm into the pass that writes the weight-gradient GEMMs'
  operand). Saved per token: ``2 I`` values instead of ``3 I + H``.
- ``recompute``: only ``rstd`` (and the input, which the norm's backward needs anyway) is kept;
  the gate/up GEMMs run again in the backward: selective activation checkpointing of the region,
  for two more GEMMs of nine.

The region's input, its down projection and its output (the residual stream, which the next layer
reads) are left untagged: the partitioner handles them as it would without us.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

MEMORY_MODES = ("default", "recompute")
# The memory modes whose training regions fuse on CUDA: those perf/bench_train.py measured to pay
# there (perf/results/train/results.md, H100, 2026-12-07): ``default`` lowers the peak of a
# whole 1B-shaped training step 7-8.5 % (region 5-6 %; the largest batch 13 instead of 11) at
# 0.99x compile's tokens/s at a fixed batch and 1.00x at each one's largest; ``recompute``, which
# a user picks for memory, lowers it 17-22 % (largest batch 17) at 0.91x. Elsewhere (the CPU)
# every mode fuses, so that CPU runs exercise the graphs a GPU run compiles. The one switch for
# compiled training on CUDA: the joint-graph pass (`fusion_pass.normalize_joint_graph`) and
# `norm_mlp_checks.should_fuse` read it through `cuda_reason`.
CUDA_MODES: frozenset[str] = frozenset(MEMORY_MODES)


def cuda_reason(mode: str | None = None) -> str | None:
    """None if training regions in memory ``mode`` fuse on CUDA (``None``: in any mode), else
    why not."""
    if (mode in CUDA_MODES) if mode is not None else bool(CUDA_MODES):
        return None
    what = f"in memory mode {mode!r} " if mode is not None else ""
    return f"training regions {what}are left to Inductor on CUDA (measured not to pay there)"


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_SAVED_STATISTICS = (torch.ops.aten.rsqrt.default,)


def trace_region(mode: Callable[[], str]) -> Callable[..., torch.fx.GraphModule]:
    """A trace function for a training replacement: ``joint_fwd_bwd``, then the checkpoint tags
    of the memory mode that ``mode()`` names when the matcher traces (`tag_saved`)."""

    def trace(fn: Callable[..., Any], args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        from torch._inductor.pattern_matcher import joint_fwd_bwd

        gm = joint_fwd_bwd(fn, args, **kwargs)
        tag_saved(gm.graph, mode())
        recompute_activation_apart(gm.graph)
        gm.recompile()
        return gm

    return trace


def in_fused_region(node: torch.fx.Node) -> bool:
    """Whether ``node`` came from a fused training region (a forward or backward graph after the
    partitioner): it carries our checkpoint tag, which the partitioner keeps, and no
    ``ac_graph_id``, which torch.utils.checkpoint sets beside each of its own tags."""
    return node.meta.get("recompute") is not None and "ac_graph_id" not in node.meta


def tag_saved(graph: torch.fx.Graph, mode: str) -> int:
    """Sets the checkpoint tags of ``mode`` (see the module docstring) on a traced training
    region, whose first placeholder is the region's input; returns how many nodes it tagged.

    The interior is every forward node that depends on the input and that the down projection
    depends on, i.e. the norm, the gate/up projections and the activation, with the casts and
    views between them; weights' own casts and views (which do not depend on the input) are the
    partitioner's to place."""
    from torch.utils.checkpoint import CheckpointPolicy

    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}; expected one of {MEMORY_MODES}")
    region = _Region(graph)
    tagged = 0
    for node in region.forward:
        if node not in region.interior or node is region.down:
            continue
        if node.target in _SAVED_STATISTICS:
            policy = CheckpointPolicy.MUST_SAVE
        elif node.target in _MATMULS:
            policy = (
                CheckpointPolicy.MUST_RECOMPUTE
                if mode == "recompute"
                else CheckpointPolicy.MUST_SAVE
            )
        else:
            policy = CheckpointPolicy.MUST_RECOMPUTE
        node.meta["recompute"] = policy
        tagged += 1
    return tagged


def recompute_activation_apart(graph: torch.fx.Graph) -> bool:
    """Gives the backward's use of the SwiGLU activation (the down projection's weight gradient)
    its own `silu_mul` op instead of the forward's nodes (see ``triton_kernels/silu_mul.py`` for
    why); returns whether it did. Regions whose activation is not ``silu(gate) * up`` are left as
    they are."""
    from torch.utils.checkpoint import CheckpointPolicy

    from inductor_fusion.triton_kernels import silu_mul  # noqa: F401  (registers the op)

    region = _Region(graph)
    act = region.down.args[0]
    users = [u for u in act.users if u in region.backward]
    pair = _silu_mul_operands(_through_views(act), region.projections)
    if not users or pair is None:
        return False
    first = min(users, key=list(graph.nodes).index)
    with graph.inserting_before(first):
        node = graph.call_function(torch.ops.inductor_fusion.silu_mul.default, pair)
    # The op's fake result from its inputs' own values (in their fake mode, as the graph's).
    vals = [n.meta.get("val") for n in pair]
    if all(isinstance(v, torch.Tensor) for v in vals):
        from torch._guards import detect_fake_mode
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        with detect_fake_mode(vals) or contextlib.nullcontext():
            node.meta["val"] = torch.ops.inductor_fusion.silu_mul.default(*vals)
        # torch 2.11's pattern matcher asserts that a replacement node with a tensor "val" also
        # has "tensor_meta" (2.13 copies whichever it finds).
        node.meta["tensor_meta"] = _extract_tensor_metadata(node.meta["val"])
    # A node that depends on forward values only: without the tag the partitioner could run it
    # in the forward and save its output, the very tensor this avoids keeping.
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    for user in users:
        user.replace_input_with(act, node)
    return True


_VIEWS = (
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
)
_CAST = torch.ops.prims.convert_element_type.default


def _through_views(node: Any, also: tuple[Any, ...] = ()) -> Any:
    while isinstance(node, torch.fx.Node) and node.target in (*_VIEWS, *also):
        node = node.args[0]
    return node


def _silu_mul_operands(
    product: Any, projections: list[torch.fx.Node]
) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(gate, up) projections if ``product`` is ``silu(gate) * up`` as the decompositions write
    it (``x / (1 + exp(-x))`` between casts, either operand order), else None."""
    if getattr(product, "target", None) != torch.ops.aten.mul.Tensor:
        return None
    for act, other in (product.args, product.args[::-1]):
        up = _through_views(other)
        x = _through_views(act, (_CAST,))
        if up not in projections or getattr(x, "target", None) != torch.ops.aten.div.Tensor:
            continue
        numerator, denominator = x.args
        if getattr(denominator, "target", None) != torch.ops.aten.add.Tensor:
            continue
        exp, one = denominator.args
        if one != 1 or getattr(exp, "target", None) != torch.ops.aten.exp.default:
            continue
        neg = exp.args[0]
        if (
            getattr(neg, "target", None) != torch.ops.aten.neg.default
            or neg.args[0] is not numerator
        ):
            continue
        gate = _through_views(numerator, (_CAST,))
        if gate in projections and gate is not up:
            return gate, up
    return None


class _Region:
    """A traced training region's parts: forward and backward nodes, its projections."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        placeholders = graph.find_nodes(op="placeholder")
        tangents = [n for n in placeholders if str(n.target).startswith("tangents")]
        if not placeholders or not tangents:
            raise ValueError("not a traced training region (no input or no tangents)")
        self.backward = _descendants(tangents)
        self.forward = [
            n for n in graph.nodes if n.op == "call_function" and n not in self.backward
        ]
        from_input = _descendants([placeholders[0]])
        matmuls = [n for n in self.forward if n.target in _MATMULS and n in from_input]
        # The down projection: the one matmul that reads another's result.
        down = [m for m in matmuls if any(a in _ancestors([m]) for a in matmuls if a is not m)]
        if len(down) != 1:
            raise ValueError(f"expected one down projection, found {len(down)}")
        self.down = down[0]
        self.projections = [m for m in matmuls if m is not self.down]
        self.interior = _ancestors(down) & from_input


def _descendants(roots: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    return _closure(roots, lambda node: node.users)


def _ancestors(roots: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    return _closure(roots, lambda node: node.all_input_nodes)


def _closure(
    roots: Iterable[torch.fx.Node], step: Callable[[torch.fx.Node], Iterable[torch.fx.Node]]
) -> set[torch.fx.Node]:
    """Every node reached from ``roots`` by ``step`` (the roots only if reached again)."""
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        for node in step(stack.pop()):
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return seen
