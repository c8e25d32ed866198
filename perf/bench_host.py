"""Both sides of speed without CUDA graphs: the host cost of the region, and the model's forward.

For the region ``h + mlp(rmsnorm(h))`` (bf16, HF modules, ``build_region`` of bench.py), compiled
with ``dynamic=False`` per M, every provider gets three numbers:

    enqueue   CPU µs per call over ``--calls`` asynchronous calls (no synchronisation between
              them): what the host pays to put one region on the stream
    wall      µs per call with the GPU in the loop, no CUDA graphs (what default mode delivers:
              the larger of host and GPU time, plus whatever does not overlap)
    graph     GPU µs per call from CUDA-graph replay (what reduce-overhead delivers)

Providers: ``compile`` (backend="inductor"), ``ours`` (our backend: Inductor's code with our
kernels lowered into it, launched by Inductor's static launcher), ``ours_triton_launcher`` (the
same through Triton's Python launcher, Inductor's default for user kernels), ``ours_op`` (our op
called eagerly through the dispatcher), ``eager_layer`` (our eager layer, `NormMLP`, in the norm's
place: what ``KernelConfig``'s ":eager" runs) and ``eager``.

Then the whole model: the demo's 4-layer Llama-3.2-1B-shaped model, batch 1 x M tokens, forward
time without CUDA graphs (median of CUDA-event-timed calls: what default mode delivers) for eager /
eager_layer / inductor / ours, and for the two eager providers also the forward's GPU time from
CUDA-graph replay. ``eager_layer`` is the model with our eager fused layer swapped in by
``KernelConfig`` (``"inductor_fusion:rmsnorm_mlp:eager"``, `inductor_fusion.layers`), no compile.

Enqueue, wall and forward times are taken in ``--rounds`` interleaved rounds over the providers
(``bench.interleaved``: the H200 machine's host speed drifted by 30% between two measures of one
provider minutes apart, 2026-12-03); the tables give the median and, in brackets, the range.

Data first (``host.json``), the tables last (``host.md``, also printed).

    python perf/bench_host.py --out /tmp/host
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench
from perf_common import error_text, log, rel_l2

PROVIDERS = ("compile", "ours", "ours_triton_launcher", "ours_op", "eager_layer", "eager")
# (name, backend): None is the eager model, "eager_layer" the eager model with our layer swapped in.
MODEL_PROVIDERS = (
    ("eager", None),
    ("eager_layer", "eager_layer"),
    ("compile", "inductor"),
    ("ours", "ours"),
)
EAGER_LAYER = {("RMSNorm", "MLP"): "inductor_fusion:rmsnorm_mlp:eager"}


def provider(name: str, region: bench.Region):
    if name == "eager_layer":
        # The eager layer (`NormMLP`) in the norm's place, as KernelConfig's ":eager" puts it.
        from inductor_fusion.layers import NormMLP

        layer = NormMLP(region.norm, region.mlp)
        return bench.region_function(layer, torch.nn.Identity(), region.kind.residual)
    if name == "ours_triton_launcher":
        import inductor_fusion

        options = {"static_launch_user_defined_triton_kernels": False}
        fn = bench.region_function(region.norm, region.mlp)
        return torch.compile(fn, backend=inductor_fusion.backend(options=options), dynamic=False)
    return bench.build_provider(name, region)


def enqueue_us(fn, x, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / calls * 1e6


def wall_us(fn, x, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def graph_us(fn, x, calls: int = 20) -> float:
    graph = bench.capture(fn, x, calls)
    samples = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def spread(samples: list[float]) -> dict[str, float]:
    """Median of the round samples, and their min and max (the noise a reader must allow)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def region_rows(shapes, tokens, calls: int, providers=PROVIDERS, rounds: int = 7) -> list[dict]:
    rows = []
    for shape in shapes:
        region = bench.build_region(shape, "cuda", seed=0)
        for m in tokens:
            x = torch.randn(m, shape.hidden, dtype=torch.bfloat16, device="cuda")
            ref = bench.reference(region, x)
            ready, block = {}, []
            for name in providers:
                row = {"shape": shape.key, "m": m, "provider": name}
                try:
                    fn = provider(name, region)
                    with torch.no_grad():
                        row["rel_err"] = rel_l2(fn(x), ref)  # compiles
                        for _ in range(3):
                            fn(x)
                        row["graph_us"] = graph_us(fn, x)
                    ready[name] = fn
                except Exception as exc:  # a provider that fails is recorded, not fatal
                    row["error"] = error_text(exc)
                    bench.recover()
                block.append(row)
            with torch.no_grad():
                for what, measure in (("enqueue_us", enqueue_us), ("wall_us", wall_us)):
                    samples = bench.interleaved(
                        {n: lambda f=f, m=measure, x=x: m(f, x, calls) for n, f in ready.items()},
                        rounds,
                    )
                    for row in block:
                        if row["provider"] in samples:
                            stats = spread(samples[row["provider"]])
                            row[what] = stats["median"]
                            row[what + "_range"] = [stats["min"], stats["max"]]
            for row in block:
                log(json.dumps(row))
            rows += block
            bench.recover()
            torch._dynamo.reset()
    return rows


