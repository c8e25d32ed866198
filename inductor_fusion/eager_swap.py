"""``:eager`` KernelConfig entries: our eager fused layers swapped in where they say.

`apply_eager_layers` pairs the modules an entry's globs match (a norm and its one sibling MLP, or
an MLP alone) and hands each pair to `inductor_fusion.layers`, which builds the fused layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch

from inductor_fusion import registry
from inductor_fusion.fusion_entries import EAGER, FUSION_PREFIX, FusionEntry
from inductor_fusion.graph_paths import join_module_path
from inductor_fusion.model_plans import registered_globs


def _eager_pairs(
    model: torch.nn.Module, entries: Iterable[FusionEntry]
) -> list[tuple[str, str, str, FusionEntry]]:
    """(parent path, norm name, MLP name, entry) for each region the ":eager" entries fuse: a
    module the norm glob matches and its one sibling the MLP glob matches (norm name None for an
    MLP alone). Raises ValueError when a pairing is ambiguous (a norm with two matched sibling
    MLPs, an MLP claimed by two norms)."""
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[str, str | None, str, FusionEntry]] = {}  # MLP path -> pair
    for entry in entries:
        if not entry.eager:
            continue
        globs = entry.globs if entry.globs is not None else registered_globs(model, entry)
        if len(globs) == 1:  # the MLP alone (mlp_postnorm): no norm to pair
            for path in modules:
                if path and fnmatch.fnmatchcase(path, globs[0]):
                    parent, _, name = path.rpartition(".")
                    pairs[path] = (parent, None, name, entry)
            continue
        norm_glob, mlp_glob = globs
        mlps = [path for path in modules if path and fnmatch.fnmatchcase(path, mlp_glob)]
        for norm_path in modules:
            if not norm_path or not fnmatch.fnmatchcase(norm_path, norm_glob):
                continue
            parent, _, norm_name = norm_path.rpartition(".")
            siblings = [m for m in mlps if m.rpartition(".")[0] == parent and m != norm_path]
            if len(siblings) > 1:
                raise ValueError(
                    f"{entry.describe()}: the norm {norm_path} has several sibling modules "
                    f"matching the MLP glob {mlp_glob!r} ({', '.join(siblings)}); an eager "
                    "region is one norm and the one MLP it feeds"
                )
            if not siblings:
                continue
            mlp_path = siblings[0]
            other = pairs.get(mlp_path)
            if other is not None and other[1] != norm_name:
                raise ValueError(
                    f"{entry.describe()}: the MLP {mlp_path} pairs with both "
                    f"{join_module_path(parent, other[1])} and {norm_path}; narrow the RMSNorm glob "
                    f"{norm_glob!r} to the norm that feeds the MLP"
                )
            pairs[mlp_path] = (parent, norm_name, mlp_path.rpartition(".")[2], entry)
    return list(pairs.values())


def _eager_pattern_for(norm: str) -> str:
    return next(n for n in registry.eager_patterns() if registry.FAMILIES[n].eager_norm == norm)


def apply_eager_layers(model: torch.nn.Module, entries: Iterable[FusionEntry]) -> list[str]:
    """Swaps the eager fused layer in where ":eager" entries say (`inductor_fusion.layers`);
    returns the norm paths fused now. Checks every pair before changing any module, so a bad
    module leaves the model as it was; pairs already fused are left alone."""
    # Imported here: it imports our Triton kernels, which only configs with ':eager' entries need.
    from inductor_fusion import layers

    pairs = _eager_pairs(model, entries)
    if not pairs:
        return []
    fused = []
    plan = []
    for parent_path, norm_name, mlp_name, entry in pairs:
        parent = model.get_submodule(parent_path)
        mlp = getattr(parent, mlp_name)
        if norm_name is None:
            if isinstance(mlp, (layers.NormMLP, layers.FusedAway)):
                continue  # fused already, alone or with its norm
            where = join_module_path(parent_path, mlp_name)
            layers.region_spec(None, mlp, where=where)  # raises before any swap
            plan.append((parent, None, mlp_name, where))
            continue
        norm = getattr(parent, norm_name)
        if isinstance(norm, layers.NormMLP) or isinstance(mlp, layers.FusedAway):
            continue
        where = f"{join_module_path(parent_path, norm_name)} -> {join_module_path(parent_path, mlp_name)}"
        # Raises, naming the module, before any swap.
        spec, _ = layers.region_spec(norm, mlp, where=where)
        if spec.norm != registry.FAMILIES[entry.pattern].eager_norm:
            raise layers.EagerFusionError(
                f"{entry.describe()}: the norm at {where} is a {type(norm).__name__}, which "
                f"{entry.pattern} does not fuse; "
                f"use '{FUSION_PREFIX}:{_eager_pattern_for(spec.norm)}:{EAGER}'"
            )
        plan.append((parent, norm_name, mlp_name, where))
    for parent, norm_name, mlp_name, where in plan:
        if norm_name is None:
            layers.fuse_mlp(parent, mlp_name, where=where)
        else:
            layers.fuse_norm_mlp(parent, norm_name, mlp_name, where=where)
        fused.append(where)
    return fused
