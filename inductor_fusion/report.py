"""What fused where: one record per replaced region, with the module paths it came from.

Every run of our pass appends to the report of the backend that compiled the graph and to a
process-wide report (``inductor_fusion.get_report()``). On an FX-graph-cache hit Inductor does not
run the pass at all, so a cached compile adds nothing here: tests that count disable the cache.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class FusedRegion:
    """One region our pass replaced."""

    pattern: str  # family name, e.g. "rmsnorm_mlp"
    variant: str  # which registered variant matched, e.g. "lowp_3d_residual"
    paths: tuple[tuple[str, str | None], ...]  # (role, module path) pairs; None if unknown

    def path(self, role: str) -> str | None:
        return dict(self.paths).get(role)

    def __str__(self) -> str:
        where = ", ".join(f"{role}={path or '?'}" for role, path in self.paths)
        return f"{self.pattern}[{self.variant}] {where}"


class FusionReport:
    """A thread-safe, append-only list of fused regions with summaries."""

    def __init__(self) -> None:
        self._regions: list[FusedRegion] = []
        self._lock = threading.Lock()

    def record(self, region: FusedRegion) -> None:
        with self._lock:
            self._regions.append(region)

    def clear(self) -> None:
        with self._lock:
            self._regions.clear()

    @property
    def regions(self) -> tuple[FusedRegion, ...]:
        with self._lock:
            return tuple(self._regions)

    def __iter__(self) -> Iterator[FusedRegion]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def counts(self) -> dict[str, int]:
        return dict(Counter(region.pattern for region in self.regions))

    def count(self, pattern: str) -> int:
        return sum(region.pattern == pattern for region in self.regions)

    def paths(self, pattern: str, role: str) -> list[str | None]:
        return [r.path(role) for r in self.regions if r.pattern == pattern]

    def summary(self) -> str:
        if not self._regions:
            return "inductor_fusion: no region fused"
        lines = [f"inductor_fusion: {len(self)} region(s) fused"]
        # The matcher walks graphs backwards; list regions in model order instead.
        ordered = sorted(self.regions, key=lambda r: (r.pattern, _natural(str(r.paths))))
        lines += [f"  {region}" for region in ordered]
        return "\n".join(lines)

    __str__ = summary


def _natural(text: str) -> tuple[object, ...]:
    """Sort key that puts layers.2 before layers.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


_GLOBAL = FusionReport()


def get_report() -> FusionReport:
    """The process-wide report: every region fused by any of our backends since the last reset."""
    return _GLOBAL


def reset_report() -> None:
    _GLOBAL.clear()
