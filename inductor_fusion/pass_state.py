"""What one run of our pass knows, visible to the patterns' checks (a leaf).

The pass sets a `PassRun` for each family it applies; a pattern's check reads it through
`on_match` / `on_reject` / `memory_mode` while Inductor's matcher runs. The registry, the
patterns and the explainer import this module, never the pass itself, so the imports go one way:
config -> registry -> pass -> patterns -> kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inductor_fusion.config import FusionPlan
    from inductor_fusion.report import FusedRegion

log = logging.getLogger("inductor_fusion")


@dataclass(frozen=True)
class Rejection:
    """Why one matched (or candidate) region stays unfused: ``family``, the one-line
    ``reason``, and ``message``, the INFO line it is logged as."""

    family: str
    reason: str
    message: str


@dataclass
class PassRun:
    """State of one pass invocation. ``rejected`` holds the keys of regions already reported
    (shared by the stages of one compile); ``rejections`` what this run refused, in order."""

    plan: FusionPlan
    regions: list[FusedRegion] = dataclasses.field(default_factory=list)
    rejected: set[object] = dataclasses.field(default_factory=set)
    rejections: list[Rejection] = dataclasses.field(default_factory=list)


_current_run: contextvars.ContextVar[PassRun | None] = contextvars.ContextVar(
    "inductor_fusion_pass_run", default=None
)


@contextlib.contextmanager
def running(run: PassRun) -> Iterator[PassRun]:
    token = _current_run.set(run)
    try:
        yield run
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
        reason = f"outside the places the plan allows ({run.plan.source})"
        on_reject(region.paths, region.pattern, reason, f"{region} not fused: {reason}")
        return False
    run.regions.append(region)
    return True


def memory_mode(pattern: str) -> str:
    """The memory mode the current plan gives ``pattern``'s training regions ("default" or
    "recompute"); read by a training replacement while it is traced."""
    run = _current_run.get()
    return "default" if run is None else run.plan.memory_mode(pattern)


def on_reject(region_key: object, family: str, reason: str, message: str) -> None:
    """Records and logs why a region stays unfused: once per region (``region_key``), although
    the region's larger and smaller variants (with and without the residual add) are each
    tried."""
    run = _current_run.get()
    if run is not None:
        if region_key in run.rejected:
            return
        run.rejected.add(region_key)
        run.rejections.append(Rejection(family, reason, message))
    log.info("inductor_fusion: %s", message)
