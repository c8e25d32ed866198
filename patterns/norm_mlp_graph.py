"""What the norm -> MLP families do to a whole graph around the matching: before it, rewrites that
let the patterns match (`prepare_graph`); after it, the candidates no pattern matched
(`unmatched_candidates`), so that every region that stays unfused is reported with a reason.

Apart from the table (`norm_mlp`) and the checks (`norm_mlp_checks`), which see one match at a
time: these walk the whole graph, once per pass, and know no variant. The family modules call
them from their own ``prepare_graph`` (and ``rmsnorm_mlp`` from its ``unmatched_candidates``).
"""

from __future__ import annotations

from typing import Any

import torch

from inductor_fusion import catalogue
from inductor_fusion.graph_paths import innermost_module, normalize_module_path, region_paths
from inductor_fusion.patterns import training
from inductor_fusion.patterns.norm_mlp_checks import (
    CAST,
    MLP_TARGETS,
    RESHAPES,
    downstream,
    node_value,
)
from inductor_fusion.triton_kernels.region import SUPPORTED_DTYPES

# --- before matching ------------------------------------------------------------------------------


def prepare_graph(graph: torch.fx.Graph) -> None:
    """Run by the pass before matching: see `specialize_eps`, `specialize_residual_scales` and
    `drop_dropout_clones`."""
    specialize_eps(graph)
    specialize_residual_scales(graph)
    drop_dropout_clones(graph)


def specialize_eps(graph: torch.fx.Graph) -> int:
    """Turns each RMSNorm eps that arrives as a graph input back into a Python float.

    With ``dynamic=True`` (Dynamo's ``specialize_float=False``) a float attribute such as
    ``variance_epsilon`` becomes a backed SymFloat that AOT autograd passes as a 0-d fp64 tensor
    input: the graph computes ``mean(x**2) + eps_tensor.to(fp32)`` and our op, which takes eps as
    a float, could not be used. eps is a model constant, so we specialize it the way torch
    specializes any backed symbol: ``guard_float`` records ``eps == value`` in the ShapeEnv, Dynamo
    turns that into a guard on the attribute (another eps recompiles), and the graph then adds
    the literal. The input is found by its Dynamo source: the one float symbol whose source is an
    attribute of the module the ``mean`` was traced in. Returns how many adds were rewritten.
    """
    rewritten = 0
    for add in graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor):
        mean, eps = (*add.args, None, None)[:2]
        if not (isinstance(mean, torch.fx.Node) and mean.target == torch.ops.aten.mean.dim):
            continue
        # The add itself may be new (AOT's scalar tensorification); the mean was traced in the norm.
        # Only attributes the catalogue names: the backend guards on exactly those before any
        # cache is consulted (`fusion_pass.specialize_eps_inputs`) and puts their values in our
        # uuid. Specializing another here would bake in a value no guard or cache key records.
        value = _module_float(eps, innermost_module(mean), catalogue.eps_attributes())
        if value is None:
            continue  # Not provably this module's eps: the region is reported unfused.
        add.args = (mean, value, *add.args[2:])
        rewritten += 1
    return rewritten


def specialize_residual_scales(graph: torch.fx.Graph) -> int:
    """`specialize_eps` for Granite's ``h + mlp * residual_multiplier``: with ``dynamic=True``
    the multiplier is a 0-d input too (cast to the activations' dtype), and the scaled variant
    takes it as a constant. Rewrites each ``mul(y, input)`` whose input is the
    ``residual_multiplier`` of a module enclosing ``y``'s (the decoder layer around the MLP) to
    multiply by the value, as the graph of a static compile does. The mul itself carries no
    module (AOT's scalar tensorification made it), so ``y`` places it. Returns how many."""
    rewritten = 0
    for mul in graph.find_nodes(op="call_function", target=torch.ops.aten.mul.Tensor):
        if len(mul.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in mul.args):
            continue
        module = innermost_module(mul) or innermost_module(mul.args[0])
        value = _module_float(mul.args[1], module, catalogue.scalar_attributes(), enclosing=True)
        if value is not None:
            mul.args = (mul.args[0], value)
            rewritten += 1
    return rewritten


def _module_float(
    arg: Any, module: str | None, attributes: tuple[str, ...], *, enclosing: bool = False
) -> float | None:
    """The value of ``arg`` if it is a 0-d graph input (possibly cast) backed by the one float
    symbol that is one of ``attributes`` of ``module`` (``enclosing``: or of a module enclosing
    it), specialized with a guard; else None."""
    from torch.fx.experimental.symbolic_shapes import guard_float
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    source = arg
    while isinstance(source, torch.fx.Node) and source.target == CAST:
        source = source.args[0]
    if not (isinstance(source, torch.fx.Node) and source.op == "placeholder"):
        return None
    val = source.meta.get("val")
    shape_env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
    if shape_env is None or module is None or val.dim() != 0:
        return None

    def owned(name: str) -> bool:
        owner, _, attribute = normalize_module_path(name).rpartition(".")
        inside = enclosing and module.startswith(f"{owner}.")
        return attribute in attributes and (owner == module or inside)

    symbols = [
        sym
        for sym, sources in shape_env.var_to_sources.items()
        if symbol_is_type(sym, SymT.FLOAT)
        and sym in shape_env.backed_var_to_val
        and any(owned(src.name) for src in sources)
    ]
    if len(symbols) != 1:
        return None
    (sym,) = symbols
    hint = float(shape_env.backed_var_to_val[sym])
    return guard_float(shape_env.create_symfloatnode(sym, hint=hint))


