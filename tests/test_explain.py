"""explain(): what a compile would fuse, without compiling; it must agree with the compile."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from doc_snippets import snippet
from peft import LoraConfig, get_peft_model
from test_families import CASES
from tiny_models import FAMILIES, TINY, fresh_compile, layer_paths, tiny_model, token_ids
from transformers import CompileConfig, LlamaConfig

import inductor_fusion
from inductor_fusion import layer_trace
from inductor_fusion.config import ENV_DISABLE
from inductor_fusion.patterns.gqa_attention import MAX_QUERY_TOKENS
from inductor_fusion.triton_kernels.launch_config import MAX_PROFITABLE_TOKENS

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

LAYERS = TINY["num_hidden_layers"]
LORA = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"])
NORM_MLP = ("rmsnorm_mlp", "layernorm_mlp", "mlp_postnorm")


def compiled_regions(model: torch.nn.Module) -> set[tuple[str, tuple[tuple[str, str], ...], str]]:
    """(family, modules, variant) of every norm -> MLP region our backend fuses in an inference
    compile of a whole sequence. The attention is left out: whether it fuses at a 7-token prefill
    depends on the transformers version (5.17 passes SDPA a mask there, 5.24 none), which explain
    does not trace; `test_gqa_decode_agrees_with_a_static_cache_generate` checks it at decode."""
    with fresh_compile() as report, torch.no_grad():
        torch.compile(model, backend="inductor_fusion")(token_ids())
        return {(r.pattern, r.paths, r.variant) for r in report if r.pattern in NORM_MLP}


def explained_regions(
    explanation: inductor_fusion.Explanation, families: tuple[str, ...] = NORM_MLP
) -> set[tuple[str, tuple[tuple[str, str], ...], str]]:
    return {(c.family, c.modules, c.variant) for c in explanation.fused if c.family in families}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llama_layers_list_rmsnorm_mlp_and_gqa_decode(family: str) -> None:
    explanation = inductor_fusion.explain(tiny_model(family))
    # Per layer, in model order: its attention, then its norm -> MLP region.
    assert [(c.layer, c.family) for c in explanation.candidates] == [
        (f"model.layers.{i}", f) for i in range(LAYERS) for f in ("gqa_decode", "rmsnorm_mlp")
    ]
    assert [c.mlp for c in explanation.of("rmsnorm_mlp") if c.fuses] == layer_paths("mlp")
    assert [c.attention for c in explanation.of("gqa_decode") if c.fuses] == layer_paths(
        "self_attn"
    )
    text = str(explanation)
    assert (
        "model.layers.1: post_attention_layernorm -> mlp: fuses as "
        "rmsnorm_mlp[fp32_3d_residual_left]"
    ) in text
    assert "model.layers.1: self_attn: fuses as gqa_decode[mask]" in text
    assert f"rmsnorm_mlp: cuda, 1-{MAX_PROFITABLE_TOKENS} tokens: our fused GEMV kernels" in text
    assert f"rmsnorm_mlp: cuda, {MAX_PROFITABLE_TOKENS + 1}+ tokens: left to Inductor" in text
    assert (
        f"gqa_decode: any device, 1-{MAX_QUERY_TOKENS} query tokens: SDPA on the key/value" in text
    )
    assert text.splitlines()[-1] == (
        f"{2 * LAYERS} of {2 * LAYERS} candidate region(s) fuse: gqa_decode {LAYERS} of "
        f"{LAYERS}, rmsnorm_mlp {LAYERS} of {LAYERS}"
    )


@pytest.mark.parametrize(
    ("family", "overrides", "dtype", "pattern", "variant", "norm", "prefix"),
    CASES,
    ids=[f"{c[0]}-{c[4]}" for c in CASES],
)
def test_every_norm_mlp_family_names_the_variant_its_compile_fuses(
    family, overrides, dtype, pattern, variant, norm, prefix
) -> None:
    """The family, modules and variant the compile fuses in test_families.CASES: the decoder
    layer's own form (Gemma2/3's post-norm, Granite's scale, GPT-NeoX's parallel residual)."""
    explanation = inductor_fusion.explain(tiny_model(family, dtype, **overrides))
    regions = explanation.of(pattern)
    assert [c.variant for c in regions if c.fuses] == [variant] * LAYERS, str(explanation)
    layers = [f"{prefix}.layers.{i}" for i in range(LAYERS)]
    assert [c.modules for c in regions] == [
        (("norm", f"{layer}.{norm}"), ("mlp", f"{layer}.mlp")) for layer in layers
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_olmo2_fuses_its_mlp_as_mlp_postnorm(dtype: torch.dtype) -> None:
    explanation = inductor_fusion.explain(tiny_model("olmo2", dtype))
    lowp = "lowp" if dtype == torch.bfloat16 else "fp32"
    regions = explanation.of("mlp_postnorm")
    assert [c.modules for c in regions] == [(("mlp", path),) for path in layer_paths("mlp")]
    assert {c.variant for c in regions if c.fuses} == {f"olmo2_{lowp}_3d_no_residual"}
    assert len([c for c in regions if c.fuses]) == LAYERS
    # Its post_attention_layernorm normalises the attention output: not the MLP's norm.
    assert not explanation.of("rmsnorm_mlp")
    assert f"model.layers.0: mlp: fuses as mlp_postnorm[olmo2_{lowp}_3d_no_residual]" in str(
        explanation
    )


def test_gpt_neox_layernorm_mlp_and_multi_head_attention() -> None:
    explanation = inductor_fusion.explain(tiny_model("gpt_neox", hidden_act="gelu"))
    assert "gpt_neox.layers.0: post_attention_layernorm -> mlp: fuses as layernorm_mlp[" in str(
        explanation
    )
    attention = explanation.of("gqa_decode")
    assert [c.attention for c in attention] == [
        f"gpt_neox.layers.{i}.attention" for i in range(LAYERS)
    ]
    assert not any(c.fuses or c.is_candidate for c in attention)
    assert str(attention[0]) == (
        "gpt_neox.layers.0: attention: gqa_decode not a candidate: multi-head attention "
        "(GPTNeoXAttention has one key/value head per query head): transformers makes no "
        "repeat_kv copies to remove"
    )
    assert str(explanation).splitlines()[-1] == (
        f"{LAYERS} of {LAYERS} candidate region(s) fuse: layernorm_mlp {LAYERS} of {LAYERS}; "
        f"{LAYERS} module(s) not a candidate"
    )
    # Regimes only for what fuses somewhere.
    assert {r.family for r in explanation.regimes} == {"layernorm_mlp"}
    # On CUDA a non-gated MLP stays Inductor's at every token count (should_fuse refuses it).
    assert "layernorm_mlp: cuda, any tokens: left to Inductor: non-gated MLP" in str(explanation)
    assert "layernorm_mlp: cuda, 1-" not in str(explanation)


def test_multi_head_llama_attention_is_not_a_candidate() -> None:
    explanation = inductor_fusion.explain(tiny_model("llama", num_key_value_heads=4))
    attention = explanation.of("gqa_decode")
    assert len(attention) == LAYERS and not any(c.is_candidate for c in attention)
    assert attention[0].reason.startswith("not a candidate: multi-head attention (LlamaAttention")
    assert len(explanation.fused) == LAYERS  # the norm -> MLP regions still fuse


def test_gqa_decode_reasons_for_toggles_kernel_config_and_attention_implementation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model("llama")
    off = inductor_fusion.explain(model, disable="gqa_decode")
    assert [c.reason for c in off.of("gqa_decode")] == [
        "gqa_decode is switched off (default + the disable option)"
    ] * LAYERS
    assert all(c.fuses for c in off.of("rmsnorm_mlp"))
    assert "gqa_decode:" not in str(off).split("\nmodel.layers.0")[0]  # no regime for it
    monkeypatch.setenv(ENV_DISABLE, "gqa_decode")
    assert inductor_fusion.explain(model).of("gqa_decode")[0].reason == (
        f"gqa_decode is switched off (default + {ENV_DISABLE})"
    )
    monkeypatch.delenv(ENV_DISABLE)
    only_layer_0 = {(("Attention", "*.0.self_attn"),): "inductor_fusion:gqa_decode"}
    scoped = inductor_fusion.explain(model, kernel_config=only_layer_0)
    assert [c.fuses for c in scoped.of("gqa_decode")] == [True, False]
    assert scoped.of("gqa_decode")[1].reason == (
        "outside the places the plan allows (the model's KernelConfig)"
    )
    model.set_attn_implementation("eager")
    assert (
        inductor_fusion.explain(model)
        .of("gqa_decode")[0]
        .reason.startswith(
            "eager attention (attn_implementation='eager'): matmul + softmax, no SDPA op to pack"
        )
    )
    model.set_attn_implementation("sdpa")
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    assert (
        inductor_fusion.explain(model)
        .of("gqa_decode")[0]
        .reason.startswith("already grouped: TRANSFORMERS_SDPA_FORCE_GQA=1")
    )


def test_norm_mlp_reasons_for_toggles_kernel_config_activation_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model("llama")
    only_layer_0 = {
        (("RMSNorm", "*.0.post_attention_layernorm"), ("MLP", "*.0.mlp")): (
            "inductor_fusion:rmsnorm_mlp"
        )
    }
    scoped = inductor_fusion.explain(model, kernel_config=only_layer_0)
    assert [c.fuses for c in scoped.of("rmsnorm_mlp")] == [True, False]
    assert scoped.of("rmsnorm_mlp")[1].reason == (
        "outside the places the plan allows (the model's KernelConfig)"
    )
    assert inductor_fusion.explain(model, disable="rmsnorm_mlp").of("rmsnorm_mlp")[0].reason == (
        "rmsnorm_mlp is switched off (default + the disable option)"
    )
    monkeypatch.setenv(ENV_DISABLE, "all")
    assert {c.reason for c in inductor_fusion.explain(model).candidates} == {
        f"rmsnorm_mlp is switched off (default + {ENV_DISABLE})",
        f"gqa_decode is switched off (default + {ENV_DISABLE})",
    }
    monkeypatch.delenv(ENV_DISABLE)
    gelu = inductor_fusion.explain(tiny_model("llama", hidden_act="gelu"))
    assert gelu.of("rmsnorm_mlp")[0].reason == (
        "unsupported activation GELUActivation: rmsnorm_mlp fuses gelu_tanh, silu"
    )
    fp64 = inductor_fusion.explain(tiny_model("llama", dtype=torch.float64))
    assert fp64.of("rmsnorm_mlp")[0].reason == (
        "unsupported dtype torch.float64: rmsnorm_mlp fuses float16, bfloat16 and float32"
    )


def test_config_only_8b_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    inductor_fusion.explain(tiny_model("llama"))  # patterns registered: measure explain itself
    traces = []
    trace = layer_trace.trace_layer
    monkeypatch.setattr(layer_trace, "trace_layer", lambda *a: traces.append(a) or trace(*a))
    start = time.perf_counter()
    explanation = inductor_fusion.explain(config, dtype=torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert len(traces) == 1  # 32 identical layers
    assert (explanation.hidden_size, explanation.intermediate_size) == (4096, 14336)
    assert len(explanation.of("rmsnorm_mlp")) == len(explanation.of("gqa_decode")) == 32
    assert len(explanation.fused) == 64
    assert {c.variant for c in explanation.of("rmsnorm_mlp")} == {"lowp_3d_residual_left"}
    # docs/usage.md's example output is this explanation's (its "# ..." elides layers 1-31;
    # tests/test_docs.py executes that snippet too).
    code = snippet("docs/usage.md", "explain").code
    shown = [line[2:] for line in code.splitlines() if line.startswith("# ") and line != "# ..."]
    assert shown and [line for line in str(explanation).splitlines() if line in shown] == shown
    # Observed ~3 s on a loaded 2-core CI machine, nearly all of it transformers building the
    # meta model; 32 identical layers are traced once.
    assert elapsed < 30, f"{elapsed:.1f} s"


@pytest.mark.parametrize(
    ("inter", "cuda_line"),
    [
        (3584, "rmsnorm_mlp: cuda, 1-16 tokens: our fused GEMV kernels"),
        (1792, "rmsnorm_mlp: cuda, any tokens: left to Inductor: 4096x1792 (our kernels"),
    ],
    ids=["tp4-shard", "tp8-shard"],
)
def test_regimes_follow_a_shapes_measured_bound(inter: int, cuda_line: str) -> None:
    """One rank's Llama-3-8B region under tensor parallelism on 4 / 8 GPUs (measured bounds in
    `_rmsnorm_mlp_tuned.PROFITABLE_TOKENS`): explain's regimes say what should_fuse does."""
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    text = str(inductor_fusion.explain(config, dtype=torch.bfloat16))
    assert cuda_line in text, text
    assert "rmsnorm_mlp: cuda, 1-64 tokens" not in text


