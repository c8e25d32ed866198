"""KernelConfig through from_pretrained: which of our fusions a model gets, and where.

Tiny random Llama/Qwen3 checkpoints are saved once per module and loaded offline. Parsing,
validation and the from_pretrained plumbing need no compile; the few compile tests assert what the
fusion report says fused, with the FX graph cache off (a cache hit skips our pass).
"""

from __future__ import annotations

import copy
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from tiny_models import TINY
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import inductor_fusion
from inductor_fusion import config as fusion_config_module
from inductor_fusion.config import FusionPlan
from inductor_fusion.fusion_entries import FusionEntry, split_kernel_mapping
from inductor_fusion.kernel_config import KernelConfig, apply_kernel_config, fusion_config
from inductor_fusion.model_plans import (
    find_model_plan,
    fusable_modules,
    model_plan,
    register_fusable_modules,
)
from inductor_fusion.registry import pattern_names

# What an ":off" entry for rmsnorm_mlp leaves on.
ALL_BUT_RMSNORM_MLP = frozenset(inductor_fusion.pattern_names()) - {"rmsnorm_mlp"}

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

ON = "inductor_fusion:rmsnorm_mlp"
OFF = "inductor_fusion:rmsnorm_mlp:off"
NORM = "model.layers.*.post_attention_layernorm"
MLP = "model.layers.*.mlp"
INLINE = (("RMSNorm", NORM), ("MLP", MLP))
LAYER0 = (("RMSNorm", "model.layers.0.post_attention_layernorm"), ("MLP", "model.layers.0.mlp"))
NAMES = ("RMSNorm", "MLP")
HUB_KEY = "rotary_pos_emb"
HUB_VALUE = "kernels-community/rotary:apply_rotary_transformers"
ALL_LAYERS = {"rmsnorm_mlp": ((NORM, MLP),)}


def tiny(config_class: type, model_class: type) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_class(config_class(**TINY)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = SimpleNamespace(llama=root / "llama", qwen3=root / "qwen3", gpt2=root / "gpt2")
    tiny(LlamaConfig, LlamaForCausalLM).save_pretrained(paths.llama)
    tiny(Qwen3Config, Qwen3ForCausalLM).save_pretrained(paths.qwen3)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32)
    )
    gpt2.save_pretrained(paths.gpt2)
    return paths


