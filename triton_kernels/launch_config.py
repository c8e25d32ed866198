"""Launch configurations of ``inductor_fusion::rmsnorm_mlp``: which kernels, tiles and launch
options run a call, and up to which token counts compiled graphs fuse the region at all.

A `Config` pairs the gate/up launch's `Blocks` with the down launch's. `pick_config` chooses one
for a token count: the measured table of the shape and GPU (``_rmsnorm_mlp_tuned``, written by
perf/tune.py) where there is one, else `DEFAULT_CONFIGS`; `graph_config` does the same for a
graph whose token count is symbolic. `max_profitable_tokens` and `cuda_token_ranges` are the one
place that says which token counts our kernels win on CUDA; the patterns' ``should_fuse`` and
the explainer read them.

These are also the tuning interface: perf/tune.py builds `Blocks` and `Config` candidates, times
them with the launches of `launch_plan`, and writes rows that `tuned_configs` parses back.
"""

import dataclasses
import functools
import re
from typing import Any

import torch

from inductor_fusion.triton_kernels import _rmsnorm_mlp_tuned as _tuned

__all__ = [
    "DEFAULT_CONFIGS",
    "INTERPRET_CONFIG",
    "LOWERED_TMA",
    "MAX_PROFITABLE_TOKENS",
    "NON_GATED",
    "Blocks",
    "Config",
    "TokenRange",
    "cuda_token_ranges",
    "fp32_form",
    "gpu_name",
    "graph_config",
    "max_profitable_tokens",
    "pick_config",
    "tuned_configs",
]

# The tuning tables' key suffix for a non-gated MLP's rows (see `tuned_configs`).
NON_GATED = "non-gated"


# --- configurations ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Kernel choice, tile shape and launch options of one of the two GEMM launches.

    ``kind`` is ``"gemv"`` (swapped operands: BLOCK_N weight rows by BLOCK_M tokens per program,
    for small M), ``"gemm"`` (classic [BLOCK_M, BLOCK_N] tiles in grouped order, pointer loads)
    or ``"tma"`` (the same tiles loaded by the tensor-memory accelerator; gate/up only after the
    norm pre-pass). ``split_k`` applies to the down GEMV only, ``group_m`` to the tiled kinds.
    """

    kind: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1

    def constexprs(self) -> dict[str, int]:
        """The kernels' block-size constexprs (the launch options travel apart, in
        `launch_plan.Launch`)."""
        values = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}
        if self.kind != "gemv":
            values["GROUP_M"] = self.group_m
        return values

    def key(self) -> str:
        """Compact text form, as the tuning table stores it."""
        text = f"{self.kind}:{self.block_m}x{self.block_n}x{self.block_k}"
        text += f":w{self.num_warps}s{self.num_stages}"
        if self.kind != "gemv":
            text += f"g{self.group_m}"
        if self.split_k > 1:
            text += f"k{self.split_k}"
        return text

    @classmethod
    def parse(cls, text: str) -> "Blocks":
        """Inverse of :meth:`key`."""
        kind, tile, opts = text.split(":")
        block_m, block_n, block_k = (int(v) for v in tile.split("x"))
        values = {letter: int(number) for letter, number in re.findall(r"([a-z])(\d+)", opts)}
        return cls(
            kind,
            block_m,
            block_n,
            block_k,
            num_warps=values["w"],
            num_stages=values["s"],
            group_m=values.get("g", 8),
            split_k=values.get("k", 1),
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration of one call: gate/up (with or without the norm pre-pass) and down."""

    name: str
    gate_up: Blocks
    down: Blocks
    prenorm: bool = False  # gemm gate/up only: norm_kernel first, plain A tiles in the loop

    def __post_init__(self) -> None:
        if self.prenorm and self.gate_up.kind == "gemv":
            raise ValueError("the norm pre-pass pairs with the tiled gate/up kernels only")
        if self.gate_up.kind == "tma" and not self.prenorm:
            raise ValueError("the TMA gate/up kernel reads pre-normalised activations")

    @classmethod
    def parse(cls, name: str, gate_up: str, down: str, prenorm: bool = False) -> "Config":
        """The configuration whose launches have these `Blocks.key` forms (a tuning table row)."""
        return cls(name, Blocks.parse(gate_up), Blocks.parse(down), prenorm)


