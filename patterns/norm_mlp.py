"""The table of norm -> MLP (-> residual) regions the pattern families fuse, and its registration.

One table describes what the Hugging Face decoder families write after attention, as a few named
axes: the norm (Llama's RMSNorm, Gemma's ``(1 + w)`` RMSNorm, LayerNorm, Nemotron's LayerNorm1P,
none), the MLP (activation; gated with separate or fused gate/up projections, or not gated) and
the residual (none, ``h + mlp`` on either side, ``h + mlp * scale``, ``mlp + other`` with a
second tensor: GPT-NeoX's parallel attention output). Each row (`RegionForm`) is a
family's form; each family module (``rmsnorm_mlp``, ``layernorm_mlp``) lists its rows and calls
`register`. The search functions are the modules' math written as plain PyTorch, e.g. Llama's:

    n   = weight * (h.float() * rsqrt(mean(h.float()**2, -1, keepdim) + eps)).to(h.dtype)
    out = h + down(silu(gate(n)) * up(n))

Inductor's pattern matcher traces them (with its own decompositions, so ``F.silu``,
``F.layer_norm`` and ``F.linear`` become exactly the nodes a compiled HF model shows) and finds
them in post-grad graphs with every literal compared (`search_pattern`), so a ``pow(x, 3)``, a
``mean`` over another dim, another activation's constants or a cast to another dtype never fuse.

Variants come from one loop: the row, dtype class (fp32 graphs lose the casts), 2-D or 3-D
activations (3-D adds reshapes), MLP biases, and the residual forms the row's models write.
Regions with a second norm on the MLP output (Gemma2/3's and OLMo-2's
``post_feedforward_layernorm``) fuse up to the MLP output (the no-residual variant); the post-norm
and the add stay Inductor's, because a row norm over H cannot sit in the down GEMM's epilogue,
whose programs each see only part of a row.

Rows marked ``training`` (Llama's) also get training variants: traced forward + backward
(``joint_fwd_bwd``) and matched in a training compile's joint graph, where the replacement is the
region's own math with the memory mode's checkpoint tags (`training`): the backward recomputes
what is one pointwise pass away instead of keeping it.

Each match fuses only if `norm_mlp_checks` finds it legal and profitable; what the pass does to a
whole graph around the matching (scalars specialized, dropout copies dropped, candidates no
variant matched reported) is `norm_mlp_graph`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inductor_fusion import catalogue
from inductor_fusion.graph_paths import canonicalize_joint_graph, region_paths
from inductor_fusion.pass_state import on_reject
from inductor_fusion.patterns import norm_mlp_checks
from inductor_fusion.patterns.norm_mlp_checks import (
    CAST,
    DIV_SCALAR,
    EXPAND,
    MLP_TARGETS,
    NORM_TARGETS,
    RESHAPES,
    SPLIT,
)
from inductor_fusion.patterns.training import trace_region
from inductor_fusion.report import FusedRegion
from inductor_fusion.triton_kernels.region import ACTIVATION_FUNCTIONS, RegionSpec

# Example scalars that equal no other literal of any pattern (2 in pow, 1 in silu and 1 + w, -1
# in mean, GELU's constants), so the scalar workaround turns exactly these into arguments.
_EXAMPLE_EPS = 1e-5
_EXAMPLE_SCALE = 0.3173828125
_SCALARS = {"eps": _EXAMPLE_EPS, "residual_scale": _EXAMPLE_SCALE}


# --- the math, as plain PyTorch -----------------------------------------------------------------


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm (Mistral, Qwen2/3, Phi-3, Granite)."""
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


def gemma_rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GemmaRMSNorm (Gemma, Gemma2, Gemma3): ``1 + w`` in fp32, one cast at the end."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * (1.0 + weight.float())).type_as(hidden)


