"""Benchmark of the Llama post-attention region ``out = h + mlp(rmsnorm(h))`` in bf16 on CUDA.

The region is built from the real Hugging Face modules (``LlamaRMSNorm`` + ``LlamaMLP``) with
random weights, and run by six providers:

    eager         the HF modules as they are
    liger         Liger-Kernel's LigerRMSNorm + LigerSwiGLUMLP on the same weights
    compile       torch.compile, default mode
    max_autotune  torch.compile, mode="max-autotune-no-cudagraphs"
    ours          torch.compile with our backend; must have fused exactly one region
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

Floor. bytes = weights (3*H*I*2) + h in + out (2*M*H*2): perfect fusion, the intermediate never
leaves the chip. flops = 6*M*H*I. floor = max(bytes / copy bandwidth, flops / matmul rate), both
ceilings measured in this run: a 2 GiB device-to-device copy (bytes read + written) and an
8192^3 bf16 torch.mm on random data, medians.

Numerics. At one M per shape every provider's output is compared with an fp32 reference (the same
weights upcast, TF32 off) by relative L2 error; our rule is ours <= 2 x eager's error.

Time. Compiling is the slow part (max-autotune autotunes two GEMM shapes per M). Each provider is
compiled once per (shape, M) with static shapes. ``--time-budget`` (default 330 s) bounds the sweep:
past 60% of it max_autotune is skipped, past all of it every remaining provider is; skipped cells
are recorded as such.

Output. Data first: ``results.json`` (records + metadata, rewritten after every (shape, M) so a
killed run keeps what it measured) and ``results.csv``; then ``report.py`` turns the JSON into
``results.md`` and ``results.png``. A short table is printed last.

    python perf/bench.py --out perf/results                      # full sweep
    python perf/bench.py --out /tmp/b --quick                    # smoke test
    python perf/bench.py --out /tmp/b --shapes 4096x14336 --tokens 1,256 --providers eager,ours
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
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

DEFAULT_SHAPES = "2048x8192,4096x14336,3072x8192"
DEFAULT_TOKENS = "1,4,16,64,256,1024,4096"
QUICK_SHAPES = "2048x8192"
QUICK_TOKENS = "1,64,1024"
NUMERICS_M = 64

FUSED_PATTERN = "rmsnorm_mlp"

CSV_FIELDS = (
    "shape",
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
class Shape:
    hidden: int
    inter: int

    @property
    def key(self) -> str:
        return f"{self.hidden}x{self.inter}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        try:
            hidden, inter = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"shape {text!r} is not HxI, e.g. 4096x14336"
            ) from None
        if hidden < 1 or inter < 1:
            raise argparse.ArgumentTypeError(f"shape {text!r} must be positive")
        return cls(hidden, inter)


@dataclasses.dataclass(frozen=True)
class TimingPlan:
    calls_per_graph: int = 20  # calls captured in one CUDA graph
    rounds: int = 5  # interleaved rounds over all providers
    replays_per_round: int = 6  # timed replays of one provider per round (one sample each)


def region_bytes(hidden: int, inter: int, m: int, elem_bytes: int = ELEM_BYTES) -> int:
    """Fewest bytes the region must move: each weight once, h in, out once."""
    return 3 * hidden * inter * elem_bytes + 2 * m * hidden * elem_bytes


def region_flops(hidden: int, inter: int, m: int) -> int:
    """Matrix flops: gate, up and down GEMMs (the norm and activation are negligible)."""
    return 2 * m * hidden * inter * 3


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
    """The HF modules of one shape, bf16, random weights, no grad."""

    shape: Shape
    config: Any  # LlamaConfig
    norm: torch.nn.Module  # LlamaRMSNorm
    mlp: torch.nn.Module  # LlamaMLP

    @property
    def eps(self) -> float:
        return float(self.norm.variance_epsilon)


def build_region(shape: Shape, device: torch.device | str, seed: int) -> Region:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.inter,
        hidden_act="silu",
        mlp_bias=False,
        rms_norm_eps=EPS,
    )
    with torch.device(device):
        norm = LlamaRMSNorm(shape.hidden, eps=config.rms_norm_eps).to(DTYPE)
        mlp = LlamaMLP(config).to(DTYPE)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        # HF initialises the norm weight to ones; a spread around one exercises the multiply.
        norm.weight.normal_(1.0, 0.1, generator=gen)
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.normal_(0.0, INIT_STD, generator=gen)
    for module in (norm, mlp):
        module.eval().requires_grad_(False)
    return Region(shape=shape, config=config, norm=norm, mlp=mlp)


def region_function(norm: torch.nn.Module, mlp: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The region as HF's decoder layer writes it after attention."""

    def region(h: Tensor) -> Tensor:
        return h + mlp(norm(h))

    return region


class Skipped(Exception):
    """A provider that cannot run here (not an error of the provider)."""


class NotFused(Exception):
    """Our backend compiled the region without fusing it: timing it would time something else."""


