"""Issue #16: fusion must survive dynamic shapes, dynamic=True and what users do to models.

Counts come from our report inside `fresh_compile()` (a graph Inductor's caches serve is reported
from our records). Graph counts are Dynamo's `unique_graphs`, the number of
graphs ``backend="inductor"`` compiles for the same calls.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from tiny_models import fresh_compile, rel_l2, tiny_model, token_ids
from torch._dynamo.utils import counters

import inductor_fusion
from inductor_fusion.kernel_config import apply_kernel_config

ON = "inductor_fusion:rmsnorm_mlp"
OFF = "inductor_fusion:rmsnorm_mlp:off"
NORM0, MLP0 = "model.layers.0.post_attention_layernorm", "model.layers.0.mlp"
LAYER0 = (("RMSNorm", NORM0), ("MLP", MLP0))


def _run_shapes(model, shapes, *, mark=(), **compile_kwargs):
    """Runs every (batch, seq) through one compiled model; returns (report count, graphs)."""
    compiled = torch.compile(model, backend="inductor_fusion", **compile_kwargs)
    with fresh_compile() as report, torch.no_grad():
        counters["stats"].clear()
        for batch, seq in shapes:
            ids = token_ids(batch=batch, seq=seq, seed=seq)
            for dim in mark:
                torch._dynamo.mark_dynamic(ids, dim)
            assert rel_l2(compiled(ids).logits, model(ids).logits) < 1e-5, (batch, seq)
        return report.count("rmsnorm_mlp"), counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "how", "shapes", "fused", "graphs"),
    [
        # A static graph for the first shape, then one dynamic graph that serves the rest.
        ("llama", "automatic", [(2, 8), (2, 5), (2, 17)], 4, 2),
        # Batch 1 is specialized (Dynamo assumes dynamic sizes >= 2), as with backend="inductor".
        ("qwen3", "mark_batch", [(2, 8), (3, 8), (1, 8)], 4, 2),
        ("llama", "mark_seq", [(3, 5), (3, 17)], 2, 1),
        ("qwen3", "dynamic_true", [(2, 5), (3, 17), (2, 8)], 2, 1),
    ],
)
def test_dynamic_graphs_fuse_every_layer(family, how, shapes, fused, graphs):
    model = tiny_model(family, torch.float32)
    kwargs = {"dynamic": True} if how == "dynamic_true" else {}
    mark = {"mark_batch": (0,), "mark_seq": (1,)}.get(how, ())
    assert _run_shapes(model, shapes, mark=mark, **kwargs) == (fused, graphs)


@pytest.mark.slow
def test_dynamic_true_specializes_eps_with_a_guard():
    model = tiny_model("llama", torch.float32, rms_norm_eps=0.25)
    compiled = torch.compile(model, backend="inductor_fusion", dynamic=True)
    ids = token_ids()
    with fresh_compile() as report, torch.no_grad():
        assert rel_l2(compiled(ids).logits, model(ids).logits) < 1e-5
        assert report.count("rmsnorm_mlp") == 2
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 0.5
        # The specialized eps is guarded: another eps recompiles (and fuses) instead of reusing.
        assert rel_l2(compiled(ids).logits, model(ids).logits) < 1e-5
        assert report.count("rmsnorm_mlp") == 4


def _layer0_model():
    model = tiny_model("llama", torch.float32)
    apply_kernel_config(model, {LAYER0: ON})
    return model


def _deepcopy(model):
    return copy.deepcopy(model)


def _assign_state(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model


def _half_then_float(model):
    return model.half().float()


@pytest.mark.slow
@pytest.mark.parametrize("transform", [_deepcopy, _assign_state, _half_then_float])
def test_plan_survives_new_parameters(transform):
    model = transform(_layer0_model())
    ids = token_ids()
    with fresh_compile() as report, torch.no_grad():
        out = torch.compile(model, backend="inductor_fusion")(ids).logits
    assert report.paths("rmsnorm_mlp", "mlp") == [MLP0]
    with torch.no_grad():
        assert rel_l2(out, model(ids).logits) < 1e-5


@pytest.mark.slow
def test_switched_off_plan_survives_deepcopy():
    model = tiny_model("llama", torch.float32)
    apply_kernel_config(model, {("RMSNorm", "MLP"): OFF})
    with fresh_compile() as report, torch.no_grad():
        torch.compile(copy.deepcopy(model), backend="inductor_fusion")(token_ids())
    assert report.count("rmsnorm_mlp") == 0


GLOBAL_MODEL = None


def _forward_global(ids):
    return GLOBAL_MODEL(ids).logits


@pytest.mark.slow
def test_model_in_a_global_gets_its_plan_and_paths(monkeypatch):
    monkeypatch.setitem(globals(), "GLOBAL_MODEL", _layer0_model())
    with fresh_compile() as report, torch.no_grad():
        torch.compile(_forward_global, backend="inductor_fusion")(token_ids())
    assert report.paths("rmsnorm_mlp", "mlp") == [MLP0]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ((("RMSNorm", NORM0), ("MLP", "model.layers.1.mlp")), "same block"),
        ((("RMSNorm", "model.layers.*.mlp"), ("MLP", "model.layers.*.input_layernorm")), "swapped"),
    ],
)
def test_globs_that_never_pair_warn(key, why):
    model = tiny_model("llama", torch.float32)
    with pytest.warns(UserWarning, match=f"never pair.*{why}"):
        apply_kernel_config(model, {key: ON})


def test_layernorm_globs_that_never_pair_warn():
    # Every two-role family is checked, named by its own layer names, not only rmsnorm_mlp.
    model = tiny_model("gpt_neox", torch.float32)
    norm, mlp = "gpt_neox.layers.0.post_attention_layernorm", "gpt_neox.layers.1.mlp"
    with pytest.warns(UserWarning, match="LayerNorm glob .* never pair.*same block"):
        apply_kernel_config(
            model, {(("LayerNorm", norm), ("MLP", mlp)): "inductor_fusion:layernorm_mlp"}
        )


def test_globs_that_pair_do_not_warn():
    model = tiny_model("llama", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_kernel_config(model, {LAYER0: ON})


def test_normalize_module_path_roots():
    from inductor_fusion.graph_paths import normalize_module_path

    for raw in (
        "L['self'].model.layers[0]._modules['mlp']",
        "L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['mlp']",
        "G['m']._modules['model']._modules['layers']._modules['0']._modules['mlp']",
        "G.m.model.layers.0.mlp",
    ):
        assert normalize_module_path(raw) == MLP0


@pytest.mark.slow
def test_region_outside_the_plan_gets_an_info_line(caplog):
    model = _layer0_model()
    # Caches off: the INFO line comes from the pass, which a cache hit does not run.
    with (
        caplog.at_level(logging.INFO, logger="inductor_fusion"),
        fresh_compile(caches=False),
        torch.no_grad(),
    ):
        torch.compile(model, backend="inductor_fusion")(token_ids())
    lines = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    assert len(lines) == 1 and "model.layers.1.mlp" in lines[0] and "plan" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "attribute", "values", "pattern", "variant"),
    [
        ("gemma", "eps", (0.25, 0.5), "rmsnorm_mlp", "gemma_fp32_3d_residual_left"),
        ("granite", "residual_multiplier", (0.22, 0.5), "rmsnorm_mlp", "granite_fp32_3d_residual_scaled"),
        ("starcoder2", "eps", (0.25, 0.5), "layernorm_mlp", "starcoder2_fp32_3d_bias_residual_left"),
    ],
)  # fmt: skip
def test_dynamic_true_specializes_each_rows_scalars(family, attribute, values, pattern, variant):
    # Caches on: the second value must neither reuse the first graph (Dynamo's guard) nor be
    # served the first value's graph by the FX graph cache (the value is in our pass's uuid).
    model = tiny_model(family, torch.float32)
    owners = [m for m in model.modules() if isinstance(getattr(m, attribute, None), float)]
    assert owners
    compiled = torch.compile(model, backend="inductor_fusion", dynamic=True)
    with fresh_compile() as report, torch.no_grad():
        for step, value in enumerate(values, start=1):
            for module in owners:
                setattr(module, attribute, value)
            ids = token_ids(seq=5 + step)
            assert rel_l2(compiled(ids).logits, model(ids).logits) < 1e-5, value
            assert report.count(pattern) == 2 * step, report.summary()
    assert {r.variant for r in report} == {variant}


@pytest.mark.slow
def test_dynamic_true_under_install_with_caches_off_fuses_granites_scaled_residual():
    # With caches off nothing asks the installed pass for its uuid before AOT traces, so the
    # multiplier reaches the pass as a graph input and the pass writes it in (guarded).
    model = tiny_model("granite", torch.float32)
    layers = [m for m in model.modules() if hasattr(m, "residual_multiplier")]
    compiled = torch.compile(model, dynamic=True)
    with fresh_compile(caches=False) as report, inductor_fusion.installed(), torch.no_grad():
        for step, value in enumerate((0.22, 0.5), start=1):
            for layer in layers:
                layer.residual_multiplier = value
            ids = token_ids(seq=5 + step)
            assert rel_l2(compiled(ids).logits, model(ids).logits) < 1e-5, value
            assert report.count("rmsnorm_mlp") == 2 * step, report.summary()
    assert {r.variant for r in report} == {"granite_fp32_3d_residual_scaled"}
