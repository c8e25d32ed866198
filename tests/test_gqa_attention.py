"""gqa_decode: masked grouped-query attention packed on the key/value heads, no repeat_kv copies.

The truth is transformers' own ``sdpa_attention_forward`` (repeat_kv + SDPA with the mask), run
eagerly; the references are fp64 runs of the same function.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import DEVICES, assert_within_tolerance, fresh_compile, tiny_model, token_ids
from transformers import CompileConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from inductor_fusion.patterns.gqa_attention import MAX_QUERY_TOKENS, packed_attention

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

ATOL = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class Attention(torch.nn.Module):
    """The part of a decoder attention module that ``sdpa_attention_forward`` reads."""

    def __init__(self, n_rep: int) -> None:
        super().__init__()
        self.num_key_value_groups = n_rep
        self.is_causal = True
        self.training = False

    def forward(self, q, k, v, mask, scale=None, dropout=0.0, is_causal=None):
        out, _ = sdpa_attention_forward(
            self, q, k, v, mask, dropout=dropout, scaling=scale, is_causal=is_causal
        )
        return out


def _inputs(b, kvh, n_rep, q, s, d, mask_kind, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):  # made on the CPU, so the values do not depend on the device
        return torch.randn(*shape, generator=gen).to(dtype)

    query, key, value = (
        t.to(device)
        for t in (randn(b, kvh * n_rep, q, d), randn(b, kvh, s, d), randn(b, kvh, s, d))
    )
    keep = torch.rand(b, 1, q, s, generator=gen) > 0.3
    keep[..., 0] = True  # no fully masked row (SDPA gives NaN there, eager and packed alike)
    if mask_kind == "bool":
        mask = keep
    elif mask_kind == "float":
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    elif mask_kind == "per_head":
        mask = torch.where(keep.expand(b, kvh * n_rep, q, s), 0.0, -1e4).to(dtype)
        mask = mask + randn(b, kvh * n_rep, q, s) * 0.1  # differs per head: must follow its head
    elif mask_kind == "batch_broadcast":
        mask = keep[:1]
    elif mask_kind == "row_broadcast":  # one mask row for all query tokens
        mask = keep[:, :, :1]
    else:
        mask = None
    return query, key, value, None if mask is None else mask.to(device)


def _fp64(*tensors):
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 3),
    kvh=st.integers(1, 3),
    n_rep=st.integers(2, 5),
    q=st.integers(1, 5),
    s=st.integers(1, 37),
    d=st.sampled_from([8, 20]),
    mask_kind=st.sampled_from(["bool", "float", "per_head", "batch_broadcast", "row_broadcast"]),
)
def test_packed_attention_equals_repeat_kv(b, kvh, n_rep, q, s, d, mask_kind):
    inputs = _inputs(b, kvh, n_rep, q, s, d, mask_kind, torch.float32, "cpu")
    module = Attention(n_rep)
    eager = module(*inputs)
    ours = packed_attention(*inputs, None).transpose(1, 2)
    reference = module(*_fp64(*inputs))
    assert ours.shape == eager.shape
    assert_within_tolerance(ours, eager, reference)


def _compile(module, *inputs, caches=False):
    # Caches off where a test watches the pass itself run (its count and log lines).
    with fresh_compile(caches=caches) as report, torch.no_grad():
        out = torch.compile(module, backend="inductor_fusion")(*inputs)
    return out, report


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "mask_kind", "q"),
    [
        (torch.float32, "bool", 1),
        (torch.float32, "float", 3),
        (torch.float32, "per_head", 2),
        (torch.float32, "batch_broadcast", 1),
        (torch.float32, "row_broadcast", 3),
        (torch.bfloat16, "bool", 1),
        (torch.float16, "float", 4),
    ],
)
def test_compiled_region_fuses_with_eager_numerics(device, dtype, mask_kind, q, kv_heads=2):
    module = Attention(n_rep=3)
    # On CUDA a 16-bit head dim that is not a multiple of 8 (20) sends SDPA to its math path (no
    # fused op, so no candidate: seen on an H200, torch 2.11); real models use 64 or 128.
    head_dim = 16 if device == "cuda" else 20
    inputs = _inputs(2, kv_heads, 3, q, 29, head_dim, mask_kind, dtype, device)
    out, report = _compile(module, *inputs)
    assert report.count("gqa_decode") == 1, report.summary()
    assert next(iter(report)).variant.endswith("_mask")
    eager = module(*inputs)
    assert_within_tolerance(out, eager, module(*_fp64(*inputs)), atol=ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_query_attention_is_packed(device, dtype):
    """One key/value head (Gemma-2B's layout): repeat_kv's reshape is then a view without a
    clone, and the region packs as GQA's does, on the CPU and on CUDA."""
    test_compiled_region_fuses_with_eager_numerics(device, dtype, "bool", 1, kv_heads=1)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("prefill", f"query tokens: packing is for decode (at most {MAX_QUERY_TOKENS})"),
        ("dropout", None),  # a training graph: the attention's other outputs are used
        ("no_mask", None),  # transformers passes enable_gqa: no repeat_kv, not a candidate
    ],
)
def test_not_packed(case, reason, caplog):
    module = Attention(n_rep=2)
    q = MAX_QUERY_TOKENS + 1 if case == "prefill" else 1
    inputs = list(_inputs(1, 2, 2, q, 40, 8, "bool" if case != "no_mask" else "none",
                          torch.float32, "cpu"))  # fmt: skip
    if case == "dropout":
        module.training = True
        for t in inputs[:3]:
            t.requires_grad_(True)
        with fresh_compile(caches=False) as report:
            torch.manual_seed(0)
            out = torch.compile(module, backend="inductor_fusion")(*inputs, None, 0.5)
            out.sum().backward()
        assert report.count("gqa_decode") == 0
        return
    with caplog.at_level(logging.INFO, logger="inductor_fusion"):
        out, report = _compile(module, *inputs)
    assert report.count("gqa_decode") == 0
    torch.testing.assert_close(out, module(*inputs), atol=1e-6, rtol=0)
    lines = [r.getMessage() for r in caplog.records if "gqa_decode not fused" in r.getMessage()]
    if reason is None:
        assert lines == []
    else:
        assert len(lines) == 1 and reason in lines[0], lines


