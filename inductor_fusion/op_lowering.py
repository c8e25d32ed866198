"""Calls of our op already in a graph, lowered like the regions the patterns fuse.

A graph can hold ``torch.ops.inductor_fusion.rmsnorm_mlp`` itself: a model whose layers were
swapped for the eager layer (`inductor_fusion.layers.NormMLP`) and then compiled, or a user's
own call of the op. Left as it is, the node is an extern call through the dispatcher, which
plans and launches the kernels in Python on every call (about 285 µs of host time on the H200
machine, against ~60 µs for a lowered region). On CUDA this pass gives such a node what a fused
region gets: our kernels as launches in Inductor's own code where they win
(`patterns.norm_mlp_checks.should_fuse`: gated MLPs, up to the shape's token bound), else the
op's PyTorch reference as aten ops, so Inductor's GEMMs run the region. Elsewhere, and for what
the kernels do not take, the node stays.

Training regions' ``silu_mul`` calls (`inductor_fusion.patterns.training`) get the same on CUDA:
the op's kernel as a launch in Inductor's code instead of a dispatcher call per backward.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger("inductor_fusion")


def _op() -> Any:
    from inductor_fusion.triton_kernels import rmsnorm_mlp  # noqa: F401  (registers the op)

    return torch.ops.inductor_fusion.rmsnorm_mlp.default


def lower_op_calls(graph: torch.fx.Graph) -> int:
    """Replaces each CUDA call of our ops in ``graph`` (a post-grad graph); returns how many."""
    op = _op()
    lowered = 0
    for node in graph.find_nodes(op="call_function", target=op):
        call = _bound_call(node)
        if call is None:
            continue
        _replace(graph, node, call)
        lowered += 1
    activations = _lower_silu_mul(graph)
    if lowered or activations:
        graph.eliminate_dead_code()
        graph.lint()
    if lowered:
        log.info("inductor_fusion: lowered %d call(s) of the rmsnorm_mlp op", lowered)
    return lowered + activations


def _lower_silu_mul(graph: torch.fx.Graph) -> int:
    from inductor_fusion.triton_kernels import silu_mul

    lowered = 0
    for node in graph.find_nodes(
        op="call_function", target=torch.ops.inductor_fusion.silu_mul.default
    ):
        fakes = [_fake(arg) for arg in node.args]
        if any(f is None or f.device.type != "cuda" or not silu_mul.takes(f) for f in fakes):
            continue  # the op's own kernels (the reference outside CUDA) run it
        if isinstance(n := fakes[0].numel(), int) and n == 0:
            continue  # no launch for an empty grid; the op's CUDA kernel returns the reference
        _inline(graph, node, silu_mul.silu_mul_lowered, list(node.args), fakes)
        lowered += 1
    return lowered


def _bound_call(node: torch.fx.Node) -> dict[str, Any] | None:
    """The node's arguments by name (defaults filled in), or None if it stays an op call."""
    from torch.fx.operator_schemas import normalize_function

    from inductor_fusion.triton_kernels.region import supports

    # By name, defaults filled in, from the op's schema (positional and keyword calls alike).
    pair = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    if pair is None:
        return None
    values = dict(pair.kwargs)
    hidden = _fake(values["hidden"])
    gate = _fake(values["gate_weight"])
    if hidden is None or gate is None:
        return None
    if supports(hidden.dtype, hidden.device.type, hidden.shape[-1], gate.shape[0]) is not None:
        return None
    # Scalars the kernels take as constants; a graph input (e.g. a SymFloat eps) stays a call.
    if not isinstance(values["eps"], float) or not isinstance(values["residual_scale"], float):
        return None
    return values


def _fake(arg: Any) -> torch.Tensor | None:
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


# The op's keyword arguments that spell its `RegionSpec`; the rest are tensors and the scalars.
_SPEC_KEYS = ("norm", "norm_weight_offset", "norm_weight_fp32", "activation", "gated")


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, call: dict[str, Any]) -> None:
    from inductor_fusion.patterns.norm_mlp_checks import RegionArgs, should_fuse
    from inductor_fusion.triton_kernels.region import RegionSpec, rmsnorm_mlp_reference
    from inductor_fusion.triton_kernels.rmsnorm_mlp import rmsnorm_mlp_lowered

    spec = RegionSpec(**{k: call[k] for k in _SPEC_KEYS})
    rest = {k: v for k, v in call.items() if k not in _SPEC_KEYS}
    names = [k for k, v in rest.items() if isinstance(v, torch.fx.Node)]
    inputs = [rest[k] for k in names]
    fakes = [_fake(n) for n in inputs]
    region = RegionArgs(
        **{k: _fake(rest[k]) for k in ("hidden", "norm_weight", "gate_weight", "up_weight")},
        down_weight=_fake(rest["down_weight"]), gate_bias=None, up_bias=None, down_bias=None,
        eps=rest["eps"],
    )  # fmt: skip
    # Where our kernels win, their launches; elsewhere the reference, for Inductor to compile.
    impl = rmsnorm_mlp_lowered if should_fuse(region) is None else rmsnorm_mlp_reference

    def region_fn(*tensors: torch.Tensor) -> torch.Tensor:
        # Both take every argument by name: the tensors (None where absent) and the scalars.
        return impl(**{**rest, **dict(zip(names, tensors, strict=True))}, spec=spec)

    _inline(graph, node, region_fn, inputs, fakes)


def _inline(
    graph: torch.fx.Graph,
    node: torch.fx.Node,
    fn: Any,
    inputs: list[torch.fx.Node],
    fakes: list[torch.Tensor | None],
) -> None:
    """Replaces ``node`` with the nodes of ``fn`` traced on ``fakes`` (the values of ``inputs``)."""
    from torch._guards import detect_fake_mode
    from torch._inductor.pattern_matcher import fwd_only

    # Inductor runs post-grad passes with the graph's fake mode set but not entered: the plan's
    # buffers would be real (CUDA) tensors and the launch wrapper would meet fake tensors outside
    # their mode. Tracing inside the mode keeps every tensor fake.
    fake_mode = detect_fake_mode(fakes)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        replacement = fwd_only(fn, fakes)
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(replacement.graph.find_nodes(op="placeholder"))
    with graph.inserting_before(node):
        for arg in inputs:
            env[next(placeholders)] = arg
        for sub in replacement.graph.nodes:
            if sub.op == "placeholder":
                continue
            if sub.op == "output":
                result = torch.fx.map_arg(sub.args[0], env.__getitem__)
                break
            env[sub] = graph.node_copy(sub, env.__getitem__)
    node.replace_all_uses_with(result)
    graph.erase_node(node)
