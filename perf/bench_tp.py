"""Tensor parallelism on N GPUs (issue #13): our backend vs ``backend="inductor"``, per rank.

A random-init Llama-3-8B-shaped checkpoint (bench_e2e's ``llama-8b``, ``--layers`` to shorten it)
is saved once; for each N in ``--gpus`` one ``torchrun`` loads it with ``tp_plan="auto"`` in bf16
(gate/up column-wise, down row-wise: every rank holds 4096 x 14336/N of each MLP) and, for ours
and for Inductor, measures on every rank:

    fused     regions our pass fused in the first compiled forward (must equal the layers)
    rel_err   last-position logits of two prompts vs the fp32 model on one GPU (relative L2),
              against the bound of the tolerance rule: 2 x the 1-GPU bf16 eager model's own
              error + 1e-3
    prefill   ms per forward of 1 x ``--prefill`` tokens, compiled with the provider's mode
              (transformers' CompileConfig default, CUDA graphs), median of ``--reps`` x 3
    decode    generate() tok/s with the static cache and CUDA graphs at each ``--batches``
              (bench_e2e's ``run_decode_cell``: warm-up, then ``--reps`` timed rounds)

Rank 0's numbers are the table (``results.md``); every rank's are in ``results.json``. Target of
the issue: decode tok/s >= 1.05x Inductor at batch 16-64 on N = 2 and 4.

    python perf/bench_tp.py --out /tmp/tp --gpus 2,4,8 --layers 8     # one device call (if the
                                                                      # budget stops it: --gpus 8)
    python perf/bench_tp.py --out /tmp/tp --cpu-smoke                 # 2 gloo ranks, tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e as e2e
from perf_common import error_text, log, recover, rel_l2

PROVIDERS = ("ours", "inductor")
PROMPTS = (2, 128)  # prompts x tokens of the numerics check


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", default="2,4,8", help="N list; those above the GPU count skip")
    parser.add_argument("--layers", type=int, help="layers of the 8B shape (default all 32)")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=540, help="s for all torchruns")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny fp32 model, 2 gloo ranks, batch 1"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank: its N's folder
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.gpus, args.batches, args.prefill, args.new_tokens, args.reps = "2", "1", 16, 4, 1
    args.gpu_list = [int(n) for n in args.gpus.split(",") if n]
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    return args


def spec_of(args: argparse.Namespace) -> e2e.ModelSpec:
    spec = e2e.MODELS["tiny" if args.cpu_smoke else "llama-8b"]
    return dataclasses.replace(spec, layers=args.layers) if args.layers else spec


def e2e_settings(args: argparse.Namespace, out: Path) -> e2e.Settings:
    """bench_e2e's settings for our sizes (device, dtype and CompileConfig mode as it picks them)."""
    argv = ["--out", str(out), "--batches", args.batches, "--prefill", str(args.prefill)]
    argv += ["--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]
    return e2e.parse_args(argv + (["--cpu-smoke"] if args.cpu_smoke else []))


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The checkpoint, and the reference logits of one unsharded process."""
    settings = e2e_settings(args, work)
    spec = spec_of(args)
    model = e2e.build_model(spec, settings.device, settings.dtype, seed=0)
    model.save_pretrained(work / "checkpoint")
    ids = e2e.token_ids(*PROMPTS, spec.vocab, seed=1, device=settings.device)
    with torch.no_grad():
        bf16 = e2e.prefill_logits(model, ids)
        reference = e2e.reference_model(spec, model, torch.float32)
        fp32 = e2e.prefill_logits(reference, ids)
    bound = 2 * rel_l2(bf16, fp32) + 1e-3
    torch.save({"ids": ids.cpu(), "fp32": fp32.cpu(), "bound": bound}, work / "reference.pt")
    del model, reference
    recover()


def worker(args: argparse.Namespace) -> None:
    """One rank: every provider's numbers, written to ``<worker>/rank<r>.json``."""
    from transformers import AutoModelForCausalLM

    import inductor_fusion

    rank, work = int(os.environ["RANK"]), args.worker.parent
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(work / "checkpoint", tp_plan="auto", dtype=dtype)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    settings = e2e_settings(args, args.worker)  # after the load: the rank's device is current
    spec, device = spec_of(args), settings.device
    reference = torch.load(work / "reference.pt")
    ids = reference["ids"].to(device)
    records = []
    for provider in PROVIDERS:
        record = {"provider": provider, "rank": rank, "world": torch.distributed.get_world_size()}
        try:
            e2e.reset_compiler(model)
            fn = e2e.prefill_callable(model, provider, settings)
            with torch.no_grad():
                logits = e2e.prefill_logits(fn, ids)
                record["fused"] = inductor_fusion.get_report().count(e2e.FUSED_PATTERN)
                record["rel_err"] = rel_l2(logits, reference["fp32"])
                record["bound"] = reference["bound"]
                # The smoke times the numerics batch: a second prompt shape is one more compile
                # per provider and rank, for a number nobody reads on the CPU.
                long = (
                    ids
                    if args.cpu_smoke
                    else e2e.token_ids(1, args.prefill, spec.vocab, seed=2, device=device)
                )
                e2e.time_prefill(fn, long, 3)  # compile, CUDA-graph warm-up and record
                record["prefill_ms"] = statistics.median(e2e.time_prefill(fn, long, 3 * args.reps))
            for batch in args.batch_list:
                cell = e2e.decode_record(spec, provider, batch, settings)
                prompt = e2e.token_ids(batch, settings.prompt, spec.vocab, seed=3, device=device)
                e2e.run_decode_cell(
                    e2e.Generator(model, provider, settings), prompt, cell, settings
                )
                record[f"tok_s_b{batch}"] = cell["tok_s"]
                record[f"recompiles_b{batch}"] = cell["graphs_timed"]
                # Collectives inside the decode graph: did CUDA graphs stay on, in one graph?
                record[f"cudagraph_skips_b{batch}"] = cell["cudagraph_skips"]
                record[f"graph_breaks_b{batch}"] = cell["graph_breaks"]
        except Exception as exc:  # recorded; the other ranks meet the same error
            record["error"] = error_text(exc)
        records.append(record)
        log(f"[rank {rank}] {json.dumps(record)}")
    (args.worker / f"rank{rank}.json").write_text(json.dumps(records))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: argparse.Namespace, work: Path, n: int, seconds: float) -> dict:
    folder = work / f"tp{n}"
    folder.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
               f"--master_port={free_port()}", __file__, "--worker", str(folder)]  # fmt: skip
    command += [a for a in sys.argv[1:] if a != "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.cpu_smoke else None
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds)
        status, tail = done.returncode, done.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        status, tail = "timeout", str(exc.stderr or "")[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    return {"n": n, "status": status, "seconds": time.perf_counter() - start,
            "ranks": ranks, "stderr_tail": "" if status == 0 else tail}  # fmt: skip


def table(runs: list[dict], batches: list[int]) -> str:
    head = ["N", "provider", "fused/rank", "rel err (bound)", "prefill ms"]
    head += [f"tok/s B={b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for run in runs:
        if not run["ranks"]:
            lines.append(f"| {run['n']} | ({run['status']}) |" + " |" * (len(head) - 2))
            continue
        by_provider = {r["provider"]: r for r in run["ranks"][0]}
        for provider, r in by_provider.items():
            fused = sorted({rank[i].get("fused") for rank in run["ranks"] for i in range(len(rank))
                            if rank[i]["provider"] == provider}, key=str)  # fmt: skip
            cells = [str(run["n"]), provider, "/".join(map(str, fused))]
            if "error" in r:
                lines.append("| " + " | ".join([*cells, r["error"][:80]]) + " |")
                continue
            cells += [f"{r['rel_err']:.2e} ({r['bound']:.2e})", f"{r['prefill_ms']:.2f}"]
            for b in batches:
                tok, base = r.get(f"tok_s_b{b}"), by_provider.get("inductor", {}).get(f"tok_s_b{b}")
                ratio = f" ({tok / base:.2f}x)" if tok and base and provider == "ours" else ""
                cells.append(f"{tok:.1f}{ratio}" if tok else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    start = time.perf_counter()
    available = 2 if args.cpu_smoke else torch.cuda.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp:
        work = Path(tmp)
        prepare(args, work)
        runs = []
        for n in args.gpu_list:
            left = args.time_budget - (time.perf_counter() - start)
            if n > available or left < 60:
                runs.append({"n": n, "status": "skipped", "ranks": [],
                             "why": f"{available} devices, {left:.0f} s left"})  # fmt: skip
            else:
                runs.append(run_ranks(args, work, n, left))
            log(json.dumps({k: v for k, v in runs[-1].items() if k != "ranks"}))
            meta = {"layers": spec_of(args).layers, "args": vars(args) | {"out": str(args.out)}}
            data = {"meta": meta, "runs": runs}
            (args.out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    text = table(runs, args.batch_list)
    (args.out / "results.md").write_text(text + "\n")
    log(text)
    return 0 if all(r["status"] in (0, "skipped") for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
