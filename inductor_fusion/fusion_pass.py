"""The one graph pass: runs the active families' matchers over Inductor's graphs.

It is installed at two points of the same compile, each chaining what the user had there:

- ``joint_custom_pre_pass``: the first thing Inductor runs on the (inference or joint) graph,
  before its own joint-graph patterns. On CUDA those include pad_mm, which rewrites an ``mm``
  with unaligned sizes (e.g. 300 tokens) into pad + mm + slice, after which no region of that
  graph matches. Graphs here still have ``view`` nodes.
- ``post_grad_custom_pre_pass``: the *pre* pass sees ``mm`` and ``add`` still apart (by the post
  pass Inductor has folded them into ``addmm``); views are reshapes by then. Whatever the first
  stage left (nothing, usually) is matched here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from inductor_fusion import catalogue, registry
from inductor_fusion.config import FusionPlan
from inductor_fusion.graph_paths import (
    canonicalize_joint_graph,
    has_tangents,
    normalize_module_path,
)
from inductor_fusion.op_lowering import lower_op_calls
from inductor_fusion.pass_state import PassRun, on_reject, running
from inductor_fusion.records import CompileRecords
from inductor_fusion.report import FusedRegion, FusionReport, get_report

log = logging.getLogger("inductor_fusion")


# --- the pass ----------------------------------------------------------------------------------


def _source_files(module_names: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for name in module_names:
        module = importlib.import_module(name)
        origin = Path(module.__file__ or "")
        # A package stands for all the sources in its folder (e.g. every kernel file).
        if origin.name == "__init__.py":
            files.extend(sorted(origin.parent.glob("*.py")))
        else:
            files.append(origin)
    return files


@functools.cache
def _source_hash(module_names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in _source_files(module_names):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# Inductor config key of each stage we install the pass at.
STAGES = {"joint": "joint_custom_pre_pass", "post_grad": "post_grad_custom_pre_pass"}


class FusionPass(CustomGraphPass):
    """Applies the plan's pattern families to a graph; its uuid() keys the FX graph cache.

    ``stage`` says which of Inductor's hooks it is installed at (`STAGES`). ``chained`` is
    whatever the user had already installed at that hook (a pass, or a list of them): it runs
    first, on the graph it was written for, and our uuid includes its uuid — or is None,
    disabling the cache, when it has none (as Inductor does). ``records`` collects what this
    compile fused, for the copy kept beside Inductor's cache entry (`inductor_fusion.records`).
    """

    def __init__(
        self,
        plan: FusionPlan,
        *,
        report: FusionReport | None = None,
        chained: Any = None,
        stage: str = "post_grad",
        rejected: set[object] | None = None,
        records: CompileRecords | None = None,
        specialized: tuple[tuple[str, float], ...] = (),
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.plan = plan
        # Regions already reported as unfused; shared by the stages of one compile, so that a
        # region rejected in the joint graph is not reported again after post-grad.
        self.rejected: set[object] = set() if rejected is None else rejected
        self.report = report
        self.records = records
        # Float inputs the backend specialized (see `specialize_eps_inputs`): their values are
        # baked into the graphs we produce, so they are part of our cache key.
        self.specialized = specialized
        if chained is None:
            self.chained: tuple[Callable[[torch.fx.Graph], Any], ...] = ()
        elif isinstance(chained, (list, tuple)):
            self.chained = tuple(chained)
        else:
            self.chained = (chained,)
        self.last_counts: dict[str, int] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        for user_pass in self.chained:
            user_pass(graph)
        joint = self.stage == "joint" and normalize_joint_graph(graph)
        counts: dict[str, int] = {}
        fused: list[FusedRegion] = []
        for name in sorted(self.plan.patterns):
            # A family may first normalise what it matches (e.g. specialize an eps input).
            prepare = registry.family_hook(name, "prepare_graph")
            if prepare is not None:
                prepare(graph)
            run = PassRun(plan=self.plan, rejected=self.rejected)
            with running(run):
                # A training graph: the families' training variants first (built on the first
                # such graph), then the others, for regions there that need no gradient.
                replaced = registry.matcher_pass(name, training=True).apply(graph) if joint else 0
                replaced += registry.matcher_pass(name).apply(graph)
            if replaced != len(run.regions):  # Would mean a check approved without recording.
                raise RuntimeError(
                    f"inductor_fusion: {name} replaced {replaced} regions but recorded "
                    f"{len(run.regions)}"
                )
            counts[name] = replaced
            fused += run.regions
            for region in run.regions:
                get_report().record(region)
                if self.report is not None:
                    self.report.record(region)
        if self.stage == "post_grad":
            # Calls of our op the graph already held (an eager-layer model compiled) get what a
            # fused region gets (`op_lowering`).
            lower_op_calls(graph)
            # The last stage: whatever looks like a region but matched no variant gets its INFO
            # line too (regions a check refused already have theirs, under the same key). Not in
            # a backward graph: regions are matched in the joint graph, so what looks like one
            # there is a forward recomputed (by a checkpoint or our `recompute` mode) whose
            # region the forward graph already reported or fused.
            for name in () if has_tangents(graph) else sorted(self.plan.patterns):
                scan = registry.family_hook(name, "unmatched_candidates")
                for keys, paths, message in scan(graph) if scan is not None else ():
                    # Regions the plan keeps out have their line already (or want none).
                    allowed = self.plan.allows(name, dict(paths))
                    if allowed and not any(key in self.rejected for key in keys):
                        self.rejected.update(keys[1:])
                        with running(PassRun(plan=self.plan, rejected=self.rejected)):
                            on_reject(keys[0], name, message, message)
        if self.records is not None:
            # Also when nothing fused: that this stage ran says it was not served from a cache.
            self.records.add(self.stage, fused)
        if any(counts.values()):
            # A training replacement spans forward and backward: its nodes go where the
            # matcher put them, which may precede the backward values they read (Inductor's
            # own joint-graph passes sort likewise after their replacements).
            stable_topological_sort(graph)
            graph.eliminate_dead_code()
            graph.lint()
            log.info(
                "inductor_fusion: fused %s (%s graph)",
                ", ".join(f"{n} x{c}" for n, c in counts.items() if c),
                self.stage,
            )
        self.last_counts = counts

    def uuid(self) -> str | None:
        chained_ids = []
        for user_pass in self.chained:
            uid = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if uid is None:
                return None
            chained_ids.append(repr(uid))
        modules = (
            "inductor_fusion",  # this package: pass, registry, config, backend
            # Every pattern source: family modules share the engine (patterns/norm_mlp*.py).
            "inductor_fusion.patterns",
            "inductor_fusion.triton_kernels",  # every kernel source
        )
        digest = hashlib.sha256()
        digest.update(_source_hash(modules).encode())
        digest.update(self.plan.key().encode())
        digest.update(self.stage.encode())
        digest.update("|".join(chained_ids).encode())
        digest.update(repr(self.specialized).encode())
        return digest.hexdigest()


def normalize_joint_graph(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` is a joint graph to match training variants in; if so, brought into the
    form they were traced in (`graph_paths.canonicalize_joint_graph`). Graphs without tangents
    (inference) and CUDA training graphs while training is switched off there are left as they
    are."""
    if not has_tangents(graph):
        return False
    from inductor_fusion.patterns.training import cuda_reason

    reason = cuda_reason()
    if reason is not None and any(
        isinstance(val := node.meta.get("val"), torch.Tensor) and val.device.type == "cuda"
        for node in graph.find_nodes(op="placeholder")
    ):
        # No memory mode fuses on CUDA: a GPU training compile then sees its joint graph exactly
        # as Inductor would, and the training variants are not even built.
        log.info("inductor_fusion: training graph on CUDA left to Inductor: %s", reason)
        return False
    canonicalize_joint_graph(graph)
    return True


