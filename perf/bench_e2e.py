"""End-to-end benchmark: ``model.generate()`` with our backend vs default Inductor and eager.

The issue: generate() with our backend must work with the static cache and CUDA graphs, compile
no more graphs than ``backend="inductor"`` (no recompiles once warm) and decode faster than
default Inductor. This script measures exactly that on random-init bf16 models built from configs
(no download) shaped like Llama-3.2-1B and Llama-3-8B:

    eager     model.generate(..., cache_implementation="static", disable_compile=True)
    inductor  ... compile_config=CompileConfig(backend="inductor", mode=M)
    ours      ... compile_config=CompileConfig(backend="inductor_fusion", mode=M)

M is transformers' own CompileConfig default (``"reduce-overhead"``, i.e. CUDA graphs, in 5.17
and 5.24; read from the dataclass at run time and recorded), the same for both compiled providers.
transformers compiles only the decode step (the prompt's forward, "prefill", runs eagerly inside
generate for every provider) and allocates a new StaticCache for every call; the cache is marked
static, so a call re-records the CUDA graph of the decode step (no Dynamo recompile). That cost is
part of what a user of generate() sees, and is in the numbers below.

Phases, per model (providers in priority order ours, inductor, eager, so a short budget drops
eager first; Dynamo and CUDA-graph state are reset before every provider):

1. decode: for each batch B (prompt of P random tokens, N new tokens, greedy, EOS disabled so
   every call makes N tokens): one full generate as warm-up (compiles, records), then K rounds of
   three timed calls, each between device synchronizations: generate(N), generate(1) and
   generate(N/2). generate(1) is prefill + setup + one sampled token, no decode step, so
   ``step_ms = (t(N) - t(1)) / (N - 1)`` (generate(N) runs N - 1 decode steps: the first token
   comes from the prefill); it includes the per-call CUDA-graph re-record, amortised.
   ``steady_step_ms = (t(N) - t(N/2)) / (N - N/2)`` excludes that and the first steps.
   ``tok_s = B * N / t(N)`` is what a user of generate() gets. Medians over the K rounds.
   Dynamo graphs compiled during the warm-up and during the timed calls (must be 0: "no
   recompiles") are counted from ``torch._dynamo.utils.counters``, with graph breaks, CUDA-graph
   skips and Dynamo's recompile reasons; ``inductor_fusion.get_report()`` (reset per provider)
   counts the regions our pass fused. ``--profile`` adds a torch.profiler trace of a short
   generate for the compiled providers: GPU kernel time vs step time, launches per step.
2. prefill: one forward of [1, S] tokens (``use_cache=False, logits_to_keep=1``) through
   ``torch.compile(model, backend=..., mode=M, dynamic=False)`` (eager: the model itself), timed
   with CUDA events after three warm-up calls (compile, CUDA-graph warm-up and record); median
   of ``--prefill-reps``.
3. numerics: first-token logits (prefill path, compiled as in 2, at the first S) of every
   provider on two prompts, and the logits of the first compiled decode step of generate on
   ``--numerics-prompts`` prompts, vs a reference model holding the same weights upcast (fp32,
   TF32 off; fp64 when the model itself is fp32), by relative L2; greedy-token agreement of the
   generate outputs, ours vs inductor and vs eager.

Data first: ``results.json`` (metadata + records) and ``results.csv`` are rewritten after every
measurement, so a killed run keeps what it measured; then ``report_e2e.py`` writes
``results.md`` and ``results.png``. A short table is printed last.

    python perf/bench_e2e.py --out /tmp/e2e --quick                 # llama-1b, B 1,16, 32 tokens
    python perf/bench_e2e.py --out /tmp/e2e --models llama-8b --batches 1,64 --profile
    python perf/bench_e2e.py --out /tmp/e2e --cpu-smoke             # tiny fp32 model on the CPU

Time (estimates before the first GPU run, H100; compiling dominates: each compiled provider
compiles 2 decode graphs (batch 1 static, then a symbolic batch that serves 16 and 64) and one
prefill graph per length, roughly 30 s each for llama-1b and 50 s for llama-8b): ``--quick``
~4 min; ``--models llama-1b`` ~6 min; ``--models llama-8b`` ~10 min, so split it
(``--phases decode,numerics``, then ``--phases prefill``). The default sweep of both models does
not fit one 9-minute call: ``--time-budget`` (default 450 s, counted from the start) skips every
step whose estimate (the same step's last duration, scaled by model size) no longer fits, and a
skipped step is recorded as such.

``--cpu-smoke`` runs a tiny fp32 model on the CPU (no CUDA graphs: mode None, and
``compile_config._compile_all_devices = True``, without which generate() does not compile on
the CPU): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import report_e2e
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

OURS_BACKEND = "inductor_fusion"
FUSED_PATTERN = "rmsnorm_mlp"
ATTENTION_PATTERN = "gqa_decode"  # counted apart: one region per layer's attention
PROVIDERS = ("eager", "inductor", "ours")  # display order
PRIORITY = ("ours", "inductor", "eager")  # run order: a short budget drops the last first
BACKENDS = {"inductor": "inductor", "ours": OURS_BACKEND}
PHASES = ("decode", "prefill", "numerics")
INIT_STD = 0.02

DEFAULT_MODELS = "llama-1b,llama-8b"
DEFAULT_BATCHES = "1,16,64"
DEFAULT_PREFILL = "512,2048"
QUICK = {"models": "llama-1b", "batches": "1,16", "new_tokens": 32, "prefill": "512"}
SMOKE = {
    "models": "tiny",
    "batches": "1,2",
    "new_tokens": 8,
    "prefill": "16",
    "prompt": 8,
    "reps": 2,
    "prefill_reps": 3,
    "numerics_prompts": 2,
}
NUMERICS_PREFILL_PROMPTS = 2

CSV_FIELDS = (
    "kind",
    "model",
    "provider",
    "status",
    "batch",
    "prompt",
    "new_tokens",
    "seq",
    "tok_s",
    "step_ms",
    "steady_step_ms",
    "gen_s",
    "first_s",
    "half_s",
    "half_tokens",
    "spread_pct",
    "warmup_s",
    "graphs_warmup",
    "graphs_timed",
    "graph_breaks",
    "cudagraph_skips",
    "fused_regions",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "compile_s",
    "graphs",
    "prof_step_ms",
    "prof_gpu_period_ms",
    "prof_gpu_busy_ms",
    "prof_idle_pct",
    "prof_graph_launches_per_step",
    "prof_kernel_launches_per_step",
    "prof_kernels_per_step",
    "first_logits_rel_l2",
    "first_logits_vs_inductor",
    "decode1_rel_l2",
    "decode1_vs_inductor",
    "tokens_agree_inductor",
    "tokens_agree_eager",
    "prefix_agree_inductor",
    "within_2x_eager",
    "decode_graphs",
    "decode_graphs_after_warmup",
    "decode_fused",
    "decode_fused_attention",
    "prefill_graphs",
    "prefill_fused",
    "error",
)


# --- models ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie: bool
    max_pos: int
    rope: dict[str, Any]

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.inter,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tie,
            max_position_embeddings=self.max_pos,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            rope_parameters=dict(self.rope),
            bos_token_id=1,
            eos_token_id=2,
        )

    def params(self) -> int:
        """Parameter count (tied embeddings once)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.inter
        per_layer = attn + mlp + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tie else 2)
        return self.layers * per_layer + embed + self.hidden


