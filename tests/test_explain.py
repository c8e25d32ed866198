"""explain(): what a compile would fuse, without compiling; it must agree with the compile."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import TINY, fresh_compile, layer_paths, tiny_model, token_ids
from transformers import LlamaConfig

import inductor_fusion
from inductor_fusion.config import ENV_DISABLE
from inductor_fusion.triton_kernels.rmsnorm_mlp import MAX_PROFITABLE_TOKENS

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

LAYERS = TINY["num_hidden_layers"]
LORA = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"])


def compiled_regions(model: torch.nn.Module) -> set[tuple[str | None, str | None, str]]:
    """(norm, mlp, variant) of every region our backend fuses in an inference compile."""
    with fresh_compile() as report, torch.no_grad():
        torch.compile(model, backend="inductor_fusion")(token_ids())
        return {(r.path("norm"), r.path("mlp"), r.variant) for r in report}


def explained_regions(explanation: inductor_fusion.Explanation) -> set[tuple[str, str, str]]:
    return {(c.norm, c.mlp, c.variant) for c in explanation.fused}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_layer_fuses_and_lines_name_it(family: str) -> None:
    explanation = inductor_fusion.explain(tiny_model(family))
    assert [c.layer for c in explanation.candidates] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert [c.mlp for c in explanation.fused] == layer_paths("mlp")
    lines = str(explanation).splitlines()
    assert "model.layers.1: post_attention_layernorm -> mlp: fuses as " in "\n".join(lines)
    assert f"cuda, 1-{MAX_PROFITABLE_TOKENS} tokens: our fused GEMV kernels" in str(explanation)
    assert f"cuda, {MAX_PROFITABLE_TOKENS + 1}+ tokens: left to Inductor" in str(explanation)
    assert lines[-1] == f"{LAYERS} of {LAYERS} candidate region(s) fuse"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_agrees_with_the_compile(family: str) -> None:
    model = tiny_model(family)
    assert explained_regions(inductor_fusion.explain(model)) == compiled_regions(model)


@pytest.mark.slow
def test_lora_adapters_fuse_nothing_and_say_why() -> None:
    model = get_peft_model(tiny_model("llama"), LORA).eval()
    explanation = inductor_fusion.explain(model)
    assert len(explanation.candidates) == LAYERS and not explanation.fused
    for candidate in explanation.candidates:
        assert candidate.mlp.startswith("base_model.model.model.layers.")
        assert candidate.reason.startswith(
            "an adapter inside the region: gate_proj (peft lora.Linear), up_proj (peft "
            "lora.Linear), down_proj (peft lora.Linear) add their own matmuls"
        ), candidate.reason
    assert compiled_regions(model) == set()  # as the compile finds
    merged = inductor_fusion.explain(model.merge_and_unload())
    assert len(merged.fused) == LAYERS


def test_reasons_for_toggles_kernel_config_activation_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model("llama")
    only_layer_0 = {
        (("RMSNorm", "*.0.post_attention_layernorm"), ("MLP", "*.0.mlp")): (
            "inductor_fusion:rmsnorm_mlp"
        )
    }
    scoped = inductor_fusion.explain(model, kernel_config=only_layer_0)
    assert [c.fuses for c in scoped.candidates] == [True, False]
    assert scoped.candidates[1].reason == (
        "outside the places the plan allows (the model's KernelConfig)"
    )
    assert inductor_fusion.explain(model, disable="rmsnorm_mlp").candidates[0].reason == (
        "rmsnorm_mlp is switched off (default + the disable option)"
    )
    monkeypatch.setenv(ENV_DISABLE, "all")
    assert inductor_fusion.explain(model).candidates[0].reason == (
        f"rmsnorm_mlp is switched off (default + {ENV_DISABLE})"
    )
    monkeypatch.delenv(ENV_DISABLE)
    gelu = inductor_fusion.explain(tiny_model("llama", hidden_act="gelu"))
    assert gelu.candidates[0].reason == (
        "unsupported activation GELUActivation: rmsnorm_mlp fuses SiLU (SwiGLU) only"
    )
    fp64 = inductor_fusion.explain(tiny_model("llama", dtype=torch.float64))
    assert fp64.candidates[0].reason == (
        "unsupported dtype torch.float64: rmsnorm_mlp fuses float16, bfloat16 and float32"
    )


def test_config_only_8b_in_seconds() -> None:
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    inductor_fusion.explain(tiny_model("llama"))  # patterns registered: measure explain itself
    start = time.perf_counter()
    explanation = inductor_fusion.explain(config, dtype=torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert (explanation.hidden_size, explanation.intermediate_size) == (4096, 14336)
    assert len(explanation.fused) == 32
    assert {c.variant for c in explanation.fused} == {"lowp_3d_residual_left"}
    # Observed ~3 s on a loaded 2-core CI machine, nearly all of it transformers building the
    # meta model; 32 identical layers are traced once.
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_cli_json_on_a_checkpoint_folder(tmp_path: Path) -> None:
    tiny_model("qwen3").save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "inductor_fusion", "explain", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["model"] == "Qwen3ForCausalLM"
    assert [c["mlp"] for c in data["candidates"] if c["fuses"]] == layer_paths("mlp")
    assert data["regimes"][0] == {
        "device": "cuda",
        "tokens": f"1-{MAX_PROFITABLE_TOKENS}",
        "runs": "our fused GEMV kernels (rmsnorm_mlp)",
    }
    unknown = subprocess.run(
        [sys.executable, "-m", "inductor_fusion", "explain", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unknown.returncode != 0 and "no-such-model: not a folder" in unknown.stderr
