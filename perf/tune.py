"""Offline tuning of ``inductor_fusion::rmsnorm_mlp``'s launch configurations (CUDA only).

For each shape (H x I) and token count M, every candidate of each launch is timed on its own:
the gate/up launch (a GEMV, a pointer-based GEMM with the norm in its K loop, or the norm pre-pass
followed by a TMA GEMM) and the down launch (a GEMV with or without split-K, a pointer GEMM or a
TMA GEMM). The fastest of each role is combined into the op's configuration for that M, checked
against an fp32 reference, and timed as a whole op beside the untuned defaults.

Timing: CUDA-graph replays of back-to-back launches, median over replays. The weights rotate over
enough copies that every launch streams them from DRAM, as in a real model where the three
matrices of a layer (more than the 50 MB L2 together) follow each other; the activations stay
the same buffers, as in a real model.

Output (``--out``): ``tune.json`` (every candidate's time, the choices, GPU and versions) and
``_rmsnorm_mlp_tuned.py``, the module the op reads its table from: copy it over
``triton_kernels/_rmsnorm_mlp_tuned.py``. Candidates that fail to compile (shared memory) are
recorded as such and skipped.

    python perf/tune.py --out /tmp/tune --shapes 2048x8192,4096x14336 --budget 420
    python perf/tune.py --out /tmp/tune --shapes gemma:2304x9216,neox:2560x10240 --tokens 1,16,64

A shape may name a family kind of perf/bench.py (``kind:HxI``; bare ``HxI`` is Llama's): its
launches then compute that family's region (norm, activation, biases, gated or not). Tables are
keyed by shape; a non-gated kind's rows go under ``(H, I, "non-gated")``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench import KINDS, Shape
from perf_common import csv_list, dist_version, error_text, git_commit, log, rel_l2

from inductor_fusion.triton_kernels.launch_config import DEFAULT_CONFIGS, NON_GATED, Blocks, Config
from inductor_fusion.triton_kernels.launch_plan import down_launch, gate_up_launch, norm_launch
from inductor_fusion.triton_kernels.rmsnorm_mlp import (
    RegionSpec,
    rmsnorm_mlp_reference,
    rmsnorm_mlp_triton,
)

DTYPE = torch.bfloat16
EPS = 1e-5
TOKENS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SHAPES = ((2048, 8192), (4096, 14336), (3072, 8192))
DEVICE = "cuda"  # the CPU smoke test in tests/ swaps in "cpu" under the interpreter

# Candidates, pruned by hand to what can win (each distinct one is a Triton compile).
# GEMV rows: (block_n, block_k, num_warps, num_stages[, split_k]); block_m follows M.
GATE_UP_GEMV = (
    (32, 128, 8, 4),
    (64, 64, 8, 6),
    (64, 128, 4, 5),
    (64, 128, 8, 3),
    (64, 128, 8, 4),
    (64, 128, 8, 5),
    (64, 256, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 3),
)
DOWN_GEMV = (
    (16, 128, 4, 4, 4),
    (32, 128, 4, 4, 4),
    (32, 128, 4, 4, 8),
    (32, 256, 4, 3, 4),
    (64, 64, 4, 6, 4),
    (64, 128, 4, 4, 2),
    (64, 128, 4, 4, 4),
    (64, 128, 8, 4, 2),
    (64, 128, 8, 4, 4),
    (64, 256, 8, 3, 2),
    (64, 256, 8, 3, 4),
    (128, 64, 8, 4, 4),
    (128, 128, 8, 3, 2),
)
# A non-gated MLP's gate/up streams one matrix, not two: wider tiles keep as many bytes in flight.
NON_GATED_GEMV = (
    (128, 128, 8, 4),
    (128, 256, 8, 3),
    (256, 64, 8, 4),
    (256, 128, 8, 3),
)
# Tiled rows: (block_m, block_n, block_k, num_warps, num_stages); gate/up has two accumulators.
GATE_UP_TILES = (
    (64, 64, 64, 4, 4),
    (64, 64, 128, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 3),
    (128, 64, 64, 8, 4),
    (128, 64, 128, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (256, 64, 64, 8, 3),
)
DOWN_TILES = (
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 64, 128, 8, 3),
)
# Split-K variants of the TMA down GEMM for mid-size M, where N = H gives too few output tiles.
DOWN_SPLIT_TILES = (
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 128, 8, 3),
    (128, 128, 64, 8, 3),
)
DOWN_SPLITS = (2, 4, 8)


def gemv_block_m(m: int, cap: int) -> int:
    return min(cap, max(16, 1 << (m - 1).bit_length()))


def gate_up_candidates(m: int, gated: bool = True) -> list[tuple[Blocks, bool]]:
    """(blocks, prenorm) pairs worth timing at ``m`` tokens."""
    out = []
    if m <= 64:
        block_m = gemv_block_m(m, 64)
        for bn, bk, w, s in GATE_UP_GEMV + (() if gated else NON_GATED_GEMV):
            out.append((Blocks("gemv", block_m, bn, bk, w, s), False))
    if m >= 32:
        for bm, bn, bk, w, s in GATE_UP_TILES:
            if bm > max(32, 2 * m):
                continue
            if m <= 128:
                out.append((Blocks("gemm", bm, bn, bk, w, s, group_m=8), False))
            if m >= 64:
                out.append((Blocks("tma", bm, bn, bk, w, s, group_m=8), True))
    return out


def down_candidates(m: int) -> list[Blocks]:
    out = []
    if m <= 256:
        block_m = gemv_block_m(m, 128)
        for bn, bk, w, s, split in DOWN_GEMV:
            if block_m >= 64 and bn * block_m > 64 * 64:
                continue  # the [BLOCK_N, BLOCK_M] accumulator outgrows the registers
            out.append(Blocks("gemv", block_m, bn, bk, w, s, split_k=split))
    if m >= 32:
        for bm, bn, bk, w, s in DOWN_TILES:
            if bm > max(32, 2 * m):
                continue
            if m <= 128:
                out.append(Blocks("gemm", bm, bn, bk, w, s, group_m=8))
            if m >= 64:
                out.append(Blocks("tma", bm, bn, bk, w, s, group_m=8))
    if 64 <= m <= 1024:
        for bm, bn, bk, w, s in DOWN_SPLIT_TILES:
            if bm > max(32, 2 * m):
                continue
            for split in DOWN_SPLITS:
                out.append(Blocks("tma", bm, bn, bk, w, s, group_m=8, split_k=split))
    return out


class Problem:
    """One shape's weights (in rotating copies) and activations for the largest M, for the
    region of family ``kind`` (perf/bench.py's KINDS: its norm, activation, biases)."""

    def __init__(
        self, hidden: int, inter: int, max_m: int, l2_bytes: int, seed: int = 0, kind="llama"
    ) -> None:
        self.hidden, self.inter, self.kind = hidden, inter, kind
        self.spec = RegionSpec(**dict(KINDS[kind].op_spec))
        bias = KINDS[kind].bias
        dev = DEVICE
        gen = torch.Generator(device=dev).manual_seed(seed)

        def randn(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen, device=dev) * std).to(DTYPE)

        # Enough copies that the smallest matrix set a launch reads cycles through > 2x the L2.
        down_bytes = hidden * inter * 2
        self.copies = max(2, math.ceil(2 * l2_bytes / down_bytes) + 1)
        self.gate = [randn(inter, hidden, std=0.02) for _ in range(self.copies)]
        gated = self.spec.gated
        self.up = [randn(inter, hidden, std=0.02) if gated else None for _ in range(self.copies)]
        self.down = [randn(hidden, inter, std=0.02) for _ in range(self.copies)]
        self.norm_w = (1.0 + 0.1 * torch.randn(hidden, generator=gen, device=dev)).to(DTYPE)
        if self.spec.norm_weight_offset:  # the model's weight is w, the norm multiplies w + 1
            self.norm_w = self.norm_w - self.spec.norm_weight_offset
        self.norm_b = randn(hidden, std=0.1) if self.spec.norm == "layer" else None
        self.gate_b = randn(inter, std=0.02) if bias else None
        self.down_b = randn(hidden, std=0.02) if bias else None
        self.x = randn(max_m, hidden)
        self.res = randn(max_m, hidden)
        self.normed = torch.empty_like(self.x)
        self.inter_buf = randn(max_m, inter, std=0.1)
        self.out = torch.empty_like(self.x)
        # Split-K counters for the down launches timed alone (the op zeroes a fresh buffer in its
        # gate/up launch; the down kernel leaves them zero, so one zeroed buffer serves all).
        self.locks = torch.zeros(1 << 16, dtype=torch.int32, device=dev)

    def gate_up_fn(self, m: int, blocks: Blocks, prenorm: bool) -> Callable[[int], None]:
        x, normed, inter = self.x[:m], self.normed[:m], self.inter_buf[:m]

        def run(i: int) -> None:
            a = x
            if prenorm:
                norm_launch(x, self.norm_w, normed, EPS, bias=self.norm_b, spec=self.spec).run()
                a = normed
            gate_up_launch(
                blocks, a, self.norm_w, self.gate[i], self.up[i], self.gate_b, None, inter, EPS,
                "tf32", norm_in_loop=not prenorm, norm_bias=self.norm_b, spec=self.spec,
            ).run()  # fmt: skip

        return run

    def down_fn(self, m: int, blocks: Blocks) -> Callable[[int], None]:
        inter, res, out = self.inter_buf[:m], self.res[:m], self.out[:m]

        def run(i: int) -> None:
            down_launch(
                blocks, inter, self.down[i], self.down_b, res, out, "tf32", self.locks
            ).run()

        return run

    def op_fn(self, m: int, config: Config | None) -> Callable[[int], None]:
        x, res = self.x[:m], self.res[:m]

        def run(i: int) -> None:
            rmsnorm_mlp_triton(
                x, self.norm_w, self.gate[i], self.up[i], self.down[i], residual=res, eps=EPS,
                **self.extras(), config=config,
            )  # fmt: skip

        return run

    def extras(self) -> dict:
        """The op's keyword arguments besides the weights: biases and the family's spec."""
        return {
            "gate_bias": self.gate_b, "down_bias": self.down_b, "norm_bias": self.norm_b,
            "spec": self.spec,
        }  # fmt: skip

    @property
    def key(self) -> tuple:
        """The tuning table's key for this problem (see ``launch_config.tuned_configs``)."""
        size = (self.hidden, self.inter)
        return size if self.spec.gated else (*size, NON_GATED)