def test_training_regimes_follow_the_cuda_switch(monkeypatch) -> None:
    """explain says per memory mode whether training regions fuse on CUDA, as should_fuse does
    (`training.CUDA_MODES`), and names the form that has training variants."""
    from inductor_fusion.patterns import training

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    text = str(inductor_fusion.explain(config))
    for mode in training.MEMORY_MODES:
        assert (
            f"rmsnorm_mlp: cuda, training, any tokens: memory={mode!r}: Inductor's kernels "
            "with our memory policy, for regions of the llama form"
        ) in text, text
    monkeypatch.setattr(training, "CUDA_MODES", frozenset({"recompute"}))
    text = str(inductor_fusion.explain(config))
    assert "memory='default': left to Inductor: training regions in memory mode" in text, text
    assert "memory='recompute': Inductor's kernels" in text


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
    # One shape for every family's candidate; its modules keyed by the family's roles.
    keys = {"layer", "family", "modules", "fuses", "variant", "reason"}
    assert all(set(c) == keys for c in data["candidates"])
    assert [(c["family"], c["modules"]) for c in data["candidates"] if c["fuses"]] == [
        pair
        for i in range(LAYERS)
        for pair in (
            ("gqa_decode", {"attention": f"model.layers.{i}.self_attn"}),
            (
                "rmsnorm_mlp",
                {
                    "norm": f"model.layers.{i}.post_attention_layernorm",
                    "mlp": f"model.layers.{i}.mlp",
                },
            ),
        )
    ]
    assert {
        "family": "rmsnorm_mlp",
        "device": "cuda",
        "tokens": f"1-{MAX_PROFITABLE_TOKENS}",
        "runs": "our fused GEMV kernels",
    } in data["regimes"]
    unknown = subprocess.run(
        [sys.executable, "-m", "inductor_fusion", "explain", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unknown.returncode != 0 and "no-such-model: not a folder" in unknown.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "olmo2"])