def test_repeat_kv_used_elsewhere_keeps_its_copy():
    """Another use of the expanded cache keeps its own copy; the attention still packs."""

    class Leaky(Attention):
        def forward(self, q, k, v, mask):
            out = super().forward(q, k, v, mask)
            return out, repeat_kv(k, self.num_key_value_groups).sum()

    module = Leaky(n_rep=2)
    inputs = _inputs(1, 2, 2, 1, 16, 8, "bool", torch.float32, "cpu")
    (out, extra), report = _compile(module, *inputs)
    eager = module(*inputs)
    torch.testing.assert_close(out, eager[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(extra, eager[1])
    assert report.count("gqa_decode") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen3", {}),
        # Multi-query attention (Gemma-2B's layout): repeat_kv's reshape is a view, no clone.
        ("llama", {"num_key_value_heads": 1}),
    ],
    ids=["llama", "qwen3", "llama-mqa"],
)
def test_generate_packs_every_layer_and_keeps_tokens(family, overrides):
    model = tiny_model(family, **overrides)
    ids = token_ids(batch=2, seq=5)

    def generate(backend):
        config = CompileConfig(backend=backend, fullgraph=False)
        config._compile_all_devices = True  # without it generate() does not compile on the CPU
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                do_sample=False, cache_implementation="static", compile_config=config,
                return_dict_in_generate=True, output_logits=True,
            )  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    with fresh_compile() as report:
        tokens, logits = generate("inductor_fusion")
    layers = model.config.num_hidden_layers
    attention = [r for r in report if r.pattern == "gqa_decode"]
    assert len(attention) == layers
    assert {r.path("attention") for r in attention} == {
        f"model.layers.{i}.self_attn" for i in range(layers)
    }
    with fresh_compile():
        ref_tokens, ref_logits = generate("inductor")
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.slow
def test_multi_head_attention_has_no_candidate():
    model = tiny_model("llama", num_key_value_heads=4)  # as many kv heads as query heads
    ids = token_ids(batch=1, seq=4)
    config = CompileConfig(backend="inductor_fusion", fullgraph=False)
    config._compile_all_devices = True
    with fresh_compile() as report, torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
            cache_implementation="static", compile_config=config,
        )  # fmt: skip
    assert report.count("gqa_decode") == 0
    assert report.count("rmsnorm_mlp") > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "key",
    [
        ("Attention", "model.layers.1.self_attn"),  # a single pair
        (("Attention", "model.layers.1.*"),),  # the n-to-1 form with one pair
    ],
)
def test_kernel_config_selects_attention_modules(tmp_path, key):
    """KernelConfig's inline form names the attention by its module glob; what it does not name
    stays off (here every norm -> MLP region)."""
    from transformers import AutoModelForCausalLM

    import inductor_fusion

    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    config = inductor_fusion.KernelConfig({key: "inductor_fusion:gqa_decode"})
    model = AutoModelForCausalLM.from_pretrained(path, kernel_config=config, dtype=torch.float32)
    ids = token_ids(batch=1, seq=4)
    compile_config = CompileConfig(backend="inductor_fusion", fullgraph=False)
    compile_config._compile_all_devices = True
    with fresh_compile() as report, torch.no_grad():
        model.eval().generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
            cache_implementation="static", compile_config=compile_config,
        )  # fmt: skip
    assert report.count("rmsnorm_mlp") == 0
    paths = {r.path("attention") for r in report if r.pattern == "gqa_decode"}
    assert paths == {"model.layers.1.self_attn"}, report.summary()


def test_dynamic_query_length_stays_packed_up_to_the_bound(caplog):
    """A symbolic query length guards on the decode bound: one packed graph serves every length
    up to it; a longer one recompiles unpacked, and its log line names the length as dynamic
    (not as if it were a number of tokens)."""
    module = Attention(n_rep=2)
    # The second length makes Dynamo recompile with the query length dynamic (only that size
    # changed), as a second draft length does.
    compiled = torch.compile(module, backend="inductor_fusion")
    with fresh_compile(caches=False) as report, caplog.at_level(logging.INFO, "inductor_fusion"):
        for q in (3, 5, 2, MAX_QUERY_TOKENS):
            inputs = _inputs(1, 2, 2, q, 40, 8, "bool", torch.float32, "cpu")
            torch.testing.assert_close(compiled(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)
        # The static graph and one dynamic graph, both packed; the dynamic one served 5, 2, 16.
        assert report.count("gqa_decode") == 2
        inputs = _inputs(1, 2, 2, MAX_QUERY_TOKENS + 4, 40, 8, "bool", torch.float32, "cpu")
        torch.testing.assert_close(compiled(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)
    assert report.count("gqa_decode") == 2
    lines = [r.getMessage() for r in caplog.records if "gqa_decode not fused" in r.getMessage()]
    assert len(lines) == 1 and "a dynamic query length (s" in lines[0], lines
    assert f"{MAX_QUERY_TOKENS + 4} tokens in this call" in lines[0]
