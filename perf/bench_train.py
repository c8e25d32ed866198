"""Training benchmark (GPU): the region's forward + backward, and whole-model training steps.

    python perf/bench_train.py --out perf/results/train --model     # CUDA, bf16
    python perf/bench_train.py --cpu-smoke --model --out /tmp/train # checks the script on a CPU

Region: ``h + LlamaMLP(LlamaRMSNorm(h))`` (the transformers modules) at M tokens on H x I.
Providers, same weights and inputs, in one process:

    eager            the modules, autograd
    compile          torch.compile(backend="inductor")
    compile_budget   the same with torch._functorch.config.activation_memory_budget = 0.5
                     (Inductor's own knob for saving less)
    liger            LigerRMSNorm + LigerSwiGLUMLP (skipped if liger_kernel is not importable)
    ours_default / ours_recompute
                     torch.compile(backend="inductor_fusion") in each memory mode

Per provider: median ms of forward + backward (CUDA events), "saved MiB" (held between the
forward and the backward beyond inputs and weights: the activations kept for the backward),
"peak MiB" (peak allocation above the baseline during forward + backward, weight gradients
included), and the largest ratio over the input and the four parameters of the gradient's error
against fp32 eager autograd to eager bf16's own error (the tolerance rule wants <= 2).

Whole model (``--model``): a Llama-3.2-1B-shaped model (``--layers`` decoder layers, all 16 by
default), bf16 parameters, AdamW, sequence 2048, loss + backward + step, each decoder layer
compiled (``layer.compile``: the graph is the same for every layer, so one compile serves all;
the second batch makes the batch dimension dynamic, so the largest one compiles nothing new).
Per provider (compile, ours, ours_recompute, liger): tokens/s and peak memory at ``--batch``,
then the largest batch that fits: the peak is linear in the batch, so it is measured at two
batches, the largest fitting batch predicted from the device's memory and then run (and one
less, if that does not fit); tokens/s at that batch.

Data first (results.json, rewritten after every row, so a timeout keeps what ran), then
results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import perf_common
import torch

SHAPES = ((2048, 8192), (4096, 14336))
TOKENS = (2048, 8192, 16384)
PROVIDERS = ("eager", "compile", "compile_budget", "liger", "ours_default", "ours_recompute")
EPS = 1e-5
GRADS = ("hidden", "norm", "gate", "up", "down")


class Region(torch.nn.Module):
    """``h + mlp(norm(h))`` with the transformers Llama modules."""

    def __init__(self, hidden: int, inter: int) -> None:
        from transformers.models.llama.configuration_llama import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        super().__init__()
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")
        self.norm = LlamaRMSNorm(hidden, eps=EPS)
        self.mlp = LlamaMLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))

    def weights(self) -> list[torch.Tensor]:
        mlp = self.mlp
        return [self.norm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]


def _region(hidden: int, inter: int, dtype: torch.dtype, device: str) -> Region:
    torch.manual_seed(0)
    region = Region(hidden, inter)
    with torch.no_grad():
        region.norm.weight.copy_(torch.rand(hidden) + 0.5)
    return region.to(device=device, dtype=dtype)


def _liger(region: Region) -> torch.nn.Module:
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    hidden, inter = region.mlp.down_proj.weight.shape
    liger = Region(hidden, inter)
    liger.norm = LigerRMSNorm(hidden, eps=EPS)
    liger.mlp = LigerSwiGLUMLP(region.mlp.config)
    for mine, theirs in zip(liger.weights(), region.weights(), strict=True):
        mine.data = theirs.data  # shared storage: the same weights
    return liger.to(region.norm.weight)


@contextlib.contextmanager
def _budget(name: str):
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=0.5 if "budget" in name else 1.0):
        yield


def _compiled(name: str, module: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    if name in ("compile", "compile_budget", "liger"):
        return torch.compile(module, backend="inductor", **kwargs)
    if name.startswith("ours"):
        memory = "recompute" if name.endswith("recompute") else "default"
        options = {"inductor_fusion": {"memory": memory}}
        return torch.compile(module, backend="inductor_fusion", options=options, **kwargs)
    return module


def _provider(name: str, region: Region) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    if name == "liger":  # eager: its autograd functions are its kernels (Dynamo rejects them)
        liger = _liger(region)
        return liger, liger.weights()
    return _compiled(name, region) if name != "eager" else region, region.weights()


def _measure(fn, h, params, grad, *, name: str, iters: int, cuda: bool) -> dict[str, Any]:
    def step() -> tuple[torch.Tensor, ...]:
        out = fn(h)
        return torch.autograd.grad(out, [h, *params], grad)

    with _budget(name):  # read when the first call compiles
        for _ in range(2):  # compile, warm caches
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
        out = fn(h)
        result["saved_mib"] = (torch.cuda.memory_allocated() - base - out.nbytes) / 2**20
        grads = torch.autograd.grad(out, [h, *params], grad)
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out, grads
    result["grads"] = step()
    return result


def run(shapes, tokens, dtype, device: str, iters: int) -> list[dict[str, Any]]:
    rows = []
    for hidden, inter in shapes:
        region = _region(hidden, inter, dtype, device)
        for m in tokens:
            g = torch.Generator(device="cpu").manual_seed(m)
            h = (torch.randn(m, hidden, generator=g) * 0.5).to(device, dtype).requires_grad_()
            grad = torch.randn(m, hidden, generator=g).to(device, dtype)
            exact = _region(hidden, inter, torch.float32, device)
            h32 = h.detach().float().requires_grad_()
            truth = torch.autograd.grad(exact(h32), [h32, *exact.weights()], grad.float())
            own = None
            for name in PROVIDERS:
                row = {"hidden": hidden, "inter": inter, "m": m, "provider": name}
                try:
                    import inductor_fusion

                    inductor_fusion.reset_report()
                    fn, params = _provider(name, region)
                    # Liger's RMSNorm backward writes into the output gradient: a copy each.
                    result = _measure(
                        fn, h, params, grad.clone(), name=name, iters=iters, cuda=device == "cuda"
                    )
                    if name.startswith("ours"):
                        row["fused"] = inductor_fusion.get_report().count("rmsnorm_mlp")
                    row.update({k: v for k, v in result.items() if k != "grads"})
                    errors = [
                        perf_common.rel_l2(a, b)
                        for a, b in zip(result["grads"], truth, strict=True)
                    ]
                    row["grad_rel_err"] = dict(zip(GRADS, errors, strict=True))
                    own = errors if name == "eager" else own
                    if own is not None and min(own) > 1e-7:  # fp32 eager is the truth itself
                        row["err_ratio"] = max(e / o for e, o in zip(errors, own, strict=True))
                    row["dh_rel_err"] = errors[0]
                except Exception as exc:  # a missing peer or a failure is a row, not an abort
                    row["error"] = perf_common.error_text(exc)
                perf_common.log(json.dumps(row))
                rows.append(row)
                perf_common.recover()
    return rows


MODEL_PROVIDERS = ("compile", "ours", "ours_recompute", "liger")


def _model(device: str, dtype: torch.dtype, layers: int, small: bool, name: str, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    # The 1B shape's 128256-token head (its logits and their gradient) is a real part of a
    # training step, so the vocabulary is Llama-3's.
    dims = (
        dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, head_dim=16)
        if small
        else dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, head_dim=64)
    )
    config = LlamaConfig(
        **dims, num_hidden_layers=layers, num_key_value_heads=dims["num_attention_heads"] // 4,
        vocab_size=1000 if small else 128256, max_position_embeddings=max(seq, 128),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).train()
    if name == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    provider = "ours_default" if name == "ours" else name
    for layer in model.model.layers:
        layer.compile(
            **({"backend": "inductor"} if provider in ("compile", "liger") else {}),
            **(
                {"backend": "inductor_fusion",
                 "options": {"inductor_fusion": {"memory": provider.removeprefix("ours_")}}}
                if provider.startswith("ours") else {}
            ),
        )  # fmt: skip
    return model, config


def _step_rows(device, dtype, layers, small, name, seq, batches, iters) -> list[dict[str, Any]]:
    """Tokens/s and peak memory per batch in ``batches`` (None entries: the predicted largest
    batch, from the peaks measured so far)."""
    import inductor_fusion

    model, config = _model(device, dtype, layers, small, name, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    rows: list[dict[str, Any]] = []
    capacity = torch.cuda.mem_get_info()[1] if device == "cuda" else 0
    # Once per provider: the batch dimension turns dynamic at the first batch that differs from
    # the first one compiled with this code (perhaps by the provider before), and later batches
    # compile nothing, so the count is what this provider's compiles fused.
    inductor_fusion.reset_report()
    for batch in batches:
        largest = batch is None
        if largest:  # the largest that fits: peak(B) = a + b B, fitted on the last two
            fitted = [r for r in rows if "peak_gib" in r][-2:]
            if len(fitted) < 2 or device != "cuda":
                continue
            (b0, p0), (b1, p1) = ((r["batch"], r["peak_gib"] * 2**30) for r in fitted)
            slope = (p1 - p0) / (b1 - b0)
            batch = int((0.97 * capacity - (p0 - slope * b0)) // slope)
        for attempt in (batch, batch - 1) if largest else (batch,):
            row: dict[str, Any] = {"model": f"llama-1b-shape-{layers}-layers", "provider": name,
                                   "batch": attempt, "seq": seq, "largest": largest}  # fmt: skip
            try:
                ids = torch.randint(0, config.vocab_size, (attempt, seq), device=device)

                def step(ids=ids, model=model, optimizer=optimizer) -> torch.Tensor:
                    # No KV cache in training (its updates would also recompile each layer).
                    loss = model(ids, labels=ids, use_cache=False).loss
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
                row.update(tokens_per_s=attempt * seq / seconds, step_ms=seconds * 1e3)
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if name.startswith("ours"):
                    row["fused"] = inductor_fusion.get_report().count("rmsnorm_mlp")
                rows.append(row)
                perf_common.log(json.dumps(row))
                break
            except torch.cuda.OutOfMemoryError as exc:
                row["error"] = perf_common.error_text(exc, 120)
                rows.append(row)
                perf_common.log(json.dumps(row))
                optimizer.zero_grad(set_to_none=True)
                perf_common.recover()
    del model, optimizer
    perf_common.recover()
    return rows


def model_rows(
    device: str, dtype: torch.dtype, layers: int, batch: int, seq: int, iters: int, small: bool
) -> list[dict[str, Any]]:
    """Whole-model training steps per provider (see the module docstring)."""
    rows = []
    for name in MODEL_PROVIDERS:
        try:
            rows += _step_rows(
                device, dtype, layers, small, name, seq, (batch, 2 * batch, None), iters
            )
        except Exception as exc:  # a missing peer or a failure is a row, not an abort
            row = {"model": f"llama-1b-shape-{layers}-layers", "provider": name,
                   "batch": batch, "seq": seq, "error": perf_common.error_text(exc)}  # fmt: skip
            perf_common.log(json.dumps(row))
            rows.append(row)
        perf_common.recover()
    return rows


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Training ({data['dtype']}, {data['device']}, {data['date']})",
        "",
        f"torch {data['torch']}, liger-kernel {data['liger_kernel']}, commit {data['commit']}.",
        "Region `h + mlp(norm(h))`, forward + backward; speed-up vs `compile`; error ratio: the",
        "largest over the 5 gradients of (error vs fp32) / (eager bf16's own error).",
        "",
        "| HxI | M | provider | ms | vs compile | saved MiB | peak MiB | peak vs compile | err ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    regions = [r for r in data["rows"] if "m" in r]
    base = {(r["hidden"], r["m"]): r for r in regions if r["provider"] == "compile" and "ms" in r}
    for r in regions:
        head = f"| {r['hidden']}x{r['inter']} | {r['m']} | {r['provider']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        ref = base.get((r["hidden"], r["m"]))
        speed = ref["ms"] / r["ms"] if ref else None
        peak = r["peak_mib"] / ref["peak_mib"] if ref and ref.get("peak_mib") else None
        lines.append(
            f"{head} {r['ms']:.3f} | {cell(speed, '.3f')} | {cell(r['saved_mib'], '.1f')} | "
            f"{cell(r['peak_mib'], '.1f')} | {cell(peak, '.3f')} | {cell(r.get('err_ratio'), '.2f')} |"
        )
    model = [r for r in data["rows"] if "m" not in r]
    if model:
        lines += [
            "",
            "Whole model (each decoder layer compiled), AdamW; 'largest': the largest batch that",
            "fits (predicted from the peaks at the two smaller batches, then run).",
            "",
            "| model | B x S | provider | largest | tokens/s | step ms | peak GiB | fused |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in model:
            head = f"| {r['model']} | {r['batch']}x{r['seq']} | {r['provider']} | {'yes' if r.get('largest') else ''} |"
            if "error" in r:
                lines.append(f"{head} {r['error']} | | | |")
                continue
            lines.append(
                f"{head} {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
                f"{cell(r.get('peak_gib'), '.2f')} | {r.get('fused', '')} |"
            )
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """results.png: per region row, time and peak vs compile; the model's tokens/s and peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = [r for r in data["rows"] if "m" in r and "ms" in r]
    base = {(r["hidden"], r["m"]): r for r in regions if r["provider"] == "compile"}
    keys = list(base)
    names = [p for p in dict.fromkeys(r["provider"] for r in regions) if p != "compile"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        rows = {(r["hidden"], r["m"]): r for r in regions if r["provider"] == name}
        for ax, field in ((axes[0], "ms"), (axes[1], "peak_mib")):
            ratio = [
                (base[k][field] / rows[k][field] if field == "ms" else rows[k][field] / base[k][field])
                if k in rows and rows[k].get(field) and base[k].get(field) else 0
                for k in keys
            ]  # fmt: skip
            ax.bar([j + i * width for j in range(len(keys))], ratio, width, label=name)
    labels = [f"H={h}\nM={m}" for h, m in keys]
    for ax, title in ((axes[0], "region speed-up vs compile"), (axes[1], "region peak vs compile")):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], labels, fontsize=7)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    model = [r for r in data["rows"] if "m" not in r and "tokens_per_s" in r]
    for r in model:
        marker = "*" if r.get("largest") else "o"
        axes[2].scatter(r["peak_gib"], r["tokens_per_s"] / 1e3, marker=marker, s=60,
                        label=f"{r['provider']} B={r['batch']}")  # fmt: skip
    axes[2].set_xlabel("peak GiB")
    axes[2].set_ylabel("k tokens/s")
    axes[2].set_title("whole model (* = largest batch)")
    axes[2].legend(fontsize=6)
    fig.suptitle(f"Training, {data['device']}, {data['dtype']}, {data['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perf/results/train"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fp32")
    parser.add_argument("--tokens", default=None, help="region M list (default the issue's)")
    parser.add_argument("--no-region", action="store_true", help="skip the region grid")
    parser.add_argument("--model", action="store_true", help="also the whole-model step")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="the model's fixed batch")
    parser.add_argument("--shapes", default=None, help="region HxI list, e.g. 2048x8192")
    parser.add_argument("--providers", default=None, help="region providers (default all)")
    parser.add_argument("--model-providers", default=None, help="model providers (default all)")
    parser.add_argument("--report", type=Path, help="only rewrite results.md/png from this JSON")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        perf_common.write_report(data, args.report.parent, markdown=markdown, plot=plot)
        return 0
    perf_common.configure_compiler()
    from inductor_fusion.patterns import training

    # What is measured is whether fusing pays: our providers fuse on CUDA whatever the switch says.
    training.CUDA_MODES = frozenset(training.MEMORY_MODES)
    if args.cpu_smoke:
        shapes, tokens, dtype, device, iters = ((32, 48),), (8, 13), torch.float32, "cpu", 2
    else:
        if not torch.cuda.is_available():
            print("bench_train: needs CUDA (or --cpu-smoke)", file=sys.stderr)
            return 2
        shapes, tokens, dtype, device, iters = SHAPES, TOKENS, torch.bfloat16, "cuda", args.iters
    if args.tokens:
        tokens = tuple(int(t) for t in perf_common.csv_list(args.tokens))
    if args.shapes:
        shapes = tuple(
            tuple(int(d) for d in s.split("x")) for s in perf_common.csv_list(args.shapes)
        )
    global PROVIDERS, MODEL_PROVIDERS
    if args.providers:
        PROVIDERS = tuple(perf_common.csv_list(args.providers))
    if args.model_providers:
        MODEL_PROVIDERS = tuple(perf_common.csv_list(args.model_providers))
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
        layers = 2 if args.cpu_smoke else args.layers
        batch, seq = (2, 16) if args.cpu_smoke else (args.batch, 2048)
        save(model_rows(device, dtype, layers, batch, seq, iters, args.cpu_smoke))
    perf_common.write_report(data, args.out, markdown=markdown, plot=plot)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
