"""generate() with the static cache, compiled by our backend on the CPU path.

transformers compiles only the decode-step forward in generate() (prefill runs eagerly), and on
the CPU only when the CompileConfig carries `_compile_all_devices = True`. These tests check that
our backend (a) gives the same greedy tokens as backend="inductor" in fp32 while fusing every
layer's post_attention_layernorm -> mlp region in each compiled graph, (b) keeps the number of
compiled graphs bounded across prompt lengths and batch sizes, and (c) honours a KernelConfig
given to from_pretrained (only the configured regions fuse).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tiny_models import TINY, fresh_compile, layer_paths, tiny_model, token_ids
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, CompileConfig

import inductor_fusion

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_hub_no_toggles")]

LAYERS = TINY["num_hidden_layers"]
NEW_TOKENS = 32


def compile_config(backend: str) -> CompileConfig:
    """The same CompileConfig for every backend, as generate() would build it, plus the CPU flag."""
    config = CompileConfig(backend=backend, fullgraph=False)
    # Not a constructor argument: without it generate() does not compile on the CPU.
    config._compile_all_devices = True
    return config


class Generated(NamedTuple):
    tokens: torch.Tensor  # (batch, prompt + new tokens)
    logits: torch.Tensor  # (new tokens, batch, vocab)


def generate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    backend: str | None,
    new_tokens: int = NEW_TOKENS,
) -> Generated:
    """Greedy generate with the static cache; compiled with `backend` unless it is None (eager)."""
    kwargs = {} if backend is None else {"compile_config": compile_config(backend)}
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            # Never stop at EOS: every call runs the same number of compiled decode steps.
            min_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    return Generated(out.sequences, torch.stack(out.logits))


def assert_same_generation(ours: Generated, reference: Generated) -> None:
    # Observed: logits agree to ~2e-7 while the smallest top-1/top-2 gap along these greedy paths
    # is ~2e-4, so fp32 rounding differences cannot flip a token.
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=0)
    assert torch.equal(ours.tokens, reference.tokens)


class GraphCount:
    graphs: int = 0


@contextlib.contextmanager
def counting_graphs() -> Iterator[GraphCount]:
    """Counts the graphs Dynamo hands to a backend (compiles and recompiles) inside the block."""
    count = GraphCount()
    before = counters["stats"]["unique_graphs"]
    try:
        yield count
    finally:
        count.graphs = counters["stats"]["unique_graphs"] - before


def regions(report: inductor_fusion.FusionReport) -> collections.Counter:
    """How many times each (norm, mlp) pair was fused."""
    return collections.Counter(
        (region.path("norm"), region.path("mlp"))
        for region in report
        if region.pattern == "rmsnorm_mlp"
    )


def every_layer(times: int) -> collections.Counter:
    norms, mlps = layer_paths("post_attention_layernorm"), layer_paths("mlp")
    return collections.Counter({pair: times for pair in zip(norms, mlps, strict=True)})


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tokens_equal_inductor_and_every_layer_fused(family: str) -> None:
    model = tiny_model(family)
    ids = token_ids(batch=1, seq=5)
    with fresh_compile() as report, counting_graphs() as seen:
        reference = generate(model, ids, "inductor")
    assert seen.graphs >= 1, "generate() compiled nothing: the CPU flag was not honoured"
    assert report.count("rmsnorm_mlp") == 0
    with fresh_compile() as report, counting_graphs() as seen:
        ours = generate(model, ids, "inductor_fusion")
        fused = report.count("rmsnorm_mlp")
        found = regions(report)
    assert seen.graphs >= 1
    # Every compiled graph is a whole decode step: num_hidden_layers regions each.
    assert fused > 0 and fused % LAYERS == 0, report.summary()
    assert found == every_layer(fused // LAYERS), report.summary()
    assert_same_generation(ours, reference)


def test_recompiles_bounded_across_prompt_lengths_and_batch_sizes() -> None:
    model = tiny_model("llama")
    prompts = [token_ids(batch=batch, seq=seq) for batch in (1, 2) for seq in (3, 5, 9)]
    new_tokens = 8
    with fresh_compile() as report:
        with counting_graphs() as first_sweep:
            ours = [generate(model, ids, "inductor_fusion", new_tokens) for ids in prompts]
        found = regions(report)
        # The graphs cover all these shapes: a second sweep (no reset) compiles nothing.
        with counting_graphs() as second_sweep:
            again = [generate(model, ids, "inductor_fusion", new_tokens) for ids in prompts]
    # Bound: 3 graphs (observed: exactly 3, torch 2.13 / transformers 5.24). The decode step's
    # shapes are (batch, 1) tokens against a static cache of (batch, heads, max_cache_len, dim);
    # max_cache_len is prompt + max_new_tokens, never shrinking across calls on one model
    # (10, 12, 16 here). So: 1 graph for the first call (static shapes); 1 recompile when the
    # cache length first changes (3 -> 5), after which Dynamo's automatic dynamic shapes make
    # that dimension symbolic and the 9-token prompt reuses the graph; 1 recompile when the batch
    # size first changes (1 -> 2), which makes batch symbolic too. Nothing else varies.
    assert 1 <= first_sweep.graphs <= 3, f"{first_sweep.graphs} graphs for 6 prompts"
    assert second_sweep.graphs == 0
    # Each graph went through our pass and fused every layer.
    assert found == every_layer(first_sweep.graphs), report.summary()
    for first, second in zip(ours, again, strict=True):
        assert torch.equal(first.tokens, second.tokens)

    # Every graph (static and symbolic shapes) gives the same tokens as eager generate() ...
    for ids, generated in zip(prompts, ours, strict=True):
        assert_same_generation(generated, generate(model, ids, None, new_tokens))
    # ... and as backend="inductor" (fresh state) for the last prompt, which our sweep served
    # with the graph compiled last (after the batch-size recompile).
    reference_model = tiny_model("llama")
    with fresh_compile(), counting_graphs():
        reference = generate(reference_model, prompts[-1], "inductor", new_tokens)
    assert_same_generation(ours[-1], reference)


def test_kernel_config_fuses_only_the_configured_regions(tmp_path: Path) -> None:
    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    only_layer_0 = inductor_fusion.KernelConfig(
        {
            (
                ("RMSNorm", "model.layers.0.post_attention_layernorm"),
                ("MLP", "model.layers.0.mlp"),
            ): "inductor_fusion:rmsnorm_mlp",
        }
    )
    configured = AutoModelForCausalLM.from_pretrained(
        path, kernel_config=only_layer_0, dtype=torch.float32
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = token_ids(batch=2, seq=5)

    with fresh_compile() as report, counting_graphs() as seen:
        ours = generate(configured, ids, "inductor_fusion")
        found = regions(report)
    assert seen.graphs >= 1
    # One region per compiled graph, at layer 0 only.
    assert found == {
        ("model.layers.0.post_attention_layernorm", "model.layers.0.mlp"): seen.graphs
    }, report.summary()

    with fresh_compile() as report, counting_graphs():
        reference = generate(plain, ids, "inductor")
    assert report.count("rmsnorm_mlp") == 0
    assert_same_generation(ours, reference)
