"""Measured launch configurations of ``inductor_fusion::rmsnorm_mlp`` (written by perf/tune.py).

``TUNED_BY_DEVICE[device name][(hidden_size, intermediate_size)]`` lists ``(max_m, gate_up,
down, prenorm)`` rows in increasing ``max_m``; the first row with ``m <= max_m`` applies. Block
strings are ``launch_config.Blocks.key()`` forms. 16-bit dtypes only; fp32 and untuned shapes use
the defaults. A GPU without its own table uses ``TUNED``, the H100's (same architecture).

``TUNED``: measured on NVIDIA H100 80GB HBM3 (2026-11-25T10:36:07+00:00, torch 2.11.0+cu130,
triton 3.6.0). perf/tune.py writes one device's table in this form; add it under its name.
"""

TUNED: dict[tuple[int, int], tuple[tuple[int, str, str, bool], ...]] = {
    (2048, 8192): (
        (1, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (4, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (8, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (16, "gemv:16x64x128:w8s4", "gemv:16x64x128:w8s4k4", False),
        (32, "gemv:32x64x128:w8s4", "gemv:32x16x128:w4s4k4", False),
        (64, "gemv:64x64x128:w8s4", "gemv:64x64x128:w4s4k4", False),
        (128, "tma:64x64x64:w4s4g8", "tma:64x64x64:w4s4g8k4", True),
        (256, "tma:128x128x64:w8s4g8", "tma:128x64x128:w8s3g8k2", True),
        (512, "tma:128x128x64:w8s4g8", "tma:64x128x64:w4s4g8k2", True),
        (1024, "tma:128x128x64:w8s4g8", "tma:128x128x64:w4s4g8", True),
        (2048, "tma:128x128x64:w8s4g8", "tma:128x256x64:w8s3g8", True),
        (2**62, "tma:128x128x64:w8s3g8", "tma:128x256x64:w8s3g8", True),
    ),
    (3072, 8192): (
        (1, "gemv:16x64x128:w8s4", "gemv:16x32x128:w4s4k4", False),
        (4, "gemv:16x64x128:w8s4", "gemv:16x32x128:w4s4k4", False),
        (8, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k2", False),
        (16, "gemv:16x64x128:w8s4", "gemv:16x32x128:w4s4k4", False),
        (32, "gemv:32x64x128:w8s4", "gemv:32x64x128:w8s4k2", False),
        (64, "gemv:64x64x128:w8s4", "gemv:64x64x128:w4s4k2", False),
        (128, "tma:128x64x128:w8s3g8", "tma:64x64x64:w4s4g8k4", True),
        (256, "tma:128x128x64:w8s4g8", "tma:64x128x64:w4s4g8k2", True),
        (512, "tma:128x128x64:w8s4g8", "tma:64x128x64:w4s4g8", True),
        (1024, "tma:128x128x64:w8s4g8", "tma:128x128x64:w8s3g8", True),
        (2048, "tma:128x128x64:w8s3g8", "tma:128x128x64:w4s4g8", True),
        (2**62, "tma:128x128x64:w8s3g8", "tma:128x256x64:w8s3g8", True),
    ),
    (4096, 14336): (
        (1, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (4, "gemv:16x128x128:w8s3", "gemv:16x64x256:w8s3k2", False),
        (8, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (16, "gemv:16x128x128:w8s3", "gemv:16x64x256:w8s3k2", False),
        (32, "gemv:32x128x128:w8s3", "gemv:32x64x256:w8s3k2", False),
        (64, "tma:64x64x128:w4s4g8", "gemv:64x64x128:w4s4k2", True),
        (128, "tma:128x64x64:w4s3g8", "tma:128x64x128:w8s3g8k2", True),
        (256, "tma:128x128x64:w8s4g8", "tma:64x128x64:w4s4g8k2", True),
        (512, "tma:128x128x64:w8s4g8", "tma:128x128x64:w4s4g8", True),
        (1024, "tma:128x128x64:w8s4g8", "tma:128x256x64:w8s3g8", True),
        (2048, "tma:128x128x64:w8s3g8", "tma:128x256x64:w8s3g8", True),
        (2**62, "tma:128x128x64:w8s3g8", "tma:128x256x64:w8s3g8", True),
    ),
}

# NVIDIA H200 (2026-12-02T04:08:07+00:00, torch 2.11.0+cu130, triton 3.6.0): the token counts a
# compiled graph fuses (M <= 64), GEMV launches only, which run the same kernels eagerly and
# lowered. At M=64 on 2048x8192 tune.py preferred the TMA gate/up (38.0 us eager), which a
# compiled graph runs as its pointer form; the H100 row's GEMVs ran 37.5 us lowered on the H200
# (perf/results/host), so that row is kept. Larger M fall back to the defaults.
TUNED_H200: dict[tuple, tuple[tuple[int, str, str, bool], ...]] = {
    (2048, 8192): (
        (1, "gemv:16x64x64:w8s6", "gemv:16x64x128:w4s4k4", False),
        (16, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (64, "gemv:64x64x128:w8s4", "gemv:64x64x128:w4s4k4", False),
    ),
    (4096, 14336): (
        (1, "gemv:16x128x128:w8s3", "gemv:16x64x64:w4s6k4", False),
        (16, "gemv:16x128x128:w8s3", "gemv:16x64x64:w4s6k4", False),
        (64, "gemv:64x128x64:w8s4", "gemv:64x64x128:w4s4k2", False),
    ),
    # One rank's region of Llama-3-8B under tensor parallelism on 2 / 4 / 8 GPUs (I = 14336 / N,
    # kind llama_tp: no residual before the all-reduce), 2026-12-03, same versions
    # (perf/results/tp_shard/tune.log). From M=32 the GEMV gate/up has few programs (I/64 for
    # 1792 columns: 28 on 132 SMs): at M=64 the norm pre-pass + TMA gate/up ran 19.6-36.2 us
    # against 41-43 for the best GEMV.
    (4096, 7168): (
        (1, "gemv:16x64x128:w8s4", "gemv:16x64x64:w4s6k4", False),
        (16, "gemv:16x64x128:w8s4", "gemv:16x64x128:w4s4k2", False),
        (32, "gemv:32x64x128:w8s4", "gemv:32x64x128:w8s4k2", False),
        (64, "tma:64x64x128:w4s4g8", "gemv:64x64x128:w4s4k2", True),
    ),
    (4096, 3584): (
        (1, "gemv:16x32x128:w8s4", "gemv:16x64x64:w4s6k4", False),
        (16, "gemv:16x32x128:w8s4", "gemv:16x64x128:w4s4k2", False),
        (32, "gemv:32x64x128:w8s4", "gemv:32x64x128:w8s4k2", False),
        (64, "tma:64x64x128:w4s4g8", "gemv:64x64x128:w4s4k2", True),
    ),
    (4096, 1792): (
        (1, "gemv:16x32x128:w8s4", "gemv:16x64x64:w4s6k4", False),
        (16, "gemv:16x32x128:w8s4", "gemv:16x64x128:w4s4k2", False),
        (32, "gemv:32x64x128:w8s4", "gemv:32x64x128:w8s4k2", False),
        (64, "tma:64x64x128:w4s4g8", "gemv:64x64x128:w4s4k2", True),
    ),
    # Families (2026-12-02T18:41, same versions; perf/results/families/tune.json). Gemma-2-2B:
    # the defaults' 64-wide gate/up tiles gave 144 programs on 132 SMs (a second, nearly empty
    # wave); 128-wide ones take M=1 from 50.6 to 40.8 us. M=64 keeps a GEMV (36.7 us gate/up;
    # the TMA one tune.py preferred runs as a pointer GEMM in a compiled graph).
    (2304, 9216): (
        (4, "gemv:16x128x128:w8s3", "gemv:16x64x64:w4s6k4", False),
        (16, "gemv:16x128x128:w8s3", "gemv:16x64x128:w4s4k4", False),
        (32, "gemv:32x128x128:w8s3", "gemv:32x64x128:w4s4k4", False),
        (64, "gemv:64x128x64:w8s4", "gemv:64x64x64:w4s6k4", False),
    ),
    # Non-gated (Pythia-2.8B, Nemotron-4-Minitron-4B sizes): what the eager op and the eager
    # layer run (compiled graphs leave these regions to Inductor on CUDA: even tuned they ran
    # 0.84-0.95x). From M=64 the norm pre-pass + TMA gate/up (24.5 us vs 43.7 for a GEMV).
    (2560, 10240, "non-gated"): (
        (4, "gemv:16x128x128:w8s4", "gemv:16x64x128:w4s4k4", False),
        (16, "gemv:16x128x128:w8s4", "gemv:16x32x128:w4s4k4", False),
        (32, "gemv:32x128x128:w8s4", "gemv:32x32x128:w4s4k4", False),
        (64, "tma:64x64x64:w4s4g8", "gemv:64x64x128:w4s4k2", True),
    ),
    (3072, 9216, "non-gated"): (
        (16, "gemv:16x128x128:w8s4", "gemv:16x64x64:w4s6k4", False),
        (32, "gemv:32x128x128:w8s4", "gemv:32x32x128:w4s4k4", False),
        (64, "tma:64x64x64:w4s4g8", "gemv:64x64x128:w4s4k2", True),
    ),
}

# Shapes whose fused region lost to torch.compile at some M <= MAX_PROFITABLE_TOKENS (64) even
# tuned: the largest token count compiled graphs fuse for them. Gemma-2-2B on the H200
# (perf/results/families): 1.14-1.19x at M <= 32, 0.90x at 64; a graph with a symbolic M in
# (16, 64] runs the M=64 configuration, so the bound is the regime edge at 16.
#
# One rank's Llama-3-8B region under tensor parallelism, tuned (perf/results/tp_shard): at 4 GPUs
# (I = 3584) 1.08x up to 16 tokens, 0.96-0.97x at 32 and 64; at 8 GPUs (I = 1792) 0.64-0.81x at
# every M (our GEMV gate/up has too few column tiles to fill the SMs), so there compiled graphs
# never fuse (0). 2 GPUs (I = 7168): 1.05-1.29x, the general bound.
PROFITABLE_TOKENS: dict[tuple[int, int], int] = {
    (2304, 9216): 16,
    (4096, 3584): 16,
    (4096, 1792): 0,
}

TUNED_BY_DEVICE: dict[str, dict[tuple, tuple[tuple[int, str, str, bool], ...]]] = {
    "NVIDIA H100 80GB HBM3": TUNED,
    "NVIDIA H200": TUNED_H200,
}