def drop_dropout_clones(graph: torch.fx.Graph) -> int:
    """Removes the copy an eval-mode dropout leaves between an MLP's output and the residual add.

    Phi-3 (``resid_mlp_dropout``), Starcoder2 (its MLP's residual dropout) and GPT-NeoX apply a
    dropout to the MLP's output; in an inference graph it is an ``aten.clone`` of the down
    projection's result, which stands between the region and its residual add, so only the
    no-residual variant could match. In a functional graph a clone is the same value: dropping
    the ones that copy a matmul's result into adds changes no number (Inductor would fold the
    copy into the add anyway) and lets the residual variants match. Returns how many it removed.
    """
    removed = 0
    for clone in graph.find_nodes(op="call_function", target=torch.ops.aten.clone.default):
        if clone.kwargs.get("memory_format") not in (None, torch.contiguous_format):
            continue
        source = clone.args[0]
        inner = source.args[0] if getattr(source, "target", None) in RESHAPES else source
        if not (isinstance(inner, torch.fx.Node) and inner.target in MLP_TARGETS):
            continue
        if not clone.users or any(u.target != torch.ops.aten.add.Tensor for u in clone.users):
            continue
        clone.replace_all_uses_with(source)
        graph.erase_node(clone)
        removed += 1
    return removed


# --- candidates no variant matched ----------------------------------------------------------------

_STAT_SOURCES = (torch.ops.aten.pow.Tensor_Scalar, torch.ops.aten.mul.Tensor)


def unmatched_candidates(graph: torch.fx.Graph, family: str) -> list[tuple[Any, ...]]:
    """Regions that look like RMSNorm -> gated MLP but that no registered variant matched (so no
    check could say why): ``(key, message)`` for one INFO line each.

    A candidate is the RMSNorm statistic ``rsqrt(mean(x*x, -1) + eps)`` whose normalised output
    reaches two matmuls whose results meet in one multiply (the gate * up of a gated MLP) within a
    few nodes. That excludes the attention-side norms (their q/k/v matmuls never multiply each
    other) and the final norm (one matmul). Typical causes: a float64 graph (its SiLU has no
    casts, unlike every variant), an activation other than SiLU, or an arrangement our variants
    do not cover. Each is ``(keys, paths, message)``: ``keys`` name the region's nodes, so that a
    region is reported once; ``paths`` are its (role, module path) pairs, for the plan.
    """
    found = []
    for rsqrt in graph.find_nodes(op="call_function", target=torch.ops.aten.rsqrt.default):
        mean = _statistic_mean(rsqrt)
        if mean is None or training.in_fused_region(rsqrt):  # fused in the joint graph
            continue
        matmuls = downstream(rsqrt, MLP_TARGETS, depth=8)
        if len(matmuls) < 2 or not _products_meet(matmuls):
            continue
        # The dtype the region's input has, before the norm's upcast to fp32.
        source = mean.args[0].args[0]
        while isinstance(source, torch.fx.Node) and source.target == CAST:
            source = source.args[0]
        dtype = getattr(node_value(source), "dtype", None)
        path = innermost_module(rsqrt)
        hint = (
            f"unsupported dtype {dtype}"
            if dtype is not None and dtype not in SUPPORTED_DTYPES
            else "its graph matches none of the registered variants (activation, casts or "
            "layout differ)"
        )
        # Keys: every matmul of the region and the statistic, so that a region a check already
        # refused (keyed by one of its matmuls) is not reported twice.
        region_mms = downstream(rsqrt, MLP_TARGETS, 14, through=True)
        keys = (mean.name, *(n.name for n in region_mms))
        paths = region_paths({"norm": [rsqrt], "mlp": region_mms})
        found.append((keys, paths, f"{family} candidate at {path or '?'} not fused: {hint}"))
    return found


def _statistic_mean(rsqrt: torch.fx.Node) -> torch.fx.Node | None:
    """The ``mean`` of ``rsqrt(mean(x*x or x**2, -1) + eps)``, else None."""
    add = rsqrt.args[0]
    if not (isinstance(add, torch.fx.Node) and add.target == torch.ops.aten.add.Tensor):
        return None
    mean = add.args[0]
    if not (isinstance(mean, torch.fx.Node) and mean.target == torch.ops.aten.mean.dim):
        return None
    source = mean.args[0]
    if not (isinstance(source, torch.fx.Node) and source.target in _STAT_SOURCES):
        return None
    return mean


def _products_meet(matmuls: list[torch.fx.Node]) -> bool:
    """Whether the results of two of ``matmuls`` meet in one ``mul`` within a few nodes."""
    reached: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for mm in matmuls:
        for node in downstream(mm, (torch.ops.aten.mul.Tensor,), depth=8):
            reached.setdefault(node, set()).add(mm)
    return any(len(sources) >= 2 for sources in reached.values())