def model_rows(tokens, reps: int = 20, providers=None, rounds: int = 7) -> list[dict]:
    import inductor_fusion
    from inductor_fusion.demo import _build

    model = _build(torch.device("cuda"), torch.bfloat16, large=True)
    rows = []
    for m in tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, m), device="cuda")
        ready, block = {}, []
        with torch.no_grad():
            eager_logits = model(ids).logits
            for name, backend in MODEL_PROVIDERS:
                if providers is not None and name not in providers:
                    continue
                row = {"model": "llama-1b-shape-4-layers", "m": m, "provider": name}
                try:
                    if backend is None:
                        fn = model
                    elif backend == "eager_layer":
                        fn = copy.deepcopy(model)
                        inductor_fusion.apply_kernel_config(fn, EAGER_LAYER)
                    elif backend == "ours":
                        inductor_fusion.reset_report()
                        fn = torch.compile(copy.deepcopy(model), backend="inductor_fusion",
                                           dynamic=False)  # fmt: skip
                    else:
                        fn = torch.compile(copy.deepcopy(model), backend=backend, dynamic=False)
                    logits = fn(ids).logits
                    row["rel_vs_eager"] = rel_l2(logits, eager_logits)
                    if backend == "ours":
                        row["fused"] = inductor_fusion.get_report().count("rmsnorm_mlp")
                    if backend in (None, "eager_layer"):
                        graph = bench.capture(lambda i, f=fn: f(i, use_cache=False).logits, ids, 1)
                        row["graph_ms"] = bench._event_median_s(graph.replay, 3, reps) * 1e3
                        del graph
                    ready[name] = fn
                except Exception as exc:
                    row["error"] = error_text(exc)
                    bench.recover()
                block.append(row)
            samples = bench.interleaved(
                {
                    n: lambda f=f, i=ids: bench._event_median_s(lambda: f(i), 2, reps) * 1e3
                    for n, f in ready.items()
                },
                rounds,
            )
        base = samples.get("eager")
        for row in block:
            if row["provider"] in samples:
                mine = samples[row["provider"]]
                stats = spread(mine)
                row["forward_ms"] = stats["median"]
                row["forward_ms_range"] = [stats["min"], stats["max"]]
                row["forward_ms_rounds"] = mine
                if base is not None:
                    # Paired by round (measured back to back): the host's slow phases, which
                    # come and go over seconds, cancel in the ratio but not in the medians.
                    row["speedup_paired"] = statistics.median(
                        b / t for b, t in zip(base, mine, strict=True)
                    )
            log(json.dumps(row))
        rows += block
        bench.recover()
        torch._dynamo.reset()
    return rows


def _with_range(row: dict, key: str, digits: int) -> str:
    """``median (min-max)`` of the interleaved rounds."""
    if key not in row:
        return "nan"
    low, high = row.get(key + "_range", (row[key], row[key]))
    return f"{row[key]:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def table(rows: list[dict]) -> str:
    lines = ["| HxI | M | provider | enqueue µs | wall µs | graph µs | rel err |", "|---" * 7 + "|"]
    for r in rows:
        if "shape" not in r:
            continue
        cells = [_with_range(r, k, 1) for k in ("enqueue_us", "wall_us")]
        cells.append(f"{r.get('graph_us', float('nan')):.1f}")
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else r.get("error", "")[:60]
        lines.append(f"| {r['shape']} | {r['m']} | {r['provider']} | {' | '.join(cells)} | {err} |")
    lines += [
        "",
        "| model | M | provider | forward ms | x eager (paired) | graph ms | fused | rel vs eager |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        if "model" not in r:
            continue
        fwd = _with_range(r, "forward_ms", 3) if "forward_ms" in r else r.get("error", "")[:60]
        graph = f"{r['graph_ms']:.3f}" if "graph_ms" in r else ""
        rel = f"{r['rel_vs_eager']:.2e}" if "rel_vs_eager" in r else ""
        paired = f"{r['speedup_paired']:.3f}" if "speedup_paired" in r else ""
        lines.append(f"| {r['model']} | {r['m']} | {r['provider']} | {fwd} | {paired} | {graph} | {r.get('fused', '')} | {rel} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="2048x8192,4096x14336")
    parser.add_argument("--tokens", default="1,16,64,256,512,4096", help="region M ('' skips)")
    parser.add_argument("--model-tokens", default="1,16,256,512,4096")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="providers of the region and model rows"
    )
    args = parser.parse_args()
    shapes = [bench.Shape.parse(s) for s in args.shapes.split(",") if s]
    tokens = [int(t) for t in args.tokens.split(",") if t]
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; known: {', '.join(PROVIDERS)}")
    rows = region_rows(shapes, tokens, args.calls, providers, args.rounds) if tokens else []
    model_tokens = [int(t) for t in args.model_tokens.split(",") if t]
    rows += (
        model_rows(model_tokens, providers=providers, rounds=args.rounds) if model_tokens else []
    )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows)
    (args.out / "host.md").write_text(text + "\n")
    log(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
