"""What fused where: one record per replaced region, with the module paths it came from.

Every run of our pass appends to the report of the backend that compiled the graph and to a
process-wide report (``inductor_fusion.get_report()``). When Inductor serves a graph from its caches
(FX graph cache, AOTAutograd cache) the pass does not run; the backend then reports the regions that
the compile which filled the cache recorded beside it (`inductor_fusion.records`), marked
``from_cache``.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class FusedRegion:
    """One region our pass replaced."""

    pattern: str  # family name, e.g. "rmsnorm_mlp"
    variant: str  # which registered variant matched, e.g. "lowp_3d_residual"
    paths: tuple[tuple[str, str | None], ...]  # (role, module path) pairs; None if unknown
    # True when Inductor served the compiled code from its caches and this record came from the
    # compile that filled them. Left out of ==/hash: the same region either way.
    from_cache: bool = field(default=False, compare=False)

    def cached(self) -> FusedRegion:
        """This region, marked as served from Inductor's cache."""
        return replace(self, from_cache=True)

    def path(self, role: str) -> str | None:
        return dict(self.paths).get(role)

    def __str__(self) -> str:
        where = ", ".join(f"{role}={path or '?'}" for role, path in self.paths)
        origin = " (from cache)" if self.from_cache else ""
        return f"{self.pattern}[{self.variant}] {where}{origin}"


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

    def count_from_cache(self) -> int:
        """How many of the regions are in code served from Inductor's caches."""
        return sum(region.from_cache for region in self.regions)

    def summary(self) -> str:
        regions = self.regions
        if not regions:
            return "inductor_fusion: no region fused"
        cached = sum(region.from_cache for region in regions)
        origin = f" ({cached} served from Inductor's cache)" if cached else ""
        lines = [f"inductor_fusion: {len(regions)} region(s) fused{origin}"]
        # The matcher walks graphs backwards; list regions in model order instead.
        ordered = sorted(regions, key=lambda r: (r.pattern, _natural(str(r.paths))))
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