def load(path: Path, kernel_config: object = None) -> torch.nn.Module:
    kwargs = {} if kernel_config is None else {"kernel_config": kernel_config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


def compile_and_run(model: torch.nn.Module) -> tuple[torch.Tensor, int, list[str | None]]:
    """Logits of one compiled run, and what our report says fused in it.

    Also checks that every graph our backend compiled found this model's plan, so that a count
    of 0 means "the plan said no", not "the pass never saw the model".
    """
    seen: list[FusionPlan | None] = []

    def spy(example_inputs: list) -> FusionPlan | None:
        seen.append(find_model_plan(example_inputs))
        return seen[-1]

    torch._dynamo.reset()
    inductor_fusion.reset_report()
    # Inductor's caches stay on: a graph they serve is reported from our records, and the
    # backend (which looks the plan up) runs either way.
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(inductor_fusion.model_plans, "find_model_plan", spy)
        logits = torch.compile(model, backend="inductor_fusion")(input_ids()).logits
    assert seen and all(plan is model_plan(model) for plan in seen)
    report = inductor_fusion.get_report()
    return logits, report.count("rmsnorm_mlp"), sorted(report.paths("rmsnorm_mlp", "mlp"))


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Stands in for the hub side of from_pretrained: records, downloads nothing.

    Patches the loader run before the model is built, and what set_use_kernels runs afterwards
    (the kernels version check, mapping registration, sanitize, compatible mapping, kernelize).
    """
    from transformers import modeling_utils
    from transformers.integrations import hub_kernels

    calls = SimpleNamespace(loader=[], sanitize=[], kernelize=[])

    def loader(cls: type, config: object, kernel_config: object) -> None:
        calls.loader.append(copy.deepcopy(kernel_config.kernel_mapping))

    # transformers 5.25 also passes device_map (and may pass more): accepted, not needed here.
    def kernelize(model: torch.nn.Module, mode: object = None, **_: object) -> None:
        config = model.kernel_config
        calls.kernelize.append((dict(config.kernel_mapping), config.inherit_mapping))

    monkeypatch.setattr(hub_kernels, "register_kernel_replacements_and_fusions", loader)
    monkeypatch.setattr(hub_kernels, "register_kernel_mapping_transformers", lambda *a, **k: None)
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda *a, **k: True)
    monkeypatch.setattr(modeling_utils, "kernelize", kernelize)
    monkeypatch.setattr(
        transformers.KernelConfig,
        "sanitize_kernel_mapping",
        lambda self, model: calls.sanitize.append(dict(self.kernel_mapping)),
    )
    monkeypatch.setattr(
        transformers.KernelConfig,
        "create_compatible_mapping",
        lambda self, model, compile=False: None,
    )
    return calls


# --- parsing ------------------------------------------------------------------------------------


def test_split_keeps_hub_entries_and_normalises_ours() -> None:
    mapping = {
        (("MLP", MLP), ("RMSNorm", NORM)): ON,  # any order: normalised to the roles' order
        NAMES: ON,
        HUB_KEY: HUB_VALUE,
        "SiLU": {"cuda": "kernels-community/activation:Silu"},
    }
    hub, ours = split_kernel_mapping(mapping)
    assert hub == {HUB_KEY: HUB_VALUE, "SiLU": {"cuda": "kernels-community/activation:Silu"}}
    assert ours == (
        FusionEntry("rmsnorm_mlp", True, NAMES, (NORM, MLP), (("MLP", MLP), ("RMSNorm", NORM)), ON),
        FusionEntry("rmsnorm_mlp", True, NAMES, None, NAMES, ON),
    )
    assert split_kernel_mapping({NAMES: OFF})[1][0].enabled is False


def test_kernel_config_is_a_transformers_kernel_config_showing_only_hub_entries() -> None:
    cfg = KernelConfig({INLINE: ON, HUB_KEY: HUB_VALUE})
    assert isinstance(cfg, transformers.KernelConfig)
    assert cfg.kernel_mapping == {HUB_KEY: HUB_VALUE}
    assert [entry.key for entry in cfg.fusion_entries] == [INLINE]
    assert inductor_fusion.kernel_config.KernelConfig is type(cfg)


def test_accepts_dict_real_kernel_config_and_ours_without_mutating_them() -> None:
    mapping = {INLINE: ON, HUB_KEY: {"cuda": HUB_VALUE}}
    snapshot = copy.deepcopy(mapping)
    real = transformers.KernelConfig(copy.deepcopy(mapping), inherit_mapping=True)
    real_snapshot = copy.deepcopy(vars(real))
    from_dict, from_real = fusion_config(mapping), KernelConfig(real)
    rebuilt = KernelConfig(from_real)
    for cfg in (from_dict, from_real, rebuilt):
        assert cfg.kernel_mapping == {HUB_KEY: {"cuda": HUB_VALUE}}
        assert cfg.fusion_entries == from_dict.fusion_entries
    assert mapping == snapshot
    assert vars(real) == real_snapshot
    # Ours is a separate copy: transformers rewriting it leaves the caller's dict alone.
    from_dict.kernel_mapping[HUB_KEY]["cuda"] = "rewritten"
    assert mapping == snapshot


def test_inherit_mapping_defaults() -> None:
    # On: never inherit transformers' default hub mapping (RMSNorm/SiLU kernels hide our region).
    assert KernelConfig({INLINE: ON}).inherit_mapping is False
    assert KernelConfig(transformers.KernelConfig({INLINE: ON})).inherit_mapping is False
    # Otherwise transformers' default, or the wrapped config's choice.
    assert KernelConfig({HUB_KEY: HUB_VALUE}).inherit_mapping is True
    assert KernelConfig({NAMES: OFF}).inherit_mapping is True
    real = transformers.KernelConfig({HUB_KEY: HUB_VALUE}, inherit_mapping=False)
    assert KernelConfig(real).inherit_mapping is False
    assert KernelConfig({INLINE: ON}, inherit_mapping=True).inherit_mapping is True


def test_hub_kernels_on_our_modules_warn() -> None:
    with pytest.warns(UserWarning, match="inherit_mapping=True kernelizes"):
        KernelConfig({INLINE: ON, HUB_KEY: HUB_VALUE}, inherit_mapping=True)
    with pytest.warns(UserWarning, match="puts a hub kernel on RMSNorm"):
        KernelConfig({INLINE: ON, "RMSNorm": "kernels-community/layer_norm:LlamaRMSNorm"})


@pytest.mark.parametrize(
    ("mapping", "error", "message"),
    [
        (
            {INLINE: "inductor_fusion:layernorm_gelu"},
            ValueError,
            "'inductor_fusion:layernorm_gelu': unknown inductor_fusion pattern 'layernorm_gelu'; "
            "valid names: " + ", ".join(pattern_names()),
        ),
        (
            {INLINE: "inductor_fusion:rmsnorm_mlp:maybe"},
            ValueError,
            "'inductor_fusion:<pattern>:off'",
        ),
        (
            {INLINE: "inductor_fusion:"},
            ValueError,
            "with <pattern> one of: " + ", ".join(pattern_names()),
        ),
        (
            {INLINE: "Inductor-Fusion:rmsnorm_mlp"},
            ValueError,
            "expected 'inductor_fusion:<pattern>'",
        ),
        ({"RMSNorm": ON}, ValueError, "rmsnorm_mlp spans 2 modules, so its key is a tuple"),
        (
            {("RMSNorm", "Attention"): ON},
            ValueError,
            "no module named 'Attention'; valid names: RMSNorm, MLP",
        ),
        ({("RMSNorm",): ON}, ValueError, "exactly once"),
        ({("RMSNorm", "RMSNorm", "MLP"): ON}, ValueError, "exactly once"),
        (
            {(("RMSNorm", NORM), "MLP"): ON},
            ValueError,
            "tuple of layer names or of (layer name, module glob)",
        ),
        ({(("RMSNorm", ""), ("MLP", MLP)): ON}, ValueError, "empty module glob"),
        ({NAMES: {"cuda": ON}}, TypeError, "our entries take one string value"),
        ({NAMES: (ON, {"version": 1})}, TypeError, "our entries take one string value"),
        ({INLINE: ON, NAMES: OFF}, ValueError, "turn rmsnorm_mlp both on and off"),
        # Would reach transformers and fail there, far from the typo.
        ({NAMES: "rmsnorm_mlp"}, ValueError, "did you mean 'inductor_fusion:rmsnorm_mlp'?"),
        (
            {NAMES: "rmsnorm_mlp:recompute"},
            ValueError,
            "did you mean 'inductor_fusion:rmsnorm_mlp:recompute'?",
        ),
        ({NAMES: 3}, TypeError, "expected a string value such as 'inductor_fusion:<pattern>'"),
        ({HUB_KEY: None}, TypeError, "expected a string value"),
    ],
)
def test_bad_entries_fail_at_construction(mapping: dict, error: type, message: str) -> None:
    key = next(iter(mapping))
    with pytest.raises(error, match=re.escape(message)) as info:
        KernelConfig(mapping)
    assert repr(key) in str(info.value)  # the error names the entry


@pytest.mark.parametrize("source", [[("RMSNorm", ON)], 42, "inductor_fusion:rmsnorm_mlp"])
def test_not_a_mapping_is_a_type_error(source: object) -> None:
    with pytest.raises(TypeError, match=r"takes a dict or a transformers\.KernelConfig"):
        KernelConfig(source)


# --- the registry of fusable modules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "model_class", "prefix"),
    [
        (LlamaConfig, LlamaForCausalLM, "model."),
        (LlamaConfig, LlamaModel, ""),
        (LlamaConfig, LlamaForQuestionAnswering, "transformer."),
        (MistralConfig, MistralForCausalLM, "model."),
        (Qwen2Config, Qwen2ForCausalLM, "model."),
        (Qwen3Config, Qwen3ForCausalLM, "model."),
    ],
)
def test_preregistered_models(config_class: type, model_class: type, prefix: str) -> None:
    model = tiny(config_class, model_class)
    found = fusable_modules(model)
    assert found == {
        "RMSNorm": f"{prefix}layers.*.post_attention_layernorm",
        "MLP": f"{prefix}layers.*.mlp",
    }
    paths = [name for name, _ in model.named_modules()]
    assert (
        f"{prefix}layers.1.post_attention_layernorm" in paths and f"{prefix}layers.1.mlp" in paths
    )


def test_registration_from_outside_the_class_overrides_inherited_names() -> None:
    class PartlyFusedLlama(LlamaForCausalLM):
        pass

    register_fusable_modules(PartlyFusedLlama, {"MLP": "model.layers.1.mlp"})
    register_fusable_modules(
        PartlyFusedLlama, {"RMSNorm": "model.layers.1.post_attention_layernorm"}
    )
    model = tiny(LlamaConfig, PartlyFusedLlama)
    plan = apply_kernel_config(model, {NAMES: ON})
    assert plan.scopes == {
        "rmsnorm_mlp": (("model.layers.1.post_attention_layernorm", "model.layers.1.mlp"),)
    }
    assert fusable_modules(tiny(LlamaConfig, LlamaForCausalLM))["MLP"] == MLP  # base untouched


@pytest.mark.parametrize(
    ("model_class", "modules", "error"),
    [
        ("LlamaForCausalLM", {"MLP": MLP}, TypeError),
        (int, {"MLP": MLP}, TypeError),
        (LlamaForCausalLM, {}, TypeError),
        (LlamaForCausalLM, {"MLP": ""}, ValueError),
        (LlamaForCausalLM, {"": MLP}, ValueError),
        # A misspelt layer name could never be looked up by a KernelConfig key.
        (LlamaForCausalLM, {"RMSNrom": MLP}, ValueError),
    ],
)
def test_register_rejects_bad_input(model_class: object, modules: dict, error: type) -> None:
    with pytest.raises(error, match="register_fusable_modules"):
        register_fusable_modules(model_class, modules)


# --- plans ------------------------------------------------------------------------------------


def test_plans_from_each_form() -> None:
    model = tiny(LlamaConfig, LlamaForCausalLM)
    assert apply_kernel_config(model, {NAMES: ON}).scopes == ALL_LAYERS
    plan = apply_kernel_config(model, transformers.KernelConfig({INLINE: ON, LAYER0: ON}))
    assert plan == FusionPlan(
        frozenset({"rmsnorm_mlp"}),
        scopes={"rmsnorm_mlp": ((NORM, MLP), tuple(glob for _, glob in LAYER0))},
        source="kernel_config",
    )
    assert model_plan(model) is plan
    assert find_model_plan([torch.ones(1), *model.parameters()]) is plan
    # Switched off: nothing of ours for this model, whatever INDUCTOR_FUSION_PATTERNS says.
    # ":off" turns that pattern off; every other pattern stays on.
    assert apply_kernel_config(model, {NAMES: OFF}).patterns == ALL_BUT_RMSNORM_MLP
    # Without entries of ours nothing is attached.
    other = tiny(LlamaConfig, LlamaForCausalLM)
    assert apply_kernel_config(other, {HUB_KEY: HUB_VALUE}) is None
    assert model_plan(other) is None


# --- from_pretrained (no compile) -------------------------------------------------------------------


def test_eager_model_is_unchanged_and_one_line_is_logged(
    checkpoints: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    plain = load(checkpoints.llama)
    caplog.set_level(logging.INFO, logger="inductor_fusion")
    caplog.clear()
    model = load(checkpoints.llama, KernelConfig({NAMES: ON}))
    ours = [record for record in caplog.records if record.name == "inductor_fusion"]
    assert len(ours) == 1
    assert 'torch.compile(model, backend="inductor_fusion")' in ours[0].getMessage()
    assert model_plan(model).scopes == ALL_LAYERS
    assert model.use_kernels is False
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, plain(input_ids()).logits)


def test_ours_never_reach_the_hub_loader_nor_kernelize(
    checkpoints: SimpleNamespace, fake_hub: SimpleNamespace
) -> None:
    cfg = KernelConfig({INLINE: ON})
    model = load(checkpoints.llama, cfg)
    assert fake_hub.loader == [{}]
    assert fake_hub.sanitize == [] and fake_hub.kernelize == []
    assert model.kernel_config is cfg
    assert model_plan(model).scopes == ALL_LAYERS


def test_hub_entries_pass_through_untouched(
    checkpoints: SimpleNamespace, fake_hub: SimpleNamespace
) -> None:
    real = transformers.KernelConfig({LAYER0: ON, HUB_KEY: HUB_VALUE})
    real_snapshot = copy.deepcopy(vars(real))
    model = load(checkpoints.llama, KernelConfig(real))
    assert fake_hub.loader == [{HUB_KEY: HUB_VALUE}]
    assert fake_hub.sanitize == [{HUB_KEY: HUB_VALUE}]
    assert fake_hub.kernelize == [({HUB_KEY: HUB_VALUE}, False)]
    assert model_plan(model).scopes == {"rmsnorm_mlp": (tuple(glob for _, glob in LAYER0),)}
    assert vars(real) == real_snapshot


def test_one_config_serves_several_models(checkpoints: SimpleNamespace) -> None:
    cfg = KernelConfig({NAMES: ON})
    first, second = load(checkpoints.llama, cfg), load(checkpoints.qwen3, cfg)
    assert model_plan(first).scopes == model_plan(second).scopes == ALL_LAYERS
    assert find_model_plan(list(second.parameters())) is model_plan(second)


def test_unregistered_names_fail_at_from_pretrained(checkpoints: SimpleNamespace) -> None:
    with pytest.raises(ValueError) as info:
        load(checkpoints.gpt2, KernelConfig({NAMES: ON}))
    message = str(info.value)
    assert repr(NAMES) in message and "GPT2LMHeadModel registers no fusable module named" in message
    assert "register_fusable_modules(GPT2LMHeadModel" in message
    # Switching off needs no registration.
    off = model_plan(load(checkpoints.gpt2, KernelConfig({NAMES: OFF})))
    assert off.patterns == ALL_BUT_RMSNORM_MLP


def test_glob_matching_no_module_warns(checkpoints: SimpleNamespace) -> None:
    key = (("RMSNorm", NORM), ("MLP", "model.blocks.*.mlp"))
    with pytest.warns(
        UserWarning, match=r"MLP glob 'model.blocks.\*.mlp' matches no module of LlamaForCausalLM"
    ):
        model = load(checkpoints.llama, KernelConfig({key: ON}))
    assert model_plan(model).scopes == {"rmsnorm_mlp": ((NORM, "model.blocks.*.mlp"),)}


def test_import_has_no_side_effects() -> None:
    code = textwrap.dedent(
        """
        import sys
        import inductor_fusion.kernel_config
        assert "transformers" not in sys.modules, "importing us imported transformers"
        from transformers import modeling_utils
        assert not hasattr(modeling_utils.PreTrainedModel.set_use_kernels, "_inductor_fusion_hook")
        inductor_fusion.kernel_config.fusion_config({})
        assert hasattr(modeling_utils.PreTrainedModel.set_use_kernels, "_inductor_fusion_hook")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


# --- compiled ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_all_layers_match_eager(checkpoints: SimpleNamespace) -> None:
    model = load(checkpoints.llama, KernelConfig({INLINE: ON}))
    logits, count, paths = compile_and_run(model)
    assert count == 2
    assert paths == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids()).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_two_models_get_their_own_fusions(checkpoints: SimpleNamespace) -> None:
    llama = load(checkpoints.llama, KernelConfig({LAYER0: ON}))
    qwen3 = load(checkpoints.qwen3, KernelConfig({NAMES: ON}))
    _, count, paths = compile_and_run(llama)
    assert (count, paths) == (1, ["model.layers.0.mlp"])
    _, count, paths = compile_and_run(qwen3)
    assert (count, paths) == (2, ["model.layers.0.mlp", "model.layers.1.mlp"])


@pytest.mark.slow
def test_switched_off_fuses_nothing(
    checkpoints: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model's KernelConfig beats INDUCTOR_FUSION_PATTERNS (config.resolve_plan).
    monkeypatch.setenv(fusion_config_module.ENV_PATTERNS, "rmsnorm_mlp")
    model = load(checkpoints.llama, KernelConfig({NAMES: OFF}))
    _, count, paths = compile_and_run(model)
    assert (count, paths) == (0, [])