# Fallback configurations by token count M for 16-bit inputs, for shapes the tuning table
# (``_rmsnorm_mlp_tuned``) has no entry for: the choices perf/tune.py made for 2048x8192 on an
# H100, which were also the best or within a few % for 3072x8192 and 4096x14336. Up to M=64 the
# swapped-operand GEMVs stream the weights with many narrow programs (split-K for down, whose
# N = H is small); from M=128 the norm runs as a pre-pass and both GEMMs are TMA-fed tiles,
# down still split along K up to a few hundred tokens.
DEFAULT_CONFIGS: tuple[tuple[int, Config], ...] = (
    (16, Config.parse("gemv16", "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4")),
    (64, Config.parse("gemv64", "gemv:64x64x128:w8s4", "gemv:64x64x128:w4s4k4")),
    (256, Config.parse("tma256", "tma:128x64x64:w4s3g8", "tma:64x128x64:w4s4g8k2", prenorm=True)),
    (1024, Config.parse("tma1024", "tma:128x128x64:w8s4g8", "tma:128x128x64:w4s4g8", prenorm=True)),
    (2**62, Config.parse("tma", "tma:128x128x64:w8s3g8", "tma:128x256x64:w8s3g8", prenorm=True)),
)

# The CPU interpreter executes every program in Python, so few, small programs keep tests fast;
# 16 is the smallest block ``tl.dot`` accepts.
INTERPRET_CONFIG = Config.parse("interpret", "gemm:16x32x32:w1s1g1", "gemm:16x32x32:w1s1g1")


def tuned_configs(
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    device_name: str | None = None,
    gated: bool = True,
) -> tuple[tuple[int, Config], ...] | None:
    """The measured table for this shape (``perf/tune.py`` writes it), if there is one.

    ``device_name`` picks the table measured on that GPU model; GPUs without their own table
    (and callers that name none) get the H100's, measured on the same Hopper architecture the
    kernels were written for. Shapes no table has take the defaults. A non-gated MLP (one
    up-projection) has its own rows, keyed ``(H, I, "non-gated")``: its gate/up launch streams
    half the weights per tile, so the gated tiles leave it short of bytes in flight.
    """
    if dtype == torch.float32:
        return None
    table = _tuned.TUNED_BY_DEVICE.get(device_name or "", _tuned.TUNED)
    key = (hidden_size, intermediate_size) if gated else (hidden_size, intermediate_size, NON_GATED)
    entry = table.get(key)
    if entry is None:
        return None
    suffix = "" if gated else "-non-gated"
    return _parse_table(f"tuned-{hidden_size}x{intermediate_size}{suffix}", entry)


