"""Benchmark of the post-attention region ``out = h + mlp(norm(h))`` of each family kind on CUDA.

The region is built from the real Hugging Face modules with random weights, one kind per row of
`KINDS` (``--shapes kind:HxI``; a bare ``HxI`` is Llama's):

    llama     LlamaRMSNorm -> LlamaMLP (SwiGLU), h + mlp                     family rmsnorm_mlp
    gemma     GemmaRMSNorm (1 + w in fp32) -> GemmaMLP (GELU-tanh gated)      family rmsnorm_mlp
    phi3      Phi3RMSNorm -> Phi3MLP (one fused gate_up_proj, SiLU)           family rmsnorm_mlp
    neox      LayerNorm (bias) -> GPTNeoXMLP (GELU erf, not gated, biases),
              mlp + h (GPTNeoXLayer's sequential residual)                    family layernorm_mlp
    nemotron  NemotronLayerNorm1P -> NemotronMLP (ReLU^2, not gated)          family layernorm_mlp
    llama_tp  Llama's, mlp(norm(h)) without the residual: one tensor-parallel rank's region
              (``--tp``: Llama-3-8B's 4096x14336 split over 2, 4, 8 GPUs)      family rmsnorm_mlp

Six providers run it:

    eager         the HF modules as they are
    liger         Liger-Kernel's modules on the same weights where it has them: LigerRMSNorm +
                  LigerSwiGLUMLP (Llama), LigerRMSNorm(offset=1, casting_mode="gemma") +
                  LigerGEGLUMLP (Gemma), LigerRMSNorm + LigerPhi3SwiGLUMLP (Phi-3), LigerLayerNorm
                  + the HF MLP (GPT-NeoX); skipped for Nemotron (no LayerNorm1P)
    compile       torch.compile, default mode
    max_autotune  torch.compile, mode="max-autotune-no-cudagraphs"
    ours          torch.compile with our backend; must have fused exactly one region of the kind's
                  family (none above its profitability limit of 64 tokens, where the region is
                  Inductor's own code on purpose: marked in the records and tables)
    ours_op       a direct call of torch.ops.inductor_fusion.rmsnorm_mlp (no compiler around it)

Timing. For each (shape, M) every provider is compiled and warmed up first (compilation and
autotuning stay out of the numbers), then a CUDA graph of ``--calls-per-graph`` back-to-back calls
is captured, so launch gaps and Python overhead vanish and only GPU time is measured. The graphs of
all providers are replayed in interleaved rounds (each round starts at a different provider), each
replay timed with CUDA events; a sample is one replay's time over its call count. We report the
median, p10 and p90 of all samples, and the spread of the per-round medians: the same version timed
several times, so differences smaller than that spread are noise. Every call reads the same input;
at the default shapes that measures no cache effect: the weights (at least 100 MB) exceed the 50 MB L2,
stream from HBM on every call, and they carry most of the bytes.

Floor. bytes = weights (W*H*I*2, W = 3 matrices for a gated MLP, 2 for a non-gated one) + MLP
biases + h in + out (2*M*H*2): perfect fusion, the intermediate never leaves the chip.
flops = 2*W*M*H*I. floor = max(bytes / copy bandwidth, flops / matmul rate), both
ceilings measured in this run: a 2 GiB device-to-device copy (bytes read + written) and an
8192^3 bf16 torch.mm on random data, medians.

Numerics. At one M per shape every provider's output is compared with an fp32 reference (the HF
modules upcast, TF32 off) by relative L2 error; our rule is ours <= 2 x eager's error.

Time. Compiling is the slow part (max-autotune autotunes two GEMM shapes per M). Each provider is
compiled once per (shape, M) with static shapes. ``--time-budget`` (default 330 s) bounds the sweep:
past 60% of it max_autotune is skipped, past all of it every remaining provider is; skipped cells
are recorded as such.

Output. Data first: ``results.json`` (records + metadata, rewritten after every (shape, M) so a
killed run keeps what it measured) and ``results.csv``; then ``report.py`` turns the JSON into
``results.md`` and ``results.png``. A short table is printed last.

    python perf/bench.py --out perf/results                      # full sweep
    python perf/bench.py --out /tmp/b --quick                    # smoke test
    python perf/bench.py --out /tmp/b --cpu-smoke                # every kind, tiny fp32, CPU
    python perf/bench.py --out /tmp/b --shapes 4096x14336 --tokens 1,256 --providers eager,ours
    python perf/bench.py --out /tmp/b --shapes gemma:2304x9216,neox:2560x10240 --tokens 1,16

``--cpu-smoke`` checks the script without a GPU: every kind at a tiny size in fp32 on the CPU, the
calls timed by wall clock (no CUDA graphs, no floor), our fused-region check and the numerics as
on the GPU; exit status 1 if any record failed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import report
import torch
from perf_common import (
    configure_compiler,
    csv_list,
    dist_version,
    error_text,
    git_commit,
    log,
    recover,
    rel_l2,
    synchronize,
)
from torch import Tensor

DTYPE = torch.bfloat16
ELEM_BYTES = 2
EPS = 1e-5
INIT_STD = 0.02  # linear weights ~ N(0, 0.02), as HF's initializer_range

PEERS = ("eager", "liger", "compile", "max_autotune")
PROVIDERS = (*PEERS, "ours", "ours_op")
# Providers whose compile (autotuning) is the slow part of a sweep: the first to go when the
# time budget runs short.
SLOW_PROVIDERS = ("max_autotune",)

# Llama's three (bare HxI), then one real size per other family kind.
DEFAULT_SHAPES = (
    "2048x8192,4096x14336,3072x8192,"
    "gemma:2304x9216,phi3:3072x8192,neox:2560x10240,nemotron:3072x9216"
)
DEFAULT_TOKENS = "1,4,16,64,256,1024,4096"
QUICK_SHAPES = "2048x8192"
# --tp: one rank's region of Llama-3-8B under tensor parallelism on 2, 4 and 8 GPUs.
TP_SHAPES = "llama_tp:4096x7168,llama_tp:4096x3584,llama_tp:4096x1792"
QUICK_TOKENS = "1,64,1024"
# --cpu-smoke: every kind at a tiny size (not multiples of the block sizes), fp32, on the CPU.
SMOKE_SHAPES = "llama:80x176,gemma:80x176,phi3:80x176,neox:80x176,nemotron:80x176"
SMOKE_TOKENS = "5"
SMOKE_PROVIDERS = "eager,liger,compile,ours,ours_op"
NUMERICS_M = 64

CSV_FIELDS = (
    "shape",
    "kind",
    "family",
    "hidden",
    "intermediate",
    "m",
    "provider",
    "status",
    "median_us",
    "p10_us",
    "p90_us",
    "min_us",
    "spread_pct",
    "samples",
    "calls_per_graph",
    "compile_s",
    "fused",
    "variant",
    "floor_us",
    "floor_bound",
    "bytes",
    "flops",
    "rel_err",
    "err_vs_eager",
    "tol_ok",
    "error",
)


# --- what is measured -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """One family kind of the region: the Hugging Face classes that build it (from
    ``transformers.models.<module>.modeling_<module>``, or ``torch.nn``) and what it computes."""

    name: str  # prefix in --shapes ("llama" is also the bare HxI form)
    family: str  # the inductor_fusion pattern family that must fuse it
    module: str
    config_cls: str
    norm_cls: str  # built as norm_cls(H, eps=eps)
    mlp_cls: str  # built as mlp_cls(config)
    config: tuple[tuple[str, Any], ...]  # config keywords besides the sizes
    eps: float  # the model's own
    # Attribute names of the MLP's linears: the gate (or the only up-projection of a non-gated
    # MLP), the up (None: fused into the gate's, or non-gated), the down.
    linears: tuple[str, str | None, str]
    fused_gate_up: bool = False  # Phi-3: one [2I, H] gate_up_proj, chunked
    bias: bool = False  # MLP biases (GPTNeoXMLP always has them)
    # "left": h + mlp(norm(h)); "right": mlp(norm(h)) + h; "none": mlp(norm(h)) (a tensor-parallel
    # shard: the all-reduce of the down projection's partial sums sits before the residual add)
    residual: str = "left"
    norm_offset: float = 0.0  # the norm multiplies by weight + offset (Gemma, LayerNorm1P)
    op_spec: tuple[tuple[str, Any], ...] = ()  # the op's RegionSpec keywords (none: Llama's)

    @property
    def gated(self) -> bool:
        return self.fused_gate_up or self.linears[1] is not None

    @property
    def matrices(self) -> int:
        """Weight matrices of H x I each: gate, up, down (gated) or up, down."""
        return 3 if self.gated else 2

    @property
    def text(self) -> str:
        mlp = f"{self.mlp_cls}({self.norm_cls}(h))"
        return {"left": f"h + {mlp}", "right": f"{mlp} + h"}.get(self.residual, mlp)


KINDS = {
    kind.name: kind
    for kind in (
        Kind(
            "llama", "rmsnorm_mlp", "llama", "LlamaConfig", "LlamaRMSNorm", "LlamaMLP",
            config=(("hidden_act", "silu"), ("mlp_bias", False)), eps=EPS,
            linears=("gate_proj", "up_proj", "down_proj"),
        ),
        # One rank's share of Llama's region under tensor parallelism (transformers' tp_plan
        # "auto": gate/up column-wise, down row-wise): HxI/N, no residual add before the
        # all-reduce. 4096x14336/N is Llama-3-8B on N GPUs (issue #13).
        Kind(
            "llama_tp", "rmsnorm_mlp", "llama", "LlamaConfig", "LlamaRMSNorm", "LlamaMLP",
            config=(("hidden_act", "silu"), ("mlp_bias", False)), eps=EPS,
            linears=("gate_proj", "up_proj", "down_proj"), residual="none",
        ),
        # Gemma-2-2B's sizes, written as Gemma 1 writes the region (Gemma 2 adds a post-norm).
        Kind(
            "gemma", "rmsnorm_mlp", "gemma", "GemmaConfig", "GemmaRMSNorm", "GemmaMLP",
            config=(("hidden_act", "gelu_pytorch_tanh"),), eps=1e-6,
            linears=("gate_proj", "up_proj", "down_proj"), norm_offset=1.0,
            op_spec=(("norm_weight_offset", 1.0), ("norm_weight_fp32", True),
                     ("activation", "gelu_tanh")),
        ),
        Kind(
            "phi3", "rmsnorm_mlp", "phi3", "Phi3Config", "Phi3RMSNorm", "Phi3MLP",
            config=(("hidden_act", "silu"),), eps=1e-5,
            linears=("gate_up_proj", None, "down_proj"), fused_gate_up=True,
        ),
        # GPTNeoXLayer's sequential form (use_parallel_residual=False): mlp(ln(h)) + h.
        Kind(
            "neox", "layernorm_mlp", "gpt_neox", "GPTNeoXConfig", "LayerNorm", "GPTNeoXMLP",
            config=(("hidden_act", "gelu"), ("use_parallel_residual", False)), eps=1e-5,
            linears=("dense_h_to_4h", None, "dense_4h_to_h"), bias=True, residual="right",
            op_spec=(("norm", "layer"), ("norm_weight_fp32", True), ("activation", "gelu"),
                     ("gated", False)),
        ),
        Kind(
            "nemotron", "layernorm_mlp", "nemotron", "NemotronConfig", "NemotronLayerNorm1P",
            "NemotronMLP", config=(("hidden_act", "relu2"), ("mlp_bias", False)), eps=1e-5,
            linears=("up_proj", None, "down_proj"), norm_offset=1.0,
            op_spec=(("norm", "layer"), ("norm_weight_offset", 1.0), ("norm_weight_fp32", True),
                     ("activation", "relu2"), ("gated", False)),
        ),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    kind: str = "llama"

    @property
    def key(self) -> str:
        """HxI for Llama (the historical keys), kind:HxI for the others."""
        size = f"{self.hidden}x{self.inter}"
        return size if self.kind == "llama" else f"{self.kind}:{size}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        kind, _, size = text.lower().rpartition(":")
        kind = kind or "llama"
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(
                f"shape {text!r}: unknown kind {kind!r}; known: {', '.join(KINDS)}"
            )
        try:
            hidden, inter = (int(v) for v in size.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"shape {text!r} is not [kind:]HxI, e.g. 4096x14336 or gemma:2304x9216"
            ) from None
        if hidden < 1 or inter < 1:
            raise argparse.ArgumentTypeError(f"shape {text!r} must be positive")
        return cls(hidden, inter, kind)


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    calls_per_graph: int = 20  # calls captured in one CUDA graph
    rounds: int = 5  # interleaved rounds over all providers
    replays_per_round: int = 6  # timed replays of one provider per round (one sample each)


def region_bytes(shape: Shape, m: int, elem_bytes: int = ELEM_BYTES) -> int:
    """Fewest bytes the region must move: each weight matrix and MLP bias once, h in, out once
    (the norm's H-sized parameters are left out, as they always were)."""
    kind, hidden, inter = KINDS[shape.kind], shape.hidden, shape.inter
    biases = (kind.matrices - 1) * inter + hidden if kind.bias else 0
    return (kind.matrices * hidden * inter + biases + 2 * m * hidden) * elem_bytes


def region_flops(shape: Shape, m: int) -> int:
    """Matrix flops of the GEMMs (the norm and activation are negligible)."""
    return 2 * m * shape.hidden * shape.inter * KINDS[shape.kind].matrices


def floor_us(nbytes: int, flops: int, copy_bw: float, mm_rate: float) -> tuple[float, str]:
    """The roof: max(bytes / copy bandwidth, flops / matmul rate), in µs, and which term binds."""
    t_bytes = nbytes / copy_bw
    t_flops = flops / mm_rate
    return (max(t_bytes, t_flops) * 1e6, "bytes" if t_bytes >= t_flops else "flops")


def summarize(rounds: Sequence[Sequence[float]]) -> dict[str, float | int]:
    """Median, p10, p90 and min over all samples (µs per call); spread of the round medians."""
    samples = sorted(s for r in rounds for s in r)
    if not samples:
        raise ValueError("no samples")
    median = statistics.median(samples)
    if len(samples) >= 2:
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = samples[0]
    round_medians = [statistics.median(r) for r in rounds if r]
    spread = (max(round_medians) - min(round_medians)) / median * 100 if median > 0 else 0.0
    return {
        "median_us": median,
        "p10_us": p10,
        "p90_us": p90,
        "min_us": samples[0],
        "spread_pct": spread,
        "samples": len(samples),
    }


# --- the region and its providers ------------------------------------------------------------------


@dataclasses.dataclass
class Region:
    """The HF modules of one shape, random weights, no grad."""

    shape: Shape
    config: Any  # the kind's config class
    norm: torch.nn.Module
    mlp: torch.nn.Module

    @property
    def kind(self) -> Kind:
        return KINDS[self.shape.kind]

    @property
    def eps(self) -> float:
        return self.kind.eps

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype


def _hf_class(kind: Kind, name: str) -> Any:
    import importlib

    module = importlib.import_module(f"transformers.models.{kind.module}.modeling_{kind.module}")
    return getattr(module, name, None) or getattr(torch.nn, name)


def build_region(
    shape: Shape, device: torch.device | str, seed: int, dtype: torch.dtype = DTYPE
) -> Region:
    import transformers

    kind = KINDS[shape.kind]
    # No attention is built: one head passes every config's hidden-size checks at any H.
    config = getattr(transformers, kind.config_cls)(
        hidden_size=shape.hidden,
        intermediate_size=shape.inter,
        num_attention_heads=1,
        num_key_value_heads=1,
        **dict(kind.config),
    )
    with torch.device(device):
        norm = _hf_class(kind, kind.norm_cls)(shape.hidden, eps=kind.eps).to(dtype)
        mlp = _hf_class(kind, kind.mlp_cls)(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        # HF initialises the norm's multiplier to one; a spread around one exercises it.
        norm.weight.normal_(1.0 - kind.norm_offset, 0.1, generator=gen)
        # Linear weights then biases, gate/up/down in the MLP's order (Llama's draws as before).
        for param in sorted(mlp.parameters(), key=lambda p: p.dim() < 2):
            param.normal_(0.0, INIT_STD, generator=gen)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.1, generator=gen)
    for module in (norm, mlp):
        module.eval().requires_grad_(False)
    return Region(shape=shape, config=config, norm=norm, mlp=mlp)


def region_function(
    norm: torch.nn.Module, mlp: torch.nn.Module, residual: str = "left"
) -> Callable[[Tensor], Tensor]:
    """The region as the kind's HF decoder layer writes it after attention."""

    def region(h: Tensor) -> Tensor:
        return h + mlp(norm(h))

    def region_right(h: Tensor) -> Tensor:
        return mlp(norm(h)) + h

    def region_shard(h: Tensor) -> Tensor:
        return mlp(norm(h))

    return {"left": region, "right": region_right, "none": region_shard}[residual]


class Skipped(Exception):
    """A provider that cannot run here (not an error of the provider)."""


class NotFused(Exception):
    """Our backend compiled the region without fusing it: timing it would time something else."""


def _liger_modules(region: Region) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Liger-Kernel's modules for the kind (constructors checked against liger-kernel 0.8.5's, the
    same since 0.6.5), on the HF tensors. GPT-NeoX: Liger has a LayerNorm but no non-gated GELU
    MLP, so its MLP is HF's."""
    kind = region.kind
    if kind.name == "nemotron":
        raise Skipped("Liger-Kernel has no LayerNorm1P (Nemotron's norm)")
    try:
        import liger_kernel.transformers as lk
    except ImportError as exc:
        raise Skipped(f"liger_kernel not importable ({exc})") from exc
    hidden, eps, config = region.shape.hidden, region.eps, region.config
    # Built on the meta device, then given the HF tensors: same weights, no second copy.
    with torch.device("meta"):
        if kind.name == "llama":
            norm, mlp = lk.LigerRMSNorm(hidden, eps=eps), lk.LigerSwiGLUMLP(config)
        elif kind.name == "gemma":
            norm = lk.LigerRMSNorm(hidden, eps=eps, offset=1.0, casting_mode="gemma")
            mlp = lk.LigerGEGLUMLP(config)  # GELU-tanh, as gelu_pytorch_tanh
        elif kind.name == "phi3":
            norm, mlp = lk.LigerRMSNorm(hidden, eps=eps), lk.LigerPhi3SwiGLUMLP(config)
        elif kind.name == "neox":
            norm, mlp = lk.LigerLayerNorm(hidden, eps=eps, bias=True), region.mlp
        else:
            raise Skipped(f"no Liger modules known for {kind.name}")
    norm.weight = region.norm.weight
    if getattr(region.norm, "bias", None) is not None:
        norm.bias = region.norm.bias
    if mlp is not region.mlp:
        for name in kind.linears:
            if name is not None:
                getattr(mlp, name).weight = getattr(region.mlp, name).weight
    return norm.eval(), mlp.eval()


