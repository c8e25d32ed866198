"""``inductor_fusion.explain(model_or_config)``: what would fuse where, and why not, without compiling.

For each decoder layer it finds the candidate norm -> MLP regions (the module paths a model class
registers, `fusable_modules`, or else a norm and an MLP that are siblings, such as
``post_attention_layernorm`` and ``mlp``), traces each region as the decoder layer writes it
(``h + mlp(norm(h))``) on fake tensors with Inductor's decompositions, and runs our matchers over
that graph: the same patterns, checks (legality, profitability) and plan (options, environment,
KernelConfig) as a compile. Nothing is allocated or computed; a model given as a config is built
on the meta device. Regions with the same structure (module classes, shapes, dtypes) are traced
once, so an 8B config takes a few seconds, most of it transformers building the meta model.

What it explains is an inference (no_grad) compile; training compiles fuse in the joint graph
(README: Training), which this does not trace.
Regions it cannot see: a residual add that the model writes elsewhere (e.g. after a tensor-
parallel all-reduce, where the compile fuses the region without its residual).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inductor_fusion import config as fusion_config
from inductor_fusion import registry
from inductor_fusion.config import FusionOptions, FusionPlan

log = logging.getLogger("inductor_fusion")

PATTERN = "rmsnorm_mlp"
# Tokens of the traced activation [1, TRACE_TOKENS, hidden]; any count traces the same graph.
TRACE_TOKENS = 8
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# The norm feeding the MLP, by the names models give it, most specific first.
_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm", "ln_2")


@dataclass(frozen=True)
class Candidate:
    """One norm -> MLP region of a decoder layer, and whether a compile fuses it."""

    layer: str
    pattern: str
    norm: str
    mlp: str
    fuses: bool
    variant: str | None = None  # the registered variant that matches, where one does
    reason: str | None = None  # one line, when it does not fuse

    def __str__(self) -> str:
        where = (
            f"{self.layer}: {_relative(self.norm, self.layer)} -> {_relative(self.mlp, self.layer)}"
        )
        if self.fuses:
            return f"{where}: fuses as {self.pattern}[{self.variant}]"
        return f"{where}: not fused: {self.reason}"


@dataclass(frozen=True)
class Regime:
    """What runs the fused region for a range of token counts on a device."""

    device: str
    tokens: str
    runs: str


@dataclass(frozen=True)
class Explanation:
    model: str
    dtype: str
    hidden_size: int | None
    intermediate_size: int | None
    plan: str
    candidates: tuple[Candidate, ...]
    regimes: tuple[Regime, ...]

    @property
    def fused(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.fuses)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        sizes = f"hidden {self.hidden_size}, intermediate {self.intermediate_size}"
        lines = [
            f"inductor_fusion explain: {self.model} ({self.dtype}, {sizes})",
            f"plan: {self.plan}; inference graphs (training: see the README's Training section)",
        ]
        lines += [f"  {r.device}, {r.tokens} tokens: {r.runs}" for r in self.regimes]
        lines += [str(c) for c in self.candidates]
        lines.append(
            f"{len(self.fused)} of {len(self.candidates)} candidate region(s) fuse"
            if self.candidates
            else "no candidate norm -> MLP region found"
        )
        return "\n".join(lines)


def explain(
    model_or_config: Any,
    *,
    patterns: Sequence[str] | str | None = None,
    disable: Sequence[str] | str = (),
    kernel_config: Any = None,
    dtype: torch.dtype | None = None,
) -> Explanation:
    """Explains what ``torch.compile`` with our pass would fuse in a model, without compiling.

    ``model_or_config``: a model (its weights are never read; a meta-device model works) or a
    ``transformers`` config (built on the meta device, in ``dtype`` or the config's dtype).
    ``patterns``/``disable`` are the backend's (or install()'s) options; ``kernel_config`` a
    KernelConfig to resolve against the model as ``from_pretrained`` would. The environment's
    toggles and a KernelConfig plan already attached to the model apply as in a compile.
    """
    from inductor_fusion.kernel_config import fusion_config as as_fusion_config
    from inductor_fusion.kernel_config import model_plan

    model = _as_model(model_or_config, dtype)
    attached = model_plan(model)
    if kernel_config is not None:
        attached = as_fusion_config(kernel_config).fusion_plan(model)
    plan = fusion_config.resolve_plan(
        options=FusionOptions(patterns=patterns, disable=disable), model_plan=attached
    )
    traced: dict[Any, tuple[str | None, str | None]] = {}
    candidates = []
    for layer, norm_path, mlp_path in find_candidates(model):
        norm, mlp = model.get_submodule(norm_path), model.get_submodule(mlp_path)
        key = _structure(norm, mlp)
        if key not in traced:
            traced[key] = _trace_region(norm, mlp)
        variant, reason = traced[key]
        if variant is not None:
            reason = _plan_reason(plan, {"norm": norm_path, "mlp": mlp_path})
        candidates.append(
            Candidate(
                layer=layer,
                pattern=PATTERN,
                norm=norm_path,
                mlp=mlp_path,
                fuses=variant is not None and reason is None,
                variant=variant,
                reason=reason,
            )
        )
    hidden, inter = _sizes(model, candidates)
    return Explanation(
        model=type(model).__name__,
        dtype=str(_dtype(model)),
        hidden_size=hidden,
        intermediate_size=inter,
        plan=_describe(plan),
        candidates=tuple(candidates),
        regimes=_regimes(_dtype(model), hidden, inter) if any(c.fuses for c in candidates) else (),
    )


# --- models and candidates -----------------------------------------------------------------------


def _as_model(model_or_config: Any, dtype: torch.dtype | None) -> torch.nn.Module:
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import PretrainedConfig

    if not isinstance(model_or_config, PretrainedConfig):
        raise TypeError(
            "inductor_fusion.explain: expected a model (nn.Module) or a transformers config, got "
            f"{type(model_or_config).__name__}"
        )
    return model_from_config(model_or_config, dtype)


def model_from_config(config: Any, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The config's model class (its ``architectures``, else the causal-LM class of its type),
    built on the meta device: no memory, no initialisation."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = [*(getattr(config, "architectures", None) or ())]
    names.append(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""))
    model_class = next(
        (getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None
    )
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        if model_class is None:
            model = transformers.AutoModel.from_config(config)
        else:
            model = model_class(config)
    return model.to(dtype)


def find_candidates(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(layer, norm path, MLP path) of every candidate region, in model order.

    Where the model class registers its fusable modules (`register_fusable_modules`), those
    globs decide; otherwise a block's MLP child (``mlp``, ``feed_forward``, ``ffn``) paired with
    the sibling norm that feeds it (``post_attention_layernorm``, ``pre_feedforward_layernorm``...).
    """
    import fnmatch

    from inductor_fusion.kernel_config import fusable_modules

    modules = dict(model.named_modules())
    registered = fusable_modules(model)
    found = []
    if "RMSNorm" in registered and "MLP" in registered:
        norms = {
            path.rpartition(".")[0]: path
            for path in modules
            if fnmatch.fnmatchcase(path, registered["RMSNorm"])
        }
        for path in modules:
            layer = path.rpartition(".")[0]
            if fnmatch.fnmatchcase(path, registered["MLP"]) and layer in norms:
                found.append((layer, norms[layer], path))
        return found
    for layer, module in modules.items():
        children = dict(module.named_children())
        mlp = next((n for n in _MLP_NAMES if n in children), None)
        norm = next((n for n in _NORM_NAMES if n in children), None)
        if mlp is None or norm is None:
            continue
        prefix = f"{layer}." if layer else ""
        found.append((layer, prefix + norm, prefix + mlp))
    return found


