"""``inductor_fusion.install()``: our pass in Inductor's global config, for every client of Inductor.

Trainer (``torch_compile=True``), accelerate (``dynamo_backend="inductor"``), ``generate()``'s own
compile and a plain ``torch.compile(model)`` all compile with ``backend="inductor"``; none of them
lets a user name our backend. `install` puts one `InstalledPass` at each of our two hooks in
``torch._inductor.config`` (``joint_custom_pre_pass``, ``post_grad_custom_pre_pass``), chaining
what was there, so that every compile in the process fuses; `uninstall` puts the old values back.
Nothing happens at import: only these calls change Inductor's config.

A global pass has no backend call in which to resolve the plan from the compiled model, so it
resolves lazily, per compile: the first time Inductor asks the pass anything within a compile
(its ``uuid()``, for the FX graph cache key, comes before it runs) the plan is resolved from the
install options, the environment and the KernelConfig plan of the model Dynamo is compiling
(found as our backend finds it), and kept on that compile's tracing context, so that a backward
graph compiled later (outside Dynamo's frame, under the same tracing context) uses the same plan.
The uuid is then that compile's `FusionPass` uuid: our sources, the plan, the chained pass's
uuid (None, disabling the cache, when it has none, as Inductor does) and the specialized eps.

Reports: every region fused under an installed pass is recorded in the process-wide
``get_report()`` and in the installation's ``report``. A graph Inductor serves from its caches runs
no pass; as for our backend, its regions are reported from the records the compile that filled
the cache left (`inductor_fusion.records`), marked "(from cache)". With no backend call around
the compile, the records' key is taken from the Dynamo graph when the pass is first asked for its
uuid (which Inductor does on a hit too), and the compile is closed by a Dynamo end-of-compile
callback (registered by the compile, removed by `uninstall`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from inductor_fusion import hf_hooks, records, registry
from inductor_fusion.config import (
    OPTIONS_KEY,
    FusionOptions,
    FusionPlan,
    inductor_config_patches,
    resolve_plan,
)
from inductor_fusion.fusion_pass import STAGES, FusionPass, specialize_eps_inputs
from inductor_fusion.kernel_config import FusionKernelConfigMixin, fusion_config
from inductor_fusion.report import FusionReport, get_report

log = logging.getLogger("inductor_fusion")


@dataclass
class _CompileState:
    """What one compile's stages share: its plan and the regions already reported unfused."""

    plan: FusionPlan
    rejected: set[object] = field(default_factory=set)
    # What this compile's stages fused, for the record kept beside Inductor's cache entry.
    compile_records: records.CompileRecords = field(default_factory=records.CompileRecords)
    # Inductor's and AOTAutograd's cache-hit counts when the compile opened: a compile whose
    # passes did not run is reported from the records only if one of them grew (a compile that
    # failed before our pass also runs no pass, and served nothing).
    hits: int = 0


class InstalledPass(CustomGraphPass):
    """The pass `install` puts at one Inductor hook; resolves its plan per compile."""

    def __init__(self, installation: Installation, stage: str, chained: Any) -> None:
        self.installation = installation
        self.stage = stage
        self.chained = chained  # what the hook held before: runs first, as in our backend

    def _current(self) -> FusionPass:
        """This compile's FusionPass (a new object per call: the state is the compile's)."""
        self.installation.used = True  # a compile (or a cache lookup: uuid()) reached us
        state = self.installation.state()
        return FusionPass(
            state.plan,
            report=self.installation.report,
            chained=self.chained,
            stage=self.stage,
            rejected=state.rejected,
            records=state.compile_records,
            specialized=specialize_eps_inputs() if state.plan.patterns else (),
        )

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._current()(graph)

    def uuid(self) -> str | None:
        return self._current().uuid()

    def __deepcopy__(self, memo: dict[int, Any]) -> InstalledPass:
        # torch copies Inductor's config (get_config_copy) for each torch.compile call; a copy
        # must stay this pass, a handle on the installation's state (and it holds a lock).
        return self

    def __repr__(self) -> str:
        return f"InstalledPass(stage={self.stage!r}, chained={self.chained!r})"