def layer_norm(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """nn.LayerNorm (GPT-NeoX, Starcoder2)."""
    return F.layer_norm(hidden, (hidden.shape[-1],), weight, bias, eps)


def layer_norm_1p(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """NemotronLayerNorm1P: LayerNorm with the weight used as ``w + 1``."""
    return F.layer_norm(hidden, (hidden.shape[-1],), weight + 1.0, bias, eps)


# The search function of each norm formula of the catalogue (`catalogue.NORM_FORMS`, which spells
# it as the op's axes): (hidden, weight[, bias], eps) -> normed; None for no norm.
NORMS: dict[str, Callable[..., torch.Tensor] | None] = {
    "llama_rms": rms_norm,
    "gemma_rms": gemma_rms_norm,
    "layer": layer_norm,
    "layer_1p": layer_norm_1p,
    "none": None,
}
MLPS = ("separate", "fused", "plain")  # gate/up projections; one fused gate_up; no gate
# h + y, y + h, h + y * scale, y + other (a second tensor: GPT-NeoX's parallel attention output), y
RESIDUALS = ("left", "right", "scaled", "parallel", "none")


@dataclass(frozen=True)
class RegionForm:
    """One row of the table: the region as one group of models writes it."""

    # Variant-name prefix; "" for Llama's, whose unprefixed names users' reports and tests key on.
    name: str
    norm: str  # a key of NORMS (and of catalogue.NORM_FORMS)
    activation: str  # a key of ACTIVATION_FUNCTIONS (the op's activation names)
    mlp: str  # one of MLPS
    residuals: tuple[str, ...]  # the residual forms registered, from RESIDUALS
    biases: tuple[bool, ...] = (False,)  # MLP biases registered (mlp_bias / use_bias)
    models: str = ""  # who writes it, for messages and the docs
    # The MLP's output goes through a second norm before the residual add (OLMo-2). A row with
    # no norm in front needs it: matched only where the MLP reads the residual stream and a norm
    # takes its output (`norm_mlp_checks.post_norm_reason`), so it never takes the MLP half of a
    # region whose norm another family fuses with it.
    post_norm: bool = False
    # Whether training (joint forward+backward) variants are registered too; the training ops
    # (`rmsnorm_mlp_train*`) compute Llama's form only: RMSNorm, SiLU, separate gate/up, no bias.
    training: bool = False

    def __post_init__(self) -> None:
        if (
            self.norm not in NORMS
            or self.activation not in ACTIVATION_FUNCTIONS
            or self.mlp not in MLPS
        ):
            raise ValueError(f"unknown axis value in {self}")
        if not set(self.residuals) <= set(RESIDUALS):
            raise ValueError(f"unknown residual form in {self}")
        if self.mlp == "fused" and True in self.biases:
            raise ValueError("fused gate_up projections are registered without biases")
        if self.norm == "none" and not self.post_norm:
            raise ValueError("a row without a norm in front must match post-norm regions only")
        if self.post_norm and self.residuals != ("none",):
            raise ValueError("the residual add of a post-norm region follows the norm: no variant")
        llama_form = (self.norm, self.activation, self.mlp) == ("llama_rms", "silu", "separate")
        if self.training and not llama_form:
            raise ValueError(f"training variants exist for Llama's form only, not {self}")

    @property
    def spec(self) -> RegionSpec:
        form = catalogue.NORM_FORMS[self.norm]
        return RegionSpec(
            norm=form.kind,
            norm_weight_offset=form.weight_offset,
            norm_weight_fp32=form.weight_fp32,
            activation=self.activation,
            gated=self.mlp != "plain",
        )


def _autocast_mlp(
    x: torch.Tensor, a: dict[str, Any], lowp: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """LlamaMLP under torch.autocast: each linear casts its own operands to the autocast dtype
    (the norm's output is cast twice, once per projection); SiLU and the product stay in it.
    The search's ``lowp`` is a wildcard of the pattern (`search_pattern`); a replacement passes
    the matched one."""
    gate = F.linear(x.to(lowp), a["gate_weight"].to(lowp))
    up = F.linear(x.to(lowp), a["up_weight"].to(lowp))
    return F.linear(F.silu(gate) * up, a["down_weight"].to(lowp))


def mlp(form: RegionForm, x: torch.Tensor, a: dict[str, Any], bias: bool) -> torch.Tensor:
    act = ACTIVATION_FUNCTIONS[form.activation]
    gate_bias = a["gate_bias"] if bias else None
    down_bias = a["down_bias"] if bias else None
    if form.mlp == "plain":
        inter = act(F.linear(x, a["gate_weight"], gate_bias))
    elif form.mlp == "fused":  # Phi3MLP: one projection, chunked; operands as it writes them
        gate, up = F.linear(x, a["gate_weight"]).chunk(2, dim=-1)
        inter = up * act(gate)
    else:
        gate = F.linear(x, a["gate_weight"], gate_bias)
        inter = act(gate) * F.linear(x, a["up_weight"], a["up_bias"] if bias else None)
    return F.linear(inter, a["down_weight"], down_bias)


@dataclass(frozen=True)
class Variant:
    """One registered form of a row: the unit torch's pattern matcher registers."""

    lowp: bool  # bf16/fp16 graph: casts to fp32 and back are present
    ndim: int  # 2 or 3: 3-D activations add reshapes around each mm
    bias: bool  # MLP biases: addmm instead of mm
    residual: str  # one of RESIDUALS
    # 3-D graphs come in two forms: with `view` nodes (the joint graph, where we match first,
    # before Inductor's pad_mm can pad an unaligned mm out of the pattern's reach) and with
    # `reshape` nodes (compile_fx converts views before the post-grad passes).
    views: bool = False
    form: RegionForm | None = None  # None: Llama's row (the default of `LLAMA`)
    # Traced forward + backward (`joint_fwd_bwd`): matched in the joint graph of a training
    # compile, where the region's saved activations and gradient computation are replaced too.
    training: bool = False
    # torch.autocast's form of a training region: fp32 parameters and norm, the MLP's GEMM
    # operands cast to a 16-bit dtype (bf16 or fp16: the pattern leaves it open, `_check`
    # reads it off the match).
    autocast: bool = False

    @property
    def row(self) -> RegionForm:
        return self.form or LLAMA

    @property
    def name(self) -> str:
        parts = [self.row.name] if self.row.name else []
        if self.training:
            parts.append("train")
        precision = "autocast" if self.autocast else "lowp" if self.lowp else "fp32"
        parts += [precision, f"{self.ndim}d"]
        if self.bias:
            parts.append("bias")
        parts.append(f"residual_{self.residual}" if self.residual != "none" else "no_residual")
        return "_".join(parts)

    @property
    def argnames(self) -> tuple[str, ...]:
        row = self.row
        fn, form = NORMS[row.norm], catalogue.NORM_FORMS[row.norm]
        names = ["hidden"]
        if fn is not None:
            names.append("norm_weight")
        if form.bias:
            names.append("norm_bias")
        names.append("gate_weight")
        if row.mlp == "separate":
            names.append("up_weight")
        names.append("down_weight")
        if self.bias:
            names += ["gate_bias", "up_bias"] if row.mlp == "separate" else ["gate_bias"]
            names.append("down_bias")
        if fn is not None:
            names.append("eps")
        if self.residual == "scaled":
            names.append("residual_scale")
        if self.residual == "parallel":
            names.append("other")
        return tuple(names)

    def search(self, **a: Any) -> torch.Tensor:
        return self._region(a, torch.bfloat16)

    def _region(self, a: dict[str, Any], lowp: torch.dtype) -> torch.Tensor:
        fn = NORMS[self.row.norm]
        x = a["hidden"]
        if fn is not None:
            extra = (a["norm_bias"],) if catalogue.NORM_FORMS[self.row.norm].bias else ()
            x = fn(x, a["norm_weight"], *extra, a["eps"])
        out = _autocast_mlp(x, a, lowp) if self.autocast else mlp(self.row, x, a, self.bias)
        if self.residual == "left":
            return a["hidden"] + out
        if self.residual == "right":
            return out + a["hidden"]
        if self.residual == "scaled":  # GraniteDecoderLayer
            return a["hidden"] + out * a["residual_scale"]
        if self.residual == "parallel":
            # GPTNeoXLayer (use_parallel_residual): mlp + attn + h, i.e. (mlp + attn) + h; the
            # first add folds into the down GEMM's epilogue, the second stays Inductor's.
            return out + a["other"]
        return out

    def replace(self, **a: Any) -> torch.Tensor:
        from inductor_fusion.triton_kernels.rmsnorm_mlp import rmsnorm_mlp_lowered

        if self.training:
            return self._replace_training(a)
        gate, up = a["gate_weight"], a.get("up_weight")
        if self.row.mlp == "fused":
            # The halves of Phi-3's [2I, H] gate_up_proj, as views: the kernels read through
            # strides, so nothing is copied.
            gate, up = gate.chunk(2, dim=0)
        args = (
            a["hidden"],
            a.get("norm_weight"),
            gate,
            up,
            a["down_weight"],
            a.get("gate_bias"),
            a.get("up_bias"),
            a.get("down_bias"),
            {"none": None, "parallel": a.get("other")}.get(self.residual, a["hidden"]),
            a.get("eps", 0.0),
            a.get("norm_bias"),
        )
        # Indexed, never defaulted: a scaled variant without its scale must fail loudly.
        scale = a["residual_scale"] if self.residual == "scaled" else 1.0
        # On CUDA the kernels become launches in Inductor's own generated code (no dispatcher
        # call per region); elsewhere the op, whose body is the PyTorch reference.
        if a["hidden"].device.type == "cuda":
            return rmsnorm_mlp_lowered(*args[:10], norm_bias=args[10], residual_scale=scale,
                                       spec=self.row.spec)  # fmt: skip
        return torch.ops.inductor_fusion.rmsnorm_mlp.default(
            *args, residual_scale=scale, **self.row.spec.op_kwargs()
        )

    def _replace_training(self, a: dict[str, Any]) -> torch.Tensor:
        """A training region is replaced by its own math, traced forward + backward with the
        memory mode's checkpoint tags (`training.trace_region`): Inductor compiles the same
        kernels as without us and only what the backward reads changes. The autocast dtype is
        the one `_check` read off this match (`_autocast_dtype`), just before the matcher
        traces this."""
        return self._region(a, _autocast_dtype.get() or torch.bfloat16)

    def example_inputs(self) -> list[Any]:
        # Distinct sizes (M=6, H=32, I=48) so no two dims are confused while tracing; values and
        # device do not matter to the trace.
        dtype = torch.bfloat16 if self.lowp else torch.float32
        hidden_shape = (2, 3, 32) if self.ndim == 3 else (6, 32)
        fused = self.row.mlp == "fused"
        shapes = {
            "hidden": hidden_shape,
            "norm_weight": (32,),
            "norm_bias": (32,),
            "gate_weight": (96, 32) if fused else (48, 32),
            "up_weight": (48, 32),
            "down_weight": (32, 48),
            "gate_bias": (48,),
            "up_bias": (48,),
            "down_bias": (32,),
            "other": hidden_shape,
        }
        # Training variants trace the backward of every tensor input (joint_fwd_bwd), and the
        # matcher re-creates them with the same requires_grad for the replacement's trace.
        return [
            _SCALARS[name]
            if name in _SCALARS
            else torch.empty(shapes[name], dtype=dtype, requires_grad=self.training)
            for name in self.argnames
        ]


LLAMA = RegionForm(
    "", "llama_rms", "silu", "separate", ("left", "right", "none"), biases=(False, True),
    models="Llama, Mistral, Qwen2, Qwen3, Granite (without its scale); Gemma2/3-style post-norm "
    "regions of these up to the MLP output", training=True,
)  # fmt: skip


def variants(forms: tuple[RegionForm, ...] = (LLAMA,)) -> list[Variant]:
    # Residual forms in the row's order: "left" first, as HF writes it, so it is tried first on
    # each add.
    return [
        Variant(
            lowp=lowp,
            ndim=ndim,
            bias=bias,
            residual=residual,
            views=views,
            form=None if form is LLAMA else form,
        )
        for form in forms
        for lowp, ndim, bias, residual in itertools.product(
            (True, False), (3, 2), form.biases, form.residuals
        )
        for views in ((False, True) if ndim == 3 else (False,))
    ] + [
        # Training: the joint graph (which still has views), no MLP bias (the training op has
        # none). Inference variants come first: a forward-only graph is matched by them, and in
        # a joint graph they never match (the backward uses the region's interior nodes).
        Variant(
            lowp=lowp,
            ndim=ndim,
            bias=False,
            residual=residual,
            views=ndim == 3,
            form=None if form is LLAMA else form,
            training=True,
            autocast=autocast,
        )
        for form in forms
        if form.training
        for (lowp, autocast), ndim, residual in itertools.product(
            ((True, False), (False, False), (False, True)), (3, 2), form.residuals
        )
    ]


def _positional(fn: Callable[..., torch.Tensor], names: tuple[str, ...]) -> Callable[..., Any]:
    """Gives a keyword-only body the explicit positional signature the matcher inspects."""

    def call(*args: Any) -> torch.Tensor:
        return fn(**dict(zip(names, args, strict=True)))

    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return call


# --- registration ---------------------------------------------------------------------------------


def _trace_reshapes(fn: Callable[..., Any], args: Any, **kwargs: Any) -> torch.fx.GraphModule:
    """fwd_only, then view -> reshape, as compile_fx does before the post-grad passes: a 3-D
    pattern traced with views would never match there."""
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.pattern_matcher import fwd_only

    gm = fwd_only(fn, args, **kwargs)
    view_to_reshape(gm)
    return gm


def search_pattern(variant: Variant) -> Any:
    """The variant's search function as a PatternExpr whose shape-dependent literals are wildcards.

    torch's own flow (``register_replacement`` without ``search_fn_pattern``) matches once with
    every literal ignored, then re-traces the search function with the graph's shapes and matches
    again with every literal compared. Under dynamic shapes that re-trace writes the reshape sizes
    as its own ``sym_size``/``mul`` nodes (``view(x, [mul, 64])`` with ``mul = 2 * s0``), which
    never equal the graph's (its ``mul`` has other users, both dims may be symbols, the factors may
    come in another order), so batch > 1 with a dynamic dim, or two dynamic dims, never matched.
    Here we trace once and keep every literal (``pow`` 2, ``mean`` over -1, the cast to fp32,
    ``add`` 1 in SiLU) except two that depend on the graph: each reshape's size list and the dtype
    a cast returns to (bf16 or fp16). `_check` verifies both on the matched nodes' metadata.

    Training variants are traced forward + backward (`joint_fwd_bwd`); their backward adds two
    more graph-dependent literals, in the RMSNorm statistic's gradient: the ``expand`` of the
    mean's gradient back to ``hidden``'s shape and the division by H
    (`norm_mlp_checks.structure_reason`).
    """
    from torch._inductor.pattern_matcher import Ignored, fx_to_pattern

    trace = _trace_fn(variant)
    gm = trace(_positional(variant.search, variant.argnames), variant.example_inputs())
    if variant.training:
        # The same normalisation our pass gives joint graphs before matching, whatever this
        # torch's joint_fwd_bwd applies itself (versions differ: early_patterns, pointless_view).
        canonicalize_joint_graph(gm.graph)
    for node in gm.graph.nodes:
        wildcard = node.target in (*RESHAPES, EXPAND, DIV_SCALAR) or (
            node.target == CAST and node.args[1] != torch.float32
        )
        if wildcard:
            node.args = (node.args[0], Ignored())
        elif node.target == SPLIT:  # Phi-3's chunk(2): the split size is I
            node.args = (node.args[0], Ignored(), *node.args[2:])
    return fx_to_pattern(gm, argnames=variant.argnames, scalar_workaround=_scalars(variant))


def _trace_fn(variant: Variant) -> Callable[..., torch.fx.GraphModule]:
    from torch._inductor.pattern_matcher import fwd_only, joint_fwd_bwd

    if variant.training:
        return joint_fwd_bwd
    return fwd_only if variant.views else _trace_reshapes


def _scalars(variant: Variant) -> dict[str, float]:
    return {name: value for name, value in _SCALARS.items() if name in variant.argnames}


def register(
    pass_: Any,
    *,
    family: str,
    forms: tuple[RegionForm, ...],
    on_match: Callable[[FusedRegion], bool],
    training: bool = False,
) -> None:
    """Registers every inference variant of ``forms`` (``training``: every training variant)
    into ``pass_`` (a PatternMatcherPass) as ``family``. Traces; call once."""
    from torch._inductor.pattern_matcher import register_replacement

    import inductor_fusion.triton_kernels.rmsnorm_mlp  # noqa: F401  (the op the replacement calls)

    # Where fwd_only itself already traces reshapes, a view form would be the reshape form again;
    # torch refuses duplicate patterns, and there is nothing more to match.
    views_differ = _fwd_only_traces_views()
    for variant in variants(forms):
        if variant.training != training:
            continue
        if variant.views and not views_differ and not variant.training:
            continue
        # A pass is built once per process: if that happens under torch.inference_mode(),
        # register_replacement would skip every training variant (and later training compiles
        # would never fuse), so tracing leaves inference mode.
        with torch.inference_mode(False):
            register_replacement(
                _positional(variant.search, variant.argnames),
                _positional(variant.replace, variant.argnames),
                variant.example_inputs(),
                # The replacement's trace; the search's is `search_pattern`'s.
                trace_region(_training_mode.get) if variant.training else _trace_fn(variant),
                pass_,
                extra_check=functools.partial(
                    _check, variant=variant, family=family, on_match=on_match
                ),
                scalar_workaround=_scalars(variant),
                # Matched as is, not re-traced per graph: see `search_pattern`.
                search_fn_pattern=search_pattern(variant),
            )


def _fwd_only_traces_views() -> bool:
    """Whether this torch's fwd_only leaves `view` nodes in a 3-D linear (2.11 and 2.13 do)."""
    from torch._inductor.pattern_matcher import fwd_only

    gm = fwd_only(F.linear, [torch.empty(2, 3, 32), torch.empty(48, 32)])
    return bool(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default))


# The memory mode and autocast dtype `_check` read off a training match, for its replacement.
_training_mode: contextvars.ContextVar[str] = contextvars.ContextVar(
    "inductor_fusion_training_mode", default="default"
)
_autocast_dtype: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "inductor_fusion_autocast_dtype", default=None
)


def _check(
    match: Any, *, variant: Variant, family: str, on_match: Callable[[FusedRegion], bool]
) -> bool:
    """The matcher's extra check of ``variant``'s matches: whether to replace this one. A region
    our op must not or should not take is reported (`on_reject`) with the reason."""
    mode = norm_mlp_checks.region_memory_mode(match, family) if variant.training else "default"
    args = norm_mlp_checks.region_args(
        match,
        variant.argnames,
        fused_gate_up=variant.row.mlp == "fused",
        training=variant.training,
        memory=mode,
    )
    if variant.row.post_norm and norm_mlp_checks.post_norm_reason(match) is not None:
        # Not this row's region (e.g. the MLP half of Llama's): no INFO line, it is no candidate.
        return False
    autocast = norm_mlp_checks.autocast_dtype_of(match) if variant.autocast else None
    # Legality first, then profitability (which may guard on a symbolic token count).
    reason = (
        ("casts to other than one 16-bit dtype" if variant.autocast and autocast is None else None)
        or norm_mlp_checks.structure_reason(match, args.hidden, also=autocast)
        or norm_mlp_checks.can_fuse(args)
        or norm_mlp_checks.should_fuse(args)
    )
    if reason is not None:
        # The graph keeps Inductor's unfused code there; say why, once per region (keyed by
        # its first projection, which every variant of the region shares).
        key = next((n.name for n in match.nodes if n.target in MLP_TARGETS), variant)
        on_reject(key, family, reason, f"{family} not fused ({variant.name}): {reason}")
        return False
    # A training match also spans the region's backward, whose nodes carry no module stack:
    # the roles' paths come from the forward nodes.
    traced = [n for n in match.nodes if not variant.training or n.meta.get("nn_module_stack")]
    roles = {"mlp": [n for n in traced if n.target in MLP_TARGETS]}
    if variant.row.norm != "none":
        roles = {"norm": [n for n in traced if n.target in NORM_TARGETS], **roles}
    name = variant.name
    if variant.training:
        # Read by the replacement, which the matcher traces right after this check approves.
        _training_mode.set(mode)
        _autocast_dtype.set(autocast)
        if mode != "default":
            name += f"_{mode}"  # the report says which memory mode a region got
    return on_match(FusedRegion(pattern=family, variant=name, paths=region_paths(roles)))
