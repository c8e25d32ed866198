"""Grouped-query attention at decode: attend on the key/value heads, not on copies of them.

transformers' SDPA path (``sdpa_attention_forward``) expands the key and value caches to every
query head (``repeat_kv``) whenever it passes an attention mask, which a static cache always does
(it passes SDPA's own ``enable_gqa`` only without a mask, because on CUDA a masked GQA call falls
back to the math kernel). Under torch.compile that is an ``expand`` + ``clone`` of the whole
cache, twice per layer and decode step, and SDPA then reads ``n_rep`` copies of the cache: on an
H200, Llama-3-8B decode at batch 64 spent 2.1 ms of a 10.3 ms step in those copies and 2.8 ms in
the attention reading them (perf/results/e2e).

With few query tokens the ``n_rep`` query heads that share a key/value head can be packed as rows
of one attention problem on that head: ``q[b, kvh * n_rep + j, t]`` becomes row ``j * Q + t`` of
head ``kvh``. The keys and values are then used as they are, and the mask is broadcast (or
reshaped, when it has a head dimension) the same way. transformers does this itself in eager mode
for one query token (``pack_gqa``) but not under torch.compile. Each row's softmax is the same
computation over the same keys, so the result equals the unpacked attention up to the rounding of
the attention kernel that runs.

The replacement is plain PyTorch: SDPA on the packed query, whose backend (cuDNN, efficient, the
CPU flash kernel) torch chooses again for the new shapes. The time went to the copies and the
n_rep-fold reads, which need no kernel of ours to remove.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from inductor_fusion.graph_paths import region_paths
from inductor_fusion.pass_state import on_reject
from inductor_fusion.report import FusedRegion

NAME = "gqa_decode"

# Query tokens per sequence up to which a region is packed: decode and speculative decoding.
# Prefill (hundreds of tokens) is compute-bound, and there the copies are a small share.
MAX_QUERY_TOKENS = 16

_VIEWS = (
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
)


@functools.cache
def sdpa_ops() -> dict[Any, str]:
    """The fused SDPA ops a compiled graph holds after AOT autograd, with their mask argument.

    ``scaled_dot_product_attention`` is decomposed into the backend torch picked for the example
    inputs; those that take a mask are the ones a masked ``repeat_kv`` graph can hold (the flash
    kernels on CUDA take none)."""
    ops = {}
    for name, mask in (
        ("_scaled_dot_product_flash_attention_for_cpu", "attn_mask"),
        ("_scaled_dot_product_efficient_attention", "attn_bias"),
        ("_scaled_dot_product_cudnn_attention", "attn_bias"),
    ):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops[packet.default] = mask
    return ops


@dataclass(frozen=True)
class AttentionArgs:
    """One matched attention: its graph inputs (fx Nodes) and their fake values."""

    query: torch.fx.Node
    key: torch.fx.Node  # the cache before repeat_kv: (B, KVH, S, D)
    value: torch.fx.Node
    mask: torch.fx.Node | None
    scale: float | None
    n_rep: int


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """``SDPA(query, repeat_kv(key), repeat_kv(value), mask)`` computed on the key/value heads.

    query (B, H, Q, D); key, value (B, KVH, S, D) with H = KVH * n_rep; mask None or
    broadcastable to (B, H, Q, S). Returns (B, H, Q, D).
    """
    b, h, q, d = query.shape
    kvh = key.shape[1]
    n_rep = h // kvh
    packed = query.reshape(b, kvh, n_rep * q, d)
    if mask is not None:
        mb, mh, mq, s = mask.shape
        if mh != 1 or mq != 1:
            # Rows follow the packed query: head kvh * n_rep + j, token t -> row j * Q + t of
            # head kvh (a copy of B x H x Q x S elements at most, small at decode). A mask with
            # one row for every head and token broadcasts as it is.
            mask = mask.expand(mb, h, q, s).reshape(mb, kvh, n_rep * q, s)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=mask, scale=scale
    )
    return out.reshape(b, h, q, d)


_NOT_REPEAT_KV = "not a repeat_kv copy"


def _repeat_kv_source(node: Any) -> tuple[torch.fx.Node, int] | str:
    """``reshape(clone(expand(unsqueeze(x, 2))))`` as transformers' repeat_kv writes it: (x, n_rep),
    or why ``node`` is not that. With one key/value head (multi-query attention) the reshape of
    the expanded cache is a view (a stride-0 head dimension): no ``clone``, the same region."""
    chain = []
    steps = (_VIEWS, (torch.ops.aten.clone.default,), (torch.ops.aten.expand.default,))
    for i, target in enumerate(steps):
        if i == 1 and getattr(node, "target", None) == torch.ops.aten.expand.default:
            continue  # the MQA form: no copy
        if not isinstance(node, torch.fx.Node) or node.target not in target:
            return _NOT_REPEAT_KV
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.target != torch.ops.aten.unsqueeze.default:
        return _NOT_REPEAT_KV
    source = node.args[0]
    x, expanded, out = (_val(n) for n in (source, chain[-1], chain[0]))
    if not all(isinstance(t, torch.Tensor) for t in (x, expanded, out)):
        return "no tensor metadata"
    if x.dim() != 4 or node.args[1] not in (2, -3) or expanded.dim() != 5:
        return _NOT_REPEAT_KV
    b, kvh, s, d = x.shape
    n_rep = expanded.shape[2]
    if not isinstance(n_rep, int) or not isinstance(kvh, int):
        return "symbolic head count"
    if tuple(expanded.shape) != (b, kvh, n_rep, s, d) or tuple(out.shape) != (b, kvh * n_rep, s, d):
        return _NOT_REPEAT_KV
    if any(len(n.users) != 1 for n in chain):
        return "the expanded cache has other users"
    return source, n_rep


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def attention_args(sdpa: torch.fx.Node) -> AttentionArgs | str | None:
    """Legality: the matched attention's inputs, or why it cannot be packed; None where it is no
    candidate (its keys are not ``repeat_kv`` copies: multi-head attention, ``enable_gqa``)."""
    mask_name = sdpa_ops().get(sdpa.target)
    bound = torch.fx.operator_schemas.normalize_function(
        sdpa.target, sdpa.args, sdpa.kwargs, normalize_to_only_use_kwargs=True
    )
    if mask_name is None or bound is None:
        return None
    kw = bound.kwargs
    key = _repeat_kv_source(kw["key"])
    if key == _NOT_REPEAT_KV:
        return None
    if kw.get("dropout_p", 0.0) != 0.0:
        return "attention dropout"
    if kw.get("is_causal", False):
        # Causal without a mask aligns the query to the first keys: packing would change that.
        return "is_causal"
    value = _repeat_kv_source(kw["value"])
    for what, found in (("key", key), ("value", value)):
        if isinstance(found, str):
            return f"{what}: {found}"
    (k, n_rep), (v, n_rep_v) = key, value  # type: ignore[misc]
    if n_rep != n_rep_v:
        return "key and value repeated differently"
    q, kt, vt = _val(kw["query"]), _val(k), _val(v)
    if not all(isinstance(t, torch.Tensor) for t in (q, kt, vt)):
        return "no tensor metadata"
    if q.dim() != 4 or q.shape[1] != kt.shape[1] * n_rep:
        return f"query heads {list(q.shape)} do not match {kt.shape[1]} x {n_rep}"
    if kt.shape[:3] != vt.shape[:3]:
        return "key and value caches differ in shape"
    mask = kw.get(mask_name)
    if mask is not None:
        m = _val(mask)
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            return "mask is not a 4-D tensor"
        if m.shape[1] not in (1, q.shape[1]):
            return f"mask has {m.shape[1]} heads"
    scale = kw.get("scale")
    if scale is not None and not isinstance(scale, float):
        return f"scale is not a Python float ({type(scale).__name__})"
    return AttentionArgs(kw["query"], k, v, mask, scale, n_rep)


def should_fuse(args: AttentionArgs) -> str | None:
    """Profitability: packing pays at decode, where the copies and n_rep-fold reads dominate."""
    tokens = _val(args.query).shape[2]
    if isinstance(tokens, int):
        if tokens <= MAX_QUERY_TOKENS:
            return None
        return f"{tokens} query tokens: packing is for decode (at most {MAX_QUERY_TOKENS})"
    # A dynamic query length (e.g. drafts of several lengths under prompt-lookup decoding): bool()
    # guards on the bound, so the packed graph serves every length up to it and a longer one
    # recompiles once, unpacked (as the norm -> MLP regimes do).
    if bool(tokens <= MAX_QUERY_TOKENS):
        return None
    hint = getattr(tokens.node, "hint", None)  # the example's length (None if unbacked)
    return (
        f"a dynamic query length ({tokens}, {hint} tokens in this call) above "
        f"{MAX_QUERY_TOKENS}: packing is for decode"
    )


def _sdpa_node(match: Any) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target in sdpa_ops())


def _check(match: Any, *, on_match: Callable[[FusedRegion], bool]) -> bool:
    sdpa = _sdpa_node(match)
    args = attention_args(sdpa)
    if args is None:  # no candidate: no line for it
        return False
    reason = args if isinstance(args, str) else should_fuse(args)
    if reason is not None:
        on_reject(sdpa.name, NAME, reason, f"{NAME} not fused ({sdpa.name}): {reason}")
        return False
    variant = sdpa.target.overloadpacket.__name__.removeprefix("_scaled_dot_product_")
    variant += "_mask" if args.mask is not None else "_nomask"
    paths = region_paths({"attention": [sdpa]})
    return on_match(FusedRegion(pattern=NAME, variant=variant, paths=paths))


def _rewrite(match: Any, *_args: Any, **_kwargs: Any) -> None:
    args = attention_args(_sdpa_node(match))
    assert isinstance(args, AttentionArgs), args  # _check approved this match
    scale = args.scale
    if args.mask is None:
        match.replace_by_example(
            lambda q, k, v: packed_attention(q, k, v, None, scale),
            [args.query, args.key, args.value],
        )
    else:
        match.replace_by_example(
            lambda q, k, v, m: packed_attention(q, k, v, m, scale),
            [args.query, args.key, args.value, args.mask],
        )


def register(pass_: Any, *, on_match: Callable[[FusedRegion], bool]) -> None:
    """Registers the pattern (output 0 of a masked SDPA op) into ``pass_``."""
    from torch._inductor.pattern_matcher import (
        CallFunction,
        CallFunctionVarArgs,
        register_graph_pattern,
    )

    # Any arguments: the ops' signatures differ (positional bias, kwarg mask, trailing defaults
    # left out), and `attention_args` binds them to the schema. The op's other outputs
    # (logsumexp, used by a backward) must be unused: the pattern's single-user rule holds that.
    pattern = CallFunction(operator.getitem, CallFunctionVarArgs(list(sdpa_ops())), 0)
    register_graph_pattern(pattern, functools.partial(_check, on_match=on_match), pass_dict=pass_)(
        _rewrite
    )