def _op_call(region: Region) -> Callable[[Tensor], Tensor]:
    """A direct call of torch.ops.inductor_fusion.rmsnorm_mlp on the region's HF tensors."""
    import inductor_fusion.triton_kernels.rmsnorm_mlp  # noqa: F401  (registers the op)

    op = torch.ops.inductor_fusion.rmsnorm_mlp.default
    kind, mlp = region.kind, region.mlp
    gate_name, up_name, down_name = kind.linears
    gate, down = getattr(mlp, gate_name), getattr(mlp, down_name)
    up = None if up_name is None else getattr(mlp, up_name)
    gate_w, up_w = gate.weight, None if up is None else up.weight
    if kind.fused_gate_up:  # the halves of Phi-3's gate_up_proj, as views (as our pass does)
        gate_w, up_w = gate.weight.chunk(2, dim=0)
    weights = (
        region.norm.weight,
        gate_w,
        up_w,
        down.weight,
        gate.bias,
        None if up is None else up.bias,
        down.bias,
    )
    norm_bias = getattr(region.norm, "bias", None)
    eps, spec = region.eps, dict(kind.op_spec)

    residual = kind.residual != "none"

    def fused(h: Tensor) -> Tensor:
        return op(h, *weights, h if residual else None, eps, norm_bias, **spec)

    return fused