def gpu_name(device: torch.device) -> str | None:
    """The GPU model's name, as tuning tables are keyed (None off CUDA, and where the device is
    only described, e.g. fake CUDA tensors traced on a machine without one)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_device_name(device.index if device.index is not None else 0)


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _parse_table(
    prefix: str, entry: tuple[tuple[int, str, str, bool], ...]
) -> tuple[tuple[int, Config], ...]:
    """Table rows as configurations, parsed once per table rather than on every op call (the
    table itself is the key, so a replaced table is parsed anew)."""
    return tuple(
        (max_m, Config.parse(f"{prefix}-{_m_text(max_m)}", gate_up, down, prenorm))
        for max_m, gate_up, down, prenorm in entry
    )


def _m_text(max_m: int) -> str:
    return "mmax" if max_m >= 2**62 else f"m{max_m}"


def pick_config(
    m: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    interpret: bool,
    device_name: str | None = None,
    gated: bool = True,
) -> Config:
    """The launch configuration for ``m`` tokens.

    Tuned shapes take their measured table; any other shape (and any M past the table) the
    defaults. fp32 gets smaller tiles (``fp32_form``) to stay under the H100's 227 KiB of shared
    memory per block.
    """
    if interpret:
        return INTERPRET_CONFIG
    tuned = tuned_configs(hidden_size, intermediate_size, dtype, device_name, gated) or ()
    # A table tuned up to some M only covers that far; larger M take the defaults.
    config = next((cfg for max_m, cfg in tuned if m <= max_m), None)
    if config is None:
        config = next(cfg for max_m, cfg in DEFAULT_CONFIGS if m <= max_m)
    if dtype == torch.float32:
        config = fp32_form(config)
    return config


def fp32_form(config: Config) -> Config:
    """``config`` with tiles that fit fp32: half (tiled kinds) or a quarter (GEMV) of BLOCK_K and
    at most three pipeline stages, since fp32 tiles take twice the shared memory of 16-bit ones."""

    def shrink(blocks: Blocks) -> Blocks:
        block_k = 32 if blocks.kind != "gemv" else max(32, blocks.block_k // 4)
        return dataclasses.replace(blocks, block_k=block_k, num_stages=min(3, blocks.num_stages))

    return dataclasses.replace(
        config,
        name=f"{config.name}-fp32",
        gate_up=shrink(config.gate_up),
        down=shrink(config.down),
    )


# --- token-count bounds --------------------------------------------------------------------------

# Token counts up to which the fused kernels beat Inductor's own code for the region on the GPUs
# we measured (H200, 2026-12-02, perf/results/host): there the region streams the weights, and
# ours streams them once with the norm, activation and residual folded in. Above it the region is
# compute-bound: Inductor's cuBLAS GEMMs ran 3-20 % faster than our pointer-based tiled kernels
# (e.g. 4096x14336 at M=4096: 2163 vs 2628 us), so a compiled graph keeps Inductor's code there.
MAX_PROFITABLE_TOKENS = 64


# Whether compiled graphs run the "tma" configurations (M > 64) with their TMA descriptors, which
# Inductor's wrapper builds on the host before each launch (torch's "stable" descriptor metadata
# for user kernels), rather than as the pointer kernels with the same tiles. Off: measured on no
# GPU yet (issue #27), and no region above MAX_PROFITABLE_TOKENS fuses on CUDA today; perf/bench.py
# --lowered-tma turns it on for the measurement.
LOWERED_TMA = False


def max_profitable_tokens(hidden_size: int, intermediate_size: int) -> int:
    """The largest token count at which the fused region of this shape beats Inductor's code on
    CUDA (``MAX_PROFITABLE_TOKENS`` unless a measurement says less; see ``_tuned``). 0: it lost
    at every token count measured, so compiled graphs leave the shape to Inductor on CUDA."""
    return _tuned.PROFITABLE_TOKENS.get((hidden_size, intermediate_size), MAX_PROFITABLE_TOKENS)


@dataclasses.dataclass(frozen=True)
class TokenRange:
    """Token counts ``first`` to ``last`` (None: every larger count), and whether compiled graphs
    on CUDA run our kernels for them (else Inductor's own code)."""

    first: int
    last: int | None
    fused: bool

    def __str__(self) -> str:
        if self.last is None:
            return "any" if self.first == 1 else f"{self.first}+"
        return f"{self.first}-{self.last}"


def cuda_token_ranges(hidden_size: int, intermediate_size: int) -> tuple[TokenRange, ...]:
    """Every token count of the region of this shape on CUDA, in increasing ranges, each fused or
    left to Inductor (the bound is `max_profitable_tokens`)."""
    limit = max_profitable_tokens(hidden_size, intermediate_size)
    if limit <= 0:
        return (TokenRange(1, None, fused=False),)
    return (TokenRange(1, limit, fused=True), TokenRange(limit + 1, None, fused=False))


# Token-count regimes of a graph whose M is symbolic: (upper bound, M the configuration is picked
# for). Within a regime one configuration serves every M; its tiles are those of the regime's
# largest M, because a GEMV tile narrower than M would stream the weights several times. Hence a
# shape's measured bound (``_tuned.PROFITABLE_TOKENS``) sits on a regime edge.
_GRAPH_REGIMES = ((16, 16), (64, 64))


def graph_config(
    m: Any,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    interpret: bool,
    device_name: str | None = None,
    gated: bool = True,
) -> Config:
    """`pick_config` for a token count ``m`` that may be symbolic (tracing a graph): the exact
    count when it is an int, else the regime its size hint falls in, with a guard on it."""

    def pick(tokens: int) -> Config:
        return pick_config(
            tokens, hidden_size, intermediate_size, dtype, interpret, device_name, gated
        )

    if isinstance(m, int):
        return pick(m)
    for upper, tokens in _GRAPH_REGIMES:
        # bool() of a symbolic comparison guards on it: the graph is valid for this regime only.
        if bool(m <= upper):
            return pick(tokens)
    # Tiled regime: every configuration is right for any M; pick by the size hint, no guard.
    hint = m.node.shape_env.size_hint(m.node.expr) if hasattr(m, "node") else int(m)
    return pick(max(int(hint), _GRAPH_REGIMES[-1][0] + 1))
