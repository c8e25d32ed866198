"""The norm -> MLP (-> residual) engine behind the pattern families of this package.

One table describes what the Hugging Face decoder families write after attention, as a few named
axes: the norm (Llama's RMSNorm, Gemma's ``(1 + w)`` RMSNorm, LayerNorm, Nemotron's LayerNorm1P,
none), the MLP (activation; gated with separate or fused gate/up projections, or not gated) and
the residual (none, ``h + mlp`` on either side, ``h + mlp * scale``, ``mlp + other`` with a
second tensor: GPT-NeoX's parallel attention output). Each row (`Shape`) is a
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

from inductor_fusion.graph_paths import (
    canonicalize_joint_graph,
    innermost_module,
    normalize_module_path,
    region_paths,
)
from inductor_fusion.pass_state import memory_mode, on_reject
from inductor_fusion.patterns import training
from inductor_fusion.patterns.training import trace_region
from inductor_fusion.report import FusedRegion
from inductor_fusion.triton_kernels.region import RegionSpec

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_DEVICES = ("cuda", "cpu")
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


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # "gelu_pytorch_tanh"
    "relu2": lambda x: torch.square(F.relu(x)),  # ReLUSquaredActivation
}


@dataclass(frozen=True)
class Norm:
    """A norm the models write: its search function and the op's spelling of it."""

    fn: Callable[..., torch.Tensor] | None  # (hidden, weight[, bias], eps) -> normed
    kind: str  # the op's norm: "rms", "layer" or "none"
    bias: bool = False
    offset: float = 0.0
    weight_fp32: bool = False


NORMS = {
    "llama_rms": Norm(rms_norm, "rms"),
    "gemma_rms": Norm(gemma_rms_norm, "rms", offset=1.0, weight_fp32=True),
    "layer": Norm(layer_norm, "layer", bias=True, weight_fp32=True),
    "layer_1p": Norm(layer_norm_1p, "layer", bias=True, offset=1.0, weight_fp32=True),
    "none": Norm(None, "none"),
}
MLPS = ("separate", "fused", "plain")  # gate/up projections; one fused gate_up; no gate
# h + y, y + h, h + y * scale, y + other (a second tensor: GPT-NeoX's parallel attention output), y
RESIDUALS = ("left", "right", "scaled", "parallel", "none")