def _liger_modules(region: Region) -> tuple[torch.nn.Module, torch.nn.Module]:
    try:
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
    except ImportError as exc:
        raise Skipped(f"liger_kernel not importable ({exc})") from exc
    # Built on the meta device, then given the HF tensors: same weights, no second copy.
    with torch.device("meta"):
        norm = LigerRMSNorm(region.shape.hidden, eps=region.eps)
        mlp = LigerSwiGLUMLP(region.config)
    norm.weight = region.norm.weight
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).weight = getattr(region.mlp, name).weight
    return norm.eval(), mlp.eval()


def build_provider(name: str, region: Region) -> Callable[[Tensor], Tensor]:
    """A callable ``h -> out`` for ``name``; compiled providers compile on their first call.

    ``dynamic=False``: every M gets its own static-shape compile, as a serving engine that
    compiles per batch size does; automatic dynamic shapes would make the second M symbolic.
    """
    eager = region_function(region.norm, region.mlp)
    if name == "eager":
        return eager
    if name == "liger":
        return region_function(*_liger_modules(region))
    if name == "compile":
        return torch.compile(eager, dynamic=False)
    if name == "max_autotune":
        return torch.compile(eager, mode="max-autotune-no-cudagraphs", dynamic=False)
    if name == "ours":
        import inductor_fusion

        return torch.compile(eager, backend=inductor_fusion.backend(), dynamic=False)
    if name == "ours_op":
        import inductor_fusion.triton_kernels.rmsnorm_mlp  # registers the op

        op = torch.ops.inductor_fusion.rmsnorm_mlp.default
        weights = (
            region.norm.weight,
            region.mlp.gate_proj.weight,
            region.mlp.up_proj.weight,
            region.mlp.down_proj.weight,
        )
        eps = region.eps

        def fused(h: Tensor) -> Tensor:
            return op(h, *weights, None, None, None, h, eps)

        return fused
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


def check_fused() -> None:
    """After the first call of ``ours``: exactly one region fused since the last reset."""
    import inductor_fusion

    report_ = inductor_fusion.get_report()
    fused, total = report_.count(FUSED_PATTERN), len(report_)
    if fused != 1 or total != 1:
        raise NotFused(
            f"inductor_fusion fused {fused} {FUSED_PATTERN} region(s) ({total} in all), "
            f"expected exactly 1; report: {report_.summary()}"
        )