def time_us(fn: Callable[[int], None], copies: int, target_us: float = 2000.0) -> float:
    """Median µs per call over CUDA-graph replays of calls rotating over the weight copies."""
    for i in range(copies):  # compile + warm up (also allocates split-K counters, not captured)
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(copies):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) * 1e3 / copies, 1.0)
    calls = copies * max(1, min(40, round(target_us / per_call / copies)))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        for i in range(calls):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    samples = []
    for _ in range(12):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(samples)


def check(problem: Problem, m: int, config: Config) -> dict[str, float]:
    """Relative L2 error vs an fp32 reference, ours and eager's (same weights, TF32 off)."""
    x, res = problem.x[:m], problem.res[:m]
    w = (problem.norm_w, problem.gate[0], problem.up[0], problem.down[0])
    extras = problem.extras()
    ours = rmsnorm_mlp_triton(x, *w, residual=res, eps=EPS, **extras, config=config)
    eager = rmsnorm_mlp_reference(x, *w, residual=res, eps=EPS, **extras)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        up = lambda t: None if t is None else t.float()  # noqa: E731
        ref = rmsnorm_mlp_reference(
            x.float(), *(up(t) for t in w), residual=res.float(), eps=EPS,
            **{k: up(v) if k != "spec" else v for k, v in extras.items()},
        )  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"ours": rel_l2(ours, ref), "eager": rel_l2(eager, ref)}


