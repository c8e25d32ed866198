"""Per-kernel GPU time of one training region (forward + backward), compile vs ours, and the
host cost per region step (wall time per step at a small M, where the GPU waits for the host).

    python perf/profile_train.py [--host-only]     # CUDA, bf16
"""

from __future__ import annotations

import sys
import time

import bench_train
import perf_common
import torch
from torch.profiler import ProfilerActivity, profile


def _step(fn, h, params, grad):
    return torch.autograd.grad(fn(h), [h, *params], grad)


def main() -> int:
    perf_common.configure_compiler()
    from inductor_fusion.patterns import training

    training.CUDA_MODES = frozenset(training.MEMORY_MODES)
    shapes = () if "--host-only" in sys.argv else ((2048, 8192, 2048), (4096, 14336, 16384))
    for hidden, inter, m in shapes:
        region = bench_train._region(hidden, inter, torch.bfloat16, "cuda")
        h = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
        grad = torch.randn_like(h)
        for name in ("compile", "ours_default"):
            fn, params = bench_train._provider(name, region)
            for _ in range(3):
                _step(fn, h, params, grad)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    _step(fn, h, params, grad)
                torch.cuda.synchronize()
            print(f"=== {hidden}x{inter} M={m} {name}")
            print(
                prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=14, max_name_column_width=70
                )
            )
            torch._dynamo.reset()
    # Host cost: M=64 tokens (GPU work ~tens of µs), 200 steps, wall time per step.
    region = bench_train._region(2048, 8192, torch.bfloat16, "cuda")
    h = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn_like(h)
    for name in ("compile", "ours_default", "ours_recompute", "compile"):
        fn, params = bench_train._provider(name, region)
        for _ in range(5):
            _step(fn, h, params, grad)
        torch.cuda.synchronize()
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(200):
                _step(fn, h, params, grad)
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) / 200 * 1e6)
        print(
            f"host M=64 {name}: wall per fwd+bwd step {min(walls):.1f} us (min of 5), median {sorted(walls)[2]:.1f}"
        )
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
