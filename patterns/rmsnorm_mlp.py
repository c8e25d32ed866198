"""RMSNorm -> SwiGLU MLP (-> residual add): Llama, Mistral, Qwen2, Qwen3 and their kin.

The search functions are the Hugging Face modules' math written as plain PyTorch:

    n   = weight * (h.float() * rsqrt(mean(h.float()**2, -1, keepdim) + eps)).to(h.dtype)
    out = h + down(silu(gate(n)) * up(n))

Inductor's pattern matcher traces them (with its own decompositions, so ``F.silu`` and
``F.linear`` become exactly the nodes a compiled HF model shows) and finds them in post-grad
graphs. The first match ignores literals (shapes, dtypes, exponents); torch then re-traces the
search function with the real shapes and dtypes and re-matches with every literal compared, so a
``pow(x, 3)``, a ``mean`` over another dim or a cast to another dtype never fuses.

Variants come from one loop: dtype class (fp32 graphs lose the casts), 2-D or 3-D activations
(3-D adds reshapes), biases (``mlp_bias=True``), and the residual add (absent, or on either side).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inductor_fusion.report import FusedRegion

NAME = "rmsnorm_mlp"
ROLES = ("norm", "mlp")

_WEIGHTS = ("norm_weight", "gate_weight", "up_weight", "down_weight")
_BIASES = ("gate_bias", "up_bias", "down_bias")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_DEVICES = ("cuda", "cpu")
# An example eps that equals no other literal of the pattern (2 in pow, 1 in silu, -1 in mean),
# so the scalar workaround turns exactly this one into an argument.
_EXAMPLE_EPS = 1e-5


# --- the math, as plain PyTorch -----------------------------------------------------------------


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


def swiglu_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    gate = F.linear(x, gate_weight, gate_bias)
    up = F.linear(x, up_weight, up_bias)
    return F.linear(F.silu(gate) * up, down_weight, down_bias)


@dataclass(frozen=True)
class Variant:
    """One registered shape of the region."""

    lowp: bool  # bf16/fp16 graph: casts to fp32 and back are present
    ndim: int  # 2 or 3: 3-D activations add reshapes around each mm
    bias: bool  # mlp_bias=True: addmm instead of mm
    residual: str  # "none", "left" (h + mlp, as HF writes it) or "right" (mlp + h)
    # 3-D graphs come in two forms: with `view` nodes (the joint graph, where we match first,
    # before Inductor's pad_mm can pad an unaligned mm out of the pattern's reach) and with
    # `reshape` nodes (compile_fx converts views before the post-grad passes).
    views: bool = False

    @property
    def name(self) -> str:
        parts = ["lowp" if self.lowp else "fp32", f"{self.ndim}d"]
        if self.bias:
            parts.append("bias")
        parts.append(f"residual_{self.residual}" if self.residual != "none" else "no_residual")
        return "_".join(parts)

    @property
    def argnames(self) -> tuple[str, ...]:
        return ("hidden", *_WEIGHTS, *(_BIASES if self.bias else ()), "eps")

    def search(self, **a: Any) -> torch.Tensor:
        biases = {k: a[k] for k in _BIASES} if self.bias else {}
        out = swiglu_mlp(
            rms_norm(a["hidden"], a["norm_weight"], a["eps"]),
            a["gate_weight"],
            a["up_weight"],
            a["down_weight"],
            **biases,
        )
        if self.residual == "left":
            return a["hidden"] + out
        if self.residual == "right":
            return out + a["hidden"]
        return out

    def replace(self, **a: Any) -> torch.Tensor:
        from inductor_fusion.triton_kernels.rmsnorm_mlp import rmsnorm_mlp_lowered

        args = (
            a["hidden"],
            a["norm_weight"],
            a["gate_weight"],
            a["up_weight"],
            a["down_weight"],
            a.get("gate_bias"),
            a.get("up_bias"),
            a.get("down_bias"),
            None if self.residual == "none" else a["hidden"],
            a["eps"],
        )
        # On CUDA the kernels become launches in Inductor's own generated code (no dispatcher
        # call per region); elsewhere the op, whose body is the PyTorch reference.
        if a["hidden"].device.type == "cuda":
            return rmsnorm_mlp_lowered(*args)
        return torch.ops.inductor_fusion.rmsnorm_mlp.default(*args)

    def example_inputs(self) -> list[Any]:
        # Distinct sizes (M=6, H=32, I=48) so no two dims are confused while tracing; values and
        # device do not matter to the trace.
        dtype = torch.bfloat16 if self.lowp else torch.float32
        hidden_shape = (2, 3, 32) if self.ndim == 3 else (6, 32)
        shapes = {
            "hidden": hidden_shape,
            "norm_weight": (32,),
            "gate_weight": (48, 32),
            "up_weight": (48, 32),
            "down_weight": (32, 48),
            "gate_bias": (48,),
            "up_bias": (48,),
            "down_bias": (32,),
        }
        return [
            _EXAMPLE_EPS if name == "eps" else torch.empty(shapes[name], dtype=dtype)
            for name in self.argnames
        ]


def variants() -> list[Variant]:
    # "left" first: it is what HF writes, so it is tried first on each add.
    return [
        Variant(lowp=lowp, ndim=ndim, bias=bias, residual=residual, views=views)
        for lowp, ndim, bias, residual in itertools.product(
            (True, False), (3, 2), (False, True), ("left", "right", "none")
        )
        for views in ((False, True) if ndim == 3 else (False,))
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
    """The matched region's inputs as fake tensors (plus eps), for the checks."""

    hidden: torch.Tensor
    norm_weight: torch.Tensor
    gate_weight: torch.Tensor
    up_weight: torch.Tensor
    down_weight: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    eps: Any