def build_provider(name: str, region: Region) -> Callable[[Tensor], Tensor]:
    """A callable ``h -> out`` for ``name``; compiled providers compile on their first call.

    ``dynamic=False``: every M gets its own static-shape compile, as a serving engine that
    compiles per batch size does; automatic dynamic shapes would make the second M symbolic.
    """
    residual = region.kind.residual
    eager = region_function(region.norm, region.mlp, residual)
    if name == "eager":
        return eager
    if name == "liger":
        norm, mlp = _liger_modules(region)  # on the CPU too: checks the constructors
        if region.norm.weight.device.type != "cuda":
            raise Skipped("Liger-Kernel's kernels need CUDA (its modules were built)")
        return region_function(norm, mlp, residual)
    if name == "compile":
        return torch.compile(eager, dynamic=False)
    if name == "max_autotune":
        return torch.compile(eager, mode="max-autotune-no-cudagraphs", dynamic=False)
    if name == "ours":
        import inductor_fusion

        return torch.compile(eager, backend=inductor_fusion.backend(), dynamic=False)
    if name == "ours_op":
        return _op_call(region)
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


def expected_regions(x: Tensor, region: Region) -> int:
    """1, or 0 where our profitability check (``should_fuse``) leaves the region to Inductor on
    purpose: on CUDA above the shape's measured bound (``max_profitable_tokens``), and for a
    non-gated MLP."""
    from inductor_fusion.triton_kernels.launch_config import max_profitable_tokens

    if x.device.type != "cuda":
        return 1
    if not region.kind.gated:
        return 0
    tokens = x.numel() // x.shape[-1]
    return int(tokens <= max_profitable_tokens(region.shape.hidden, region.shape.inter))