LLAMA3_ROPE_1B = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
MODELS = {
    "llama-1b": ModelSpec(
        "llama-1b", "Llama-3.2-1B", 2048, 8192, 16, 32, 8, 64, 128256, True, 131072, LLAMA3_ROPE_1B
    ),
    "llama-8b": ModelSpec(
        "llama-8b",
        "Llama-3-8B",
        4096,
        14336,
        32,
        32,
        8,
        128,
        128256,
        False,
        8192,
        {"rope_type": "default", "rope_theta": 500000.0},
    ),
    "tiny": ModelSpec(
        "tiny", "tiny Llama", 64, 160, 2, 4, 2, 16, 128, False, 256, {"rope_type": "default"}
    ),
}


def _rebuild_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Rotary modules hold non-persistent fp32 buffers (inv_freq) that ``to_empty`` leaves
    uninitialised and a dtype cast would round: build them anew, as construction does."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):
                fresh = type(module)(module.config)
            setattr(parent, attr, fresh.to(device))


def empty_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with uninitialised weights of ``dtype`` on ``device`` (built on meta: fast)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(spec.config())
    model = model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage
    _rebuild_rotary(model, device)
    model.generation_config.eos_token_id = None  # every call makes exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def build_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int
) -> torch.nn.Module:
    """Random init: linear and embedding weights N(0, 0.02), norm weights 1 (HF's init)."""
    model = empty_model(spec, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=gen)
    if spec.tie and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("tied embeddings came apart")
    return model


