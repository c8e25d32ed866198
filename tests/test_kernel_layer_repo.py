"""Our `kernels` layer repository in transformers' own n-to-1 kernel fusion (`kernel_layer`).

What each environment proves:

- everywhere (CI until 2026-12-02: transformers 5.24 + kernels 0.17.2, which 5.24 treats as
  absent; since 2026-12-03: 5.25 + kernels 0.19.1, accepted): the shipped
  repository and its metadata; `kernels` loading the layer offline; the layout against the
  modules it replaces; transformers' own fusion code (``register_kernel_replacements_and_fusions``,
  handed kernels' ``LocalLayerRepository`` where transformers' version gate hides it) building
  the fused model from an unchanged checkpoint; keys through load and save; ``kernels.kernelize``
  giving the layouts the layer's forward (on cpu); torch.compile on top;
- where transformers accepts the installed kernels (5.17 + 0.16.x, 5.20-5.22 + 0.17.2,
  5.25 + 0.19.1):
  ``from_pretrained(kernel_config=...)`` itself, which swaps, loads, then refuses device cpu;
- on CUDA with such a pair (the GPU machine: transformers 5.17 + kernels 0.16.2): the whole flow.

transformers keeps the decoder-layer patch and the checkpoint rename in process-wide registries;
every test here gets them back as they were (`own_registries`). Models are tiny random Llama and
Qwen3 checkpoints, saved once and loaded offline.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_eager_layer import CountOps, logits_and_ops, traced_op_calls  # our op's calls
from tiny_models import FAMILIES, assert_within_tolerance, fp64_logits, tiny_model, token_ids
from transformers import AutoConfig, AutoModelForCausalLM, KernelConfig
from transformers.utils.import_utils import (
    KERNELS_MAX_VERSION,
    KERNELS_MIN_VERSION,
    is_kernels_available,
)

import inductor_fusion
from inductor_fusion import layers
from inductor_fusion.kernel_layer import RMSNormMLP, RMSNormMLPLayout, repository_path
from inductor_fusion.layers import EagerFusionError

kernels = pytest.importorskip("kernels")

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles", "own_registries")

KEY = (("RMSNorm", "model.layers.*.post_attention_layernorm"), ("MLP", "model.layers.*.mlp"))
OP = "inductor_fusion.rmsnorm_mlp.default"
LAYERS = 2  # tiny_models.TINY
MLP_KEYS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

# transformers hands a local kernel to `kernels` only where it accepts the installed version.
ACCEPTED = is_kernels_available()
NOT_ACCEPTED = (
    f"transformers {transformers.__version__} wants kernels >= "
    f"{KERNELS_MIN_VERSION}, < {KERNELS_MAX_VERSION}; with kernels {kernels.__version__} it "
    "treats kernels as absent and from_pretrained(kernel_config=...) cannot load a layer"
)


# --- fixtures and helpers ---------------------------------------------------------------------


@contextlib.contextmanager
def transformers_registries() -> Iterator[None]:
    """transformers' decoder-layer patches and checkpoint conversions as they were before.

    ``register_kernel_replacements_and_fusions`` adds to both and nothing removes them: without
    this, every later ``from_pretrained`` of the model type in the session would be fused too."""
    from transformers import conversion_mapping, monkey_patching

    patches = dict(monkey_patching._monkey_patch_mapping_cache)
    conversions = conversion_mapping._checkpoint_conversion_mapping_cache
    conversions = None if conversions is None else dict(conversions)
    user_registered = set(conversion_mapping.USER_REGISTERED_MAPPINGS)
    try:
        yield
    finally:
        # transformers' functions read these module globals on every call.
        monkey_patching._monkey_patch_mapping_cache.clear()
        monkey_patching._monkey_patch_mapping_cache.update(patches)
        conversion_mapping._checkpoint_conversion_mapping_cache = conversions
        conversion_mapping.USER_REGISTERED_MAPPINGS.clear()
        conversion_mapping.USER_REGISTERED_MAPPINGS.update(user_registered)


@pytest.fixture
def own_registries() -> Iterator[None]:
    with transformers_registries():
        yield


@pytest.fixture
def listable_transformers_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets transformers' ``apply_patches`` list every loaded transformers module.

    ``from_pretrained`` runs it once a patch is registered: it calls ``dir()`` on each
    ``transformers*`` module in ``sys.modules``. transformers 5.17 loads 211 lazy aliases of
    image processors whose ``dir()`` imports torchvision / Pillow code, and fails where those are
    not installed (5.22 and 5.24 list cleanly). None of them holds a decoder layer class to patch,
    so for the test their listing is empty."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("transformers"):
            continue
        try:
            dir(module)
        except Exception:  # whatever the failed import raised: ImportError, NameError, ...
            monkeypatch.setattr(module, "__dir__", list, raising=False)


def _unwrap_local(value: object) -> object:
    # (string, hub metadata) -> string: the form transformers' local-kernel path splits.
    return value[0] if isinstance(value, tuple) else value


@pytest.fixture
def local_fusion_mapping_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Works around transformers 5.17-5.24: its loader rewrites each kernel entry to
    ``(value, {"version": 1, ...})``, and with ``use_local_kernel=True``
    ``create_compatible_mapping`` passes that tuple to ``add_to_mapping_local``, which splits it
    as a string: AttributeError on every device that transformers lets through (cpu is refused
    before). The metadata is for hub repositories; a local one needs the string alone.
    `test_transformers_still_splits_its_own_tuple` fails once transformers fixes it."""
    from transformers.utils import kernel_config as hf_kernel_config

    original = hf_kernel_config.add_to_mapping_local

    def add_to_mapping_local(layer_name, device, repo_name, mode, compatible_mapping):
        return original(layer_name, device, _unwrap_local(repo_name), mode, compatible_mapping)

    monkeypatch.setattr(hf_kernel_config, "add_to_mapping_local", add_to_mapping_local)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("kernel_layer_checkpoints")
    paths = SimpleNamespace(llama=root / "llama", qwen3=root / "qwen3")
    tiny_model("llama").save_pretrained(paths.llama)
    tiny_model("qwen3").save_pretrained(paths.qwen3)
    return paths


