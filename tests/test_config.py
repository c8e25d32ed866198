"""Toggle resolution, without compiling: every source, precedence, and errors."""

from __future__ import annotations

import pytest

from inductor_fusion import registry
from inductor_fusion.config import (
    ENV_DISABLE,
    ENV_PATTERNS,
    FusionOptions,
    FusionPlan,
    resolve_plan,
)

ALL = frozenset(registry.pattern_names())


def test_default_is_every_pattern_everywhere():
    plan = resolve_plan(environ={})
    assert plan.patterns == ALL
    assert plan.allows("rmsnorm_mlp", {"norm": None, "mlp": None})


@pytest.mark.parametrize(
    ("value", "left"),
    [
        ("rmsnorm_mlp", ALL - {"rmsnorm_mlp"}),
        ("all", frozenset()),
        (" rmsnorm_mlp , ", ALL - {"rmsnorm_mlp"}),
    ],
)
def test_env_disable_removes(value, left):
    assert resolve_plan(environ={ENV_DISABLE: value}).patterns == left


@pytest.mark.parametrize(("value", "expected"), [("none", frozenset()), ("all", ALL)])
def test_env_patterns_selects(value, expected):
    assert resolve_plan(environ={ENV_PATTERNS: value}).patterns == expected


@pytest.mark.parametrize("value", ["", " ", ",,,"])
def test_env_patterns_naming_nothing_is_an_error_not_everything_off(value):
    with pytest.raises(ValueError, match=rf"{ENV_PATTERNS}: .* names no pattern; write 'none'"):
        resolve_plan(environ={ENV_PATTERNS: value})


@pytest.mark.parametrize("value", ["", ",,"])
def test_env_disable_empty_disables_nothing(value):
    assert resolve_plan(environ={ENV_DISABLE: value}).patterns == ALL


@pytest.mark.parametrize("var", [ENV_PATTERNS, ENV_DISABLE])
def test_env_unknown_name_lists_valid_names(var):
    with pytest.raises(
        ValueError, match=r"unknown inductor_fusion pattern 'rmsnorm_mpl'.*rmsnorm_mlp"
    ):
        resolve_plan(environ={var: "rmsnorm_mpl"})


def test_env_all_mixed_with_names_is_an_error():
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_plan(environ={ENV_DISABLE: "all,rmsnorm_mlp"})


def test_options_beat_model_plan_and_env_patterns():
    model_plan = FusionPlan(frozenset(), source="kernel_config")
    plan = resolve_plan(
        options=FusionOptions(patterns=("rmsnorm_mlp",)),
        model_plan=model_plan,
        environ={ENV_PATTERNS: "none"},
    )
    assert plan.patterns == {"rmsnorm_mlp"} and plan.source == "options"


def test_model_plan_beats_env_patterns():
    scoped = FusionPlan(
        frozenset({"rmsnorm_mlp"}),
        scopes={"rmsnorm_mlp": (("model.layers.0.*", "model.layers.0.*"),)},
        source="kernel_config",
    )
    plan = resolve_plan(model_plan=scoped, environ={ENV_PATTERNS: "none"})
    assert plan is scoped
    assert plan.allows(
        "rmsnorm_mlp",
        {"norm": "model.layers.0.post_attention_layernorm", "mlp": "model.layers.0.mlp"},
    )
    assert not plan.allows(
        "rmsnorm_mlp",
        {"norm": "model.layers.1.post_attention_layernorm", "mlp": "model.layers.1.mlp"},
    )
    # Unknown paths never satisfy a scope.
    assert not plan.allows("rmsnorm_mlp", {"norm": None, "mlp": None})


def test_env_disable_wins_over_everything():
    plan = resolve_plan(
        options=FusionOptions(patterns=("rmsnorm_mlp",)),
        environ={ENV_DISABLE: "all"},
    )
    assert plan.patterns == frozenset()


