"""Whether a matched norm -> MLP region may fuse and whether fusing it pays, and what those
checks read off a match.

`can_fuse` (legality: our op computes the region exactly as written) and `should_fuse`
(profitability: where our kernels beat Inductor's code) take the region's inputs as `RegionArgs`
rather than a match, so that callers without one ask the same questions: the lowering of op calls
already in a graph (`inductor_fusion.op_lowering`) and the benchmarks' expectations. The readers
take from a match what its pattern leaves open (`region_args`, `structure_reason`,
`post_norm_reason`, `autocast_dtype_of`, `region_memory_mode`).

Kept apart from the table (`norm_mlp`), which runs these on each variant's matches, because
nothing here depends on the table's rows: each check answers for one region, whichever row
matched it. The node targets of a region's parts and the graph walk (`downstream`) live here too,
at the bottom of the engine's imports: the table and the whole-graph passes (`norm_mlp_graph`)
import this module, never the other way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from inductor_fusion.pass_state import memory_mode
from inductor_fusion.triton_kernels.region import SUPPORTED_DTYPES, token_count

_SUPPORTED_DEVICES = ("cuda", "cpu")

# The nodes of a region's norm and of its MLP's projections, by target.
NORM_TARGETS = (
    torch.ops.aten.mean.dim,
    torch.ops.aten.rsqrt.default,
    torch.ops.aten.var_mean.correction,
)
MLP_TARGETS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
# The nodes whose graph-dependent literals a pattern leaves open (`norm_mlp.search_pattern`);
# `structure_reason` checks them on the match.
RESHAPES = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
CAST = torch.ops.prims.convert_element_type.default
SPLIT = torch.ops.aten.split.Tensor
EXPAND = torch.ops.aten.expand.default
DIV_SCALAR = torch.ops.aten.div.Scalar


# --- legality and profitability -------------------------------------------------------------------


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
    if h.dtype not in SUPPORTED_DTYPES:
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
    tokens = token_count(h)
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


# --- reading a match ------------------------------------------------------------------------------


def node_value(arg: Any) -> Any:
    """A node argument's fake value (its ``meta["val"]``); a literal as it is."""
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def region_args(
    match: Any, argnames: tuple[str, ...], *, fused_gate_up: bool, training: bool, memory: str
) -> RegionArgs:
    """The matched region's inputs: ``argnames`` are its pattern's (`norm_mlp.Variant.argnames`),
    ``fused_gate_up`` says the gate_up weight is Phi-3's one projection, to split in halves;
    ``training`` and ``memory`` as in `RegionArgs`."""
    values = {name: node_value(match.kwargs.get(name)) for name in argnames}
    if fused_gate_up:
        gate_up = values.pop("gate_weight")
        if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 2:
            values["gate_weight"], values["up_weight"] = gate_up.chunk(2, dim=0)
        else:
            values["gate_weight"] = gate_up
    values.pop("eps", None)
    values.pop("residual_scale", None)
    return RegionArgs(
        **{name: values.get(name) for name in _TENSOR_FIELDS},
        eps=_matched_eps(match) if "eps" in argnames else 0.0,
        residual_scale=_matched_scale(match) if "residual_scale" in argnames else 1.0,
        training=training,
        memory=memory,
    )


_TENSOR_FIELDS = tuple(
    n
    for n in RegionArgs.__dataclass_fields__
    if n not in ("eps", "residual_scale", "training", "memory")
)


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


def structure_reason(match: Any, hidden: Any, also: torch.dtype | None = None) -> str | None:
    """What `norm_mlp.search_pattern` left as wildcards, checked on the match: None if every reshape
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
        if node.target == CAST and node.args[1] not in (torch.float32, hidden.dtype, also):
            return f"a cast to {node.args[1]} inside the region"
        if node.target == SPLIT:
            src = node_value(node.args[0])
            if not isinstance(src, torch.Tensor) or not statically_known_true(
                src.shape[-1] == 2 * node.args[1]
            ):
                return f"{node.name} splits the gate_up projection other than in halves"
            continue
        if node.target == DIV_SCALAR and node.args[1] != hidden.shape[-1]:
            return f"{node.name} divides by {node.args[1]}, not by the hidden size"
        if node.target == EXPAND:
            val = node_value(node)
            if not (isinstance(val, torch.Tensor) and same(tuple(val.shape), tuple(hidden.shape))):
                return f"{node.name} expands to other than hidden's shape"
        if node.target not in RESHAPES:
            continue
        src, out = node_value(node.args[0]), node_value(node)
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


def post_norm_reason(match: Any) -> str | None:
    """None if the match is a post-norm MLP (OLMo-2): its input is used outside the region (the
    residual stream, which a norm's output never is here) and its output is normalised (through
    casts, ``x**2`` or ``x*x`` averaged, or LayerNorm's ``var_mean``); else what differs."""
    hidden = match.kwargs.get("hidden")
    inside = set(match.nodes)
    if not isinstance(hidden, torch.fx.Node) or all(u in inside for u in hidden.users):
        return "the MLP's input is used by the MLP only (a norm's output, fused by its family)"
    out = match.output_node()
    # The output's readers, and those of its casts (bf16 -> fp32, up to two).
    casts = downstream(out, (CAST,), depth=2, through=True, via=(CAST,))
    for user in {user for node in (out, *casts) for user in node.users}:
        if user.target == torch.ops.aten.var_mean.correction:
            return None
        squares = user.target == torch.ops.aten.pow.Tensor_Scalar or (
            user.target == torch.ops.aten.mul.Tensor and user.args[0] is user.args[1]
        )
        if squares and any(u.target == torch.ops.aten.mean.dim for u in user.users):
            return None
    return "the MLP's output is not normalised"


def autocast_dtype_of(match: Any) -> torch.dtype | None:
    """The one 16-bit dtype an autocast region's casts go to, None if there is not exactly one."""
    targets = {n.args[1] for n in match.nodes if n.target == CAST and n.args[1] != torch.float32}
    if len(targets) == 1 and next(iter(targets)) in (torch.bfloat16, torch.float16):
        return next(iter(targets))
    return None


def region_memory_mode(match: Any, family: str) -> str:
    """The plan's memory mode for ``family``, or "recompute" inside an activation-checkpointed
    region (HF ``gradient_checkpointing_enable()``, ``torch.utils.checkpoint``): there the user
    asked to keep nothing but the layer's input, and the default mode would save gate/up."""
    from torch.utils.checkpoint import CheckpointPolicy

    recompute = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
    if any(node.meta.get("recompute") in recompute for node in match.nodes):
        return "recompute"
    return memory_mode(family)


# --- walking the graph ----------------------------------------------------------------------------


def downstream(
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
