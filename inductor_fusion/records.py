"""What our pass fused, kept beside Inductor's cache entries so a cache hit can still report it.

On an FX-graph-cache or AOTAutograd-cache hit Inductor runs none of the compile, our pass included,
so the pass cannot tell the report what the served code contains. Nor can anything at run time:
our kernels may be launched from Inductor's own wrapper code, with no call of our op to observe.
So every compile whose pass ran writes the regions it fused to a small JSON file under Inductor's
cache dir (``<cache_dir>/inductor_fusion/<key>.json``), and a compile whose pass did not run reads
that file back. The key hashes what decides the compiled result: the Dynamo graph and its module
paths, the placeholders' shapes/strides/dtypes/devices, grad mode, the plan, the passes' uuids
(which hash our sources), Inductor's and AOTAutograd's config and the torch version.

Inductor's own cache key is finer than ours in places (it sees the graph after AOTAutograd), so a
hit may come without a record (then one INFO line, and nothing is invented); ours never says
"same" where the compiled result could differ, because everything our regions depend on is in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from inductor_fusion.report import FusedRegion, FusionReport

log = logging.getLogger("inductor_fusion")

# Bumped when the key's inputs or the file's layout change: old files are then never read.
RECORDS_VERSION = 1


def records_dir() -> Path:
    """``inductor_fusion/`` under Inductor's cache dir (honours ``TORCHINDUCTOR_CACHE_DIR``)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "inductor_fusion"


def caches_disabled() -> bool:
    from torch._inductor import config as inductor_config

    return bool(inductor_config.force_disable_caches)


def _describe(value: Any) -> Any:
    """A placeholder's example value, as far as it decides the compiled code."""
    if isinstance(value, torch.Tensor):
        return {
            "shape": [str(size) for size in value.shape],
            "stride": [str(stride) for stride in value.stride()],
            "dtype": str(value.dtype),
            "device": str(value.device),
            "requires_grad": value.requires_grad,
        }
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {"symbol": str(value)}
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return type(value).__qualname__


def compile_key(
    gm: torch.fx.GraphModule | torch.fx.Graph,
    example_inputs: Sequence[Any],
    *,
    plan_key: str,
    pass_uuids: Sequence[str | None],
) -> str | None:
    """The records' key for compiling ``gm``, or None where records make no sense.

    Call it with the compile's Inductor config patches applied. None when a pass has no uuid
    (Inductor then bypasses its caches, so our pass always runs) or caches are force-disabled.
    ``gm`` may be the Dynamo graph itself (an installed pass finds that, not the GraphModule).
    """
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    if caches_disabled() or any(uid is None for uid in pass_uuids):
        return None
    graph = gm if isinstance(gm, torch.fx.Graph) else gm.graph
    code = graph.python_code(root_module="self").src if gm is graph else gm.code
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    inputs = [
        _describe(node.meta.get("example_value", value))
        for node, value in zip(placeholders, example_inputs, strict=False)
    ]
    modules = [
        [node.name, [entry[0] for entry in node.meta["nn_module_stack"].values()]]
        for node in graph.nodes
        if node.meta.get("nn_module_stack")
    ]
    try:
        # Our passes' config keys are left out of these (Inductor keys them by uuid, as we do).
        inductor = inductor_config.save_config_portable()
        functorch = functorch_config.save_config_portable()
    except Exception as error:  # e.g. a factory config without uuid(): Inductor would refuse too
        log.debug("inductor_fusion: no cache records for this compile (%s)", error)
        return None
    parts = {
        "version": RECORDS_VERSION,
        "torch": torch.__version__,
        "graph": code,
        "modules": modules,
        "inputs": inputs,
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "plan": plan_key,
        "passes": list(pass_uuids),
        "inductor": inductor,
        "functorch": functorch,
    }
    # default=repr: a config value without a stable repr changes the key every process, which
    # costs a missing record (one INFO line), never a wrong one.
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _encode(stage: str, region: FusedRegion) -> dict[str, Any]:
    return {
        "stage": stage,
        "pattern": region.pattern,
        "variant": region.variant,
        "paths": [list(pair) for pair in region.paths],
    }


def _decode(entry: dict[str, Any]) -> tuple[str, FusedRegion]:
    region = FusedRegion(
        pattern=str(entry["pattern"]),
        variant=str(entry["variant"]),
        paths=tuple(
            (str(role), None if path is None else str(path)) for role, path in entry["paths"]
        ),
    )
    return str(entry["stage"]), region


def load(key: str) -> list[tuple[str, FusedRegion]] | None:
    """The (stage, region) pairs saved under ``key``; None if there is no readable record."""
    path = records_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("version") != RECORDS_VERSION:
            return None
        return [_decode(entry) for entry in data["regions"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.debug("inductor_fusion: unreadable cache record %s (%s)", path, error)
        return None


def save(key: str, regions: Iterable[tuple[str, FusedRegion]]) -> None:
    """Writes the record atomically: concurrent compiles of one graph each write a whole file."""
    directory = records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(
        {"version": RECORDS_VERSION, "regions": [_encode(s, r) for s, r in regions]},
        sort_keys=True,
    )
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temp, directory / f"{key}.json")
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class CompileRecords:
    """The regions one compile's pass stages fused, kept apart from every other compile's.

    Each compile makes its own and hands it to its own `FusionPass` objects, so regions are
    attributed to the compile that fused them even when compiles interleave. ``key`` None: no
    records are read or written.
    """

    key: str | None = None
    regions: list[tuple[str, FusedRegion]] = dataclasses.field(default_factory=list)
    stages_run: set[str] = dataclasses.field(default_factory=set)
    finished: bool = False
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, regions: Sequence[FusedRegion]) -> None:
        """Called by the pass each time it runs (both stages; the backward graph may run late)."""
        with self._lock:
            self.stages_run.add(stage)
            self.regions.extend((stage, region) for region in regions)
            # AOTAutograd may compile the backward graph after compile_fx returned: keep the
            # record whole, as the cache entry it sits beside is written after that too.
            late = self.finished and regions
        if late:
            self._save()

    def finish(self, stages: Iterable[str], reports: Sequence[FusionReport]) -> None:
        """After compile_fx returned: report what the cache served, save what this compile did.

        A stage that did not run was served from Inductor's cache (all of them on an AOTAutograd
        hit; only post-grad on an FX-graph-cache hit, where the joint stage still runs): its
        regions come from the record, marked ``from_cache``.
        """
        if self.key is None:
            return
        with self._lock:
            served = [stage for stage in stages if stage not in self.stages_run]
        saved = load(self.key) if served else None
        if saved is None and served and not self.stages_run:
            log.info(
                "inductor_fusion: graph served from Inductor's cache without records of ours "
                "(compiled by another version or with caches off?); its regions are not reported"
            )
        carried = [(stage, region) for stage, region in saved or () if stage in served]
        for _, region in carried:
            for report in reports:
                report.record(region.cached())
        with self._lock:
            # Kept with their stage, so a later partial hit takes exactly what it skipped.
            self.regions.extend(carried)
            self.finished = True
            ran = bool(self.stages_run)
        if ran:
            self._save()

    def _save(self) -> None:
        assert self.key is not None
        with self._lock:
            regions = list(self.regions)
        try:
            save(self.key, regions)
        except OSError as error:  # A read-only cache dir costs the next hit its report only.
            log.warning("inductor_fusion: could not save cache records (%s)", error)