def _structure(norm: torch.nn.Module, mlp: torch.nn.Module) -> Any:
    """What the traced graph depends on: module classes, parameter shapes and dtypes, eps."""

    def describe(module: torch.nn.Module) -> tuple[Any, ...]:
        return (
            tuple((n, type(m)) for n, m in module.named_modules()),
            tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers()),
            repr(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (int, float)))),
        )

    return describe(norm), describe(mlp)


class _Region(torch.nn.Module):
    """The region as HF decoder layers write it: ``residual + mlp(post_attention_layernorm(h))``."""

    def __init__(self, norm: torch.nn.Module, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.norm(hidden))


class _Rejections(logging.Handler):
    """Collects the one-line reasons our patterns log for matched regions they leave unfused."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " not fused " in message:
            self.reasons.append(message.partition("): ")[2] or message)


def _trace_region(norm: torch.nn.Module, mlp: torch.nn.Module) -> tuple[str | None, str | None]:
    """(variant, None) if our matcher fuses the region, else (None, why not)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    from inductor_fusion.fusion_pass import _PassRun, _running

    region = _Region(norm, mlp)
    params = dict(region.named_parameters())
    hidden_size = getattr(norm, "weight", None)
    if not isinstance(hidden_size, torch.Tensor) or hidden_size.dim() != 1:
        return None, f"{type(norm).__name__} has no 1-D weight: not an RMSNorm"
    dtype = hidden_size.dtype
    with FakeTensorMode() as mode:
        # Fake CPU tensors: the device decides nothing the pattern checks but the CUDA regimes,
        # which `_regimes` reports for every token count.
        fakes = {
            name: torch.empty(t.shape, dtype=t.dtype, device="cpu")
            for name, t in (*params.items(), *region.named_buffers())
        }
        hidden = torch.empty(1, TRACE_TOKENS, hidden_size.shape[0], dtype=dtype, device="cpu")

    def forward(tensors: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return functional_call(region, tensors, (h,))

    try:
        with mode, torch.no_grad():
            gm = make_fx(forward, select_decomp_table())(fakes, hidden)
    except Exception as error:  # a module that does not trace on fake tensors
        return None, f"the region does not trace on fake tensors ({type(error).__name__}: {error})"
    gm.graph.eliminate_dead_code()
    rejections = _Rejections()
    log.addHandler(rejections)
    level = log.level
    log.setLevel(min(level or logging.WARNING, logging.INFO))
    log.propagate, propagate = False, log.propagate
    try:
        prepare = getattr(registry.pattern_module(PATTERN), "prepare_graph", None)
        if prepare is not None:
            prepare(gm.graph)
        run = _PassRun(plan=FusionPlan(frozenset({PATTERN}), source="explain"), regions=[])
        with _running(run):
            registry.matcher_pass(PATTERN).apply(gm.graph)
    finally:
        log.removeHandler(rejections)
        log.setLevel(level)
        log.propagate = propagate
    if run.regions:
        return run.regions[0].variant, None
    if rejections.reasons:
        return None, rejections.reasons[0]
    return None, _no_match_reason(norm, mlp)


def _no_match_reason(norm: torch.nn.Module, mlp: torch.nn.Module) -> str:
    """Why the region's graph does not have the pattern's shape, from the modules' structure."""
    adapters = [
        f"{name or type(mlp).__name__} ({_adapter_kind(m)})"
        for name, m in mlp.named_modules()
        if type(m).__module__.startswith("peft.") and hasattr(m, "base_layer")
    ]
    if adapters:
        return (
            f"an adapter inside the region: {', '.join(adapters)} add their own matmuls; merge "
            "them into the weights to fuse (peft: model.merge_and_unload())"
        )
    projections = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projections):
        if hasattr(mlp, "gate_up_proj"):
            return "the MLP computes gate and up in one matmul (gate_up_proj): not a pattern yet"
        return f"{type(mlp).__name__} has no gate_proj/up_proj/down_proj linears: not a SwiGLU MLP"
    act = getattr(mlp, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return f"unsupported activation {type(act).__name__}: {PATTERN} fuses SiLU (SwiGLU) only"
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"unsupported dtype {weight.dtype}: {PATTERN} fuses float16, bfloat16 and float32"
    return (
        f"{type(norm).__name__} -> {type(mlp).__name__} does not compute the pattern's math "
        "(Llama-style RMSNorm: fp32 statistics, cast back, x weight; then down(silu(gate) * up))"
    )


def _adapter_kind(module: torch.nn.Module) -> str:
    """``peft lora.Linear`` for peft's ``peft.tuners.lora.layer.Linear``."""
    parts = type(module).__module__.split(".")
    tuner = f"{parts[2]}." if len(parts) > 2 and parts[1] == "tuners" else ""
    return f"{parts[0]} {tuner}{type(module).__name__}"


# --- plan and regimes ----------------------------------------------------------------------------


def _plan_reason(plan: FusionPlan, paths: Mapping[str, str]) -> str | None:
    if PATTERN not in plan.patterns:
        return f"{PATTERN} is switched off ({_source(plan)})"
    if not plan.allows(PATTERN, paths):
        return f"outside the places the plan allows ({_source(plan)})"
    return None


def _source(plan: FusionPlan) -> str:
    parts = {
        "default": "default",
        "env": f"{fusion_config.ENV_PATTERNS}",
        "options": "the patterns option",
        "kernel_config": "the model's KernelConfig",
        "options.disable": "the disable option",
        fusion_config.ENV_DISABLE: fusion_config.ENV_DISABLE,
    }
    return " + ".join(parts.get(part, part) for part in plan.source.split("+"))


def _describe(plan: FusionPlan) -> str:
    if not plan.patterns:
        return f"no pattern active ({_source(plan)})"
    names = ", ".join(sorted(plan.patterns))
    where = "where the KernelConfig says" if plan.scopes else "everywhere"
    return f"{names} {where} ({_source(plan)})"


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _sizes(
    model: torch.nn.Module, candidates: Sequence[Candidate]
) -> tuple[int | None, int | None]:
    for candidate in candidates:
        gate = getattr(model.get_submodule(candidate.mlp), "gate_proj", None)
        weight = getattr(gate, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[1]), int(weight.shape[0])
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)


def _regimes(dtype: torch.dtype, hidden: int | None, inter: int | None) -> tuple[Regime, ...]:
    from inductor_fusion.triton_kernels.rmsnorm_mlp import MAX_PROFITABLE_TOKENS, supports

    limit = MAX_PROFITABLE_TOKENS
    other = Regime("cpu and other devices", "any", "our op (the PyTorch reference)")
    reason = supports(dtype, "cuda", hidden or 0, inter or 0)
    if reason is not None:
        return (Regime("cuda", "any", f"left to Inductor: {reason}"), other)
    return (
        Regime("cuda", f"1-{limit}", f"our fused GEMV kernels ({PATTERN})"),
        Regime("cuda", f"{limit + 1}+", "left to Inductor (its GEMMs are faster there)"),
        other,
    )


def _relative(path: str, layer: str) -> str:
    return path[len(layer) + 1 :] if layer and path.startswith(layer + ".") else path
