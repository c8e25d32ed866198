"""Issue #27 experiment: can a Triton GEMM on Hopper carry the prefill region's fusions at cuBLAS speed?

The region's only traffic a fusion can save at large M is the [M, I] round trip of gate and up
(written by two GEMMs, read by SiLU·mul, which writes h): 5·M·I·2 bytes against 2·M·I·2 with
SiLU·mul in the GEMM epilogue, ~7 % of the region at M=4096 on 4096x14336. That pays only if the
fused gate/up GEMM runs within a few % of cuBLAS. This script times, per M, on the card it runs on:

- cublas:   n @ Wg.T, n @ Wu.T (cuBLAS), then Inductor's compiled SiLU·mul (what compile runs);
- cublas_packed: one cuBLAS GEMM on [Wg; Wu] (N = 2I) + SiLU·mul: the best cuBLAS can do;
- ours_tma: the op's current gate/up TMA kernel (two accumulators, one tile per program);
- persistent: a persistent TMA kernel (one program per SM, grouped tiles, ``tl.range(flatten=)``
  so the next tile's loads overlap the epilogue), two accumulators;
- persistent_packed: the same with one accumulator over a [2·BLOCK_N, K] weight tile of gate and
  up rows packed block by block (a weight layout that frozen inference weights could take once),
  split in the epilogue;
and the down GEMM + residual: cuBLAS addmm vs the persistent kernel with the residual in its
epilogue. CUDA-graph replay (``triton.testing.do_bench_cudagraph``), median.

    python perf/exp_prefill_gemm.py --out perf/results/prefill_gemm   (or: GPU_CHECK_STAGES=prefill bash perf/gpu_check.sh)
"""

# Each closure is timed inside the iteration that defines it, so late binding is harmless here.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from perf_common import dist_version, log
from triton.tools.tensor_descriptor import TensorDescriptor

from inductor_fusion.triton_kernels import _rmsnorm_mlp_jit as jit


@triton.jit
def _tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % size_m), (tile_id % group) // size_m