def test_agrees_with_the_compile(family: str) -> None:
    model = tiny_model(family)
    assert explained_regions(inductor_fusion.explain(model)) == compiled_regions(model)


@pytest.mark.slow
def test_gqa_decode_agrees_with_a_static_cache_generate() -> None:
    model = tiny_model("llama")
    ids = token_ids(batch=1, seq=4)
    config = CompileConfig(backend="inductor_fusion", fullgraph=False)
    config._compile_all_devices = True  # without it generate() does not compile on the CPU
    with fresh_compile() as report, torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
            cache_implementation="static", compile_config=config,
        )  # fmt: skip
        compiled = {r.path("attention") for r in report if r.pattern == "gqa_decode"}
    explained = inductor_fusion.explain(model).of("gqa_decode")
    assert {c.attention for c in explained if c.fuses} == compiled == set(layer_paths("self_attn"))


@pytest.mark.slow
def test_lora_adapters_fuse_nothing_and_say_why() -> None:
    model = get_peft_model(tiny_model("llama"), LORA).eval()
    explanation = inductor_fusion.explain(model)
    regions = explanation.of("rmsnorm_mlp")
    assert len(regions) == LAYERS and not any(c.fuses for c in regions)
    for candidate in regions:
        assert candidate.mlp.startswith("base_model.model.model.layers.")
        assert candidate.reason.startswith(
            "an adapter inside the region: gate_proj (peft lora.Linear), up_proj (peft "
            "lora.Linear), down_proj (peft lora.Linear) add their own matmuls"
        ), candidate.reason
    assert compiled_regions(model) == set()  # as the compile finds
    merged = inductor_fusion.explain(model.merge_and_unload())
    assert len(merged.of("rmsnorm_mlp")) == LAYERS and all(
        c.fuses for c in merged.of("rmsnorm_mlp")
    )