def tune_one(problem: Problem, m: int, deadline: float) -> dict:
    record: dict = {"hidden": problem.hidden, "inter": problem.inter, "m": m}
    roles = {
        "gate_up": [
            (f"{b.key()}{'+prenorm' if p else ''}", problem.gate_up_fn(m, b, p), (b, p))
            for b, p in gate_up_candidates(m, problem.spec.gated)
        ],
        "down": [(b.key(), problem.down_fn(m, b), b) for b in down_candidates(m)],
    }
    best = {}
    for role, cands in roles.items():
        times = {}
        for name, fn, _value in cands:
            if time.monotonic() > deadline:
                times[name] = "skipped (budget)"
                continue
            try:
                times[name] = time_us(fn, problem.copies)
            except Exception as exc:  # a candidate that cannot run (shared memory) is data
                times[name] = f"failed: {error_text(exc, 200)}"
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
        record[role] = times
        timed = [(t, name, value) for (name, _, value), t in zip(cands, times.values(), strict=True)
                 if isinstance(t, float)]  # fmt: skip
        if not timed:
            return record
        best[role] = min(timed, key=lambda item: item[0])
    (gu_blocks, prenorm), down_blocks = best["gate_up"][2], best["down"][2]
    config = Config(f"tuned-m{m}", gu_blocks, down_blocks, prenorm)
    record["choice"] = {
        "gate_up": gu_blocks.key(),
        "down": down_blocks.key(),
        "prenorm": prenorm,
        "gate_up_us": best["gate_up"][0],
        "down_us": best["down"][0],
    }
    record["op_us"] = time_us(problem.op_fn(m, config), problem.copies)
    # The untuned defaults, not the table this run may replace.
    default = next(cfg for max_m, cfg in DEFAULT_CONFIGS if m <= max_m)
    record["default"] = default.name
    record["default_op_us"] = time_us(problem.op_fn(m, default), problem.copies)
    record["errors"] = check(problem, m, config)
    return record