class Installation:
    """One `install` call: its options, the Inductor values it replaced, what it fused."""

    def __init__(self, options: FusionOptions, patches: Mapping[str, Any]) -> None:
        self.options = options
        self.used = False  # whether any compile reached our passes while installed
        self.patches = dict(patches)  # Inductor options set globally with the passes
        self.report = FusionReport()
        self.saved: dict[str, Any] = {}
        self.passes: dict[str, InstalledPass] = {}
        # One state per tracing context (one Dynamo frame compile), shared by both stages and by
        # a backward graph compiled later; weak, so it goes with the compile.
        self._states: weakref.WeakKeyDictionary[Any, _CompileState] = weakref.WeakKeyDictionary()
        # Compiles whose records are still open, closed by `finish_compiles` (Dynamo's end of
        # compile). Strong references: the tracing context may be gone by then.
        self._open: list[_CompileState] = []
        self._lock = threading.Lock()

    def state(self) -> _CompileState:
        """The current compile's state, resolving its plan the first time it is asked for."""
        from inductor_fusion.model_plans import current_model_plan

        context = torch._guards.TracingContext.try_get()
        with self._lock:
            state = self._states.get(context) if context is not None else None
            if state is not None:
                return state
            plan = resolve_plan(options=self.options, model_plan=current_model_plan())
            state = _CompileState(plan, hits=_cache_hits())
            if context is not None:
                self._states[context] = state
        if context is not None:
            # Outside the lock: the key asks both stages' passes for their uuid (this state).
            self._open_records(state)
        return state

    def _open_records(self, state: _CompileState) -> None:
        """Keys the compile's records by the graph Dynamo is compiling (None outside Dynamo,
        e.g. AOTInductor: then nothing is recorded or read)."""
        from inductor_fusion.model_plans import current_dynamo_graph

        graph = current_dynamo_graph()
        if graph is None:
            return
        placeholders = graph.find_nodes(op="placeholder")
        state.compile_records.key = records.compile_key(
            graph,
            [None] * len(placeholders),  # the placeholders' example values are in their meta
            plan_key=state.plan.key(),
            pass_uuids=[self.passes[stage].uuid() for stage in STAGES],
        )
        with self._lock:
            self._open.append(state)
            # Registered here, per compile, rather than once at install: torch._dynamo.reset()
            # clears Dynamo's callbacks. Dynamo reads the list when the compile ends.
            callbacks = torch._dynamo.callback_handler
            if self.finish_compiles not in callbacks.end_callbacks:
                callbacks.register_end_callback(self.finish_compiles)

    def finish_compiles(self, _args: Any = None) -> None:
        """Dynamo's end-of-compile callback: reports what the caches served to the compiles
        that just ended, and saves what their passes fused."""
        with self._lock:
            states, self._open = self._open, []
        hits = _cache_hits()
        for state in states:
            if state.compile_records.stages_run or hits > state.hits:
                state.compile_records.finish(STAGES, reports=(get_report(), self.report))


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return (
        counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    )


_installations: list[Installation] = []
_install_lock = threading.RLock()


def user_pass(value: Any) -> Any:
    """``value`` (an Inductor hook's content) with our installed pass replaced by what it chains.

    Our backend calls this: a compile with ``backend="inductor_fusion"`` runs its own pass, with
    its own plan, and must not run an installed one too."""
    while isinstance(value, InstalledPass):
        value = value.chained
    return value


