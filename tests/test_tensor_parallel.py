"""Tensor parallelism (transformers' tp_plan="auto", 2 CPU ranks over gloo): fused per shard.

The all-reduce after the down projection sits between the MLP and the residual add, so each rank
fuses the region without its residual (the no_residual variant) on its shard of the weights.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import TINY, child_environ, layer_paths, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_hub_no_toggles")]

WORKER = Path(__file__).with_name("tp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_fuse_every_layer_and_match_the_unsharded_model(tmp_path: Path) -> None:
    checkpoint = tmp_path / "llama"
    tiny_model("llama").save_pretrained(checkpoint)
    # Nothing compiled before is served: a cache-key tag of this test's own (force_disable_caches
    # would also rebuild every C++ kernel). The second rank may be served the first one's graph
    # (the same graph on its shard); the report then lists that graph's regions, from our records.
    env = {**child_environ(str(tmp_path)), "OMP_NUM_THREADS": "1"}  # two ranks on 2 cores
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER),
        str(checkpoint),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = [
        [norm, mlp, "fp32_3d_no_residual"]
        for norm, mlp in zip(
            layer_paths("post_attention_layernorm"), layer_paths("mlp"), strict=True
        )
    ]
    for rank in range(2):
        data = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert data["world_size"] == 2 and data["sharded"] == "DTensor", data
        assert data["regions"] == expected, data  # one region per layer on each rank
        # Sharded matmuls sum in another order than the unsharded ones: fp32 rounding only.
        assert data["max_abs_diff"] < 1e-5, data
    assert len(expected) == TINY["num_hidden_layers"]