def test_options_disable():
    plan = resolve_plan(options=FusionOptions.from_value({"disable": ["rmsnorm_mlp"]}), environ={})
    assert plan.patterns == ALL - {"rmsnorm_mlp"}


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ({"patterns": ["nope"]}, ValueError, "valid names: " + ", ".join(registry.pattern_names())),
        ({"disable": ["nope"]}, ValueError, "valid names: " + ", ".join(registry.pattern_names())),
        ({"patern": ["rmsnorm_mlp"]}, ValueError, "unknown key"),
        (["rmsnorm_mlp"], TypeError, "must be a dict"),
        ({"patterns": 3}, TypeError, "expected a list"),
        # A dict would be read as its keys, switching on the pattern it means to switch off.
        ({"patterns": {"rmsnorm_mlp": False}}, TypeError, "got a dict"),
        ({"disable": {"rmsnorm_mlp": True}}, TypeError, "got a dict"),
        ({"patterns": ""}, ValueError, "names no pattern"),
    ],
)
def test_bad_options(value, error, match):
    with pytest.raises(error, match=match):
        FusionOptions.from_value(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("rmsnorm_mlp", ("rmsnorm_mlp",)),
        (" rmsnorm_mlp, ", ("rmsnorm_mlp",)),
        ("none", ()),
        ("all", registry.pattern_names()),
        (["rmsnorm_mlp"], ("rmsnorm_mlp",)),
    ],
)
def test_options_patterns_as_list_or_string(value, expected):
    assert FusionOptions.from_value({"patterns": value}).patterns == expected
    assert FusionOptions(patterns=value).patterns == expected


def test_apply_kernel_config_checks_the_model_first():
    from inductor_fusion import apply_kernel_config

    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str 'model'"):
        apply_kernel_config("model", {})


def test_plan_scope_must_align_with_roles():
    with pytest.raises(ValueError, match="one glob per role"):
        FusionPlan(frozenset({"rmsnorm_mlp"}), scopes={"rmsnorm_mlp": (("only-one",),)})


def test_plan_key_is_deterministic_and_distinguishes_toggles():
    a = FusionPlan(ALL)
    assert a.key() == FusionPlan(ALL, source="other").key()
    assert a.key() != FusionPlan(frozenset()).key()
    scoped = FusionPlan(ALL, scopes={"rmsnorm_mlp": (("x", "y"),)})
    assert scoped.key() != a.key()


def test_env_misspelt_variable_is_an_error_naming_the_real_ones():
    """INDUCTOR_FUSION_PATTERN (singular) would be ignored without a word."""
    with pytest.raises(ValueError, match="unknown environment variable INDUCTOR_FUSION_PATTERN;"):
        resolve_plan(environ={"INDUCTOR_FUSION_PATTERN": "rmsnorm_mlp"})
    with pytest.raises(
        ValueError, match="reads INDUCTOR_FUSION_PATTERNS and INDUCTOR_FUSION_DISABL"
    ):
        resolve_plan(environ={"INDUCTOR_FUSION_DISABLED": "all"})
    assert resolve_plan(environ={"OTHER_INDUCTOR_FUSION_X": "1"}).patterns == ALL


@pytest.mark.parametrize("entry", ["backend", "install"])
def test_both_entry_points_merge_arguments_and_options_alike(entry):
    """patterns/disable arguments beside options["inductor_fusion"]: the arguments' patterns
    replace the options', disables add up, and the options' memory mode is kept (install()
    once dropped it)."""
    import inductor_fusion

    options = {"inductor_fusion": {"memory": "recompute", "disable": ["gqa_decode"]}}
    kwargs = dict(patterns=["rmsnorm_mlp", "layernorm_mlp"], disable="layernorm_mlp")
    if entry == "backend":
        merged = inductor_fusion.backend(**kwargs, options=options).fusion_options
    else:
        installation = inductor_fusion.install(**kwargs, options=options)
        try:
            merged = installation.options
        finally:
            inductor_fusion.uninstall()
    assert merged.patterns == ("rmsnorm_mlp", "layernorm_mlp")
    assert merged.disable == ("gqa_decode", "layernorm_mlp")
    assert set(merged.memory.values()) == {"recompute"}
    plan = resolve_plan(options=merged, environ={})
    assert (
        plan.patterns == frozenset({"rmsnorm_mlp"})
        and plan.memory_mode("rmsnorm_mlp") == "recompute"
    )