def reference_model(spec: ModelSpec, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` (weights upcast), built without a second bf16 copy."""
    device = next(model.parameters()).device
    ref = empty_model(spec, device, dtype)
    with torch.no_grad():
        ours = dict(model.named_parameters())
        for name, param in ref.named_parameters():
            param.copy_(ours[name])
    return ref


class Skipped(Exception):
    """A step left out (time budget): recorded as skipped, not failed."""


def token_ids(batch: int, seq: int, vocab: int, seed: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


# --- compiler state and counters -----------------------------------------------------------------------


def ensure_backend_registered() -> str:
    """``backend="inductor_fusion"`` resolves through the package's entry point; register it by
    hand if the package is importable but not installed (source tree on PYTHONPATH)."""
    import inductor_fusion

    if OURS_BACKEND in torch._dynamo.list_backends(exclude_tags=()):
        return "entry point"
    torch._dynamo.register_backend(
        compiler_fn=inductor_fusion.inductor_fusion_backend, name=OURS_BACKEND
    )
    return "registered by bench_e2e.py"


class RecompileLog(logging.Handler):
    """Collects Dynamo's recompile reasons (the ``recompiles`` log artifact)."""

    LOGGER = "torch._dynamo.guards.__recompiles"

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(" ".join(record.getMessage().split())[:400])

    def install(self) -> None:
        with contextlib.suppress(Exception):
            torch._logging.set_logs(recompiles=True)
        logging.getLogger(self.LOGGER).addHandler(self)

    def take(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


@dataclasses.dataclass
class Snapshot:
    graphs: int
    graph_breaks: int
    cudagraph_skips: int

    @classmethod
    def now(cls) -> Snapshot:
        from torch._dynamo.utils import counters

        return cls(
            graphs=int(counters["stats"]["unique_graphs"]),
            graph_breaks=int(sum(counters["graph_break"].values())),
            cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]),
        )

    def since(self, before: Snapshot) -> Snapshot:
        return Snapshot(
            self.graphs - before.graphs,
            self.graph_breaks - before.graph_breaks,
            self.cudagraph_skips - before.cudagraph_skips,
        )


def reset_compiler(model: torch.nn.Module | None = None) -> None:
    """Forget every compiled graph and CUDA graph; drop generate()'s cached compiled call."""
    import inductor_fusion

    if model is not None:
        for attr in ("_compiled_call", "_last_compile_config"):
            if attr in model.__dict__:
                delattr(model, attr)
    torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    inductor_fusion.reset_report()
    recover()


def fused_regions(pattern: str = FUSED_PATTERN) -> int:
    import inductor_fusion

    return inductor_fusion.get_report().count(pattern)


# --- settings -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    out: Path
    device: torch.device
    dtype: torch.dtype
    models: list[str]
    batches: list[int]
    prefill: list[int]
    new_tokens: int
    prompt: int
    providers: list[str]
    phases: list[str]
    mode: str | None
    dynamic: bool | None
    reps: int
    prefill_reps: int
    numerics_prompts: int
    profile: bool
    profile_tokens: int
    keep_traces: bool
    time_budget: float
    quick: bool
    cpu_smoke: bool
    seed: int

    @property
    def half_tokens(self) -> int | None:
        half = self.new_tokens // 2
        return half if 2 <= half < self.new_tokens else None

    def run_order(self) -> list[str]:
        # As given: swapping the order shows what the process's history does to the host.
        return list(self.providers)


def transformers_default_mode() -> str | None:
    """The mode transformers' CompileConfig uses when none is given (generate()'s default)."""
    from transformers import CompileConfig

    field = CompileConfig.__dataclass_fields__["mode"]
    return field.default if field.default is not dataclasses.MISSING else CompileConfig().mode


def compile_config(backend: str, settings: Settings):
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=settings.mode, dynamic=settings.dynamic)
    if settings.device.type != "cuda":
        # Not a constructor argument: without it generate() does not compile on the CPU.
        config._compile_all_devices = True
    return config


# --- the budget -------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget from the script's start: a step starts only if its estimate (the last
    duration of the same kind of step of this provider, else the slowest of another provider,
    scaled up by model size) fits in what is left. A step never seen has no estimate."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def estimate(self, kind: str, provider: str, params: int) -> float:
        seen = self._last.get((kind, provider))
        if seen is None:  # another provider's step of the same kind (the slowest), if any
            others = [v for (k, _), v in self._last.items() if k == kind]
            if not others:
                return 0.0
            seen = max(others, key=lambda v: v[0] / max(v[1], 1))
        seconds, seen_params = seen
        return seconds * max(params / max(seen_params, 1), 1.0)

    def skip_reason(self, kind: str, provider: str, params: int) -> str | None:
        if self.seconds <= 0:
            return None
        left = self.seconds - self.elapsed()
        if left <= 0:
            return f"time budget of {self.seconds:.0f} s spent"
        need = self.estimate(kind, provider, params)
        if need > left:
            return f"needs ~{need:.0f} s, {left:.0f} s of the {self.seconds:.0f} s budget left"
        return None

    @contextlib.contextmanager
    def timing(self, kind: str, provider: str, params: int) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self._last[(kind, provider)] = (time.monotonic() - start, params)


# --- data out ----------------------------------------------------------------------------------------


class Results:
    """Records plus metadata; ``save()`` rewrites results.json and results.csv whole."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.meta = meta
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.records.append(record)
        return record

    def data(self) -> dict[str, Any]:
        return {"meta": finite(self.meta), "records": [finite(r) for r in self.records]}

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = self.data()
        tmp = self.out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        tmp.replace(self.out_dir / "results.json")
        tmp = self.out_dir / "results.csv.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(data["records"])
        tmp.replace(self.out_dir / "results.csv")


def finite(value: Any) -> Any:
    """JSON has no NaN or Inf: such a value is written as the string 'nan' / 'inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def environment(settings: Settings) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if settings.device.type == "cuda":
        props = torch.cuda.get_device_properties(settings.device)
        meta.update(
            gpu=torch.cuda.get_device_name(settings.device),
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        meta.update(gpu=f"none (CPU: {platform.processor() or platform.machine()})")
    meta.update(
        torch=torch.__version__,
        triton=dist_version("triton"),
        transformers=dist_version("transformers"),
        inductor_fusion=dist_version("inductor-fusion"),
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
    )
    return meta


# --- decode: generate() -------------------------------------------------------------------------------


class Generator:
    """``model.generate`` for one provider, with the same arguments for every provider."""

    def __init__(self, model: torch.nn.Module, provider: str, settings: Settings) -> None:
        self.model = model
        self.provider = provider
        self.settings = settings
        if provider == "eager":
            self.kwargs: dict[str, Any] = {"disable_compile": True}
        else:
            self.kwargs = {"compile_config": compile_config(BACKENDS[provider], settings)}

    def __call__(self, ids: Tensor, new_tokens: int, **extra: Any) -> Any:
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
            **self.kwargs,
            **extra,
        )
        sequences = out.sequences if hasattr(out, "sequences") else out
        if sequences.shape != (ids.shape[0], ids.shape[1] + new_tokens):
            raise RuntimeError(
                f"generate returned {tuple(sequences.shape)}, expected "
                f"{(ids.shape[0], ids.shape[1] + new_tokens)}"
            )
        return out

    def timed(self, ids: Tensor, new_tokens: int) -> float:
        device = ids.device
        synchronize(device)
        start = time.perf_counter()
        self(ids, new_tokens)
        synchronize(device)
        return time.perf_counter() - start


def decode_record(spec: ModelSpec, provider: str, batch: int, settings: Settings) -> dict:
    record: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
    record.update(
        kind="decode",
        model=spec.key,
        provider=provider,
        status="pending",
        batch=batch,
        prompt=settings.prompt,
        new_tokens=settings.new_tokens,
        half_tokens=settings.half_tokens,
    )
    return record


def run_decode_cell(gen: Generator, ids: Tensor, record: dict, settings: Settings) -> None:
    """Warm-up generate, then K rounds of generate(N), generate(1), generate(N/2)."""
    n, half = settings.new_tokens, settings.half_tokens
    batch = ids.shape[0]
    before = Snapshot.now()
    fused_before = fused_regions()
    record["warmup_s"] = gen.timed(ids, n)
    warm = Snapshot.now()
    record["graphs_warmup"] = warm.since(before).graphs
    full, one, halves = [], [], []
    for _ in range(settings.reps):
        full.append(gen.timed(ids, n))
        one.append(gen.timed(ids, 1))
        if half is not None:
            halves.append(gen.timed(ids, half))
    done = Snapshot.now()
    record["graphs_timed"] = done.since(warm).graphs
    record["graph_breaks"] = done.since(before).graph_breaks
    record["cudagraph_skips"] = done.since(before).cudagraph_skips
    record["fused_regions"] = fused_regions() - fused_before
    gen_s, first_s = statistics.median(full), statistics.median(one)
    record.update(
        status="ok",
        gen_s=gen_s,
        first_s=first_s,
        gen_s_all=full,
        first_s_all=one,
        tok_s=batch * n / gen_s,
        step_ms=(gen_s - first_s) / (n - 1) * 1e3 if n > 1 else None,
        spread_pct=(max(full) - min(full)) / gen_s * 100,
    )
    if halves:
        half_s = statistics.median(halves)
        record.update(
            half_s=half_s,
            half_s_all=halves,
            steady_step_ms=(gen_s - half_s) / (n - half) * 1e3,
        )


# --- profile ------------------------------------------------------------------------------------------

KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
STEP_MARKER = "aten::argmax"  # generate() takes one greedy argmax per token, outside the model


def kernel_category(name: str) -> str:
    low = name.lower()
    if "gate_up" in low or "down_kernel" in low or "rmsnorm_mlp" in low:
        return "ours"
    if any(k in low for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")):
        return "gemm"
    if low.startswith("triton"):
        return "triton (inductor)"
    if "memcpy" in low or "memset" in low:
        return "memcpy/memset"
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize_trace(trace: dict, skip_steps: int = 2) -> dict[str, Any]:
    """GPU kernel time vs step time from a chrome trace of one generate() call.

    Step boundaries are the host times of generate's greedy ``aten::argmax`` (one per token; the
    first ends the prefill). A kernel belongs to the step whose host interval holds the API call
    that launched it (matched by the CUPTI correlation id; for a CUDA graph, the graph launch).
    The first ``skip_steps`` decode steps (CUDA-graph re-record) are left out. Per step: host
    period, GPU period (first kernel start of the step to the next step's), GPU busy time (union
    of kernel intervals), idle = 1 - busy / GPU period, launches of each kind.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    marks = sorted(
        float(e["ts"]) for e in events if e.get("cat") == "cpu_op" and e["name"] == STEP_MARKER
    )
    summary: dict[str, Any] = {"tokens_seen": len(marks)}
    if len(marks) < skip_steps + 3:
        summary["note"] = f"only {len(marks)} {STEP_MARKER} markers: too few steps"
        return summary

    def step_of(ts: float) -> int:
        # Step i (1-based decode step) spans (marks[i-1], marks[i]]; 0 is the prefill.
        return bisect.bisect_left(marks, ts)

    launches: dict[int, tuple[float, str]] = {}
    graph_launches: Counter = Counter()
    kernel_launches: Counter = Counter()
    for e in events:
        if e.get("cat") not in LAUNCH_CATS:
            continue
        ts, name = float(e["ts"]), e["name"]
        corr = (e.get("args") or {}).get("correlation")
        if corr is not None:
            launches[int(corr)] = (ts, name)
        step = step_of(ts)
        if name.startswith("cudaGraphLaunch") or name.startswith("cuGraphLaunch"):
            graph_launches[step] += 1
        elif "LaunchKernel" in name:
            kernel_launches[step] += 1

    per_step: dict[int, list[tuple[float, float, str]]] = {}
    unmatched = 0
    for e in events:
        if e.get("cat") not in KERNEL_CATS:
            continue
        corr = (e.get("args") or {}).get("correlation")
        launch = launches.get(int(corr)) if corr is not None else None
        if launch is None:
            unmatched += 1
            continue
        start = float(e["ts"])
        per_step.setdefault(step_of(launch[0]), []).append(
            (start, start + float(e.get("dur", 0.0)), e["name"])
        )
    last = len(marks) - 1  # the last decode step; later launches are generate's epilogue
    steady = [i for i in range(1 + skip_steps, last + 1)]
    summary.update(steps_total=last, steps_used=len(steady), kernels_unmatched=unmatched)
    host = [marks[i] - marks[i - 1] for i in steady]
    summary["step_ms"] = statistics.median(host) / 1e3
    summary["graph_launches_per_step"] = statistics.median(graph_launches[i] for i in steady)
    summary["kernel_launches_per_step"] = statistics.median(kernel_launches[i] for i in steady)
    if not per_step:
        summary["note"] = "no device kernels in the trace (CPU run, or CUPTI saw none)"
        return summary
    busy, counts, periods, firsts = [], [], [], {}
    by_name: Counter = Counter()
    by_cat: Counter = Counter()
    for i in range(1 + skip_steps, last + 2):
        kernels = per_step.get(i, [])
        if kernels:
            firsts[i] = min(k[0] for k in kernels)
        if i > last:
            continue
        busy.append(_union_us([(k[0], k[1]) for k in kernels]))
        counts.append(len(kernels))
        for start, stop, name in kernels:
            by_name[name] += stop - start
            by_cat[kernel_category(name)] += stop - start
    for i in steady:
        # The last step has no successor: what follows it is generate's epilogue.
        if i + 1 <= last and i in firsts and i + 1 in firsts:
            periods.append(firsts[i + 1] - firsts[i])
    n = len(steady)
    summary["gpu_busy_ms"] = statistics.median(busy) / 1e3
    summary["kernels_per_step"] = statistics.median(counts)
    if periods:
        period = statistics.median(periods)
        summary["gpu_period_ms"] = period / 1e3
        summary["idle_pct"] = max(0.0, 1 - summary["gpu_busy_ms"] * 1e3 / period) * 100
    summary["kernel_ms_per_step_by_category"] = {
        cat: round(us / n / 1e3, 4) for cat, us in by_cat.most_common()
    }
    summary["top_kernels_ms_per_step"] = [
        [name[:120], round(us / n / 1e3, 4)] for name, us in by_name.most_common(12)
    ]
    return summary


def profile_decode(gen: Generator, ids: Tensor, settings: Settings, tag: str) -> dict[str, Any]:
    """torch.profiler over one generate() of ``--profile-tokens`` tokens (already warm)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if settings.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    # Fewer tokens than the timed calls: the static cache keeps the longest length seen, so the
    # decode step's shapes (and graphs) stay the same.
    tokens = max(2, min(settings.profile_tokens, settings.new_tokens))
    synchronize(ids.device)
    with profile(activities=activities) as prof:
        gen(ids, tokens)
        synchronize(ids.device)
    trace_dir = settings.out / "traces" if settings.keep_traces else None
    with tempfile.TemporaryDirectory() as tmp:
        path = (trace_dir or Path(tmp)) / f"trace_{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    summary = summarize_trace(trace)
    summary["tokens"] = tokens
    if trace_dir is not None:
        summary["trace"] = str(path)
    return summary


PROFILE_FIELDS = {
    "prof_step_ms": "step_ms",
    "prof_gpu_period_ms": "gpu_period_ms",
    "prof_gpu_busy_ms": "gpu_busy_ms",
    "prof_idle_pct": "idle_pct",
    "prof_graph_launches_per_step": "graph_launches_per_step",
    "prof_kernel_launches_per_step": "kernel_launches_per_step",
    "prof_kernels_per_step": "kernels_per_step",
}


# --- prefill -------------------------------------------------------------------------------------------


def prefill_callable(model: torch.nn.Module, provider: str, settings: Settings) -> Callable:
    if provider == "eager":
        return model
    return torch.compile(model, backend=BACKENDS[provider], mode=settings.mode, dynamic=False)


def prefill_logits(fn: Callable, ids: Tensor) -> Tensor:
    """Last-position logits of one forward, copied out of any CUDA-graph-owned buffer."""
    out = fn(input_ids=ids, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float().clone()


def time_prefill(fn: Callable, ids: Tensor, reps: int) -> list[float]:
    """ms per forward: CUDA events on the GPU, perf_counter on the CPU."""
    times = []
    cuda = ids.device.type == "cuda"
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(input_ids=ids, use_cache=False, logits_to_keep=1)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(input_ids=ids, use_cache=False, logits_to_keep=1)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    if len(ordered) >= 2:
        deciles = statistics.quantiles(ordered, n=10, method="inclusive")
        return median, deciles[0], deciles[-1]
    return median, median, median


# --- numerics ------------------------------------------------------------------------------------------


def token_agreement(a: Tensor, b: Tensor, prompt: int) -> tuple[float, float]:
    """Generated tokens only: fraction of positions equal, and mean fraction of each sequence
    before the first difference (greedy paths diverge for good after one different token)."""
    ga, gb = a[:, prompt:], b[:, prompt:]
    same = ga == gb
    equal = float(same.float().mean())
    prefix = []
    for row in same:
        diff = (~row).nonzero()
        prefix.append((int(diff[0]) if len(diff) else row.numel()) / row.numel())
    return equal, statistics.mean(prefix)


# --- the sweep --------------------------------------------------------------------------------------


class ModelRun:
    """One model: its inputs, and what each provider produced for the numerics."""

    def __init__(
        self, spec: ModelSpec, model: torch.nn.Module, settings: Settings, results: Results
    ) -> None:
        self.spec = spec
        self.results = results
        self.model = model
        self.settings = settings
        self.params = spec.params()
        device, vocab, seed = settings.device, spec.vocab, settings.seed
        self.decode_ids = {
            b: token_ids(b, settings.prompt, vocab, seed * 7919 + b, device)
            for b in settings.batches
        }
        # Numerics prompts at the smallest swept batch: no shape the timed calls did not see.
        self.num_batch = min(settings.batches)
        calls = max(1, math.ceil(settings.numerics_prompts / self.num_batch))
        self.numerics_ids = [
            token_ids(self.num_batch, settings.prompt, vocab, seed * 7919 + 100003 + i, device)
            for i in range(calls)
        ]
        self.prefill_ids = {
            s: token_ids(1, s, vocab, seed * 7919 + 200003 + s, device) for s in settings.prefill
        }
        s0 = settings.prefill[0] if settings.prefill else None
        self.first_ids = (
            [token_ids(1, s0, vocab, seed * 7919 + 300007 + i, device) for i in range(2)]
            if s0
            else []
        )
        # provider -> list over numerics calls of (sequences, first-decode-step logits) on CPU
        self.generated: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.first_logits: dict[str, list[Tensor]] = {}
        self.summaries: dict[str, dict[str, Any]] = {}

    def summary(self, provider: str) -> dict[str, Any]:
        if provider not in self.summaries:
            record: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
            record.update(kind="compile", model=self.spec.key, provider=provider, status="ok")
            record.update(layers=self.spec.layers, decode_graphs_by_batch={})
            self.summaries[provider] = self.results.add(record)
        return self.summaries[provider]


def run_decode_phase(run: ModelRun, results: Results, budget: Budget, recompiles: RecompileLog):
    settings, spec, model = run.settings, run.spec, run.model
    for provider in settings.run_order():
        reset_compiler(model)
        recompiles.take()
        gen = Generator(model, provider, settings)
        summary = run.summary(provider)
        fused_before = fused_regions()
        attention_before = fused_regions(ATTENTION_PATTERN)
        start = Snapshot.now()
        for batch in settings.batches if "decode" in settings.phases else []:
            rec = results.add(decode_record(spec, provider, batch, settings))
            reason = budget.skip_reason("decode", provider, run.params)
            if reason is not None:
                rec.update(status="skipped", error=reason)
                results.save()
                continue
            try:
                with budget.timing("decode", provider, run.params):
                    run_decode_cell(gen, run.decode_ids[batch], rec, settings)
                summary["decode_graphs_by_batch"][str(batch)] = rec["graphs_warmup"]
            except Exception as exc:
                rec.update(status="failed", error=error_text(exc))
                recover()
            log(_decode_line(rec, budget.elapsed()))
            results.save()
            if settings.profile and provider != "eager" and rec["status"] == "ok":
                reason = budget.skip_reason("profile", provider, run.params)
                if reason is not None:
                    rec["profile_error"] = "skipped: " + reason
                else:
                    try:
                        with budget.timing("profile", provider, run.params):
                            prof = profile_decode(
                                gen,
                                run.decode_ids[batch],
                                settings,
                                f"{spec.key}_{provider}_b{batch}",
                            )
                        rec["profile"] = prof
                        rec.update({k: prof.get(v) for k, v in PROFILE_FIELDS.items()})
                        log(f"    profile: {_profile_line(prof)}")
                    except Exception as exc:
                        rec["profile_error"] = error_text(exc)
                        log(f"    profile failed: {rec['profile_error']}")
                        recover()
                    results.save()
        # Greedy outputs for the numerics, served by the graphs compiled above.
        if "numerics" in settings.phases:
            reason = budget.skip_reason("numerics_generate", provider, run.params)
            if reason is not None:
                summary["numerics_error"] = "skipped: " + reason
            else:
                try:
                    with budget.timing("numerics_generate", provider, run.params):
                        outs = []
                        for ids in run.numerics_ids:
                            out = gen(
                                ids,
                                settings.new_tokens,
                                return_dict_in_generate=True,
                                output_logits=True,
                            )
                            outs.append((out.sequences.cpu(), out.logits[1].float().cpu()))
                        run.generated[provider] = outs
                except Exception as exc:
                    summary["numerics_error"] = "generate: " + error_text(exc)
                    recover()
        done = Snapshot.now().since(start)
        warmups = sum(int(n or 0) for n in summary["decode_graphs_by_batch"].values())
        summary.update(
            decode_graphs=done.graphs,
            # Compiled outside a warm-up: during timed, profiled or numerics calls (must be 0).
            decode_graphs_after_warmup=done.graphs - warmups,
            decode_graph_breaks=done.graph_breaks,
            decode_cudagraph_skips=done.cudagraph_skips,
            decode_fused=fused_regions() - fused_before,
            decode_fused_attention=fused_regions(ATTENTION_PATTERN) - attention_before,
            decode_recompile_reasons=recompiles.take()[:12],
        )
        results.save()
    reset_compiler(model)


def run_prefill_phase(run: ModelRun, results: Results, budget: Budget, recompiles: RecompileLog):
    settings, spec, model = run.settings, run.spec, run.model
    for provider in settings.run_order():
        reset_compiler(model)
        recompiles.take()
        summary = run.summary(provider)
        start = Snapshot.now()
        fused_before = fused_regions()
        try:
            fn = prefill_callable(model, provider, settings)
        except Exception as exc:
            fn = exc
        for i, seq in enumerate(settings.prefill):
            rec: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
            rec.update(kind="prefill", model=spec.key, provider=provider, seq=seq, batch=1)
            results.add(rec)
            reason = budget.skip_reason("prefill", provider, run.params * seq)
            if reason is not None:
                rec.update(status="skipped", error=reason)
                results.save()
                continue
            try:
                if isinstance(fn, BaseException):
                    raise fn
                with budget.timing("prefill", provider, run.params * seq):
                    ids = run.prefill_ids[seq]
                    before = Snapshot.now()
                    fused0 = fused_regions()
                    device = ids.device
                    synchronize(device)
                    t0 = time.perf_counter()
                    prefill_logits(fn, ids)
                    synchronize(device)
                    rec["compile_s"] = time.perf_counter() - t0
                    for _ in range(2):  # CUDA-graph trees: warm-up run, then the recording
                        prefill_logits(fn, ids)
                    synchronize(device)
                    samples = time_prefill(fn, ids, settings.prefill_reps)
                    median, p10, p90 = quantiles(samples)
                    rec.update(
                        status="ok",
                        median_ms=median,
                        p10_ms=p10,
                        p90_ms=p90,
                        samples_ms=samples,
                        graphs=Snapshot.now().since(before).graphs,
                        fused_regions=fused_regions() - fused0,
                    )
                    if i == 0 and "numerics" in settings.phases:
                        run.first_logits[provider] = [
                            prefill_logits(fn, x).cpu() for x in run.first_ids
                        ]
            except Exception as exc:
                rec.update(status="failed", error=error_text(exc))
                recover()
            log(_prefill_line(rec, budget.elapsed()))
            results.save()
        done = Snapshot.now().since(start)
        summary.update(
            prefill_graphs=done.graphs,
            prefill_graph_breaks=done.graph_breaks,
            prefill_fused=fused_regions() - fused_before,
            prefill_recompile_reasons=recompiles.take()[:12],
        )
        del fn
        results.save()
    reset_compiler(model)


def run_numerics_phase(run: ModelRun, results: Results, budget: Budget) -> None:
    """Every provider's logits vs a reference model with the same weights upcast."""
    settings, spec = run.settings, run.spec
    if not run.generated and not run.first_logits:
        return
    ref_dtype = torch.float64 if settings.dtype == torch.float32 else torch.float32
    cuda = settings.device.type == "cuda"
    prev = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    records = {}
    for provider in PROVIDERS:
        if provider not in settings.providers:
            continue
        rec: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
        rec.update(kind="numerics", model=spec.key, provider=provider, status="ok")
        rec.update(ref_dtype=str(ref_dtype).removeprefix("torch."), prompt=settings.prompt)
        records[provider] = results.add(rec)
    try:
        reason = budget.skip_reason("reference", "-", run.params)
        if reason is not None:
            raise Skipped(reason)
        reset_compiler(run.model)
        ref = reference_model(spec, run.model, ref_dtype)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        first_ref = [prefill_logits(ref, x).cpu() for x in run.first_ids]
        decode_ref: dict[str, list[Tensor]] = {}
        for provider, outs in run.generated.items():
            decode_ref[provider] = [
                ref(
                    input_ids=seq[:, : settings.prompt + 1].to(settings.device),
                    use_cache=False,
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .cpu()
                for seq, _ in outs
            ]
        # How close greedy choices are: top-1 minus top-2 logit of the reference's decode step.
        gaps = []
        for logits_list in decode_ref.values():
            for logits in logits_list:
                top = logits.double().topk(2, dim=-1).values
                gaps += (top[:, 0] - top[:, 1]).tolist()
            break
        del ref
        recover()
    except Skipped as exc:
        for rec in records.values():
            rec.update(status="skipped", error=f"reference: {exc}")
        results.save()
        return
    except Exception as exc:
        for rec in records.values():
            rec.update(status="failed", error="reference: " + error_text(exc))
        results.save()
        recover()
        return
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev

    def mean_err(outs: list[Tensor], refs: list[Tensor]) -> float:
        return statistics.mean(rel_l2(o, r) for o, r in zip(outs, refs, strict=True))

    for provider, rec in records.items():
        first = run.first_logits.get(provider)
        if first is not None:
            rec["first_logits_rel_l2"] = mean_err(first, first_ref)
            if "inductor" in run.first_logits and provider != "inductor":
                rec["first_logits_vs_inductor"] = mean_err(first, run.first_logits["inductor"])
        outs = run.generated.get(provider)
        if outs is not None:
            rec["decode1_rel_l2"] = mean_err([lg for _, lg in outs], decode_ref[provider])
            rec["numerics_sequences"] = sum(seq.shape[0] for seq, _ in outs)
            for other in ("inductor", "eager"):
                theirs = run.generated.get(other)
                if theirs is None or other == provider:
                    continue
                a = torch.cat([seq for seq, _ in outs])
                b = torch.cat([seq for seq, _ in theirs])
                equal, prefix = token_agreement(a, b, settings.prompt)
                rec[f"tokens_agree_{other}"] = equal
                rec[f"prefix_agree_{other}"] = prefix
                if other == "inductor":
                    rec["decode1_vs_inductor"] = mean_err(
                        [lg for _, lg in outs], [lg for _, lg in theirs]
                    )
        if first is None and outs is None:
            rec.update(status="skipped", error="no outputs (provider failed or was skipped)")
        if gaps:
            rec["ref_top2_gap_median"] = statistics.median(gaps)
    eager = records.get("eager")
    for provider in ("inductor", "ours"):
        rec = records.get(provider)
        if rec is None or eager is None:
            continue
        checks = []
        for key in ("first_logits_rel_l2", "decode1_rel_l2"):
            mine, base = rec.get(key), eager.get(key)
            if mine is not None and base is not None:
                checks.append(mine <= 2 * base + 1e-6)
        if checks:
            rec["within_2x_eager"] = all(checks)
    for rec in records.values():
        log(_numerics_line(rec))
    results.save()


def run_model(spec: ModelSpec, settings: Settings, results: Results, budget: Budget, rlog):
    log(
        f"== {spec.key} ({spec.label}-shaped, {spec.params() / 1e9:.2f} B params, "
        f"{budget.elapsed():.0f} s)"
    )
    try:
        t0 = time.perf_counter()
        model = build_model(spec, settings.device, settings.dtype, settings.seed)
        synchronize(settings.device)
        log(
            f"  built in {time.perf_counter() - t0:.1f} s; attention "
            f"{getattr(model.config, '_attn_implementation', None)}"
        )
        results.meta.setdefault("attn_implementation", {})[spec.key] = getattr(
            model.config, "_attn_implementation", None
        )
    except Exception as exc:
        rec: dict[str, Any] = dict.fromkeys(CSV_FIELDS)
        rec.update(kind="model", model=spec.key, status="failed", error=error_text(exc))
        results.add(rec)
        results.save()
        log(f"  building the model failed: {rec['error']}")
        recover()
        return
    run = ModelRun(spec, model, settings, results)
    # Numerics reuse what the other phases compiled: generate's decode graphs (greedy outputs,
    # first decode step) and the prefill graphs (first-token logits).
    if "decode" in settings.phases or "numerics" in settings.phases:
        run_decode_phase(run, results, budget, rlog)
    if "prefill" in settings.phases:
        run_prefill_phase(run, results, budget, rlog)
    if "numerics" in settings.phases:
        with budget.timing("reference", "-", run.params):
            run_numerics_phase(run, results, budget)
    del run, model
    reset_compiler()


# --- progress lines -------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _decode_line(rec: dict, elapsed: float) -> str:
    head = f"  [{elapsed:4.0f} s] {rec['model']} {rec['provider']:<8} B={rec['batch']:<3}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec.get('error')}"
    return (
        f"{head} {rec['tok_s']:8.1f} tok/s  step {_fmt(rec['step_ms'], '.2f')} ms  "
        f"steady {_fmt(rec['steady_step_ms'], '.2f')} ms  (warm-up {rec['warmup_s']:.1f} s, "
        f"graphs {rec['graphs_warmup']}+{rec['graphs_timed']}, fused {rec['fused_regions']})"
    )


def _prefill_line(rec: dict, elapsed: float) -> str:
    head = f"  [{elapsed:4.0f} s] {rec['model']} {rec['provider']:<8} prefill S={rec['seq']:<5}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec.get('error')}"
    return (
        f"{head} {rec['median_ms']:.2f} ms (compile {rec['compile_s']:.1f} s, "
        f"fused {rec['fused_regions']})"
    )


def _numerics_line(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"  numerics {rec['provider']}: {rec['status']} {rec.get('error') or ''}"
    parts = [f"first-token {_fmt(rec.get('first_logits_rel_l2'), '.2e')}"]
    parts.append(f"decode step 1 {_fmt(rec.get('decode1_rel_l2'), '.2e')}")
    if rec.get("tokens_agree_inductor") is not None:
        parts.append(f"tokens = inductor {rec['tokens_agree_inductor']:.0%}")
    return f"  numerics {rec['provider']:<8} vs {rec['ref_dtype']}: " + ", ".join(parts)


def _profile_line(prof: dict) -> str:
    if "gpu_busy_ms" not in prof:
        return f"step {_fmt(prof.get('step_ms'), '.2f')} ms; {prof.get('note', '')}"
    return (
        f"step {prof['step_ms']:.2f} ms host, GPU period {_fmt(prof.get('gpu_period_ms'), '.2f')}"
        f" ms, busy {prof['gpu_busy_ms']:.2f} ms (idle {_fmt(prof.get('idle_pct'))}%), "
        f"{prof['graph_launches_per_step']} graph + {prof['kernel_launches_per_step']} kernel "
        "launches per step"
    )


# --- CLI -----------------------------------------------------------------------------------------------


def _int_list(text: str, what: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(v) for v in csv_list(text)]
    except ValueError:
        parser.error(f"{what}: {text!r} is not a comma-separated list of integers")
    if any(v < 1 for v in values):
        parser.error(f"{what}: every value must be >= 1")
    return values


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="generate() tokens/s, decode step, prefill and numerics: eager vs "
        "Inductor vs our backend; writes JSON/CSV, then MD/PNG.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--models", help=f"subset of {', '.join(MODELS)} (default {DEFAULT_MODELS})"
    )
    parser.add_argument("--batches", help=f"batch sizes (default {DEFAULT_BATCHES})")
    parser.add_argument("--prefill", help=f"prefill lengths (default {DEFAULT_PREFILL})")
    parser.add_argument("--new-tokens", type=int, help="tokens per generate (default 128)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 128)")
    parser.add_argument(
        "--providers",
        default=",".join(PRIORITY),
        help="subset of eager,inductor,ours, in run order (default: a short budget drops the last)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="subset of decode,prefill,numerics"
    )
    parser.add_argument(
        "--mode",
        help="torch.compile mode of both compiled providers (default: transformers' CompileConfig "
        "default, reduce-overhead; 'none' for no mode)",
    )
    parser.add_argument(
        "--dynamic",
        choices=("none", "false", "true"),
        default="none",
        help="CompileConfig(dynamic=...) of generate (default none, transformers' default: "
        "automatic dynamic shapes, so the second batch size recompiles with a symbolic batch)",
    )
    parser.add_argument("--reps", type=int, help="timed rounds per batch (default 3)")
    parser.add_argument("--prefill-reps", type=int, help="timed prefill forwards (default 10)")
    parser.add_argument(
        "--numerics-prompts", type=int, help="prompts for token agreement (default 4)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler trace of the compiled decode steps"
    )
    parser.add_argument(
        "--profile-tokens", type=int, default=24, help="tokens of the profiled call"
    )
    parser.add_argument(
        "--keep-traces", action="store_true", help="keep the traces under OUT/traces"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="llama-1b, batches 1,16, 32 new tokens, prefill 512 (unless given)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny fp32 model on the CPU: batches 1,2, 8 new tokens, prefill 16 (a script check)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=450.0,
        help="seconds from the start; a step whose estimate does not fit is skipped (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset: dict[str, Any] = SMOKE if args.cpu_smoke else QUICK if args.quick else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else preset.get(name, default)

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --cpu-smoke to check the script on the CPU")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16

    models = csv_list(pick("models", DEFAULT_MODELS))
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    providers = csv_list(args.providers)
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or not providers:
        parser.error(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
    phases = csv_list(args.phases)
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    if args.mode is None:
        mode = None if args.cpu_smoke else transformers_default_mode()
    else:
        mode = None if args.mode.lower() in ("none", "default", "") else args.mode
    settings = Settings(
        out=args.out,
        device=device,
        dtype=dtype,
        models=models,
        batches=_int_list(pick("batches", DEFAULT_BATCHES), "--batches", parser),
        prefill=_int_list(pick("prefill", DEFAULT_PREFILL), "--prefill", parser),
        new_tokens=int(pick("new_tokens", 128)),
        prompt=int(pick("prompt", 128)),
        providers=providers,
        phases=phases,
        mode=mode,
        dynamic={"none": None, "false": False, "true": True}[args.dynamic],
        reps=int(pick("reps", 3)),
        prefill_reps=int(pick("prefill_reps", 10)),
        numerics_prompts=int(pick("numerics_prompts", 4)),
        profile=args.profile,
        profile_tokens=args.profile_tokens,
        keep_traces=args.keep_traces,
        time_budget=args.time_budget,
        quick=args.quick,
        cpu_smoke=args.cpu_smoke,
        seed=args.seed,
    )
    if settings.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (a decode step needs a token after the prefill)")
    if min(settings.prompt, settings.reps, settings.prefill_reps, settings.numerics_prompts) < 1:
        parser.error("--prompt, --reps, --prefill-reps and --numerics-prompts must be >= 1")
    for key in settings.models:
        spec = MODELS[key]
        longest = max([settings.prompt + settings.new_tokens, *settings.prefill])
        if longest > spec.max_pos:
            parser.error(f"{key}: {longest} tokens exceed max_position_embeddings {spec.max_pos}")
    return settings


def settings_meta(settings: Settings) -> dict[str, Any]:
    from transformers import CompileConfig

    return {
        "benchmark": "model.generate(cache_implementation='static') with compile_config",
        "device": str(settings.device),
        "dtype": str(settings.dtype).removeprefix("torch."),
        "models": {k: dataclasses.asdict(MODELS[k]) for k in settings.models},
        "model_params": {k: MODELS[k].params() for k in settings.models},
        "batches": settings.batches,
        "prefill": settings.prefill,
        "prompt": settings.prompt,
        "new_tokens": settings.new_tokens,
        "half_tokens": settings.half_tokens,
        "providers": settings.providers,
        "run_order": settings.run_order(),
        "phases": settings.phases,
        "mode": settings.mode,
        "dynamic": settings.dynamic,
        "transformers_compile_config_default": CompileConfig().to_dict(),
        "reps": settings.reps,
        "prefill_reps": settings.prefill_reps,
        "numerics_prompts": settings.numerics_prompts,
        "profile": settings.profile,
        "time_budget_s": settings.time_budget,
        "quick": settings.quick,
        "cpu_smoke": settings.cpu_smoke,
        "seed": settings.seed,
        "init": f"linear/embedding N(0, {INIT_STD}), norm weights 1; prompts uniform random ids",
        "notes": [
            "tok_s = batch * new_tokens / t(generate N); medians over reps",
            "step_ms = (t(N) - t(1)) / (N - 1): generate(N) runs N - 1 decode steps",
            "steady_step_ms = (t(N) - t(N/2)) / (N - N/2): no per-call CUDA-graph re-record",
            "generate() allocates a StaticCache per call (static addresses): the decode graph "
            "is re-recorded once per call, no Dynamo recompile",
            "prefill: torch.compile(model, dynamic=False), use_cache=False, logits_to_keep=1",
            "graphs_* = new Dynamo graphs (counters['stats']['unique_graphs']); "
            "graphs_timed must be 0",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    budget = Budget(settings.time_budget)
    configure_compiler()
    if settings.device.type == "cuda":
        torch.cuda.set_device(settings.device)
    route = ensure_backend_registered()
    rlog = RecompileLog()
    rlog.install()
    meta = environment(settings)
    meta.update(settings_meta(settings), backend_registration=route)
    log(
        f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  transformers "
        f"{meta['transformers']}  mode {settings.mode!r}  budget {settings.time_budget:.0f} s"
    )
    results = Results(settings.out, meta)
    results.save()
    with torch.no_grad():
        for key in settings.models:
            run_model(MODELS[key], settings, results, budget, rlog)
            meta["elapsed_s"] = budget.elapsed()
            results.save()
    meta["elapsed_s"] = budget.elapsed()
    results.save()
    data = results.data()
    try:
        written = report_e2e.write_report(data, settings.out)
        log("wrote " + ", ".join(str(p) for p in [settings.out / "results.json", *written]))
    except Exception as exc:
        log(f"report failed ({error_text(exc)}); the data is in {settings.out / 'results.json'}")
    log("")
    log(report_e2e.text_table(data))
    log(f"total {budget.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
