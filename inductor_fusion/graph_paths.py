"""Module paths of graph nodes, and the joint-graph form patterns are matched in (a leaf).

The pass, the patterns and the explainer all read these; this module imports nothing of ours, so
none of them has to import another to get them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import torch

# Dynamo names the root object after the frame's local (L['self'], L['args'][0], L['model']...)
# or, for a model held in a module-level global, after the global (G['m'], or G.m in some
# versions' module stacks). Either way the path starts below that object.
_ROOT = re.compile(r"^[LG](?:\[[^\]]*\]|\.[A-Za-z_]\w*)(?:\[[^\]]*\])*")
_ITEM = re.compile(r"\[(?:'([^']*)'|\"([^\"]*)\"|(\d+))\]")
_MODULES = re.compile(r"\._modules\[(?:'([^']*)'|\"([^\"]*)\")\]")


@functools.lru_cache(maxsize=4096)
def normalize_module_path(raw: str) -> str:
    """``L['self'].model.layers[0]._modules['mlp']`` or ``G['m']._modules['model']...`` ->
    ``model.layers.0.mlp``."""
    path = _ROOT.sub("", raw)
    path = _MODULES.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    path = _ITEM.sub(lambda m: "." + next(g for g in m.groups() if g is not None), path)
    return path.lstrip(".")


def innermost_module(node: torch.fx.Node) -> str | None:
    """Path of the innermost nn.Module the node was traced in, or None without metadata."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    raw = list(stack.values())[-1][0]
    return normalize_module_path(raw)


def common_module(paths: Sequence[str | None]) -> str | None:
    """Longest dotted prefix shared by all paths (None if any is unknown)."""
    if not paths or any(p is None for p in paths):
        return None
    split = [p.split(".") for p in paths if p is not None]
    prefix: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix) or None


def region_paths(
    roles: Mapping[str, Sequence[torch.fx.Node]],
) -> tuple[tuple[str, str | None], ...]:
    """Module path per role: the common module of the nodes a pattern attributes to it."""
    return tuple(
        (role, common_module([innermost_module(n) for n in nodes])) for role, nodes in roles.items()
    )


def has_tangents(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` takes output gradients: a joint graph, or a backward one after the
    partitioner (AOT autograd names those inputs ``tangents_*``)."""
    return any(str(p.target).startswith("tangents") for p in graph.find_nodes(op="placeholder"))


def canonicalize_joint_graph(graph: torch.fx.Graph) -> None:
    """Brings a joint graph into the form `joint_fwd_bwd` traces training patterns in.

    Our pass runs first among the joint-graph passes, before Inductor's own ``remove_noop_ops``
    and ``early_patterns``, and `joint_fwd_bwd` applies both to the training patterns it traces.
    Without them the ``alias`` nodes AOT autograd leaves between a forward value and its use in
    the backward (e.g. of the norm's ``rsqrt``) keep every training pattern from matching. Both
    run right after our pass anyway, so running them first changes no number. The pass calls
    this on training graphs, and the patterns on the training variants they trace (whatever a
    torch version's joint_fwd_bwd applies itself), so that both sides have the same form.
    """
    from torch._inductor.fx_passes import joint_graph
    from torch._inductor.fx_passes.post_grad import remove_noop_ops

    remove_noop_ops(graph)
    # In torch 2.11 and 2.13 (read in their sources); tolerated if a version lacks it, since the
    # patterns get this same normalisation.
    early_patterns = getattr(joint_graph, "early_patterns", None)
    if early_patterns is not None:
        early_patterns.apply(graph)


def join_module_path(parent: str, name: str) -> str:
    """``parent.name``, or ``name`` under the root module (whose path is empty)."""
    return f"{parent}.{name}" if parent else name
