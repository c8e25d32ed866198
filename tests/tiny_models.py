"""Tiny real transformers models (random init, no download) and the checks our tests share."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import torch
from hf_region import hf_formula_fp64
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    NemotronConfig,
    NemotronForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import inductor_fusion

# Model-level tests run on the CPU everywhere and on CUDA too where there is one (the GPU machine):
# there the replacement's op runs our Triton kernels.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    "starcoder2": (Starcoder2Config, Starcoder2ForCausalLM),
    "nemotron": (NemotronConfig, NemotronForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
}

# What a family's tiny config needs besides TINY: Granite's realistic residual multiplier (1.0
# would hide a dropped scale), token ids inside the tiny vocabulary, eps for the norms' own names.
FAMILY_OVERRIDES = {
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "granite": dict(residual_multiplier=0.22),
    "gpt_neox": dict(layer_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "starcoder2": dict(norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2),
    "nemotron": dict(norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}

# Sizes that are not multiples of Triton block sizes; eps that differs from every default.
TINY = dict(
    hidden_size=80,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=20,
    vocab_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def tiny_config(family: str, **overrides):
    config_cls, _ = FAMILIES[family]
    return config_cls(**{**TINY, **FAMILY_OVERRIDES.get(family, {}), **overrides})


def tiny_model(
    family: str, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu", **overrides
):
    _, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, **overrides))
    # Random init gives RMSNorm weights of exactly 1; perturb them so a wrong weight shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            if name.endswith("layernorm.bias") or name.endswith("norm.bias"):
                param.uniform_(-0.5, 0.5)  # LayerNorm biases start at 0: a dropped one would hide
    return model.to(device=device, dtype=dtype).eval()


def token_ids(
    batch: int = 2, seq: int = 7, vocab: int = TINY["vocab_size"], seed: int = 1, device="cpu"
):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fp64_logits(model, ids) -> torch.Tensor:
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        return reference(ids).logits


class FusedCountError(AssertionError):
    """A fused-region count other than the expected one. Tests of a known gap are marked
    ``xfail(strict=True, raises=FusedCountError)``: they flip to a failure when the gap closes,
    and any other failure (wrong numbers) still fails them."""


def assert_fused(report: inductor_fusion.FusionReport, expected: int) -> None:
    got = report.count("rmsnorm_mlp")
    if got != expected:
        raise FusedCountError(f"fused {got} region(s), expected {expected}\n{report.summary()}")


# Compiled fp32 logits/gradients vs eager on the CPU, where nothing but Inductor's own codegen
# differs: measured 1.4e-7 to 5.0e-7 (2026-12-02, tiny models); ~5x headroom.
FP32_VS_EAGER = 2e-6


def assert_within_tolerance(ours, eager, reference, *, atol: float = 1e-6) -> None:
    """Our rule: error vs an fp64 reference <= 2 x eager's own error + a small atol.

    The default atol is an fp32 rounding's worth at these sizes; 16-bit eager errors (~5e-3)
    dwarf it."""
    eager_err = rel_l2(eager, reference)
    ours_err = rel_l2(ours, reference)
    assert ours_err <= 2 * eager_err + atol, f"ours {ours_err:.3g} vs eager {eager_err:.3g}"


@contextlib.contextmanager
def fresh_compile(*, caches: bool = True) -> Iterator[inductor_fusion.FusionReport]:
    """Clean dynamo state and an empty report.

    Inductor's caches stay as configured: a graph they serve is reported from our records, so
    counts do not depend on them. ``caches=False`` turns off the FX graph and AOTAutograd caches,
    for tests that must see the pass itself run (say why where it is used).
    """
    torch._dynamo.reset()
    inductor_fusion.reset_report()
    with contextlib.ExitStack() as stack:
        if not caches:
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        yield inductor_fusion.get_report()
    torch._dynamo.reset()


def child_environ(tag: str, **env: str) -> dict[str, str]:
    """The environment of a test's child process: none of our toggles (whatever the outer
    environment sets), Inductor's FX graph and AOTAutograd caches on, and their keys salted with
    ``tag`` (``TORCH_COMPILE_CACHE_KEY_TAG``): a test's first child with a new tag misses and its
    later ones hit, while every child reuses the C++ kernels already built in the worker's cache
    dir (a cold dir costs a child ~20 s of g++). The parent is blocked in the child meanwhile, so
    no two processes write that dir at once (see conftest)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("INDUCTOR_FUSION_")}
    return {
        **inherited,
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "TORCH_COMPILE_CACHE_KEY_TAG": tag,
        **env,
    }


def run_child(code: str, tag: str, **env: str) -> dict:
    """Runs ``code`` in a child Python with `child_environ` (``tag``, ``env``) and returns the
    JSON object its last line prints; a failing child fails the test with its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=child_environ(tag, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def layer_paths(role_suffix: str, layers: int = TINY["num_hidden_layers"]) -> list[str]:
    return [f"model.layers.{i}.{role_suffix}" for i in range(layers)]


class Region(torch.nn.Module):
    """post_attention_layernorm -> mlp (-> residual), as a decoder layer composes them.

    eps defaults to 0.1 and `region_hidden` to a scale of 0.05 (mean square 2.5e-3): with
    Llama's 1e-5 on N(0, 1) inputs eps moves the output by ~1e-5 relative, below bf16's
    resolution, and a fused op that lost or replaced eps would still pass.
    """

    def __init__(self, *, bias: bool, residual: str, eps: float = 0.1) -> None:
        super().__init__()
        config = tiny_config("llama", mlp_bias=bias, rms_norm_eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.mlp = LlamaMLP(config)
        self.residual = residual
        with torch.no_grad():
            for param in self.parameters():
                param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)

    def forward(self, h: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        y = self.mlp(self.post_attention_layernorm(h))
        if self.residual == "left":
            return h + y
        if self.residual == "right":
            return y + h
        if self.residual == "other":
            return other + y
        return y

    def fp64(self, h: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """The same region as exact math: the HF formula in float64 on these parameters."""
        residual = {"left": h, "right": h, "other": other}.get(self.residual)
        return hf_formula_fp64(
            h,
            self.post_attention_layernorm.weight,
            self.mlp.gate_proj.weight,
            self.mlp.up_proj.weight,
            self.mlp.down_proj.weight,
            gate_bias=self.mlp.gate_proj.bias,
            up_bias=self.mlp.up_proj.bias,
            down_bias=self.mlp.down_proj.bias,
            residual=residual,
            eps=self.post_attention_layernorm.variance_epsilon,
        ).detach()


def region_hidden(
    ndim: int, dtype: torch.dtype, tokens: int = 13, device="cpu", scale: float = 0.05
) -> torch.Tensor:
    """Input of a `Region`: [tokens, 80] or [1, tokens, 80], ~ scale * N(0, 1)."""
    shape = (tokens, 80) if ndim == 2 else (1, tokens, 80)
    generator = torch.Generator().manual_seed(tokens)
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)