@dataclass(frozen=True)
class Shape:
    """One row of the table: the region as one group of models writes it."""

    name: str  # variant-name prefix ("" for Llama's, the historical names)
    norm: str  # a key of NORMS
    activation: str  # a key of _ACTIVATIONS
    mlp: str  # one of MLPS
    residuals: tuple[str, ...]  # the residual forms registered, from RESIDUALS
    biases: tuple[bool, ...] = (False,)  # MLP biases registered (mlp_bias / use_bias)
    models: str = ""  # who writes it, for messages and the docs
    # The MLP's output goes through a second norm before the residual add (OLMo-2). A row with
    # no norm in front needs it: matched only where the MLP reads the residual stream and a norm
    # takes its output (`_post_norm_reason`), so it never takes the MLP half of a region whose
    # norm another family fuses with it.
    post_norm: bool = False
    # Whether training (joint forward+backward) variants are registered too; the training ops
    # (`rmsnorm_mlp_train*`) compute Llama's form only: RMSNorm, SiLU, separate gate/up, no bias.
    training: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS or self.activation not in _ACTIVATIONS or self.mlp not in MLPS:
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
        norm = NORMS[self.norm]
        return RegionSpec(
            norm=norm.kind,
            norm_weight_offset=norm.offset,
            norm_weight_fp32=norm.weight_fp32,
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


def mlp(shape: Shape, x: torch.Tensor, a: dict[str, Any], bias: bool) -> torch.Tensor:
    act = _ACTIVATIONS[shape.activation]
    gate_bias = a["gate_bias"] if bias else None
    down_bias = a["down_bias"] if bias else None
    if shape.mlp == "plain":
        inter = act(F.linear(x, a["gate_weight"], gate_bias))
    elif shape.mlp == "fused":  # Phi3MLP: one projection, chunked; operands as it writes them
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
    shape: Shape | None = None  # None: Llama's row (the default of `LLAMA`)
    # Traced forward + backward (`joint_fwd_bwd`): matched in the joint graph of a training
    # compile, where the region's saved activations and gradient computation are replaced too.
    training: bool = False
    # torch.autocast's form of a training region: fp32 parameters and norm, the MLP's GEMM
    # operands cast to a 16-bit dtype (bf16 or fp16: the pattern leaves it open, `_check`
    # reads it off the match).
    autocast: bool = False

    @property
    def row(self) -> Shape:
        return self.shape or LLAMA

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
        norm, row = NORMS[self.row.norm], self.row
        names = ["hidden"]
        if norm.fn is not None:
            names.append("norm_weight")
        if norm.bias:
            names.append("norm_bias")
        names.append("gate_weight")
        if row.mlp == "separate":
            names.append("up_weight")
        names.append("down_weight")
        if self.bias:
            names += ["gate_bias", "up_bias"] if row.mlp == "separate" else ["gate_bias"]
            names.append("down_bias")
        if norm.fn is not None:
            names.append("eps")
        if self.residual == "scaled":
            names.append("residual_scale")
        if self.residual == "parallel":
            names.append("other")
        return tuple(names)

    def search(self, **a: Any) -> torch.Tensor:
        return self._region(a, torch.bfloat16)

    def _region(self, a: dict[str, Any], lowp: torch.dtype) -> torch.Tensor:
        norm = NORMS[self.row.norm]
        x = a["hidden"]
        if norm.fn is not None:
            extra = (a["norm_bias"],) if norm.bias else ()
            x = norm.fn(x, a["norm_weight"], *extra, a["eps"])
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


LLAMA = Shape(
    "", "llama_rms", "silu", "separate", ("left", "right", "none"), biases=(False, True),
    models="Llama, Mistral, Qwen2, Qwen3, Granite (without its scale); Gemma2/3-style post-norm "
    "regions of these up to the MLP output", training=True,
)  # fmt: skip


def variants(shapes: tuple[Shape, ...] = (LLAMA,)) -> list[Variant]:
    # Residual forms in the row's order: "left" first, as HF writes it, so it is tried first on
    # each add.
    return [
        Variant(
            lowp=lowp,
            ndim=ndim,
            bias=bias,
            residual=residual,
            views=views,
            shape=None if shape is LLAMA else shape,
        )
        for shape in shapes
        for lowp, ndim, bias, residual in itertools.product(
            (True, False), (3, 2), shape.biases, shape.residuals
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
            shape=None if shape is LLAMA else shape,
            training=True,
            autocast=autocast,
        )
        for shape in shapes
        if shape.training
        for (lowp, autocast), ndim, residual in itertools.product(
            ((True, False), (False, False), (False, True)), (3, 2), shape.residuals
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


# --- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionArgs:
    """The matched region's inputs as fake tensors (plus its scalars), for the checks.

    Phi-3's fused gate_up weight arrives split into its two halves (``gate_weight``,
    ``up_weight``); what a row does not have is None (``up_weight`` of a non-gated MLP,
    ``norm_weight`` without a norm) and its scalars their neutral values."""

    hidden: torch.Tensor
    norm_weight: torch.Tensor | None
    gate_weight: torch.Tensor
    up_weight: torch.Tensor | None
    down_weight: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    eps: Any
    norm_bias: torch.Tensor | None = None
    residual_scale: Any = 1.0
    other: torch.Tensor | None = None  # the second tensor of a parallel residual
    training: bool = False  # a training variant's match: the region's backward is replaced too
    memory: str = "default"  # a training match's memory mode (`training.MEMORY_MODES`)


def can_fuse(args: RegionArgs) -> str | None:
    """Legality: None if our op computes this region exactly as written, else the reason not."""
    from inductor_fusion.triton_kernels.region import supports

    if not isinstance(args.eps, float):
        # With dynamic=True eps may arrive as a graph input (SymFloat or tensor).
        return f"eps is not a Python float ({type(args.eps).__name__})"
    if not isinstance(args.residual_scale, float):
        # The kernels take the scale as a constant; a computed one (a tensor, a SymFloat) stays.
        return f"residual scale is not a Python float ({type(args.residual_scale).__name__})"
    h = args.hidden
    tensors = [t for t in (h, *_weights_of(args)) if t is not None]
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return "an input has no tensor metadata"
    if h.dtype not in _SUPPORTED_DTYPES:
        return f"unsupported dtype {h.dtype}"
    if any(t.dtype != h.dtype for t in tensors):
        return "mixed dtypes: " + ", ".join(sorted({str(t.dtype) for t in tensors}))
    if h.device.type not in _SUPPORTED_DEVICES:
        return f"unsupported device {h.device}"
    if any(t.device != h.device for t in tensors):
        return "inputs on different devices"
    if h.dim() < 2:
        return f"hidden has {h.dim()} dims"
    if args.other is not None and not _same_shape(args.other.shape, h.shape):
        # The epilogue adds it elementwise over [tokens, H]: a broadcast add is another region.
        return f"parallel residual has shape {list(args.other.shape)}, hidden {list(h.shape)}"
    hidden_size, inter = args.gate_weight.shape[1], args.gate_weight.shape[0]
    if not all(isinstance(s, int) for s in (hidden_size, inter)):
        return "symbolic hidden or intermediate size"
    expected = {
        "hidden[-1]": (tuple(h.shape[-1:]), (hidden_size,)),
        "norm_weight": (_shape(args.norm_weight), (hidden_size,)),
        "norm_bias": (_shape(args.norm_bias), (hidden_size,)),
        "up_weight": (_shape(args.up_weight), (inter, hidden_size)),
        "down_weight": (tuple(args.down_weight.shape), (hidden_size, inter)),
        "gate_bias": (_shape(args.gate_bias), (inter,)),
        "up_bias": (_shape(args.up_bias), (inter,)),
        "down_bias": (_shape(args.down_bias), (hidden_size,)),
    }
    for what, (got, want) in expected.items():
        if got is not None and got != want:
            return f"{what} has shape {got}, expected {want}"
    if h.device.type == "cuda":
        reason = supports(h.dtype, "cuda", hidden_size, inter)
        if reason is not None:
            return reason
    return None


def should_fuse(args: RegionArgs) -> str | None:
    """Profitability: None if fusing pays, else why not.

    On CUDA the fused kernels win up to ``max_profitable_tokens`` tokens (64, fewer for shapes
    measured to lose earlier): they stream the weights once, with the norm, activation and
    residual in their prologue/epilogues. Above it the
    region is compute-bound and Inductor's own code (cuBLAS GEMMs) is faster than our tiled
    kernels, so the region stays Inductor's (measured on an H200: perf/results/host). On the CPU
    our op is the eager reference and we still fuse, so that CPU runs exercise the same graphs as
    GPU ones. Non-gated MLPs stay Inductor's on CUDA at every M (see below).
    """
    from inductor_fusion.triton_kernels.launch_config import max_profitable_tokens

    h = args.hidden
    if h.device.type != "cuda":
        return None
    if args.training:
        from inductor_fusion.patterns.training import cuda_reason

        # Inductor's own kernels with another saved set: pays where its memory mode measured so.
        return cuda_reason(args.memory)
    if args.up_weight is None:
        # GPT-NeoX, Starcoder2, Nemotron: one up-projection. Our GEMV then streams one matrix
        # per tile; tuned on an H200 it still ran 0.84-0.95x Inductor's code at M <= 64
        # (perf/results/families), so on CUDA the region stays Inductor's.
        return (
            "non-gated MLP on CUDA: our kernels measured slower than Inductor's for one "
            "up-projection"
        )
    hidden, inter = h.shape[-1], args.gate_weight.shape[0]
    limit = max_profitable_tokens(hidden, inter)
    if limit <= 0:  # checked before the token count, so that it adds no guard
        return (
            f"{hidden}x{inter}: our kernels measured slower than Inductor's code at every "
            "token count for this shape"
        )
    tokens = h.numel() // hidden
    # bool() of a symbolic comparison guards on it: a graph with a dynamic token count is then
    # compiled for one side of the threshold, and the other side recompiles once.
    if bool(tokens <= limit):
        return None
    return f"{tokens} tokens: above {limit} Inductor's code is faster than our kernels here"


def _same_shape(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(
        statically_known_true(x == y) for x, y in zip(a, b, strict=True)
    )


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _weights_of(args: RegionArgs) -> tuple[torch.Tensor | None, ...]:
    return (
        args.norm_weight,
        args.norm_bias,
        args.gate_weight,
        args.up_weight,
        args.down_weight,
        args.gate_bias,
        args.up_bias,
        args.down_bias,
        args.other,
    )


def _value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


_NORM_TARGETS = (
    torch.ops.aten.mean.dim,
    torch.ops.aten.rsqrt.default,
    torch.ops.aten.var_mean.correction,
)
_MLP_TARGETS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _check(
    match: Any, *, variant: Variant, family: str, on_match: Callable[[FusedRegion], bool]
) -> bool:
    values = {name: _value(match.kwargs.get(name)) for name in variant.argnames}
    if variant.row.mlp == "fused":
        gate_up = values.pop("gate_weight")
        if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 2:
            values["gate_weight"], values["up_weight"] = gate_up.chunk(2, dim=0)
        else:
            values["gate_weight"] = gate_up
    values.pop("eps", None)
    values.pop("residual_scale", None)
    mode = _region_memory_mode(match, family) if variant.training else "default"
    args = RegionArgs(
        **{name: values.get(name) for name in _TENSOR_FIELDS},
        eps=_matched_eps(match) if "eps" in variant.argnames else 0.0,
        residual_scale=_matched_scale(match) if variant.residual == "scaled" else 1.0,
        training=variant.training,
        memory=mode,
    )
    if variant.row.post_norm and _post_norm_reason(match) is not None:
        # Not this row's region (e.g. the MLP half of Llama's): no INFO line, it is no candidate.
        return False
    autocast = _autocast_dtype_of(match) if variant.autocast else None
    # Legality first, then profitability (which may guard on a symbolic token count).
    reason = (
        ("casts to other than one 16-bit dtype" if variant.autocast and autocast is None else None)
        or _structure_reason(match, args.hidden, also=autocast)
        or can_fuse(args)
        or should_fuse(args)
    )
    if reason is not None:
        # The graph keeps Inductor's unfused code there; say why, once per region (keyed by
        # its first projection, which every variant of the region shares).
        key = next((n.name for n in match.nodes if n.target in _MLP_TARGETS), variant)
        on_reject(key, family, reason, f"{family} not fused ({variant.name}): {reason}")
        return False
    # A training match also spans the region's backward, whose nodes carry no module stack:
    # the roles' paths come from the forward nodes.
    traced = [n for n in match.nodes if not variant.training or n.meta.get("nn_module_stack")]
    roles = {"mlp": [n for n in traced if n.target in _MLP_TARGETS]}
    if variant.row.norm != "none":
        roles = {"norm": [n for n in traced if n.target in _NORM_TARGETS], **roles}
    name = variant.name
    if variant.training:
        # Read by the replacement, which the matcher traces right after this check approves.
        _training_mode.set(mode)
        _autocast_dtype.set(autocast)
        if mode != "default":
            name += f"_{mode}"  # the report says which memory mode a region got
    return on_match(FusedRegion(pattern=family, variant=name, paths=region_paths(roles)))


_TENSOR_FIELDS = tuple(
    n
    for n in RegionArgs.__dataclass_fields__
    if n not in ("eps", "residual_scale", "training", "memory")
)


def _post_norm_reason(match: Any) -> str | None:
    """None if the match is a post-norm MLP (OLMo-2): its input is used outside the region (the
    residual stream, which a norm's output never is here) and its output is normalised (through
    casts, ``x**2`` or ``x*x`` averaged, or LayerNorm's ``var_mean``); else what differs."""
    hidden = match.kwargs.get("hidden")
    inside = set(match.nodes)
    if not isinstance(hidden, torch.fx.Node) or all(u in inside for u in hidden.users):
        return "the MLP's input is used by the MLP only (a norm's output, fused by its family)"
    out = match.output_node()
    # The output's readers, and those of its casts (bf16 -> fp32, up to two).
    casts = _downstream(out, (_CAST,), depth=2, through=True, via=(_CAST,))
    for user in {user for node in (out, *casts) for user in node.users}:
        if user.target == torch.ops.aten.var_mean.correction:
            return None
        squares = user.target == torch.ops.aten.pow.Tensor_Scalar or (
            user.target == torch.ops.aten.mul.Tensor and user.args[0] is user.args[1]
        )
        if squares and any(u.target == torch.ops.aten.mean.dim for u in user.users):
            return None
    return "the MLP's output is not normalised"


_training_mode: contextvars.ContextVar[str] = contextvars.ContextVar(
    "inductor_fusion_training_mode", default="default"
)
_autocast_dtype: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "inductor_fusion_autocast_dtype", default=None
)


def _autocast_dtype_of(match: Any) -> torch.dtype | None:
    """The one 16-bit dtype an autocast region's casts go to, None if there is not exactly one."""
    targets = {n.args[1] for n in match.nodes if n.target == _CAST and n.args[1] != torch.float32}
    if len(targets) == 1 and next(iter(targets)) in (torch.bfloat16, torch.float16):
        return next(iter(targets))
    return None


def _region_memory_mode(match: Any, family: str) -> str:
    """The plan's memory mode for ``family``, or "recompute" inside an activation-checkpointed
    region (HF ``gradient_checkpointing_enable()``, ``torch.utils.checkpoint``): there the user
    asked to keep nothing but the layer's input, and the default mode would save gate/up."""
    from torch.utils.checkpoint import CheckpointPolicy

    recompute = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
    if any(node.meta.get("recompute") in recompute for node in match.nodes):
        return "recompute"
    return memory_mode(family)


def _structure_reason(match: Any, hidden: Any, also: torch.dtype | None = None) -> str | None:
    """What `search_pattern` left as wildcards, checked on the match: None if every reshape
    flattens ``hidden``'s leading dims into one (``[..., K] -> [M, K]``) or restores them
    (``[M, N] -> [..., N]``), and every cast goes to fp32 or back to ``hidden``'s dtype. In a
    training match also: the norm weight's gradient is squeezed from ``[1, .., 1, H]`` to
    ``[H]``, the statistic's gradient is expanded to ``hidden``'s shape and divided by H. An
    autocast region's casts may also go to its autocast dtype (``also``)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not isinstance(hidden, torch.Tensor):
        return "hidden has no tensor metadata"
    lead = tuple(hidden.shape[:-1])
    tokens = functools.reduce(lambda a, b: a * b, lead, 1)

    def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        return len(a) == len(b) and all(
            statically_known_true(x == y) for x, y in zip(a, b, strict=True)
        )

    for node in match.nodes:
        if node.target == _CAST and node.args[1] not in (torch.float32, hidden.dtype, also):
            return f"a cast to {node.args[1]} inside the region"
        if node.target == _SPLIT:
            src = _value(node.args[0])
            if not isinstance(src, torch.Tensor) or not statically_known_true(
                src.shape[-1] == 2 * node.args[1]
            ):
                return f"{node.name} splits the gate_up projection other than in halves"
            continue
        if node.target == _DIV_SCALAR and node.args[1] != hidden.shape[-1]:
            return f"{node.name} divides by {node.args[1]}, not by the hidden size"
        if node.target == _EXPAND:
            val = _value(node)
            if not (isinstance(val, torch.Tensor) and same(tuple(val.shape), tuple(hidden.shape))):
                return f"{node.name} expands to other than hidden's shape"
        if node.target not in _RESHAPES:
            continue
        src, out = _value(node.args[0]), _value(node)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
            return f"{node.name} has no tensor metadata"
        a, b = tuple(src.shape), tuple(out.shape)
        if not a or not b or not statically_known_true(a[-1] == b[-1]):
            return f"{node.name} reshapes {list(a)} to {list(b)}, not over the token dims"
        if len(b) == 1 and all(statically_known_true(d == 1) for d in a[:-1]):
            continue  # [1, .., 1, H] -> [H]: a weight gradient's keepdim sum, squeezed
        flattens = same(a[:-1], lead) and same(b[:-1], (tokens,))
        restores = same(a[:-1], (tokens,)) and same(b[:-1], lead)
        if not (flattens or restores):
            return f"{node.name} reshapes {list(a)} to {list(b)}, not over the token dims"
    return None


def _matched_eps(match: Any) -> Any:
    """The eps the graph adds to the mean of squares, read off the matched ``add`` node.

    Read from the graph rather than from ``match.kwargs``: whether the re-matched pattern keeps
    eps as an argument differs between torch versions (2.13 does, 2.11 bakes the literal in).
    A Node here means eps is computed at run time (e.g. a graph input under dynamic=True).
    """
    for node in match.nodes:
        # The add under the rsqrt: mean(x**2) + eps (RMSNorm) or var + eps (LayerNorm).
        if node.target == torch.ops.aten.add.Tensor and any(
            u.target == torch.ops.aten.rsqrt.default for u in node.users
        ):
            return node.args[1]
    return match.kwargs.get("eps")


def _matched_scale(match: Any) -> Any:
    """Granite's residual multiplier, read off the graph (see `_matched_eps` for why): the
    scalar the MLP output is multiplied by before the residual add."""
    out = match.output_node()
    for arg in out.args:
        if isinstance(arg, torch.fx.Node) and arg.target == torch.ops.aten.mul.Tensor:
            return arg.args[1]
    return match.kwargs.get("residual_scale")


def specialize_eps(graph: torch.fx.Graph) -> int:
    """Turns each RMSNorm eps that arrives as a graph input back into a Python float.

    With ``dynamic=True`` (Dynamo's ``specialize_float=False``) a float attribute such as
    ``variance_epsilon`` becomes a backed SymFloat that AOT autograd passes as a 0-d fp64 tensor
    input: the graph computes ``mean(x**2) + eps_tensor.to(fp32)`` and our op, which takes eps as
    a float, could not be used. eps is a model constant, so we specialize it the way torch
    specializes any backed symbol: ``guard_float`` records ``eps == value`` in the ShapeEnv, Dynamo
    turns that into a guard on the attribute (another eps recompiles), and the graph then adds
    the literal. The input is found by its Dynamo source: the one float symbol whose source is an
    attribute of the module the ``mean`` was traced in. Returns how many adds were rewritten.
    """
    rewritten = 0
    for add in graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor):
        mean, eps = (*add.args, None, None)[:2]
        if not (isinstance(mean, torch.fx.Node) and mean.target == torch.ops.aten.mean.dim):
            continue
        # The add itself may be new (AOT's scalar tensorification); the mean was traced in the norm.
        value = _module_float(eps, innermost_module(mean))
        if value is None:
            continue  # Not provably this module's eps: the region is reported unfused.
        add.args = (mean, value, *add.args[2:])
        rewritten += 1
    return rewritten


# Attributes our patterns take as constants besides eps: Granite's residual multiplier.
_SCALE_ATTRIBUTES = ("residual_multiplier",)


def specialize_residual_scales(graph: torch.fx.Graph) -> int:
    """`specialize_eps` for Granite's ``h + mlp * residual_multiplier``: with ``dynamic=True``
    the multiplier is a 0-d input too (cast to the activations' dtype), and the scaled variant
    takes it as a constant. Rewrites each ``mul(y, input)`` whose input is the
    ``residual_multiplier`` of a module enclosing ``y``'s (the decoder layer around the MLP) to
    multiply by the value, as the graph of a static compile does. The mul itself carries no
    module (AOT's scalar tensorification made it), so ``y`` places it. Returns how many."""
    rewritten = 0
    for mul in graph.find_nodes(op="call_function", target=torch.ops.aten.mul.Tensor):
        if len(mul.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in mul.args):
            continue
        module = innermost_module(mul) or innermost_module(mul.args[0])
        value = _module_float(mul.args[1], module, attributes=_SCALE_ATTRIBUTES)
        if value is not None:
            mul.args = (mul.args[0], value)
            rewritten += 1
    return rewritten


def _module_float(
    arg: Any, module: str | None, attributes: tuple[str, ...] | None = None
) -> float | None:
    """The value of ``arg`` if it is a 0-d graph input (possibly cast) backed by the one float
    symbol that is an attribute of ``module`` (without ``attributes``) or one of ``attributes``
    of ``module`` or a module enclosing it, specialized with a guard; else None."""
    from torch.fx.experimental.symbolic_shapes import guard_float
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    source = arg
    while isinstance(source, torch.fx.Node) and source.target == _CAST:
        source = source.args[0]
    if not (isinstance(source, torch.fx.Node) and source.op == "placeholder"):
        return None
    val = source.meta.get("val")
    shape_env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
    if shape_env is None or module is None or val.dim() != 0:
        return None

    def owned(name: str) -> bool:
        owner, _, attribute = normalize_module_path(name).rpartition(".")
        if attributes is None:
            return owner == module
        return attribute in attributes and (owner == module or module.startswith(f"{owner}."))

    symbols = [
        sym
        for sym, sources in shape_env.var_to_sources.items()
        if symbol_is_type(sym, SymT.FLOAT)
        and sym in shape_env.backed_var_to_val
        and any(owned(src.name) for src in sources)
    ]
    if len(symbols) != 1:
        return None
    (sym,) = symbols
    hint = float(shape_env.backed_var_to_val[sym])
    return guard_float(shape_env.create_symfloatnode(sym, hint=hint))


def _trace_reshapes(fn: Callable[..., Any], args: Any, **kwargs: Any) -> torch.fx.GraphModule:
    """fwd_only, then view -> reshape, as compile_fx does before the post-grad passes: a 3-D
    pattern traced with views would never match there."""
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.pattern_matcher import fwd_only

    gm = fwd_only(fn, args, **kwargs)
    view_to_reshape(gm)
    return gm


_RESHAPES = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
_CAST = torch.ops.prims.convert_element_type.default
_SPLIT = torch.ops.aten.split.Tensor
_EXPAND = torch.ops.aten.expand.default
_DIV_SCALAR = torch.ops.aten.div.Scalar


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
    mean's gradient back to ``hidden``'s shape and the division by H (`_structure_reason`).
    """
    from torch._inductor.pattern_matcher import Ignored, fx_to_pattern

    trace = _trace_fn(variant)
    gm = trace(_positional(variant.search, variant.argnames), variant.example_inputs())
    if variant.training:
        # The same normalisation our pass gives joint graphs before matching, whatever this
        # torch's joint_fwd_bwd applies itself (versions differ: early_patterns, pointless_view).
        canonicalize_joint_graph(gm.graph)
    for node in gm.graph.nodes:
        wildcard = node.target in (*_RESHAPES, _EXPAND, _DIV_SCALAR) or (
            node.target == _CAST and node.args[1] != torch.float32
        )
        if wildcard:
            node.args = (node.args[0], Ignored())
        elif node.target == _SPLIT:  # Phi-3's chunk(2): the split size is I
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
    shapes: tuple[Shape, ...],
    on_match: Callable[[FusedRegion], bool],
    training: bool = False,
) -> None:
    """Registers every inference variant of ``shapes`` (``training``: every training variant)
    into ``pass_`` (a PatternMatcherPass) as ``family``. Traces; call once."""
    from torch._inductor.pattern_matcher import register_replacement

    import inductor_fusion.triton_kernels.rmsnorm_mlp  # noqa: F401  (the op the replacement calls)

    # Where fwd_only itself already traces reshapes, a view form would be the reshape form again;
    # torch refuses duplicate patterns, and there is nothing more to match.
    views_differ = _fwd_only_traces_views()
    for variant in variants(shapes):
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


def prepare_graph(graph: torch.fx.Graph) -> None:
    """Run by the pass before matching: see `specialize_eps`, `specialize_residual_scales` and
    `drop_dropout_clones`."""
    specialize_eps(graph)
    specialize_residual_scales(graph)
    drop_dropout_clones(graph)


def drop_dropout_clones(graph: torch.fx.Graph) -> int:
    """Removes the copy an eval-mode dropout leaves between an MLP's output and the residual add.

    Phi-3 (``resid_mlp_dropout``), Starcoder2 (its MLP's residual dropout) and GPT-NeoX apply a
    dropout to the MLP's output; in an inference graph it is an ``aten.clone`` of the down
    projection's result, which stands between the region and its residual add, so only the
    no-residual variant could match. In a functional graph a clone is the same value: dropping
    the ones that copy a matmul's result into adds changes no number (Inductor would fold the
    copy into the add anyway) and lets the residual variants match. Returns how many it removed.
    """
    removed = 0
    for clone in graph.find_nodes(op="call_function", target=torch.ops.aten.clone.default):
        if clone.kwargs.get("memory_format") not in (None, torch.contiguous_format):
            continue
        source = clone.args[0]
        inner = source.args[0] if getattr(source, "target", None) in _RESHAPES else source
        if not (isinstance(inner, torch.fx.Node) and inner.target in _MLP_TARGETS):
            continue
        if not clone.users or any(u.target != torch.ops.aten.add.Tensor for u in clone.users):
            continue
        clone.replace_all_uses_with(source)
        graph.erase_node(clone)
        removed += 1
    return removed


# --- candidates no variant matched ----------------------------------------------------------------

_STAT_SOURCES = (torch.ops.aten.pow.Tensor_Scalar, torch.ops.aten.mul.Tensor)


def unmatched_candidates(graph: torch.fx.Graph, family: str) -> list[tuple[Any, ...]]:
    """Regions that look like RMSNorm -> gated MLP but that no registered variant matched (so no
    check could say why): ``(key, message)`` for one INFO line each.

    A candidate is the RMSNorm statistic ``rsqrt(mean(x*x, -1) + eps)`` whose normalised output
    reaches two matmuls whose results meet in one multiply (the gate * up of a gated MLP) within a
    few nodes. That excludes the attention-side norms (their q/k/v matmuls never multiply each
    other) and the final norm (one matmul). Typical causes: a float64 graph (its SiLU has no
    casts, unlike every variant), an activation other than SiLU, or an arrangement our variants
    do not cover. Each is ``(keys, paths, message)``: ``keys`` name the region's nodes, so that a
    region is reported once; ``paths`` are its (role, module path) pairs, for the plan.
    """
    found = []
    for rsqrt in graph.find_nodes(op="call_function", target=torch.ops.aten.rsqrt.default):
        mean = _statistic_mean(rsqrt)
        if mean is None or training.in_fused_region(rsqrt):  # fused in the joint graph
            continue
        matmuls = _downstream(rsqrt, _MLP_TARGETS, depth=8)
        if len(matmuls) < 2 or not _products_meet(matmuls):
            continue
        # The dtype the region's input has, before the norm's upcast to fp32.
        source = mean.args[0].args[0]
        while isinstance(source, torch.fx.Node) and source.target == _CAST:
            source = source.args[0]
        dtype = getattr(_value(source), "dtype", None)
        path = innermost_module(rsqrt)
        hint = (
            f"unsupported dtype {dtype}"
            if dtype is not None and dtype not in _SUPPORTED_DTYPES
            else "its graph matches none of the registered variants (activation, casts or "
            "layout differ)"
        )
        # Keys: every matmul of the region and the statistic, so that a region a check already
        # refused (keyed by one of its matmuls) is not reported twice.
        region_mms = _downstream(rsqrt, _MLP_TARGETS, 14, through=True)
        keys = (mean.name, *(n.name for n in region_mms))
        paths = region_paths({"norm": [rsqrt], "mlp": region_mms})
        found.append((keys, paths, f"{family} candidate at {path or '?'} not fused: {hint}"))
    return found


def _statistic_mean(rsqrt: torch.fx.Node) -> torch.fx.Node | None:
    """The ``mean`` of ``rsqrt(mean(x*x or x**2, -1) + eps)``, else None."""
    add = rsqrt.args[0]
    if not (isinstance(add, torch.fx.Node) and add.target == torch.ops.aten.add.Tensor):
        return None
    mean = add.args[0]
    if not (isinstance(mean, torch.fx.Node) and mean.target == torch.ops.aten.mean.dim):
        return None
    source = mean.args[0]
    if not (isinstance(source, torch.fx.Node) and source.target in _STAT_SOURCES):
        return None
    return mean


def _downstream(
    start: torch.fx.Node,
    targets: tuple[Any, ...],
    depth: int,
    through: bool = False,
    via: tuple[Any, ...] | None = None,
) -> list[torch.fx.Node]:
    """Nodes with one of ``targets`` reachable from ``start`` through at most ``depth`` users,
    looking past them only if ``through``, and past other nodes only if ``via`` (when given)
    holds their target."""
    seen, frontier, hits = {start}, [start], []
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.target in targets:
                    hits.append(user)
                if (through or user.target not in targets) and (via is None or user.target in via):
                    nxt.append(user)
        frontier = nxt
    return hits


def _products_meet(matmuls: list[torch.fx.Node]) -> bool:
    """Whether the results of two of ``matmuls`` meet in one ``mul`` within a few nodes."""
    reached: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for mm in matmuls:
        for node in _downstream(mm, (torch.ops.aten.mul.Tensor,), depth=8):
            reached.setdefault(node, set()).add(mm)
    return any(len(sources) >= 2 for sources in reached.values())