def can_fuse(args: RegionArgs) -> str | None:
    """Legality: None if our op computes this region exactly as written, else the reason not."""
    from inductor_fusion.triton_kernels.rmsnorm_mlp import supports

    if not isinstance(args.eps, float):
        # With dynamic=True eps may arrive as a graph input (SymFloat or tensor).
        return f"eps is not a Python float ({type(args.eps).__name__})"
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
    hidden_size, inter = args.gate_weight.shape[1], args.gate_weight.shape[0]
    if not all(isinstance(s, int) for s in (hidden_size, inter)):
        return "symbolic hidden or intermediate size"
    expected = {
        "hidden[-1]": (tuple(h.shape[-1:]), (hidden_size,)),
        "norm_weight": (tuple(args.norm_weight.shape), (hidden_size,)),
        "up_weight": (tuple(args.up_weight.shape), (inter, hidden_size)),
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

    On CUDA the fused kernels win up to ``MAX_PROFITABLE_TOKENS`` tokens (they stream the weights
    once, with the norm, activation and residual in their prologue/epilogues); above it the
    region is compute-bound and Inductor's own code (cuBLAS GEMMs) is faster than our tiled
    kernels, so the region stays Inductor's (measured on an H200: perf/results/host). On the CPU
    our op is the eager reference and we still fuse, so that CPU runs exercise the same graphs as
    GPU ones.
    """
    from inductor_fusion.triton_kernels.rmsnorm_mlp import MAX_PROFITABLE_TOKENS

    h = args.hidden
    if h.device.type != "cuda":
        return None
    tokens = h.numel() // h.shape[-1]
    # bool() of a symbolic comparison guards on it: a graph with a dynamic token count is then
    # compiled for one side of the threshold, and the other side recompiles once.
    if bool(tokens <= MAX_PROFITABLE_TOKENS):
        return None
    return (
        f"{tokens} tokens: above {MAX_PROFITABLE_TOKENS} Inductor's GEMMs are faster than "
        "our tiled kernels"
    )


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _weights_of(args: RegionArgs) -> tuple[torch.Tensor | None, ...]:
    return (
        args.norm_weight,
        args.gate_weight,
        args.up_weight,
        args.down_weight,
        args.gate_bias,
        args.up_bias,
        args.down_bias,
    )


def _value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


_NORM_TARGETS = (torch.ops.aten.mean.dim, torch.ops.aten.rsqrt.default)
_MLP_TARGETS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _check(match: Any, *, variant: Variant, on_match: Callable[[FusedRegion], bool]) -> bool:
    from inductor_fusion.fusion_pass import on_reject, region_paths

    args = RegionArgs(
        **{
            name: _value(match.kwargs.get(name))
            for name in RegionArgs.__dataclass_fields__
            if name != "eps"
        },
        eps=_matched_eps(match),
    )
    # Legality first, then profitability (which may guard on a symbolic token count).
    reason = _structure_reason(match, args.hidden) or can_fuse(args) or should_fuse(args)
    if reason is not None:
        # The graph keeps Inductor's unfused code there; say why, once per region (keyed by
        # its statistics node, which every variant of the region shares).
        key = next((n.name for n in match.nodes if n.target == torch.ops.aten.mean.dim), variant)
        on_reject(key, f"{NAME} not fused ({variant.name}): {reason}")
        return False
    paths = region_paths(
        {
            "norm": [n for n in match.nodes if n.target in _NORM_TARGETS],
            "mlp": [n for n in match.nodes if n.target in _MLP_TARGETS],
        }
    )
    return on_match(FusedRegion(pattern=NAME, variant=variant.name, paths=paths))


def _structure_reason(match: Any, hidden: Any) -> str | None:
    """What `search_pattern` left as wildcards, checked on the match: None if every reshape
    flattens ``hidden``'s leading dims into one (``[..., K] -> [M, K]``) or restores them
    (``[M, N] -> [..., N]``), and every cast goes to fp32 or back to ``hidden``'s dtype."""
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
        if node.target == _CAST and node.args[1] not in (torch.float32, hidden.dtype):
            return f"a cast to {node.args[1]} inside the region"
        if node.target not in _RESHAPES:
            continue
        src, out = _value(node.args[0]), _value(node)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
            return f"{node.name} has no tensor metadata"
        a, b = tuple(src.shape), tuple(out.shape)
        if not a or not b or not statically_known_true(a[-1] == b[-1]):
            return f"{node.name} reshapes {list(a)} to {list(b)}, not over the token dims"
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
        if node.target == torch.ops.aten.add.Tensor and any(
            isinstance(a, torch.fx.Node) and a.target == torch.ops.aten.mean.dim
            for a in node.args[:1]
        ):
            return node.args[1]
    return match.kwargs.get("eps")


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
    from torch.fx.experimental.symbolic_shapes import guard_float
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    from inductor_fusion.fusion_pass import innermost_module, normalize_module_path

    rewritten = 0
    for add in graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor):
        mean, eps = (*add.args, None, None)[:2]
        if not (isinstance(mean, torch.fx.Node) and mean.target == torch.ops.aten.mean.dim):
            continue
        source = eps
        while isinstance(source, torch.fx.Node) and source.target == _CAST:
            source = source.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "placeholder"):
            continue
        # The add itself may be new (AOT's scalar tensorification); the mean was traced in the norm.
        val, module = source.meta.get("val"), innermost_module(mean)
        shape_env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
        if shape_env is None or module is None or val.dim() != 0:
            continue
        symbols = [
            sym
            for sym, sources in shape_env.var_to_sources.items()
            if symbol_is_type(sym, SymT.FLOAT)
            and sym in shape_env.backed_var_to_val
            and any(normalize_module_path(src.name).rpartition(".")[0] == module for src in sources)
        ]
        if len(symbols) != 1:
            continue  # Not provably this module's eps: the region is reported unfused.
        (sym,) = symbols
        hint = float(shape_env.backed_var_to_val[sym])
        value = guard_float(shape_env.create_symfloatnode(sym, hint=hint))
        add.args = (mean, value, *add.args[2:])
        rewritten += 1
    return rewritten


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
    """
    from torch._inductor.pattern_matcher import Ignored, fwd_only, fx_to_pattern

    trace = fwd_only if variant.views else _trace_reshapes
    gm = trace(_positional(variant.search, variant.argnames), variant.example_inputs())
    for node in gm.graph.nodes:
        wildcard = node.target in _RESHAPES or (
            node.target == _CAST and node.args[1] != torch.float32
        )
        if wildcard:
            node.args = (node.args[0], Ignored())
    return fx_to_pattern(gm, argnames=variant.argnames, scalar_workaround={"eps": _EXAMPLE_EPS})


def register(pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None:
    """Registers every variant into ``pass_`` (a PatternMatcherPass). Traces; call once."""
    from torch._inductor.pattern_matcher import fwd_only, register_replacement

    import inductor_fusion.triton_kernels.rmsnorm_mlp  # noqa: F401  (the op the replacement calls)

    # Where fwd_only itself already traces reshapes, a view form would be the reshape form again;
    # torch refuses duplicate patterns, and there is nothing more to match.
    views_differ = _fwd_only_traces_views()
    for variant in variants():
        if variant.views and not views_differ:
            continue
        register_replacement(
            _positional(variant.search, variant.argnames),
            _positional(variant.replace, variant.argnames),
            variant.example_inputs(),
            fwd_only if variant.views else _trace_reshapes,
            pass_,
            extra_check=functools.partial(_check, variant=variant, on_match=on_match),
            scalar_workaround={"eps": _EXAMPLE_EPS},
            # Matched as is, not re-traced per graph: see `search_pattern`.
            search_fn_pattern=search_pattern(variant),
        )


def _fwd_only_traces_views() -> bool:
    """Whether this torch's fwd_only leaves `view` nodes in a 3-D linear (2.11 and 2.13 do)."""
    from torch._inductor.pattern_matcher import fwd_only

    gm = fwd_only(F.linear, [torch.empty(2, 3, 32), torch.empty(48, 32)])
    return bool(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default))


def prepare_graph(graph: torch.fx.Graph) -> None:
    """Run by the pass before matching: see `specialize_eps`."""
    specialize_eps(graph)