def check_fused(family: str, expected: int) -> tuple[int, str | None]:
    """After the first call of ``ours``: exactly ``expected`` regions of ``family`` fused since
    the last reset, and nothing else. Returns the count and the variant that matched."""
    import inductor_fusion

    report_ = inductor_fusion.get_report()
    fused, total = report_.count(family), len(report_)
    if fused != expected or total != expected:
        raise NotFused(
            f"inductor_fusion fused {fused} {family} region(s) ({total} in all), "
            f"expected exactly {expected}; report: {report_.summary()}"
        )
    return fused, ",".join(region.variant for region in report_) or None


def first_call(name: str, fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Runs the call that compiles (and autotunes); returns its wall time in seconds."""
    if name == "ours":
        import inductor_fusion

        inductor_fusion.reset_report()
    synchronize(x.device)
    start = time.perf_counter()
    fn(x)
    synchronize(x.device)
    return time.perf_counter() - start


def reference(region: Region, x: Tensor) -> Tensor:
    """The truth every provider is scored on: the HF modules upcast to fp32 (fp64 for an fp32
    run), TF32 off."""
    dtype = torch.float64 if region.dtype == torch.float32 else torch.float32
    norm, mlp = (copy.deepcopy(m).to(dtype) for m in (region.norm, region.mlp))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return region_function(norm, mlp, region.kind.residual)(x.to(dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# --- CUDA timing ------------------------------------------------------------------------------------


def capture(fn: Callable[[Tensor], Tensor], x: Tensor, calls: int) -> torch.cuda.CUDAGraph:
    """A graph of ``calls`` back-to-back calls of ``fn(x)``, after its first call compiled it.

    Warm-up runs on a side stream as torch.cuda.graphs asks. The graph's last output is then
    poisoned, the graph replayed, and the output compared with a direct call: a graph that does
    not write its output, or computes something else, fails here instead of timing fast.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn(x)
    out.fill_(float("nan"))
    graph.replay()
    direct = fn(x)
    torch.cuda.synchronize()
    err = rel_l2(out, direct.float())
    if not err <= 1e-2:  # NaN-safe
        raise RuntimeError(f"graph replay disagrees with a direct call (rel L2 {err:.3g})")
    return graph


def interleaved(measures: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """``rounds`` results of every measure, taken in turns, each round starting one provider
    later, so that drift (clocks, other tenants on the host) hits all providers alike."""
    names = list(measures)
    samples: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            samples[name].append(measures[name]())
    return samples


def time_graphs(
    graphs: dict[str, torch.cuda.CUDAGraph], plan: TimingPlan
) -> dict[str, list[list[float]]]:
    """µs per call: for each provider, one list of samples per round."""

    def one_round(graph: torch.cuda.CUDAGraph) -> list[float]:
        graph.replay()  # untimed: the first replay after another provider's
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(plan.replays_per_round)
        ]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 / plan.calls_per_graph for start, end in events]

    return interleaved({n: lambda g=g: one_round(g) for n, g in graphs.items()}, plan.rounds)


