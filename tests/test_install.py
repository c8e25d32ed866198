"""install()/uninstall(): our pass in Inductor's global config, for backend="inductor" compiles."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import FP32_VS_EAGER, TINY, fresh_compile, layer_paths, tiny_model, token_ids
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers import AutoModelForCausalLM

import inductor_fusion
from inductor_fusion.config import ENV_DISABLE
from inductor_fusion.global_pass import InstalledPass
from inductor_fusion.model_plans import model_plan

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

HOOKS = ("joint_custom_pre_pass", "post_grad_custom_pre_pass")
LAYERS = TINY["num_hidden_layers"]


class UserPass(CustomGraphPass):
    """A user's pass, with a uuid (cacheable) or without (Inductor then bypasses its cache)."""

    def __init__(self, uid: str | None = "user-pass-v1") -> None:
        self.uid = uid
        self.graphs = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs += 1

    def uuid(self) -> str | None:
        return self.uid


def snapshot() -> dict[str, object]:
    """Inductor's whole config; the hooks by identity (a pass has no value equality)."""
    values = {k: v for k, v in inductor_config.get_config_copy().items() if k not in HOOKS}
    return {**values, **{hook: id(getattr(inductor_config, hook)) for hook in HOOKS}}


@pytest.fixture
def user_passes() -> Iterator[dict[str, UserPass]]:
    passes = {hook: UserPass() for hook in HOOKS}
    with inductor_config.patch(passes):
        yield passes


@pytest.mark.parametrize("with_user_passes", [False, True])
def test_uninstall_restores_inductor_config_exactly(request, with_user_passes: bool) -> None:
    if with_user_passes:
        request.getfixturevalue("user_passes")
    before = snapshot()
    installation = inductor_fusion.install(
        patterns="rmsnorm_mlp", options={"shape_padding": not inductor_config.shape_padding}
    )
    assert snapshot() != before
    for stage, hook in zip(("joint", "post_grad"), HOOKS, strict=True):
        installed = getattr(inductor_config, hook)
        assert installed is installation.passes[stage]
        # What the hook held before runs first, as with our backend.
        assert id(installed.chained) == before[hook]
    assert inductor_fusion.uninstall() is True
    assert snapshot() == before
    assert inductor_fusion.uninstall() is False  # nothing left to undo


def test_installs_stack_and_the_context_manager_restores(user_passes) -> None:
    before = snapshot()
    outer = inductor_fusion.install()
    with inductor_fusion.installed(disable="rmsnorm_mlp") as inner:
        current = inductor_config.post_grad_custom_pre_pass
        assert current is inner.passes["post_grad"]
        # The inner installation chains the user's pass, not the outer installation's.
        assert current.chained is user_passes["post_grad_custom_pre_pass"]
    assert inductor_config.post_grad_custom_pre_pass is outer.passes["post_grad"]
    inductor_fusion.uninstall()
    assert snapshot() == before


def test_a_hook_changed_after_install_is_left_alone() -> None:
    before = inductor_config.post_grad_custom_pre_pass
    inductor_fusion.install()
    theirs = UserPass()
    try:
        inductor_config.post_grad_custom_pre_pass = theirs
        with pytest.warns(UserWarning, match="changed after install"):
            inductor_fusion.uninstall()
        assert inductor_config.post_grad_custom_pre_pass is theirs
        assert inductor_config.joint_custom_pre_pass is None
    finally:
        inductor_config.post_grad_custom_pre_pass = before


def test_uuid_follows_the_toggles_and_the_chained_pass(
    monkeypatch: pytest.MonkeyPatch, user_passes
) -> None:
    with inductor_fusion.installed():
        installed = inductor_config.post_grad_custom_pre_pass
        assert isinstance(installed, InstalledPass)
        default = installed.uuid()
        monkeypatch.setenv(ENV_DISABLE, "rmsnorm_mlp")  # read when a compile asks, not at install
        disabled = installed.uuid()
        monkeypatch.delenv(ENV_DISABLE)
        user_passes["post_grad_custom_pre_pass"].uid = "user-pass-v2"
        changed_user_pass = installed.uuid()
        # As Inductor does: a chained pass without uuid disables the FX graph cache.
        user_passes["post_grad_custom_pre_pass"].uid = None
        assert installed.uuid() is None
    assert len({default, disabled, changed_user_pass}) == 3
    assert all(isinstance(uid, str) for uid in (default, disabled, changed_user_pass))


