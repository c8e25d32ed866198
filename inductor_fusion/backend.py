"""The torch.compile backend: Inductor with our pass installed (see ``fusion_pass`` for where).

``torch.compile(model, backend="inductor_fusion", mode=..., options=...)`` resolves through the
``torch_dynamo_backends`` entry point to `inductor_fusion_backend`. torch hands a string backend
``mode=`` (unless "default") or ``options=``; we turn them into Inductor config patches the way
``backend="inductor"`` does, after taking our own key (``options["inductor_fusion"]``) out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from inductor_fusion import records, registry
from inductor_fusion.config import (
    OPTIONS_KEY,
    FusionOptions,
    inductor_config_patches,
    resolve_plan,
)
from inductor_fusion.report import FusionReport, get_report

log = logging.getLogger("inductor_fusion")


class InductorFusionBackend:
    """A torch.compile backend object; ``report`` lists what it fused.

    >>> b = inductor_fusion.backend(patterns=["rmsnorm_mlp"], mode="max-autotune-no-cudagraphs")
    >>> torch.compile(model, backend=b)
    """

    def __init__(
        self,
        *,
        patterns: Sequence[str] | str | None = None,
        disable: Sequence[str] | str = (),
        mode: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        options = dict(options or {})
        self.fusion_options = FusionOptions.merged(options, patterns, disable)
        options.pop(OPTIONS_KEY, None)
        self.inductor_patches = inductor_config_patches(mode, options)
        self.report = FusionReport()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        from inductor_fusion.fusion_pass import STAGES, FusionPass, specialize_eps_inputs
        from inductor_fusion.global_pass import user_pass as installed_user_pass
        from inductor_fusion.model_plans import find_model_plan

        plan = resolve_plan(options=self.fusion_options, model_plan=find_model_plan(example_inputs))
        # A cache hit runs compiled code without running our pass: the ops it calls must exist.
        registry.import_op_modules(plan.patterns)
        patches = dict(self.inductor_patches)
        # Our kernels are user-defined Triton kernels to Inductor, which by default launches
        # those through Triton's Python launcher; its static launcher, which it uses for its own
        # kernels, costs the host less per launch (measured: perf/results/host). A user's own
        # setting wins.
        if hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
            patches.setdefault("static_launch_user_defined_triton_kernels", True)
        # Shared by this compile's passes only: what they fuse is this compile's (see records).
        compile_records = records.CompileRecords()
        rejected: set[object] = set()
        specialized = specialize_eps_inputs() if plan.patterns else ()
        passes = []
        for stage, config_key in STAGES.items():
            # Compose with a pass the user set there (in options or globally): it runs first.
            # An installed pass of ours (inductor_fusion.install) gives way to this compile's.
            user_pass = installed_user_pass(
                patches.get(config_key, getattr(inductor_config, config_key))
            )
            patches[config_key] = FusionPass(
                plan,
                report=self.report,
                chained=user_pass,
                stage=stage,
                rejected=rejected,
                records=compile_records,
                specialized=specialized,
            )
            passes.append(patches[config_key])
        # Under the patches, so that options such as force_disable_caches count.
        with inductor_config.patch(patches):
            compile_records.key = records.compile_key(
                gm, example_inputs, plan_key=plan.key(), pass_uuids=[p.uuid() for p in passes]
            )
        log.debug("inductor_fusion: compiling with %s (%s)", sorted(plan.patterns), plan.source)
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        # Stages that did not run were served from Inductor's caches: report their regions from
        # the records the compile that filled the caches left.
        compile_records.finish(STAGES, reports=(get_report(), self.report))
        return compiled

    def reset(self) -> None:
        """Called by torch._dynamo.reset(): drop CUDA-graph trees as Inductor's wrapper does."""
        reset_cudagraphs(self.inductor_patches.get("triton.cudagraphs"))


def reset_cudagraphs(enabled: bool | None = None) -> None:
    """Drops CUDA-graph trees when this backend (``enabled``) or the global config uses them.

    The string backend cannot know the mode it was compiled with (torch hands ``mode`` to each
    call, not to ``reset``), so there ``enabled`` is None and any CUDA machine resets.
    """
    from torch._inductor import config as inductor_config

    if enabled is None:
        enabled = inductor_config.triton.cudagraphs or torch.cuda.is_available()
    if enabled or inductor_config.triton.cudagraphs:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()


def backend(
    *,
    patterns: Sequence[str] | str | None = None,
    disable: Sequence[str] | str = (),
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> InductorFusionBackend:
    """The callable form: ``torch.compile(model, backend=inductor_fusion.backend(...))``."""
    return InductorFusionBackend(patterns=patterns, disable=disable, mode=mode, options=options)


def inductor_fusion_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """Entry point behind ``backend="inductor_fusion"``."""
    return InductorFusionBackend(mode=mode, options=options)(gm, example_inputs)


inductor_fusion_backend.reset = reset_cudagraphs  # type: ignore[attr-defined]