@pytest.mark.parametrize(
    ("family", "overrides", "expected"),
    [
        ("llama", {}, ("rmsnorm_mlp", ("norm", "mlp"), "fp32_3d_residual_left")),
        ("gpt_neox", {"hidden_act": "gelu"}, ("layernorm_mlp", ("norm", "mlp"), "gpt_neox_fp32_3d_bias_residual_parallel")),
        ("olmo2", {}, ("mlp_postnorm", ("mlp",), "olmo2_fp32_3d_no_residual")),
    ],
)  # fmt: skip
def test_layers_of_an_unregistered_model_are_found_by_their_children(
    family: str, overrides: dict, expected: tuple
) -> None:
    """No registered module paths (a bare ModuleList of decoder layers): the layer's children
    decide the family (a LayerNorm has a bias; OLMo-2's MLP has a post-norm and none in front)."""
    layers = torch.nn.ModuleList(tiny_model(family, **overrides).base_model.layers)
    explanation = inductor_fusion.explain(layers)
    name, roles, variant = expected
    regions = [c for c in explanation.candidates if c.family != "gqa_decode"]
    assert [(c.layer, c.family, tuple(r for r, _ in c.modules)) for c in regions] == [
        (str(i), name, roles) for i in range(LAYERS)
    ]
    assert {c.variant for c in regions if c.fuses} == {variant}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_cli_explains_every_family_by_its_model_type(model_type: str, capsys) -> None:
    """Each family's bare model type gets a tiny config (its text config for composite models,
    special token ids inside the tiny vocabulary) and explains without error."""
    from inductor_fusion.__main__ import TINY_CONFIG, load_config, main

    config = load_config(model_type)
    layers = config.get_text_config().num_hidden_layers
    assert layers == TINY_CONFIG["num_hidden_layers"]
    assert main(["explain", model_type]) == 0
    out = capsys.readouterr().out
    assert "candidate region(s) fuse" in out
    assert f"model.layers.{layers}:" not in out and f"language_model.layers.{layers}:" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "bogus"], "--dtype 'bogus': expected one of float32, bfloat16, float16"),
        (
            ["--patterns", "rmsnorm_mpl"],
            "--patterns: unknown inductor_fusion pattern 'rmsnorm_mpl'; valid names: ",
        ),
        (
            ["--disable", "rmsnorm_mlp,x"],
            "--disable: unknown inductor_fusion pattern 'x'; valid names: ",
        ),
    ],
)
def test_cli_input_errors_are_one_line_and_exit_2(argv, message, capsys) -> None:
    from inductor_fusion.__main__ import main

    assert main(["explain", "llama", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert main(["explain", "no-such-model"]) == 2
    assert "no-such-model: not a folder" in capsys.readouterr().err
    # The backend's own spellings stay valid on the command line.
    assert main(["explain", "llama", "--patterns", "all", "--disable", ""]) == 0