def test_import_alone_installs_nothing() -> None:
    code = (
        "import torch._inductor.config as c; before = c.get_config_copy(); "
        "import inductor_fusion; inductor_fusion.install; inductor_fusion.explain; "
        "assert c.get_config_copy() == before; "
        "inductor_fusion.install(); assert c.get_config_copy() != before; "
        "inductor_fusion.uninstall(); assert c.get_config_copy() == before; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-3000:]


def test_plain_transformers_kernel_config_works_while_installed(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    mapping = {
        (
            ("RMSNorm", "model.layers.0.post_attention_layernorm"),
            ("MLP", "model.layers.0.mlp"),
        ): "inductor_fusion:rmsnorm_mlp",
    }
    plain = transformers.KernelConfig(dict(mapping))
    own = vars(transformers.PreTrainedModel)["from_pretrained"]
    with inductor_fusion.installed():
        assert vars(transformers.PreTrainedModel)["from_pretrained"] is not own
        model = AutoModelForCausalLM.from_pretrained(tmp_path, kernel_config=plain)
    assert model_plan(model).scopes == {
        "rmsnorm_mlp": (("model.layers.0.post_attention_layernorm", "model.layers.0.mlp"),)
    }
    assert not model.use_kernels  # only our entries: transformers kernelized nothing
    assert plain.kernel_mapping == mapping  # the caller's config is not modified
    # Uninstalled, from_pretrained is transformers' own again.
    assert vars(transformers.PreTrainedModel)["from_pretrained"] is own


# --- compiled -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plain_torch_compile_fuses_with_toggles_and_kernel_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        eager = model(ids).logits
    # Caches off: an installed pass reports only the graphs it runs on (see global_pass).
    with fresh_compile(caches=False) as report, inductor_fusion.installed() as installation:
        with torch.no_grad():
            logits = torch.compile(model)(ids).logits
        assert sorted(report.paths("rmsnorm_mlp", "mlp")) == layer_paths("mlp")
        assert installation.report.count("rmsnorm_mlp") == LAYERS
    torch.testing.assert_close(logits, eager, atol=FP32_VS_EAGER, rtol=0)

    # The model's KernelConfig plan applies as it does for our backend ...
    only_layer_1 = {
        (
            ("RMSNorm", "*.1.post_attention_layernorm"),
            ("MLP", "*.1.mlp"),
        ): "inductor_fusion:rmsnorm_mlp"
    }
    inductor_fusion.apply_kernel_config(model, only_layer_1)
    with fresh_compile(caches=False) as report, inductor_fusion.installed():
        with torch.no_grad():
            torch.compile(model)(ids)
        assert report.paths("rmsnorm_mlp", "mlp") == ["model.layers.1.mlp"]
        # ... our backend, compiled while installed, runs its own pass with its own plan only.
        report.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=inductor_fusion.backend(disable="rmsnorm_mlp"))(ids)
        assert len(report) == 0
        # ... and INDUCTOR_FUSION_DISABLE still wins.
        monkeypatch.setenv(ENV_DISABLE, "all")
        report.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model)(ids)
        assert len(report) == 0


def test_a_lazy_compile_after_uninstall_and_an_earlier_compile_each_get_a_warning(caplog) -> None:
    """torch.compile compiles at the first call: a call after uninstall() fuses nothing, and code
    Dynamo compiled before install() keeps its graphs. Each case says so in one log line; a
    compile while installed says nothing."""
    import logging

    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="inductor_fusion"):
        inductor_fusion.install()
        compiled = torch.compile(lambda x: x * 2)
        inductor_fusion.uninstall()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "nothing was compiled while installed" in line and "before uninstall()" in line
    compiled(torch.ones(3))  # compiles now, with plain Inductor
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inductor_fusion"), inductor_fusion.installed():
        torch.compile(lambda x: x + 2)(torch.ones(3))
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Dynamo already holds" in line and "torch._dynamo.reset()" in line
    torch._dynamo.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inductor_fusion"), inductor_fusion.installed():
        torch.compile(lambda x: x + 3)(torch.ones(3))
    assert not caplog.records
