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

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from inductor_fusion import registry
from inductor_fusion.config import FusionPlan
from inductor_fusion.op_lowering import lower_op_calls
from inductor_fusion.records import CompileRecords
from inductor_fusion.report import FusedRegion, FusionReport, get_report

log = logging.getLogger("inductor_fusion")


@dataclass
class _PassRun:
    """State of one pass invocation, visible to the patterns' checks through a context var."""

    plan: FusionPlan
    regions: list[FusedRegion]
    rejected: set[object] = dataclasses.field(default_factory=set)


_current_run: contextvars.ContextVar[_PassRun | None] = contextvars.ContextVar(
    "inductor_fusion_pass_run", default=None
)


@contextlib.contextmanager
def _running(run: _PassRun) -> Iterator[None]:
    token = _current_run.set(run)
    try:
        yield
    finally:
        _current_run.reset(token)


def on_match(region: FusedRegion) -> bool:
    """Called by a pattern after its own legality/profitability checks passed.

    Decides whether the current plan allows the region where it is (module globs) and, if so,
    records it. Inductor replaces exactly the matches whose check returned True, so the records
    equal the replacements.
    """
    run = _current_run.get()
    if run is None:  # A matcher applied outside our pass: never fuse behind the user's back.
        return False
    if not run.plan.allows(region.pattern, dict(region.paths)):
        on_reject(
            region.paths,
            f"{region} not fused: outside the places the plan allows ({run.plan.source})",
        )
        return False
    run.regions.append(region)
    return True


def memory_mode(pattern: str) -> str:
    """The memory mode the current plan gives ``pattern``'s training regions ("default" or
    "recompute"); read by a training replacement while it is traced."""
    run = _current_run.get()
    return "default" if run is None else run.plan.memory_mode(pattern)


def on_reject(region_key: object, message: str) -> None:
    """Logs why a matched region stays unfused: one line per region, although the region's
    larger and smaller variants (with and without the residual add) are each tried."""
    run = _current_run.get()
    if run is not None and region_key in run.rejected:
        return
    if run is not None:
        run.rejected.add(region_key)
    log.info("inductor_fusion: %s", message)


# --- module paths ------------------------------------------------------------------------------

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
            prepare = getattr(registry.pattern_module(name), "prepare_graph", None)
            if prepare is not None:
                prepare(graph)
            run = _PassRun(plan=self.plan, regions=[], rejected=self.rejected)
            with _running(run):
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
            for name in () if _has_tangents(graph) else sorted(self.plan.patterns):
                scan = getattr(registry.pattern_module(name), "unmatched_candidates", None)
                for keys, paths, message in scan(graph) if scan is not None else ():
                    # Regions the plan keeps out have their line already (or want none).
                    allowed = self.plan.allows(name, dict(paths))
                    if allowed and not any(key in self.rejected for key in keys):
                        self.rejected.update(keys[1:])
                        with _running(_PassRun(plan=self.plan, regions=[], rejected=self.rejected)):
                            on_reject(keys[0], message)
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
            # Every pattern source: family modules share the engine (patterns/norm_mlp.py).
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


def _has_tangents(graph: torch.fx.Graph) -> bool:
    """Whether ``graph`` takes output gradients: a joint graph, or a backward one after the
    partitioner (AOT autograd names those inputs ``tangents_*``)."""
    return any(str(p.target).startswith("tangents") for p in graph.find_nodes(op="placeholder"))


def normalize_joint_graph(graph: torch.fx.Graph) -> bool:
    """Brings a training compile's joint graph into the form `joint_fwd_bwd` traces patterns in.

    Our pass runs first among the joint-graph passes, before Inductor's own ``remove_noop_ops``
    and ``early_patterns``, and `joint_fwd_bwd` applies both to the training patterns it traces.
    Without them the ``alias`` nodes AOT autograd leaves between a forward value and its use in
    the backward (e.g. of the norm's ``rsqrt``) keep every training pattern from matching. Both
    run right after our pass anyway, so running them first changes no number. Graphs without
    tangents (inference) and CUDA training graphs are left as they are. Returns whether the graph
    is a joint one to match training variants in.
    """
    from torch._inductor.fx_passes import joint_graph
    from torch._inductor.fx_passes.post_grad import remove_noop_ops

    if not _has_tangents(graph):
        return False
    placeholders = graph.find_nodes(op="placeholder")
    from inductor_fusion.patterns.training import cuda_reason

    reason = cuda_reason()
    if reason is not None and any(
        isinstance(val := node.meta.get("val"), torch.Tensor) and val.device.type == "cuda"
        for node in placeholders
    ):
        # No memory mode fuses on CUDA: a GPU training compile then sees its joint graph exactly
        # as Inductor would, and the training variants are not even built.
        log.info("inductor_fusion: training graph on CUDA left to Inductor: %s", reason)
        return False
    remove_noop_ops(graph)
    # In torch 2.11 and 2.13 (read in their sources); tolerated if a version lacks it, since the
    # patterns get this same normalisation (`norm_mlp.search_pattern`).
    early_patterns = getattr(joint_graph, "early_patterns", None)
    if early_patterns is not None:
        early_patterns.apply(graph)
    return True


# Module attributes that hold a norm's epsilon (LlamaRMSNorm.variance_epsilon, LayerNorm.eps...),
# and the other scalars our patterns take as constants (Granite's residual multiplier).
_EPS_ATTRIBUTE = re.compile(r"\.(variance_epsilon|epsilon|eps|residual_multiplier)$")


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
    for sym, sources in list(shape_env.var_to_sources.items()):
        if not symbol_is_type(sym, SymT.FLOAT) or sym not in shape_env.backed_var_to_val:
            continue
        names = [src.name for src in sources if _EPS_ATTRIBUTE.search(src.name)]
        if not names:
            continue
        hint = float(shape_env.backed_var_to_val[sym])
        value = guard_float(shape_env.create_symfloatnode(sym, hint=hint))
        specialized.append((normalize_module_path(names[0]), value))
    return tuple(sorted(specialized))


def region_paths(
    roles: Mapping[str, Sequence[torch.fx.Node]],
) -> tuple[tuple[str, str | None], ...]:
    """Module path per role: the common module of the nodes a pattern attributes to it."""
    return tuple(
        (role, common_module([innermost_module(n) for n in nodes])) for role, nodes in roles.items()
    )