def time_calls(
    fns: dict[str, Callable[[Tensor], Tensor]], x: Tensor, plan: TimingPlan
) -> dict[str, list[list[float]]]:
    """--cpu-smoke: µs per call by wall clock, in the rounds and samples of `time_graphs`."""

    def one_round(fn: Callable[[Tensor], Tensor]) -> list[float]:
        round_ = []
        for _ in range(plan.replays_per_round):
            start = time.perf_counter()
            for _ in range(plan.calls_per_graph):
                fn(x)
            round_.append((time.perf_counter() - start) * 1e6 / plan.calls_per_graph)
        return round_

    return interleaved({n: lambda f=f: one_round(f) for n, f in fns.items()}, plan.rounds)


def _event_median_s(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_copy_bw(nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in B/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = _event_median_s(lambda: dst.copy_(src), warmup=3, reps=reps)
    return 2 * nbytes / seconds


def measure_mm_rate(n: int, reps: int) -> float:
    """bf16 torch.mm rate in FLOP/s on random data (zeros run faster than real data)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    seconds = _event_median_s(lambda: torch.mm(a, b, out=c), warmup=3, reps=reps)
    return 2 * n**3 / seconds


# --- the sweep ----------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget: past ``soft_frac`` of it the slow providers are skipped, past all of it
    every provider is. What is already under way finishes; nothing new starts."""

    def __init__(self, seconds: float, soft_frac: float = 0.6) -> None:
        self.start = time.monotonic()
        self.seconds = seconds
        self.soft_frac = soft_frac

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def skip_reason(self, provider: str) -> str | None:
        if self.seconds <= 0:
            return None
        if self.elapsed() > self.seconds:
            return f"time budget of {self.seconds:.0f} s spent"
        if provider in SLOW_PROVIDERS and self.elapsed() > self.soft_frac * self.seconds:
            return f"past {self.soft_frac:.0%} of the {self.seconds:.0f} s time budget"
        return None


def base_record(
    shape: Shape,
    m: int,
    provider: str,
    copy_bw: float | None,
    mm_rate: float | None,
    elem_bytes: int = ELEM_BYTES,
) -> dict:
    """A record before the run; no floor where the ceilings were not measured (--cpu-smoke)."""
    nbytes = region_bytes(shape, m, elem_bytes)
    flops = region_flops(shape, m)
    floor, bound = (
        floor_us(nbytes, flops, copy_bw, mm_rate) if copy_bw and mm_rate else (None, None)
    )
    record: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
    record.update(
        shape=shape.key,
        kind=shape.kind,
        family=KINDS[shape.kind].family,
        hidden=shape.hidden,
        intermediate=shape.inter,
        m=m,
        provider=provider,
        status="pending",
        floor_us=floor,
        floor_bound=bound,
        bytes=nbytes,
        flops=flops,
    )
    return record


class ShapeRun:
    """One shape's modules and its providers' callables, built once and reused for every M."""

    def __init__(self, shape: Shape, seed: int, device: str = "cuda", dtype=DTYPE) -> None:
        self.shape = shape
        self.region = build_region(shape, device, seed, dtype)
        self.seed = seed
        self.device = device
        self._fns: dict[str, Callable[[Tensor], Tensor] | BaseException] = {}

    def fn(self, name: str) -> Callable[[Tensor], Tensor]:
        if name not in self._fns:
            try:
                self._fns[name] = build_provider(name, self.region)
            except Exception as exc:  # remembered, so each M reports it without rebuilding
                self._fns[name] = exc
        built = self._fns[name]
        if isinstance(built, BaseException):
            raise built
        return built

    def input(self, m: int, salt: int) -> Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1000003 + m * 17 + salt)
        shape = (1, m, self.shape.hidden)
        return torch.randn(shape, generator=gen, device=self.device, dtype=self.region.dtype)


def run_block(
    run: ShapeRun,
    m: int,
    providers: Sequence[str],
    *,
    plan: TimingPlan,
    budget: Budget,
    numerics: bool,
    copy_bw: float | None,
    mm_rate: float | None,
) -> list[dict]:
    """Every provider at one (shape, M): compile, capture, check numerics, time interleaved.
    On the CPU (--cpu-smoke) the calls themselves are timed, by wall clock, instead of graphs."""
    x = run.input(m, salt=0)
    elem_bytes = x.element_size()
    records = {p: base_record(run.shape, m, p, copy_bw, mm_rate, elem_bytes) for p in providers}
    graphs: dict[str, Any] = {}  # CUDA graphs, or the callables themselves on the CPU
    for name in providers:
        rec = records[name]
        reason = budget.skip_reason(name)
        if reason is not None:
            rec.update(status="skipped", error=reason)
            continue
        try:
            fn = run.fn(name)
            rec["compile_s"] = first_call(name, fn, x)
            if name == "ours":
                rec["fused"], rec["variant"] = check_fused(
                    run.region.kind.family, expected_regions(x, run.region)
                )
            graphs[name] = capture(fn, x, plan.calls_per_graph) if x.is_cuda else fn
            rec.update(status="ok", calls_per_graph=plan.calls_per_graph)
        except Skipped as exc:
            rec.update(status="skipped", error=str(exc))
        except Exception as exc:
            rec.update(status="failed", error=error_text(exc))
            log(f"    {name} failed: {rec['error']}")
            recover()
    if numerics:
        check_numerics(run, m, providers, records)
    if graphs:
        samples = time_graphs(graphs, plan) if x.is_cuda else time_calls(graphs, x, plan)
        for name, rounds in samples.items():
            records[name].update(summarize(rounds))
    del graphs
    recover()
    return [records[p] for p in providers]


def check_numerics(run: ShapeRun, m: int, providers: Sequence[str], records: dict) -> None:
    """Relative L2 error vs fp32 of every provider that runs, on a fresh input."""
    x = run.input(m, salt=1)
    ref = reference(run.region, x)
    for name in providers:
        rec = records[name]
        if rec["status"] != "ok":
            continue
        try:
            rec["rel_err"] = rel_l2(run.fn(name)(x), ref)
        except Exception as exc:
            rec.update(status="failed", error="numerics: " + error_text(exc))
            recover()
    eager_err = records.get("eager", {}).get("rel_err")
    for name in providers:
        err = records[name].get("rel_err")
        if err is None:
            continue
        if eager_err is None:
            continue
        records[name]["err_vs_eager"] = err / eager_err if eager_err > 0 else float("inf")
        if name in ("ours", "ours_op"):
            # Our rule: at most twice the error of same-dtype eager (NaN fails).
            records[name]["tol_ok"] = err <= 2 * eager_err


# --- data out --------------------------------------------------------------------------------------


def environment(cuda: bool = True) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or '?'})",
        "sm_count": getattr(props, "multi_processor_count", None),
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "transformers": dist_version("transformers"),
        "liger_kernel": dist_version("liger-kernel"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def write_data(out_dir: Path, meta: dict, records: list[dict]) -> None:
    """results.json and results.csv, each written whole and renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "records": finite_records(records)}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(out_dir / "results.json")
    tmp = out_dir / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data["records"])
    tmp.replace(out_dir / "results.csv")


def finite_records(records: Iterable[dict]) -> list[dict]:
    """JSON has no NaN or Inf: such a value (a NaN error, say) is written as the string 'nan'."""
    return [
        {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
        for rec in records
    ]


# --- CLI ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time h + mlp(norm(h)) of each family kind (bf16, CUDA graphs) for eager, "
        "Liger, torch.compile, max-autotune, our backend and our op; write JSON/CSV, then MD/PNG.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--shapes",
        help=f"[kind:]HxI list, kind one of {', '.join(KINDS)}, bare HxI is llama "
        f"(default {DEFAULT_SHAPES})",
    )
    parser.add_argument("--tokens", help=f"M list (default {DEFAULT_TOKENS})")
    parser.add_argument("--providers", help="subset of " + ",".join(PROVIDERS) + " (default all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shapes {QUICK_SHAPES}, M {QUICK_TOKENS} (unless given), fewer repeats",
    )
    parser.add_argument(
        "--tp",
        action="store_true",
        help=f"one rank's region under tensor parallelism: shapes {TP_SHAPES} (unless given)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help=f"check the script on the CPU: fp32, shapes {SMOKE_SHAPES}, M {SMOKE_TOKENS}, "
        f"providers {SMOKE_PROVIDERS} (unless given), a few wall-clock-timed calls, no floor",
    )
    parser.add_argument("--calls-per-graph", type=int, default=20)
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; quick 2)")
    parser.add_argument("--replays", type=int, help="timed replays per round (default 6; quick 3)")
    parser.add_argument(
        "--numerics-m",
        type=int,
        default=NUMERICS_M,
        help="M of the numerics check (default 64; the nearest swept M is used)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=330.0,
        help="seconds; past 60%% max_autotune is skipped, past 100%% everything left is (0: none)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier results.json: its records for (shape, M) cells this run does not measure "
        "are kept (each record keeps the floor of its own run), so one sweep can span calls",
    )
    parser.add_argument(
        "--fuse-every-m",
        action="store_true",
        help="issue #27's measurement: compiled graphs fuse at every M on CUDA (the token bound "
        "lifted), to time our kernels where the product leaves the region to Inductor",
    )
    parser.add_argument(
        "--lowered-tma",
        action="store_true",
        help="compiled graphs launch the TMA kernels for M > 64 (launch_config.LOWERED_TMA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = "smoke" if args.cpu_smoke else "quick" if args.quick else "default"
    shapes_text = args.shapes or {
        "smoke": SMOKE_SHAPES, "quick": QUICK_SHAPES, "default": DEFAULT_SHAPES
    }[preset]  # fmt: skip
    if args.tp and not args.shapes:
        shapes_text = TP_SHAPES
    tokens_text = args.tokens or {
        "smoke": SMOKE_TOKENS, "quick": QUICK_TOKENS, "default": DEFAULT_TOKENS
    }[preset]  # fmt: skip
    try:
        args.shapes = [Shape.parse(s) for s in csv_list(shapes_text)]
        args.tokens = [int(m) for m in csv_list(tokens_text)]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if any(m < 1 for m in args.tokens):
        parser.error("every M must be >= 1")
    if min(args.calls_per_graph, args.rounds or 1, args.replays or 1) < 1:
        parser.error("--calls-per-graph, --rounds and --replays must be >= 1")
    args.providers = csv_list(
        args.providers or (SMOKE_PROVIDERS if args.cpu_smoke else ",".join(PROVIDERS))
    )
    unknown = sorted(set(args.providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
    short = args.quick or args.cpu_smoke
    args.plan = TimingPlan(
        calls_per_graph=2 if args.cpu_smoke else args.calls_per_graph,
        rounds=args.rounds or (2 if short else 5),
        replays_per_round=args.replays or (3 if short else 6),
    )
    return args


def experiment(fuse_every_m: bool, lowered_tma: bool) -> None:
    """The launch settings issue #27 measures, set before anything compiles (both are read when a
    graph is traced)."""
    from inductor_fusion.triton_kernels import _rmsnorm_mlp_tuned, launch_config

    if fuse_every_m:
        launch_config.MAX_PROFITABLE_TOKENS = 1 << 62
        _rmsnorm_mlp_tuned.PROFITABLE_TOKENS.clear()
    launch_config.LOWERED_TMA = lowered_tma


def numerics_m(tokens: Sequence[int], wanted: int) -> int:
    """The swept M closest to ``wanted`` (ties: the smaller)."""
    return min(tokens, key=lambda m: (abs(math.log2(m) - math.log2(wanted)), m))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        log("bench.py times CUDA graphs: no CUDA device here (--cpu-smoke checks the script).")
        return 2
    device, dtype = ("cuda", DTYPE) if cuda else ("cpu", torch.float32)
    configure_compiler()
    experiment(args.fuse_every_m, args.lowered_tma)
    budget = Budget(args.time_budget)
    out_dir: Path = args.out
    plan: TimingPlan = args.plan
    m_num = numerics_m(args.tokens, args.numerics_m)

    meta = environment(cuda)
    log(
        f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  transformers "
        f"{meta['transformers']}  liger {meta['liger_kernel']}  CUDA {meta['cuda']}"
    )
    copy_bytes = (1 if args.quick else 2) << 30
    copy_bw = mm_rate = None
    if cuda:
        copy_bw = measure_copy_bw(copy_bytes, reps=5 if args.quick else 10)
        mm_rate = measure_mm_rate(8192, reps=5 if args.quick else 10)
        torch.cuda.empty_cache()
        log(f"copy {copy_bw / 1e12:.2f} TB/s (read + write), bf16 mm {mm_rate / 1e12:.0f} TFLOP/s")
    kinds = {s.kind: KINDS[s.kind] for s in args.shapes}
    meta.update(
        benchmark="out = h + mlp(norm(h)), per kind (see kinds)",
        kinds={
            name: {"family": k.family, "region": k.text, "weight_matrices": k.matrices}
            for name, k in kinds.items()
        },
        dtype=str(dtype).removeprefix("torch."),
        input_shape="[1, M, H]",
        init=f"linear weights and MLP biases N(0, {INIT_STD}), norm multiplier (w + offset) "
        "N(1, 0.1), norm bias N(0, 0.1), h N(0, 1)",
        copy_bw=copy_bw,
        copy_bytes=copy_bytes,
        mm_rate=mm_rate,
        mm_n=8192,
        timing=dataclasses.asdict(plan),
        numerics_m=m_num,
        quick=args.quick,
        cpu_smoke=args.cpu_smoke,
        shapes=[s.key for s in args.shapes],
        tokens=args.tokens,
        providers=args.providers,
        time_budget_s=args.time_budget,
        notes=[
            "median/p10/p90 over all timed replays; spread = range of per-round medians / median",
            "every call reads the same h; the weights exceed L2 and stream from HBM every call",
            "floor = max(bytes / copy_bw, flops / mm_rate), bytes = (W*H*I + MLP biases + "
            "2*M*H)*2, flops = 2*W*M*H*I, W = 3 weight matrices (gated) or 2 (not gated)",
            "ours fuses up to the profitability limit of 64 tokens on CUDA; above it the "
            "region is Inductor's own code on purpose (records: fused = 0), unless fuse_every_m",
        ],
        fuse_every_m=args.fuse_every_m,
        lowered_tma=args.lowered_tma,
    )
    records: list[dict] = []
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        planned = {(shape.key, m) for shape in args.shapes for m in args.tokens}
        records = [r for r in earlier["records"] if (r["shape"], r["m"]) not in planned]
        previous = earlier["meta"]
        meta["merged_from"] = [
            *previous.get("merged_from", []),
            {k: previous.get(k) for k in ("date", "commit", "gpu", "copy_bw", "mm_rate", "shapes")},
        ]
        meta["shapes"] = sorted({r["shape"] for r in records} | set(meta["shapes"]))
        meta["kinds"] = {**previous.get("kinds", {}), **meta["kinds"]}
        log(f"kept {len(records)} records of {args.merge}")
    write_data(out_dir, meta, records)

    with torch.no_grad():
        for shape in args.shapes:
            log(f"== {shape.key} ({budget.elapsed():.0f} s)")
            try:
                run = ShapeRun(shape, args.seed, device, dtype)
            except Exception as exc:
                error = "building the HF modules: " + error_text(exc)
                log(f"  {error}")
                for m in args.tokens:
                    for p in args.providers:
                        rec = base_record(shape, m, p, copy_bw, mm_rate, dtype.itemsize)
                        rec.update(status="failed", error=error)
                        records.append(rec)
                write_data(out_dir, meta, records)
                recover()
                continue
            for m in args.tokens:
                block = run_block(
                    run,
                    m,
                    args.providers,
                    plan=plan,
                    budget=budget,
                    numerics=(m == m_num),
                    copy_bw=copy_bw,
                    mm_rate=mm_rate,
                )
                records.extend(block)
                log(_block_line(shape, m, block, budget.elapsed()))
                meta["elapsed_s"] = budget.elapsed()
                write_data(out_dir, meta, records)
            del run
            torch._dynamo.reset()
            recover()

    meta["elapsed_s"] = budget.elapsed()
    write_data(out_dir, meta, records)
    data = {"meta": meta, "records": finite_records(records)}
    try:
        written = report.write_report(data, out_dir)
        log("wrote " + ", ".join(str(p) for p in [out_dir / "results.json", *written]))
    except Exception as exc:
        log(f"report failed ({error_text(exc)}); the data is in {out_dir / 'results.json'}")
    log("")
    log(report.text_table(data))
    log(f"total {budget.elapsed():.0f} s")
    failed = [r for r in records if r["status"] == "failed"]
    if args.cpu_smoke and failed:
        log(f"cpu smoke: {len(failed)} failed record(s), e.g. {failed[0]['shape']} "
            f"{failed[0]['provider']}: {failed[0]['error']}")  # fmt: skip
        return 1
    return 0


def _block_line(shape: Shape, m: int, block: list[dict], elapsed: float) -> str:
    parts = []
    for rec in block:
        if rec["status"] == "ok" and rec.get("median_us") is not None:
            text = f"{rec['provider']} {rec['median_us']:.1f}"
            if rec.get("compile_s") is not None and rec["compile_s"] > 1:
                text += f" ({rec['compile_s']:.0f}s)"
        else:
            text = f"{rec['provider']} {rec['status']}"
        parts.append(text)
    floor = block[0]["floor_us"] if block else None
    floor_text = "-" if floor is None else f"{floor:.1f}"
    return f"  [{elapsed:4.0f} s] {shape.key} M={m:<5} floor {floor_text} | " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