def module_text(choices: dict[tuple, list[dict]], meta: dict, largest_m: int | None = None) -> str:
    """The ``_rmsnorm_mlp_tuned`` module. The last row of a shape covers every larger M only if
    it was tuned at ``largest_m`` (the largest M asked for; None: always): a run cut short by
    its budget leaves larger M to the defaults instead of stretching a small-M choice."""
    lines = [
        '"""Measured launch configurations of ``inductor_fusion::rmsnorm_mlp`` (written by perf/tune.py).',
        "",
        "``TUNED[(hidden_size, intermediate_size)]`` lists ``(max_m, gate_up, down, prenorm)`` rows in",
        "increasing ``max_m``; the first row with ``m <= max_m`` applies. Block strings are",
        "``launch_config.Blocks.key()`` forms. 16-bit dtypes only; fp32 and untuned shapes use the defaults.",
        "",
        f"Measured on {meta['gpu']} ({meta['date']}, torch {meta['torch']}, triton {meta['triton']}).",
        '"""',
        "",
        "TUNED: dict[tuple, tuple[tuple[int, str, str, bool], ...]] = {",
    ]
    for key, rows in sorted(choices.items(), key=lambda item: tuple(map(str, item[0]))):
        lines.append(f"    {key!r}: (")
        for n, row in enumerate(rows):
            last = n == len(rows) - 1 and (largest_m is None or row["m"] >= largest_m)
            max_m = "2**62" if last else str(row["m"])
            c = row["choice"]
            lines.append(f'        ({max_m}, "{c["gate_up"]}", "{c["down"]}", {c["prenorm"]}),')
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default=",".join(f"{h}x{i}" for h, i in SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = [Shape.parse(text) for text in csv_list(args.shapes)]
    tokens = sorted(int(t) for t in csv_list(args.tokens))
    props = torch.cuda.get_device_properties(0)
    meta = {
        "gpu": props.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    t0 = time.monotonic()
    deadline = t0 + args.budget
    records, choices = [], {}
    for shape in shapes:
        l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        problem = Problem(shape.hidden, shape.inter, max(tokens), l2_bytes, kind=shape.kind)
        rows = []
        for m in tokens:
            if time.monotonic() > deadline:
                log(f"budget spent: {shape.key} stops before M={m}")
                break
            rec = tune_one(problem, m, deadline)
            rec["kind"] = shape.kind
            records.append(rec)
            if "choice" in rec:
                rows.append(rec)
                c = rec["choice"]
                log(
                    f"{shape.key} M={m}: op {rec['op_us']:.1f} us (default {rec['default_op_us']:.1f})"
                    f" | gate_up {c['gate_up']}{'+prenorm' if c['prenorm'] else ''}"
                    f" {c['gate_up_us']:.1f} | down {c['down']} {c['down_us']:.1f}"
                    f" | err {rec['errors']['ours']:.2e} (eager {rec['errors']['eager']:.2e})"
                    f" | {time.monotonic() - t0:.0f}s"
                )
            (out_dir / "tune.json").write_text(json.dumps({"meta": meta, "records": records}))
        if rows:
            choices[problem.key] = rows
        del problem
        torch.cuda.empty_cache()
    (out_dir / "_rmsnorm_mlp_tuned.py").write_text(module_text(choices, meta, max(tokens)))
    log(f"wrote {out_dir}/tune.json and _rmsnorm_mlp_tuned.py in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
