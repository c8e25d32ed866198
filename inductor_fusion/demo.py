"""``python -m inductor_fusion.demo``: compile a small Llama-shaped model and show what fused.

Builds the model from a config (random init, nothing downloaded), compiles it with
``backend="inductor_fusion"``, prints the fused regions and the logits' error against eager,
and on a GPU times eager, ``backend="inductor"`` and ours on the same model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import inductor_fusion


def _build(device: torch.device, dtype: torch.dtype, large: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama-3.2-1B's layer shape on a GPU; a few small layers on the CPU, where Inductor's C++
    # compile dominates the demo's time.
    dims = (
        dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, head_dim=64)
        if large
        else dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, head_dim=32)
    )
    config = LlamaConfig(
        **dims,
        num_hidden_layers=4,
        num_key_value_heads=dims["num_attention_heads"] // 4,
        vocab_size=32000 if large else 1000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _time_ms(fn, ids, repeats: int = 20) -> float:
    for _ in range(3):
        fn(ids)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(ids)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    # On a GPU the fused kernels pay up to 64 tokens per region (above, Inductor's own GEMMs are
    # faster and the region is left to them): the default is a decode-sized batch.
    tokens = args.tokens or (16 if cuda else 33)
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'CPU'} | torch {torch.__version__} | "
        f"dtype {dtype}"
    )
    if not cuda:
        print(
            "No GPU: the fused op runs its CPU path (the PyTorch reference); the Triton kernels "
            "run only on CUDA. Timings are skipped."
        )

    model = _build(device, dtype, large=cuda)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, tokens), device=device)

    inductor_fusion.reset_report()
    with torch.no_grad():
        eager = model(ids).logits
        reference = copy.deepcopy(model).float()(ids).logits if dtype != torch.float32 else None
        started = time.perf_counter()
        ours_fn = torch.compile(model, backend="inductor_fusion")
        ours = ours_fn(ids).logits
        compile_s = time.perf_counter() - started

    report = inductor_fusion.get_report()
    print(f"compiled with backend='inductor_fusion' in {compile_s:.1f} s")
    print(report.summary())
    layers = model.config.num_hidden_layers
    status = "all layers" if report.count("rmsnorm_mlp") == layers else "NOT all layers"
    print(f"rmsnorm_mlp fused {report.count('rmsnorm_mlp')} of {layers} decoder layers ({status})")

    ours_vs_eager = _rel_l2(ours, eager)
    print(f"logits: relative L2 difference ours vs eager = {ours_vs_eager:.2e}")
    ok = report.count("rmsnorm_mlp") == layers
    if reference is not None:
        eager_err, ours_err = _rel_l2(eager, reference), _rel_l2(ours, reference)
        within = ours_err <= 2 * eager_err + 1e-4
        print(
            f"vs fp32 reference: eager {eager_err:.2e}, ours {ours_err:.2e} "
            f"({'within' if within else 'OUTSIDE'} the 2x-eager tolerance)"
        )
        ok = ok and within
    else:
        ok = ok and ours_vs_eager < 1e-4

    if cuda:
        with torch.no_grad():
            inductor_fn = torch.compile(copy.deepcopy(model), backend="inductor")
            timings = {
                "eager": _time_ms(model, ids),
                "backend='inductor'": _time_ms(inductor_fn, ids),
                "backend='inductor_fusion'": _time_ms(ours_fn, ids),
            }
        print(f"forward time, batch {args.batch} x {tokens} tokens (median ms):")
        for name, ms in timings.items():
            print(f"  {name:28s} {ms:8.3f}")
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
