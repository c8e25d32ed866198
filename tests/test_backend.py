"""The backend: string and callable forms, toggles at compile time, options, pass chaining, uuid."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FP32_VS_EAGER, fresh_compile, rel_l2, tiny_model, token_ids
from torch._dynamo.backends.registry import lookup_backend
from torch._inductor.custom_graph_pass import CustomGraphPass

import inductor_fusion
from inductor_fusion.config import ENV_DISABLE, ENV_PATTERNS, FusionPlan, inductor_config_patches
from inductor_fusion.fusion_pass import FusionPass
from inductor_fusion.graph_paths import normalize_module_path

pytestmark = pytest.mark.slow


def _fused_count(backend="inductor_fusion", caches: bool = True, **compile_kwargs) -> int:
    model = tiny_model("llama", torch.float32)
    ids = token_ids()
    with fresh_compile(caches=caches) as report, torch.no_grad():
        out = torch.compile(model, backend=backend, **compile_kwargs)(ids).logits
        assert rel_l2(out, model(ids).logits) < FP32_VS_EAGER
        return report.count("rmsnorm_mlp")


def test_string_resolves_through_entry_point():
    assert lookup_backend("inductor_fusion") is inductor_fusion.inductor_fusion_backend


def test_import_has_no_side_effects_on_inductor_config():
    import subprocess
    import sys

    code = (
        "import torch._inductor.config as c; before = c.get_config_copy(); "
        "import inductor_fusion, inductor_fusion.backend, inductor_fusion.fusion_pass; "
        "from inductor_fusion import registry; "
        "assert c.get_config_copy() == before; "
        "assert registry._built_pass.cache_info().currsize == 0; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({ENV_DISABLE: "rmsnorm_mlp"}, 0),
        ({ENV_DISABLE: "all"}, 0),
        ({ENV_PATTERNS: "none"}, 0),
        ({ENV_PATTERNS: "rmsnorm_mlp"}, 2),
    ],
)
def test_environment_toggles(monkeypatch, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _fused_count() == expected


def test_environment_unknown_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE, "rmsnorm")
    with pytest.raises(Exception, match=r"unknown inductor_fusion pattern 'rmsnorm'.*rmsnorm_mlp"):
        _fused_count()


def test_options_toggle_and_pass_inductor_options_through():
    options = {"inductor_fusion": {"disable": ["rmsnorm_mlp"]}, "epilogue_fusion": False}
    assert _fused_count(options=options) == 0
    assert _fused_count(options={"inductor_fusion": {"patterns": ["rmsnorm_mlp"]}}) == 2


def test_options_unknown_inductor_option_is_an_error():
    with pytest.raises(Exception, match="Unexpected optimization option"):
        _fused_count(options={"not_an_inductor_option": True})


def test_callable_backend_and_its_report():
    backend = inductor_fusion.backend()
    assert _fused_count(backend=backend) == 2
    assert backend.report.count("rmsnorm_mlp") == 2
    assert _fused_count(backend=inductor_fusion.backend(patterns=[])) == 0
    with pytest.raises(ValueError, match="valid names"):
        inductor_fusion.backend(patterns=["rmsnorm"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"max_autotune": "yes-please"},
            "Unexpected type of attr max_autotune, got str should be bool",
        ),
        ({"max-autotune": 1}, "Unexpected type of attr max-autotune, got int should be bool"),
    ],
)
def test_options_values_are_type_checked_as_inductor_does(options, match):
    with pytest.raises(RuntimeError, match=match):
        inductor_config_patches(None, options)
    with pytest.raises(RuntimeError, match=match):
        inductor_fusion.backend(options=options)
    # The message is backend="inductor"'s own.
    with pytest.raises(RuntimeError, match=match):
        torch._TorchCompileInductorWrapper(None, options, dynamic=None)
    assert inductor_config_patches(None, {"max_autotune": True}) == {"max_autotune": True}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"patterns": "rmsnorm_mlp"}, ("rmsnorm_mlp",)),
        ({"patterns": "rmsnorm_mlp,"}, ("rmsnorm_mlp",)),
        ({"patterns": "none"}, ()),
        ({"patterns": ["rmsnorm_mlp"], "disable": "rmsnorm_mlp"}, ("rmsnorm_mlp",)),
    ],
)
def test_backend_patterns_take_a_string_as_options_do(kwargs, expected):
    options = inductor_fusion.backend(**kwargs).fusion_options
    assert options.patterns == expected
    assert options.disable == (("rmsnorm_mlp",) if "disable" in kwargs else ())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patterns": 5}, TypeError, "expected a list of pattern names.*got int 5"),
        ({"patterns": {"rmsnorm_mlp": False}}, TypeError, "got a dict"),
        ({"disable": 5}, TypeError, "expected a list of pattern names.*got int 5"),
        ({"patterns": "rmsnorm"}, ValueError, "unknown inductor_fusion pattern 'rmsnorm'"),
        ({"patterns": ""}, ValueError, "names no pattern; write 'none'"),
    ],
)
def test_backend_bad_patterns_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        inductor_fusion.backend(**kwargs)


def test_mode_gives_inductor_mode_options():
    patches = inductor_config_patches("max-autotune-no-cudagraphs", None)
    assert patches["max_autotune"] is True
    assert inductor_config_patches("default", None) == {}
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        inductor_config_patches("fastest", None)


def test_mode_reaches_inductor(monkeypatch):
    seen = {}
    import torch._inductor.compile_fx as compile_fx_module

    real = compile_fx_module.compile_fx

    def spy(gm, inputs, config_patches=None, **kwargs):
        seen.update(config_patches or {})
        return real(gm, inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    assert _fused_count(mode="max-autotune-no-cudagraphs") == 2
    assert seen["max_autotune"] is True
    assert isinstance(seen["post_grad_custom_pre_pass"], FusionPass)


class _RecordingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "recording-pass-v1"


def test_user_pre_pass_is_chained_not_replaced():
    # Caches off: the user pass is called only where our pass runs, never on a cache hit.
    user_pass = _RecordingPass()
    with torch._inductor.config.patch(post_grad_custom_pre_pass=user_pass):
        assert _fused_count(caches=False) == 2
    assert user_pass.calls >= 1
    user_pass_in_options = _RecordingPass()
    options = {"post_grad_custom_pre_pass": user_pass_in_options}
    assert _fused_count(caches=False, options=options) == 2
    assert user_pass_in_options.calls >= 1


def test_uuid_covers_toggles_and_chained_passes():
    everything = FusionPlan(frozenset({"rmsnorm_mlp"}))
    nothing = FusionPlan(frozenset())
    scoped = FusionPlan(frozenset({"rmsnorm_mlp"}), scopes={"rmsnorm_mlp": (("a", "b"),)})
    ids = {FusionPass(p).uuid() for p in (everything, nothing, scoped)}
    assert len(ids) == 3 and None not in ids
    assert FusionPass(everything).uuid() == FusionPass(everything).uuid()
    assert FusionPass(everything, chained=_RecordingPass()).uuid() != FusionPass(everything).uuid()
    # A raw callable has no uuid: Inductor must then bypass the cache, and so do we.
    assert FusionPass(everything, chained=lambda graph: None).uuid() is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("L['self'].model.layers.0.mlp", "model.layers.0.mlp"),
        (
            "L['args'][0].model.layers.1.post_attention_layernorm",
            "model.layers.1.post_attention_layernorm",
        ),
        ("L['self'].model.layers[3]._modules['mlp']", "model.layers.3.mlp"),
        ("L['model']", ""),
    ],
)
def test_module_path_normalization(raw, expected):
    assert normalize_module_path(raw) == expected