@triton.jit
def gate_up_persistent(
    x_desc,
    g_desc,
    u_desc,
    o_desc,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            acc_g = tl.dot(a, g_desc.load([off_n, ki * BLOCK_K]).T, acc_g)
            acc_u = tl.dot(a, u_desc.load([off_n, ki * BLOCK_K]).T, acc_u)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        o_desc.store([off_m, off_n], h.to(o_desc.dtype))


@triton.jit
def gate_up_persistent_packed(
    x_desc,
    w_desc,  # [2N, K]: rows [2b·BN, 2b·BN + BN) gate block b, the next BN up block b
    o_desc,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            acc = tl.dot(a, w_desc.load([pid_n * 2 * BLOCK_N, ki * BLOCK_K]).T, acc)
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
        h = gate * tl.sigmoid(gate) * up
        o_desc.store([off_m, pid_n * BLOCK_N], h.to(o_desc.dtype))


@triton.jit
def down_persistent(
    a_desc,
    w_desc,
    r_desc,
    o_desc,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            acc = tl.dot(
                a_desc.load([off_m, ki * BLOCK_K]), w_desc.load([off_n, ki * BLOCK_K]).T, acc
            )
        acc += r_desc.load([off_m, off_n]).to(tl.float32)
        o_desc.store([off_m, off_n], acc.to(o_desc.dtype))


def pack(gate: torch.Tensor, up: torch.Tensor, block_n: int) -> torch.Tensor:
    n, k = gate.shape
    blocks = (n + block_n - 1) // block_n
    pad = blocks * block_n - n
    g = torch.nn.functional.pad(gate, (0, 0, 0, pad)).view(blocks, block_n, k)
    u = torch.nn.functional.pad(up, (0, 0, 0, pad)).view(blocks, block_n, k)
    return torch.stack((g, u), 1).reshape(2 * blocks * block_n, k).contiguous()


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60) * 1000.0  # us


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="4096x14336,2048x8192")
    parser.add_argument("--tokens", default="1024,4096,16384")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dt = torch.bfloat16
    silu_mul = torch.compile(lambda g, u: torch.nn.functional.silu(g) * u)
    rows: list[dict] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "sms": sms,
    }
    for shape in args.shapes.split(","):
        hidden, inter = map(int, shape.split("x"))
        torch.manual_seed(0)
        wg = torch.randn(inter, hidden, device="cuda", dtype=dt) / hidden**0.5
        wu = torch.randn(inter, hidden, device="cuda", dtype=dt) / hidden**0.5
        wd = torch.randn(hidden, inter, device="cuda", dtype=dt) / inter**0.5
        w_cat = torch.cat((wg, wu))
        for m in map(int, args.tokens.split(",")):
            n = torch.randn(m, hidden, device="cuda", dtype=dt)
            res = torch.randn(m, hidden, device="cuda", dtype=dt)
            ref = silu_mul(n @ wg.T, n @ wu.T)
            times: dict[str, float] = {}
            errors: dict[str, float] = {}
            times["cublas"] = bench(lambda: silu_mul(n @ wg.T, n @ wu.T))
            times["cublas_packed"] = bench(lambda: silu_mul(*(n @ w_cat.T).split(inter, 1)))
            out = torch.empty(m, inter, device="cuda", dtype=dt)

            def check(name: str) -> None:
                errors[name] = float((out.float() - ref.float()).norm() / ref.float().norm())

            for bm, bn, bk, stages, warps in ((128, 128, 64, 3, 8), (128, 128, 64, 4, 8)):
                xd = TensorDescriptor.from_tensor(n, [bm, bk])
                gd = TensorDescriptor.from_tensor(wg, [bn, bk])
                ud = TensorDescriptor.from_tensor(wu, [bn, bk])
                grid = (triton.cdiv(m, bm) * triton.cdiv(inter, bn),)

                def tma(xd=xd, gd=gd, ud=ud, grid=grid, bm=bm, bn=bn, bk=bk, s=stages, w=warps):
                    jit.gate_up_tma_kernel[grid](
                        xd, gd, ud, out, out, out, out, 0, n, m, inter, hidden, 0, 0,
                        out.stride(0), out.stride(1), ACTIVATION="silu", GATED=True,
                        HAS_GATE_BIAS=False, HAS_UP_BIAS=False, ZERO_LOCKS=False,
                        DOT_PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                        num_warps=w, num_stages=s,
                    )  # fmt: skip

                name = f"ours_tma {bm}x{bn}x{bk} s{stages}"
                try:
                    times[name] = bench(tma)
                    check(name)
                except Exception as error:  # a config that does not compile
                    log(f"{name}: {type(error).__name__}: {str(error)[:200]}")
            for bm, bn, bk, stages, warps, flat in (
                (128, 128, 64, 3, 8, True),
                (128, 128, 64, 4, 8, True),
                (128, 128, 64, 3, 8, False),
                (128, 64, 64, 4, 4, True),
            ):
                xd = TensorDescriptor.from_tensor(n, [bm, bk])
                gd = TensorDescriptor.from_tensor(wg, [bn, bk])
                ud = TensorDescriptor.from_tensor(wu, [bn, bk])
                od = TensorDescriptor.from_tensor(out, [bm, bn])
                grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(inter, bn)),)
                name = f"persistent {bm}x{bn}x{bk} s{stages} w{warps} flat={flat}"

                def persistent(
                    xd=xd, gd=gd, ud=ud, od=od, grid=grid, c=(bm, bn, bk, stages, warps, flat)
                ):
                    gate_up_persistent[grid](
                        xd, gd, ud, od, m, inter, hidden, BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2],
                        GROUP_M=8, NUM_SMS=grid[0], FLATTEN=c[5], num_stages=c[3], num_warps=c[4],
                    )  # fmt: skip

                try:
                    times[name] = bench(persistent)
                    check(name)
                except Exception as error:
                    log(f"{name}: {type(error).__name__}: {str(error)[:200]}")
            for bm, bn, bk, stages, warps, flat in (
                (128, 128, 64, 3, 8, True),
                (128, 128, 64, 4, 8, True),
                (128, 64, 64, 4, 8, True),
                (128, 64, 64, 5, 4, True),
            ):
                packed = pack(wg, wu, bn)
                xd = TensorDescriptor.from_tensor(n, [bm, bk])
                wd_ = TensorDescriptor.from_tensor(packed, [2 * bn, bk])
                od = TensorDescriptor.from_tensor(out, [bm, bn])
                grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(inter, bn)),)
                name = f"persistent_packed {bm}x{2 * bn}x{bk} s{stages} w{warps}"

                def persistent_packed(
                    xd=xd, wd_=wd_, od=od, grid=grid, c=(bm, bn, bk, stages, warps, flat)
                ):
                    gate_up_persistent_packed[grid](
                        xd, wd_, od, m, inter, hidden, BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2],
                        GROUP_M=8, NUM_SMS=grid[0], FLATTEN=c[5], num_stages=c[3], num_warps=c[4],
                    )  # fmt: skip

                try:
                    times[name] = bench(persistent_packed)
                    check(name)
                except Exception as error:
                    log(f"{name}: {type(error).__name__}: {str(error)[:200]}")
            # Down + residual.
            h = ref
            y = torch.empty(m, hidden, device="cuda", dtype=dt)
            down_ref = torch.addmm(res, h, wd.T)
            times["down cublas addmm"] = bench(lambda: torch.addmm(res, h, wd.T))
            for bm, bn, bk, stages, warps in (
                (128, 128, 64, 4, 8),
                (128, 256, 64, 3, 8),
                (128, 128, 64, 3, 4),
            ):
                ad = TensorDescriptor.from_tensor(h, [bm, bk])
                wdd = TensorDescriptor.from_tensor(wd, [bn, bk])
                rd = TensorDescriptor.from_tensor(res, [bm, bn])
                yd = TensorDescriptor.from_tensor(y, [bm, bn])
                grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(hidden, bn)),)
                name = f"down persistent {bm}x{bn}x{bk} s{stages} w{warps}"

                def down(ad=ad, wdd=wdd, rd=rd, yd=yd, grid=grid, c=(bm, bn, bk, stages, warps)):
                    down_persistent[grid](
                        ad, wdd, rd, yd, m, hidden, inter, BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2],
                        GROUP_M=8, NUM_SMS=grid[0], FLATTEN=True, num_stages=c[3], num_warps=c[4],
                    )  # fmt: skip

                try:
                    times[name] = bench(down)
                    errors[name] = float(
                        (y.float() - down_ref.float()).norm() / down_ref.float().norm()
                    )
                except Exception as error:
                    log(f"{name}: {type(error).__name__}: {str(error)[:200]}")
            flops = 2 * 2 * m * hidden * inter
            row = {"hidden": hidden, "intermediate": inter, "m": m, "us": times, "rel_err": errors}
            rows.append(row)
            # After every row: a call that runs out of time keeps what it measured.
            (out_dir / "prefill_gemm.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1)
            )
            for name, us in sorted(times.items(), key=lambda kv: kv[1]):
                f = flops if not name.startswith("down") else flops / 2
                log(f"{hidden}x{inter} M={m:6d} {name:45s} {us:9.1f} us {f / us / 1e6:6.0f} TFLOP/s "
                    f"err={errors.get(name, float('nan')):.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