def first_call(name: str, fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Runs the call that compiles (and autotunes); returns its wall time in seconds."""
    if name == "ours":
        import inductor_fusion

        inductor_fusion.reset_report()
    synchronize(x.device)
    start = time.perf_counter()
    fn(x)
    synchronize(x.device)
    seconds = time.perf_counter() - start
    if name == "ours":
        check_fused()
    return seconds


def reference_fp32(region: Region, x: Tensor) -> Tensor:
    """The region in fp32 on upcast weights, TF32 off: the truth every provider is scored on."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + region.eps)
        n = n * region.norm.weight.float()
        gate = n @ region.mlp.gate_proj.weight.float().T
        up = n @ region.mlp.up_proj.weight.float().T
        return x32 + (F.silu(gate) * up) @ region.mlp.down_proj.weight.float().T
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


def time_graphs(
    graphs: dict[str, torch.cuda.CUDAGraph], plan: TimingPlan
) -> dict[str, list[list[float]]]:
    """µs per call: for each provider, one list of samples per round."""
    names = list(graphs)
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(plan.rounds):
        shift = r % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            graph = graphs[name]
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
            samples[name].append(
                [start.elapsed_time(end) * 1e3 / plan.calls_per_graph for start, end in events]
            )
    return samples


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


def base_record(shape: Shape, m: int, provider: str, copy_bw: float, mm_rate: float) -> dict:
    nbytes = region_bytes(shape.hidden, shape.inter, m)
    flops = region_flops(shape.hidden, shape.inter, m)
    floor, bound = floor_us(nbytes, flops, copy_bw, mm_rate)
    record: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
    record.update(
        shape=shape.key,
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

    def __init__(self, shape: Shape, seed: int) -> None:
        self.shape = shape
        self.region = build_region(shape, "cuda", seed)
        self.seed = seed
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
        gen = torch.Generator(device="cuda").manual_seed(self.seed * 1000003 + m * 17 + salt)
        return torch.randn((1, m, self.shape.hidden), generator=gen, device="cuda", dtype=DTYPE)


def run_block(
    run: ShapeRun,
    m: int,
    providers: Sequence[str],
    *,
    plan: TimingPlan,
    budget: Budget,
    numerics: bool,
    copy_bw: float,
    mm_rate: float,
) -> list[dict]:
    """Every provider at one (shape, M): compile, capture, check numerics, time interleaved."""
    x = run.input(m, salt=0)
    records = {p: base_record(run.shape, m, p, copy_bw, mm_rate) for p in providers}
    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    for name in providers:
        rec = records[name]
        reason = budget.skip_reason(name)
        if reason is not None:
            rec.update(status="skipped", error=reason)
            continue
        try:
            fn = run.fn(name)
            rec["compile_s"] = first_call(name, fn, x)
            graphs[name] = capture(fn, x, plan.calls_per_graph)
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
        samples = time_graphs(graphs, plan)
        for name, rounds in samples.items():
            records[name].update(summarize(rounds))
    del graphs
    recover()
    return [records[p] for p in providers]


def check_numerics(run: ShapeRun, m: int, providers: Sequence[str], records: dict) -> None:
    """Relative L2 error vs fp32 of every provider that runs, on a fresh input."""
    x = run.input(m, salt=1)
    ref = reference_fp32(run.region, x)
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


def environment() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
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
        description="Time h + mlp(rmsnorm(h)) (bf16, CUDA graphs) for eager, Liger, "
        "torch.compile, max-autotune, our backend and our op; write JSON/CSV, then MD/PNG.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--shapes", help=f"HxI list (default {DEFAULT_SHAPES})")
    parser.add_argument("--tokens", help=f"M list (default {DEFAULT_TOKENS})")
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="subset of " + ",".join(PROVIDERS)
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shapes {QUICK_SHAPES}, M {QUICK_TOKENS} (unless given), fewer repeats",
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes_text = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    tokens_text = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    try:
        args.shapes = [Shape.parse(s) for s in csv_list(shapes_text)]
        args.tokens = [int(m) for m in csv_list(tokens_text)]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if any(m < 1 for m in args.tokens):
        parser.error("every M must be >= 1")
    if min(args.calls_per_graph, args.rounds or 1, args.replays or 1) < 1:
        parser.error("--calls-per-graph, --rounds and --replays must be >= 1")
    args.providers = csv_list(args.providers)
    unknown = sorted(set(args.providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
    args.plan = TimingPlan(
        calls_per_graph=args.calls_per_graph,
        rounds=args.rounds or (2 if args.quick else 5),
        replays_per_round=args.replays or (3 if args.quick else 6),
    )
    return args


def numerics_m(tokens: Sequence[int], wanted: int) -> int:
    """The swept M closest to ``wanted`` (ties: the smaller)."""
    return min(tokens, key=lambda m: (abs(math.log2(m) - math.log2(wanted)), m))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log("bench.py times CUDA graphs: no CUDA device here.")
        return 2
    configure_compiler()
    budget = Budget(args.time_budget)
    out_dir: Path = args.out
    plan: TimingPlan = args.plan
    m_num = numerics_m(args.tokens, args.numerics_m)

    meta = environment()
    log(
        f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  transformers "
        f"{meta['transformers']}  liger {meta['liger_kernel']}  CUDA {meta['cuda']}"
    )
    copy_bytes = (1 if args.quick else 2) << 30
    copy_bw = measure_copy_bw(copy_bytes, reps=5 if args.quick else 10)
    mm_rate = measure_mm_rate(8192, reps=5 if args.quick else 10)
    torch.cuda.empty_cache()
    log(f"copy {copy_bw / 1e12:.2f} TB/s (read + write), bf16 mm {mm_rate / 1e12:.0f} TFLOP/s")
    meta.update(
        benchmark="out = h + LlamaMLP(LlamaRMSNorm(h))",
        dtype="bfloat16",
        input_shape="[1, M, H]",
        init=f"linear weights N(0, {INIT_STD}), norm weight N(1, 0.1), h N(0, 1)",
        copy_bw=copy_bw,
        copy_bytes=copy_bytes,
        mm_rate=mm_rate,
        mm_n=8192,
        timing=dataclasses.asdict(plan),
        numerics_m=m_num,
        quick=args.quick,
        shapes=[s.key for s in args.shapes],
        tokens=args.tokens,
        providers=args.providers,
        time_budget_s=args.time_budget,
        notes=[
            "median/p10/p90 over all timed replays; spread = range of per-round medians / median",
            "every call reads the same h; the weights exceed L2 and stream from HBM every call",
            "floor = max(bytes / copy_bw, flops / mm_rate), bytes = 3*H*I*2 + 2*M*H*2",
        ],
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
        log(f"kept {len(records)} records of {args.merge}")
    write_data(out_dir, meta, records)

    with torch.no_grad():
        for shape in args.shapes:
            log(f"== {shape.key} ({budget.elapsed():.0f} s)")
            try:
                run = ShapeRun(shape, args.seed)
            except Exception as exc:
                error = "building the HF modules: " + error_text(exc)
                log(f"  {error}")
                for m in args.tokens:
                    for p in args.providers:
                        rec = base_record(shape, m, p, copy_bw, mm_rate)
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
    floor = block[0]["floor_us"] if block else float("nan")
    return f"  [{elapsed:4.0f} s] {shape.key} M={m:<5} floor {floor:.1f} | " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