def local_config() -> KernelConfig:
    return KernelConfig({KEY: inductor_fusion.kernel_layer()}, use_local_kernel=True)


def local_repository() -> object:
    folder, _, layer = inductor_fusion.kernel_layer().partition(":")
    return kernels.LocalLayerRepository(repo_path=Path(folder), layer_name=layer)


def register_fusion(family: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> KernelConfig:
    """What ``from_pretrained(path, kernel_config=local_config())`` does before building the
    model, through transformers' own code; returns the config as transformers rewrote it."""
    from transformers.integrations import hub_kernels

    if not ACCEPTED:
        # transformers imports kernels' classes only from a kernels version it accepts, and
        # leaves stand-ins that raise; the fusion code itself does not depend on the version.
        monkeypatch.setattr(hub_kernels, "LocalLayerRepository", kernels.LocalLayerRepository)
    kernel_config = local_config()
    hub_kernels.register_kernel_replacements_and_fusions(
        FAMILIES[family][1], AutoConfig.from_pretrained(path), kernel_config
    )
    return kernel_config


def loaded_before_set_use_kernels(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """The models from_pretrained built, seen as it hands them to set_use_kernels (which refuses
    device cpu: transformers kernelizes accelerators only)."""
    from transformers import PreTrainedModel

    built: list[torch.nn.Module] = []
    set_use_kernels = PreTrainedModel.set_use_kernels

    def spy(self, *args, **kwargs):
        built.append(self)
        return set_use_kernels(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", spy)
    return built


def load(path: Path, **kwargs: object) -> torch.nn.Module:
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def kernelize(model: torch.nn.Module, device: str) -> None:
    """``kernels.kernelize`` with the mapping transformers builds for our entry (``inherit_mapping``
    is off for local kernels)."""
    mapping = {"RMSNormMLP": {device: local_repository()}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, device=device, mode=kernels.Mode.INFERENCE)


def assert_fused_layers(model: torch.nn.Module, *, kernelized: bool) -> None:
    """Every decoder layer holds our layout in the norm's place and an Identity in the MLP's;
    ``kernelized``: its forward is the layer's."""
    decoder_layers = model.model.layers
    assert len(decoder_layers) == LAYERS
    for layer in decoder_layers:
        layout = layer.post_attention_layernorm
        assert type(layout) is RMSNormMLPLayout and type(layer.mlp) is torch.nn.Identity
        forward = layout.forward
        assert (getattr(forward, "__func__", None) is RMSNormMLP.forward) == kernelized


def fused_keys(plain_keys: list[str]) -> list[str]:
    return [
        re.sub(r"layers\.(\d+)\.mlp\.", r"layers.\1.post_attention_layernorm.mlp.", k)
        for k in plain_keys
    ]


# --- the repository and the value for transformers ---------------------------------------------


def test_kernel_layer_names_the_shipped_repository_and_its_layer() -> None:
    value = inductor_fusion.kernel_layer()
    folder, _, layer = value.partition(":")  # as transformers splits it
    assert Path(folder) == repository_path("rmsnorm_mlp") and Path(folder).is_absolute()
    assert layer == "RMSNormMLP" and "/" in value  # transformers' check for a repository
    variant = Path(folder) / "build" / "torch-universal"
    metadata = json.loads((variant / "metadata.json").read_text())
    # The fields kernels 0.16.2 and 0.17.2 require (either rejects metadata missing one).
    assert set(metadata) == {"id", "name", "version", "license", "python-depends", "backend"}
    assert re.fullmatch(r"[a-z][-a-z0-9]*[a-z0-9]", metadata["name"])
    assert metadata["backend"] == {"type": "cuda"} and metadata["python-depends"] == []
    package = variant / metadata["name"].replace("-", "_")
    assert {p.name for p in package.glob("*.py")} == {"__init__.py", "layers.py"}
    with pytest.raises(ValueError, match="rmsnorm_mlp"):
        inductor_fusion.kernel_layer("layernorm_mlp")


def test_kernels_loads_the_layer_offline_next_to_its_layout() -> None:
    layer = local_repository().load()
    assert layer is RMSNormMLP
    # Where transformers looks for the layout: the layer class's module, "<Layer>Layout".
    assert getattr(sys.modules[layer.__module__], f"{layer.__name__}Layout") is RMSNormMLPLayout
    loaded = kernels.get_local_kernel(repository_path())
    assert loaded.layers.RMSNormMLP is RMSNormMLP
    assert loaded.layers.RMSNormMLPLayout is RMSNormMLPLayout


# --- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layout_computes_the_modules_output_with_their_parameters(family: str) -> None:
    model = tiny_model(family)
    hidden = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for decoder_layer in model.model.layers:
        norm, mlp = decoder_layer.post_attention_layernorm, decoder_layer.mlp
        with torch.no_grad():
            eager = mlp(norm(hidden))
            reference = copy.deepcopy(mlp).double()(copy.deepcopy(norm).double()(hidden.double()))
        layout = RMSNormMLPLayout(norm, mlp).eval()
        with torch.no_grad(), CountOps() as counter:
            fused = layout(hidden)
        assert counter.ops[OP] == 1
        assert_within_tolerance(fused, eager, reference)
        # The norm's parameter stays the norm's, at the norm's key; the MLP is a child.
        assert layout.weight is norm.weight and layout.mlp is mlp
        assert list(layout.state_dict()) == ["weight", *(f"mlp.{key}" for key in MLP_KEYS)]
        layout.train()
        assert layout._norm_mlp.training and mlp.training
        layout.eval()
        assert not layout._norm_mlp.training and not mlp.training


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (lambda norm, mlp: (torch.nn.LayerNorm(norm.weight.shape[0]), mlp), "RMSNorms"),
        (lambda norm, mlp: (mlp, norm), "LlamaMLP"),  # the key's pairs in the wrong order
    ],
    ids=["layernorm", "mlp-first"],
)
def test_layout_refuses_modules_it_does_not_fuse(modules, message: str) -> None:
    decoder_layer = tiny_model("llama").model.layers[0]
    norm, mlp = modules(decoder_layer.post_attention_layernorm, decoder_layer.mlp)
    with pytest.raises(EagerFusionError, match=message):
        RMSNormMLPLayout(norm, mlp)


# --- transformers' fusion code, kernels' kernelize, torch.compile -----------------------------


@pytest.mark.usefixtures("listable_transformers_modules")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_transformers_fusion_loads_an_unchanged_checkpoint(
    checkpoints: SimpleNamespace, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = getattr(checkpoints, family)
    plain = load(path)
    kernel_config = register_fusion(family, path, monkeypatch)
    # transformers' rewrite of the entry: the layer's name, the value, hub metadata.
    assert list(kernel_config.kernel_mapping) == ["RMSNormMLP"]
    assert (
        _unwrap_local(kernel_config.kernel_mapping["RMSNormMLP"]) == inductor_fusion.kernel_layer()
    )

    fused = load(path)
    assert_fused_layers(fused, kernelized=False)
    # The same keys but the MLP's, which follow the norm (registered after the MLP) now.
    assert sorted(fused.state_dict()) == sorted(fused_keys(list(plain.state_dict())))
    ids = token_ids()
    expected, plain_ops = logits_and_ops(plain, ids)
    logits, ops = logits_and_ops(fused, ids)
    assert (plain_ops, ops) == (0, LAYERS)
    assert_within_tolerance(logits, expected, fp64_logits(plain, ids))


@pytest.mark.usefixtures("listable_transformers_modules")
def test_save_pretrained_writes_the_checkpoint_format_back(
    checkpoints: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = load_file(checkpoints.llama / "model.safetensors")
    plain = load(checkpoints.llama)
    ids = token_ids()
    expected = logits_and_ops(plain, ids)[0]
    with transformers_registries():
        register_fusion("llama", checkpoints.llama, monkeypatch)
        fused = load(checkpoints.llama)
        fused.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "model.safetensors")
        assert sorted(saved) == sorted(original)
        assert all(torch.equal(saved[key], original[key]) for key in original)
        fused_again = load(tmp_path)
        assert_fused_layers(fused_again, kernelized=False)
        assert torch.equal(logits_and_ops(fused_again, ids)[0], logits_and_ops(fused, ids)[0])
    plain_again = load(tmp_path)  # transformers' registries as before: no fusion
    assert type(plain_again.model.layers[0].mlp) is not torch.nn.Identity
    assert torch.equal(logits_and_ops(plain_again, ids)[0], expected)


@pytest.mark.usefixtures("listable_transformers_modules")
def test_kernelize_gives_each_layout_the_layer_forward(
    checkpoints: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_fusion("llama", checkpoints.llama, monkeypatch)
    model = load(checkpoints.llama)
    ids = token_ids()
    before = logits_and_ops(model, ids)[0]
    # transformers refuses cpu before it gets here; kernels itself kernelizes for cpu as for
    # cuda, and validates the layer against the layout (stateless, same forward signature).
    kernelize(model, "cpu")
    assert_fused_layers(model, kernelized=True)
    logits, ops = logits_and_ops(model, ids)
    assert ops == LAYERS and torch.equal(logits, before)


@pytest.mark.usefixtures("listable_transformers_modules")
def test_torch_compile_on_top_fuses_nothing_twice(
    checkpoints: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_fusion("llama", checkpoints.llama, monkeypatch)
    model = load(checkpoints.llama)
    kernelize(model, "cpu")
    ids = token_ids()
    expected = logits_and_ops(model, ids)[0]
    assert traced_op_calls(model, ids) == LAYERS  # the layouts' calls, traced as they are

    torch._dynamo.reset()
    inductor_fusion.reset_report()
    with torch.no_grad():
        logits = torch.compile(model, backend="inductor_fusion")(ids).logits
    assert inductor_fusion.get_report().count("rmsnorm_mlp") == 0
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    torch._dynamo.reset()


# --- from_pretrained(kernel_config=...) itself --------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    raises=AttributeError,
    reason="transformers 5.17-5.25 split the (value, metadata) tuple its own loader writes "
    "(see local_fusion_mapping_fix); an XPASS means the workaround can go",
)
def test_transformers_still_splits_its_own_tuple() -> None:
    from transformers.utils import kernel_config as hf_kernel_config

    rewritten = (inductor_fusion.kernel_layer(), {"version": 1, "trust_remote_code": False})
    hf_kernel_config.add_to_mapping_local(
        "RMSNormMLP", "cuda", rewritten, kernels.Mode.INFERENCE, {}
    )


@pytest.mark.skipif(ACCEPTED, reason="transformers accepts the installed kernels")
def test_without_an_accepted_kernels_the_flow_stops_before_building(
    checkpoints: SimpleNamespace,
) -> None:
    with pytest.raises(RuntimeError, match="requires `kernels`"):
        load(checkpoints.llama, kernel_config=local_config())


@pytest.mark.skipif(not ACCEPTED, reason=NOT_ACCEPTED)
@pytest.mark.usefixtures("listable_transformers_modules")
def test_from_pretrained_swaps_and_loads_then_refuses_cpu(
    checkpoints: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = load(checkpoints.llama)
    built = loaded_before_set_use_kernels(monkeypatch)
    with pytest.raises(ValueError, match="got: cpu"):
        load(checkpoints.llama, kernel_config=local_config())
    (fused,) = built  # loaded, then refused in set_use_kernels
    assert_fused_layers(fused, kernelized=False)
    ids = token_ids()
    expected = logits_and_ops(plain, ids)[0]
    logits, ops = logits_and_ops(fused, ids)
    assert ops == LAYERS
    assert_within_tolerance(logits, expected, fp64_logits(plain, ids))


CUDA_FLOW = pytest.mark.skipif(
    not (ACCEPTED and torch.cuda.is_available()),
    reason=NOT_ACCEPTED if not ACCEPTED else "needs CUDA (transformers kernelizes cuda, not cpu)",
)


@CUDA_FLOW
@pytest.mark.usefixtures("listable_transformers_modules", "local_fusion_mapping_fix")
def test_full_flow_on_cuda(
    checkpoints: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda")
    plain = load(checkpoints.llama, **kwargs)
    model = load(checkpoints.llama, kernel_config=local_config(), **kwargs)
    assert model.use_kernels
    assert_fused_layers(model, kernelized=True)
    ids = token_ids(device="cuda")
    logits = logits_and_ops(model, ids)[0]
    # On CUDA the layer calls the op's implementation directly; through the dispatcher, where a
    # dispatch mode sees the op, the same implementation gives the same logits.
    with monkeypatch.context() as patch:
        patch.setattr(layers, "DIRECT_DEVICES", ())
        counted, ops = logits_and_ops(model, ids)
    assert ops == LAYERS and torch.equal(counted, logits)
    expected = logits_and_ops(plain, ids)[0]
    assert_within_tolerance(logits, expected, fp64_logits(plain, ids))

    model.save_pretrained(tmp_path)
    original = load_file(checkpoints.llama / "model.safetensors")
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(original)


@CUDA_FLOW
@pytest.mark.usefixtures("listable_transformers_modules", "local_fusion_mapping_fix")
def test_full_flow_on_cuda_round_trips_and_compiles(
    checkpoints: SimpleNamespace, tmp_path: Path
) -> None:
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda")
    plain = load(checkpoints.llama, **kwargs)
    model = load(checkpoints.llama, kernel_config=local_config(), **kwargs)
    ids = token_ids(device="cuda")
    logits = logits_and_ops(model, ids)[0]
    model.save_pretrained(tmp_path)
    again = load(tmp_path, kernel_config=local_config(), **kwargs)
    assert_fused_layers(again, kernelized=True)
    assert torch.equal(logits_and_ops(again, ids)[0], logits)

    torch._dynamo.reset()
    inductor_fusion.reset_report()
    with torch.no_grad():
        compiled = torch.compile(again, backend="inductor_fusion")(ids).logits
    assert inductor_fusion.get_report().count("rmsnorm_mlp") == 0
    assert traced_op_calls(again, ids) == LAYERS
    expected = logits_and_ops(plain, ids)[0]
    assert_within_tolerance(compiled, expected, fp64_logits(plain, ids))
    torch._dynamo.reset()


@CUDA_FLOW
@pytest.mark.usefixtures("listable_transformers_modules")
def test_full_flow_on_cuda_through_our_config_needs_no_workaround(
    checkpoints: SimpleNamespace,
) -> None:
    """``inductor_fusion.KernelConfig`` with the same entry: its ``create_compatible_mapping``
    unwraps transformers' tuple, so the flow completes without `local_fusion_mapping_fix`."""
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda")
    plain = load(checkpoints.llama, **kwargs)
    config = inductor_fusion.KernelConfig(
        {KEY: inductor_fusion.kernel_layer()}, use_local_kernel=True
    )
    model = load(checkpoints.llama, kernel_config=config, **kwargs)
    assert model.use_kernels
    assert_fused_layers(model, kernelized=True)
    ids = token_ids(device="cuda")
    expected = logits_and_ops(plain, ids)[0]
    assert_within_tolerance(logits_and_ops(model, ids)[0], expected, fp64_logits(plain, ids))


def test_our_config_unwraps_local_entries_before_transformers_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU half of the test above: what reaches transformers' ``create_compatible_mapping``
    is the ``"folder:Layer"`` string, whatever its loader wrapped it in; hub entries keep their
    metadata."""
    from transformers import KernelConfig as HFKernelConfig

    seen = {}

    def upstream(self, model, compile=False):
        seen.update(self.kernel_mapping)

    monkeypatch.setattr(HFKernelConfig, "create_compatible_mapping", upstream)
    layer = inductor_fusion.kernel_layer()
    config = inductor_fusion.KernelConfig({KEY: layer}, use_local_kernel=True)
    (name,) = config.kernel_mapping
    config.kernel_mapping[name] = (layer, {"version": 1, "trust_remote_code": False})
    config.create_compatible_mapping(None)
    assert seen == {name: layer}
    hub = inductor_fusion.KernelConfig({"RMSNorm": "kernels-community/layer_norm:LlamaRMSNorm"})
    wrapped = ("kernels-community/layer_norm:LlamaRMSNorm", {"version": 1})
    hub.kernel_mapping["RMSNorm"] = wrapped
    hub.create_compatible_mapping(None)
    assert seen["RMSNorm"] == wrapped


def test_docs_snippet_builds_the_config() -> None:
    """docs/eager_layer.md's route through transformers' flow, executed from the page: the config
    it builds holds our layer's entry for transformers (the load itself needs CUDA: tests above)."""
    from doc_snippets import snippet

    namespace: dict = {}
    exec(snippet("docs/eager_layer.md", "kernels-layer").compiled(), namespace)
    config = namespace["config"]
    assert isinstance(config, inductor_fusion.KernelConfig) and config.use_local_kernel
    assert list(config.kernel_mapping.values()) == [inductor_fusion.kernel_layer()]