def _constant_attribute() -> re.Pattern[str]:
    """Sources of module attributes holding a norm's epsilon (LlamaRMSNorm.variance_epsilon,
    LayerNorm.eps...) or another scalar our patterns take as a constant (Granite's residual
    multiplier): the catalogue's names."""
    names = (*catalogue.eps_attributes(), *catalogue.scalar_attributes())
    return re.compile(rf"\.({'|'.join(map(re.escape, names))})$")


def specialize_eps_inputs() -> tuple[tuple[str, float], ...]:
    """Guards on every norm epsilon that Dynamo made a graph input; returns (source, value) pairs.

    Under ``dynamic=True`` Dynamo passes float attributes such as ``variance_epsilon`` as 0-d
    float64 inputs backed by a float symbol. Our patterns need eps as a constant (the patterns'
    ``specialize_eps`` writes it into the graph). Guarding here, in the backend, makes Dynamo
    guard on each eps whether or not Inductor's caches then serve the graph (a cache hit runs no
    pass, so a guard taken in the pass would be missing and a changed eps would reuse a graph
    with the old one baked in). The values go into the pass's uuid, so the FX graph cache, whose
    key sees only a 0-d input, never serves a graph compiled for another eps either.
    """
    from torch.fx.experimental.symbolic_shapes import guard_float
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    # Dynamo hands the backend real example inputs; its ShapeEnv is the tracing context's.
    context = torch._guards.TracingContext.try_get()
    fake_mode = getattr(context, "fake_mode", None)
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        return ()
    specialized = []
    constant_attribute = _constant_attribute()
    for sym, sources in list(shape_env.var_to_sources.items()):
        if not symbol_is_type(sym, SymT.FLOAT) or sym not in shape_env.backed_var_to_val:
            continue
        names = [src.name for src in sources if constant_attribute.search(src.name)]
        if not names:
            continue
        hint = float(shape_env.backed_var_to_val[sym])
        value = guard_float(shape_env.create_symfloatnode(sym, hint=hint))
        specialized.append((normalize_module_path(names[0]), value))
    return tuple(sorted(specialized))
