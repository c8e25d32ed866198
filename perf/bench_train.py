"""Training benchmark of the region: forward + backward time and activation memory (GPU).

    python perf/bench_train.py --out perf/results/train      # CUDA: the issue #11 grid, bf16
    python perf/bench_train.py --cpu-smoke --out /tmp/train  # checks the script on a CPU

Region: ``h + down(silu(gate(n)) * up(n))``, ``n = LlamaRMSNorm(h)``, at M tokens on H x I.
Providers, same weights and inputs, in one process:

    eager            the HF modules (LlamaRMSNorm + LlamaMLP) and the add, autograd
    compile          the same function under torch.compile (backend="inductor")
    liger            LigerRMSNorm + LigerSwiGLUMLP (skipped if liger_kernel is not importable)
    ours_default     torch.ops.inductor_fusion.rmsnorm_mlp_train, default memory mode (eager op)
    ours_recompute   the same op, recompute mode
    ours_compiled_default / ours_compiled_recompute
                     what a fused training region is in a compiled graph: the forward as aten ops
                     compiled by Inductor, our backward op (rmsnorm_mlp_train_compiled under
                     torch.compile), in each memory mode

Per provider: median ms of forward + backward (CUDA events), "saved MiB" (memory held between
the forward and the backward, beyond inputs and weights: the activations kept for the backward)
and "peak MiB" (peak allocation above the baseline during forward + backward). Each result row
carries the error of the input's gradient against the fp32 eager one.

Then a whole-model training step (``--model``): a Llama-3.2-1B-shaped model (``--layers``
decoder layers), bf16, batch x sequence = 8 x 2048, AdamW, loss + backward + step: tokens/s and
peak memory for ``compile`` (backend="inductor"), ``ours`` and ``ours_recompute`` (our backend
with `FUSED_TRAINING_ON_CUDA` turned on for the run, so that the CUDA training regions fuse) and
``liger`` (``apply_liger_kernel_to_llama`` on the model, then backend="inductor").

Data first (results.json, rewritten after every row, so a timeout keeps what ran), then
results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import perf_common
import torch
import torch.nn.functional as F

SHAPES = ((2048, 8192), (4096, 14336))
TOKENS = (2048, 8192, 16384)
PROVIDERS = (
    "eager",
    "compile",
    "liger",
    "ours_default",
    "ours_recompute",
    "ours_compiled_default",
    "ours_compiled_recompute",
)
EPS = 1e-5


def _weights(hidden: int, inter: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def param(*shape: int, scale: float) -> torch.Tensor:
        t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_()

    return {
        "norm": (torch.rand(hidden, generator=g) + 0.5)
        .to(device=device, dtype=dtype)
        .requires_grad_(),
        "gate": param(inter, hidden, scale=hidden**-0.5),
        "up": param(inter, hidden, scale=hidden**-0.5),
        "down": param(hidden, inter, scale=inter**-0.5),
    }


def _eager(h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    x = h.float()
    n = w["norm"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)
    return h + F.linear(F.silu(F.linear(n, w["gate"])) * F.linear(n, w["up"]), w["down"])


def _provider(name: str, w: dict[str, torch.Tensor]):
    if name == "eager":
        return _eager
    if name == "compile":
        return torch.compile(_eager, backend="inductor")
    if name == "liger":
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
        from transformers import LlamaConfig

        hidden, inter = w["down"].shape
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")
        norm = LigerRMSNorm(hidden, eps=EPS).to(w["norm"])
        mlp = LigerSwiGLUMLP(config).to(w["norm"])
        # Plain attributes in the parameters' place, so that the gradients reach our tensors.
        for module, key in ((norm, "norm"), (mlp.gate_proj, "gate"), (mlp.up_proj, "up"),
                            (mlp.down_proj, "down")):  # fmt: skip
            del module.weight
            module.weight = w[key]
        return lambda h, _w: h + mlp(norm(h))
    from inductor_fusion.triton_kernels.rmsnorm_mlp_train import rmsnorm_mlp_train_compiled

    recompute = name.endswith("_recompute")
    if name.startswith("ours_compiled"):
        region = rmsnorm_mlp_train_compiled
        return torch.compile(
            lambda h, w: region(h, w["norm"], w["gate"], w["up"], w["down"], EPS, True, recompute),
            backend="inductor",
        )
    op = torch.ops.inductor_fusion.rmsnorm_mlp_train.default
    return lambda h, w: op(h, w["norm"], w["gate"], w["up"], w["down"], EPS, True, recompute)[0]


def _measure(fn, h, w, grad, *, iters: int, cuda: bool) -> dict[str, Any]:
    params = list(w.values())

    def step() -> tuple[torch.Tensor, ...]:
        out = fn(h, w)
        return torch.autograd.grad(out, [h, *params], grad)

    for _ in range(2):  # compile, autotune, warm caches
        step()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    result: dict[str, Any] = {"ms": statistics.median(times), "saved_mib": None, "peak_mib": None}
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(h, w)
        result["saved_mib"] = (torch.cuda.memory_allocated() - base - out.nbytes) / 2**20
        grads = torch.autograd.grad(out, [h, *params], grad)
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out, grads
    result["grads"] = step()
    return result


def run(shapes, tokens, dtype, device: str, iters: int) -> list[dict[str, Any]]:
    rows = []
    for hidden, inter in shapes:
        w = _weights(hidden, inter, dtype, device)
        for m in tokens:
            g = torch.Generator(device="cpu").manual_seed(m)
            h = (torch.randn(m, hidden, generator=g) * 0.5).to(device, dtype).requires_grad_()
            grad = torch.randn(m, hidden, generator=g).to(device, dtype)
            truth = torch.autograd.grad(
                _eager(h.float(), {k: v.float() for k, v in w.items()}), h, grad.float()
            )[0]
            for name in PROVIDERS:
                row = {"hidden": hidden, "inter": inter, "m": m, "provider": name}
                try:
                    result = _measure(
                        _provider(name, w), h, w, grad, iters=iters, cuda=device == "cuda"
                    )
                    row.update({k: v for k, v in result.items() if k != "grads"})
                    row["dh_rel_err"] = perf_common.rel_l2(result["grads"][0], truth)
                except Exception as exc:  # a missing peer or a failure is a row, not an abort
                    row["error"] = perf_common.error_text(exc)
                perf_common.log(json.dumps(row))
                rows.append(row)
                perf_common.recover()
    return rows


MODEL_PROVIDERS = ("compile", "ours", "ours_recompute", "liger")


def model_rows(
    device: str, dtype: torch.dtype, layers: int, batch: int, seq: int, iters: int, small: bool
) -> list[dict[str, Any]]:
    """Whole-model training steps per provider (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import inductor_fusion
    from inductor_fusion.triton_kernels import rmsnorm_mlp_train

    # Not demo._build's model: that one keeps a 32000-token vocabulary, and the 1B shape's
    # 128256-token head (its logits and their gradient) is a real part of a training step.
    dims = (
        dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, head_dim=16)
        if small
        else dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, head_dim=64)
    )
    config = LlamaConfig(
        **dims, num_hidden_layers=layers, num_key_value_heads=dims["num_attention_heads"] // 4,
        vocab_size=1000 if small else 128256, max_position_embeddings=max(seq, 128),
    )  # fmt: skip
    rows = []
    for name in MODEL_PROVIDERS:
        row: dict[str, Any] = {"model": f"llama-1b-shape-{layers}-layers", "provider": name,
                               "batch": batch, "seq": seq}  # fmt: skip
        switch = rmsnorm_mlp_train.FUSED_TRAINING_ON_CUDA
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(config).to(dtype).train()
            options = None
            if name == "liger":
                from liger_kernel.transformers import apply_liger_kernel_to_llama

                apply_liger_kernel_to_llama(model=model)
            if name.startswith("ours"):
                rmsnorm_mlp_train.FUSED_TRAINING_ON_CUDA = True
                memory = "recompute" if name.endswith("recompute") else "default"
                options = {"inductor_fusion": {"memory": memory}}
                inductor_fusion.reset_report()
            backend = "inductor_fusion" if name.startswith("ours") else "inductor"
            compiled = torch.compile(model, backend=backend, options=options)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
            ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

            def step(compiled=compiled, optimizer=optimizer, ids=ids) -> torch.Tensor:
                loss = compiled(ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss

            for _ in range(2):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(iters):
                loss = step()
            float(loss)  # waits for the GPU
            seconds = (time.perf_counter() - t0) / iters
            row["tokens_per_s"] = batch * seq / seconds
            row["step_ms"] = seconds * 1e3
            if device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if name.startswith("ours"):
                row["fused"] = inductor_fusion.get_report().count("rmsnorm_mlp")
            del model, compiled, optimizer, step
        except Exception as exc:  # a missing peer or a failure is a row, not an abort
            row["error"] = perf_common.error_text(exc)
        finally:
            rmsnorm_mlp_train.FUSED_TRAINING_ON_CUDA = switch
        perf_common.log(json.dumps(row))
        rows.append(row)
        perf_common.recover()
    return rows


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Region forward + backward ({data['dtype']}, {data['device']}, {data['date']})",
        "",
        "| HxI | M | provider | ms | saved MiB | peak MiB | dh rel err |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in data["rows"]:
        if "provider" in r and "m" not in r:
            continue  # a model row, below
        if "error" in r:
            lines.append(
                f"| {r['hidden']}x{r['inter']} | {r['m']} | {r['provider']} | {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['hidden']}x{r['inter']} | {r['m']} | {r['provider']} | {r['ms']:.3f} | "
            f"{cell(r['saved_mib'], '.1f')} | {cell(r['peak_mib'], '.1f')} | {r['dh_rel_err']:.2e} |"
        )
    model = [r for r in data["rows"] if "m" not in r]
    if model:
        lines += [
            "",
            "| model | B x S | provider | tokens/s | step ms | peak GiB | fused |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in model:
            head = f"| {r['model']} | {r['batch']}x{r['seq']} | {r['provider']} |"
            if "error" in r:
                lines.append(f"{head} {r['error']} | | | |")
                continue
            lines.append(
                f"{head} {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
                f"{cell(r.get('peak_gib'), '.2f')} | {r.get('fused', '')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perf/results/train"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fp32")
    parser.add_argument("--tokens", default=None, help="region M list (default the issue's)")
    parser.add_argument("--no-region", action="store_true", help="skip the region grid")
    parser.add_argument("--model", action="store_true", help="also the whole-model step")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    perf_common.configure_compiler()
    if args.cpu_smoke:
        shapes, tokens, dtype, device, iters = ((32, 48),), (8, 13), torch.float32, "cpu", 2
    else:
        if not torch.cuda.is_available():
            print("bench_train: needs CUDA (or --cpu-smoke)", file=sys.stderr)
            return 2
        shapes, tokens, dtype, device, iters = SHAPES, TOKENS, torch.bfloat16, "cuda", args.iters
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "liger_kernel": perf_common.dist_version("liger-kernel"),
        "commit": perf_common.git_commit(),
        "rows": [],
    }

    def save(rows: list[dict[str, Any]]) -> None:
        data["rows"] += rows
        (args.out / "results.json").write_text(json.dumps(data, indent=2))

    if not args.no_region:
        for shape in shapes:
            for m in tokens:
                save(run((shape,), (m,), dtype, device, iters))
    if args.model:
        batch, seq = (2, 16) if args.cpu_smoke else (8, 2048)
        save(model_rows(device, dtype, args.layers, batch, seq, iters, args.cpu_smoke))
    (args.out / "results.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
