"""A plain ``transformers.KernelConfig`` that names our layer by a hub-style id, loaded through
transformers' and kernels' own flow with no hub: ``LOCAL_KERNELS`` maps the id to the folder
shipped in this package (`inductor_fusion.kernel_layer.local_kernels_entry`).

Also pinned here: what a plain config with our ``"inductor_fusion:<pattern>"`` value does without
``install()`` (the hub's error, quoted by the docs), and that ``kernels.kernelize`` gives our
layer in the training and torch.compile modes too (the layer's ``has_backward`` /
``can_torch_compile`` flags; without them kernels falls back to the original forward).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from test_eager_layer import logits_and_ops

# Fixtures (listable_transformers_modules, own_registries, checkpoints) are used by name.
from test_kernel_layer_repo import (  # noqa: F401
    ACCEPTED,
    KEY,
    LAYERS,
    NOT_ACCEPTED,
    assert_fused_layers,
    listable_transformers_modules,
    load,
    loaded_before_set_use_kernels,
    local_repository,
    own_registries,
)
from test_kernel_layer_repo import checkpoints as checkpoints
from tiny_models import assert_within_tolerance, fp64_logits, tiny_model, token_ids
from transformers import KernelConfig

kernels = pytest.importorskip("kernels")
layer_module = importlib.import_module("inductor_fusion.kernel_layer")

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles", "own_registries")


@pytest.fixture
def local_kernels(monkeypatch: pytest.MonkeyPatch) -> str:
    entry = layer_module.local_kernels_entry()
    monkeypatch.setenv("LOCAL_KERNELS", entry)
    return entry


def test_cli_prints_the_entry_and_the_value() -> None:
    run = [sys.executable, "-m", "inductor_fusion", "kernel-repo"]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    entry = layer_module.local_kernels_entry()
    assert (
        out.splitlines()[0] == f'export LOCAL_KERNELS="{entry}${{LOCAL_KERNELS:+:$LOCAL_KERNELS}}"'
    )
    assert repr(layer_module.hub_style_value()) in out
    bad = subprocess.run([*run, "rmsnorm_mpl"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "rmsnorm_mlp" in bad.stderr


def test_the_entry_points_kernels_at_the_shipped_folder(local_kernels: str) -> None:
    repo_id, _, folder = local_kernels.partition("=")
    assert repo_id.count("/") == 1 and ":" not in folder
    assert folder == str(layer_module.repository_path())
    value = layer_module.hub_style_value()
    assert value == f"{repo_id}:{layer_module.KERNEL_LAYERS['rmsnorm_mlp']}"


@pytest.mark.skipif(not ACCEPTED, reason=NOT_ACCEPTED)
@pytest.mark.usefixtures("listable_transformers_modules", "local_kernels")
def test_plain_config_with_the_hub_style_name_loads_without_the_hub(
    checkpoints: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = load(checkpoints.llama)
    built = loaded_before_set_use_kernels(monkeypatch)
    config = KernelConfig({KEY: layer_module.hub_style_value()})
    with pytest.raises(ValueError, match="got: cpu"):
        load(checkpoints.llama, kernel_config=config)
    (fused,) = built  # swapped and loaded by transformers, then refused in set_use_kernels
    assert_fused_layers(fused, kernelized=False)
    ids = token_ids()
    logits, ops = logits_and_ops(fused, ids)
    assert ops == LAYERS
    assert_within_tolerance(logits, logits_and_ops(plain, ids)[0], fp64_logits(plain, ids))


@pytest.mark.skipif(not ACCEPTED, reason=NOT_ACCEPTED)
@pytest.mark.usefixtures("listable_transformers_modules")
def test_plain_config_with_our_pattern_value_fails_at_the_hub(
    checkpoints: SimpleNamespace,
) -> None:
    """Without install() transformers hands ``inductor_fusion:rmsnorm_mlp`` to the hub, which has
    no such repository: offline (as here) kernels says it is not cached; online it fails its
    publisher-trust check. The docs quote both and give the fixes."""
    config = KernelConfig({KEY: "inductor_fusion:rmsnorm_mlp"})
    with pytest.raises(ValueError, match="'inductor_fusion' is not available in the local cache"):
        load(checkpoints.llama, kernel_config=config)


@pytest.mark.parametrize("mode", ["TRAINING", "INFERENCE|TORCH_COMPILE", "TRAINING|TORCH_COMPILE"])
def test_kernelize_picks_our_layer_for_training_and_compile(mode: str) -> None:
    """kernels picks a layer for a mode only if its flags allow it (else the original forward
    stays, silently under transformers' ``use_fallback``): ours declares both."""
    from inductor_fusion.kernel_layer import RMSNormMLP, RMSNormMLPLayout

    flags = [getattr(kernels.Mode, part) for part in mode.split("|")]
    wanted = flags[0] if len(flags) == 1 else flags[0] | flags[1]
    layer = tiny_model("llama").model.layers[0]
    layout = RMSNormMLPLayout(layer.post_attention_layernorm, layer.mlp)
    model = torch.nn.Sequential(layout)
    mapping = {"RMSNormMLP": {"cpu": {wanted: local_repository()}}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, device="cpu", mode=wanted)
    assert getattr(model[0].forward, "__func__", None) is RMSNormMLP.forward


@pytest.mark.skipif(
    not (ACCEPTED and torch.cuda.is_available()),
    reason=NOT_ACCEPTED if not ACCEPTED else "needs CUDA (transformers kernelizes cuda, not cpu)",
)
@pytest.mark.usefixtures("listable_transformers_modules", "local_kernels")
def test_plain_config_with_the_hub_style_name_on_cuda(checkpoints: SimpleNamespace) -> None:
    """The whole flow with no workaround: transformers' hub path (no ``use_local_kernel``), the
    id resolved by kernels through LOCAL_KERNELS, the layouts kernelized with our layer."""
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda")
    plain = load(checkpoints.llama, **kwargs)
    config = KernelConfig({KEY: layer_module.hub_style_value()})
    model = load(checkpoints.llama, kernel_config=config, **kwargs)
    assert model.use_kernels
    assert_fused_layers(model, kernelized=True)
    ids = token_ids(device="cuda")
    expected = logits_and_ops(plain, ids)[0]
    assert_within_tolerance(logits_and_ops(model, ids)[0], expected, fp64_logits(plain, ids))