def install(
    patterns: Sequence[str] | str | None = None,
    disable: Sequence[str] | str = (),
    options: Mapping[str, Any] | None = None,
) -> Installation:
    """Makes every ``backend="inductor"`` compile in this process fuse, until `uninstall`.

    ``patterns``/``disable`` and ``options`` mean what they mean for our backend: ``options``
    may hold our own options under ``"inductor_fusion"`` and Inductor options, which are set in
    Inductor's global config too (and restored by `uninstall`). Toggles resolve per compile as for
    the backend (``INDUCTOR_FUSION_DISABLE`` still wins). Installing again while installed stacks:
    the newest installation is the one in effect, and `uninstall` returns to the previous one.
    A plain ``transformers.KernelConfig`` naming our patterns also works in ``from_pretrained``
    while installed. Returns the installation; its ``report`` lists what its compiles fused.
    """
    from torch._inductor import config as inductor_config

    options = dict(options or {})
    ours = FusionOptions.merged(options, patterns, disable)
    options.pop(OPTIONS_KEY, None)
    patches = inductor_config_patches(None, options)
    # As our backend does (see there), unless the caller chose.
    if hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
        patches.setdefault("static_launch_user_defined_triton_kernels", True)
    # A cache hit runs compiled code without any pass: the ops it calls must exist.
    registry.import_op_modules(registry.pattern_names())
    # Frames Dynamo compiled and still holds (torch._dynamo.reset() clears them).
    tracker = getattr(torch._dynamo.convert_frame, "output_codes", None)
    frames = len(getattr(tracker, "seen", ()))
    if frames:
        # Code Dynamo compiled before keeps its graphs: the call runs them, not a new compile.
        log.warning(
            "inductor_fusion.install: Dynamo already holds %d compiled frame(s); code compiled "
            "before install() keeps its unfused graphs until torch._dynamo.reset()",
            frames,
        )
    installation = Installation(ours, patches)
    with _install_lock:
        for key in (*patches, *STAGES.values()):
            installation.saved[key] = getattr(inductor_config, key)
        for stage, key in STAGES.items():
            installation.passes[stage] = InstalledPass(
                installation, stage, chained=user_pass(getattr(inductor_config, key))
            )
        for key, value in patches.items():
            setattr(inductor_config, key, value)
        for stage, key in STAGES.items():
            setattr(inductor_config, key, installation.passes[stage])
        _installations.append(installation)
        hf_hooks.install_from_pretrained_hook(FusionKernelConfigMixin, fusion_config)
    return installation


def uninstall() -> bool:
    """Undoes the latest `install`: Inductor's config is again what it was before it.

    A hook that something else changed since `install` is left as it is now (with a warning):
    restoring it would undo that change. Returns False if nothing was installed."""
    from torch._inductor import config as inductor_config

    with _install_lock:
        if not _installations:
            return False
        installation = _installations.pop()
        if not installation.used:
            # torch.compile compiles at the first call: one made after uninstall() is unfused.
            log.warning(
                "inductor_fusion.uninstall: nothing was compiled while installed, so nothing "
                "fused (torch.compile compiles at the first call: call the compiled model before "
                "uninstall(), or inside `with inductor_fusion.installed():`)"
            )
        callbacks = torch._dynamo.callback_handler
        if installation.finish_compiles in callbacks.end_callbacks:
            callbacks.remove_end_callback(installation.finish_compiles)
        for key, value in installation.saved.items():
            stage = next((s for s, k in STAGES.items() if k == key), None)
            current = getattr(inductor_config, key)
            if stage is not None and current is not installation.passes[stage]:
                warnings.warn(
                    f"inductor_fusion.uninstall: torch._inductor.config.{key} was changed after "
                    "install(); leaving it as it is",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            setattr(inductor_config, key, value)
        if not _installations:
            hf_hooks.uninstall_from_pretrained_hook()
    return True


@contextlib.contextmanager
def installed(
    patterns: Sequence[str] | str | None = None,
    disable: Sequence[str] | str = (),
    options: Mapping[str, Any] | None = None,
) -> Iterator[Installation]:
    """``with inductor_fusion.installed(): ...``: `install` for the block, then `uninstall`."""
    installation = install(patterns=patterns, disable=disable, options=options)
    try:
        yield installation
    finally:
        with _install_lock:
            if _installations and _installations[-1] is installation:
                uninstall()


def is_installed() -> bool:
    return bool(_installations)
