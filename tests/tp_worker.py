"""One rank of the tensor-parallel test (test_tensor_parallel.py), started by torchrun.

Loads the checkpoint twice: unsharded (the reference) and with ``tp_plan="auto"`` (weights become
DTensor shards, gloo on the CPU), compiles the sharded one with our backend, and writes what fused
on this rank and the logits' largest difference to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from doc_snippets import snippet
from transformers import AutoModelForCausalLM

import inductor_fusion


def main(checkpoint: str, out: str) -> None:
    rank = int(os.environ["RANK"])
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # The tensor-parallel snippet of docs/clients.md, executed from the page (the checkpoint is
    # fp32, which from_pretrained keeps):
    namespace = {"checkpoint": checkpoint}
    exec(snippet("docs/clients.md", "tensor-parallel").compiled(), namespace)
    model, compiled = namespace["model"], namespace["compiled"]
    assert model.dtype == torch.float32, model.dtype
    with torch.no_grad():
        logits = compiled(ids).logits
        expected = reference(ids).logits
    report = inductor_fusion.get_report()
    result = {
        "world_size": torch.distributed.get_world_size(),
        "sharded": type(model.model.layers[0].mlp.gate_proj.weight).__name__,
        "regions": sorted(
            [r.path("norm"), r.path("mlp"), r.variant] for r in report if r.pattern == "rmsnorm_mlp"
        ),
        "max_abs_diff": (logits.float() - expected).abs().max().item(),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
