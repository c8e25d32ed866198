"""The catalogue of Hugging Face modules (`inductor_fusion.catalogue`): its rows name what the
installed transformers really has, and a new family of a form we fuse is one row.

The toy family below is what a newcomer adds: a SwiGLU decoder block whose RMSNorm keeps its eps in
``norm_eps`` (no shipped row uses that name) under ``ffn_norm``/``ffn``. Adding its row (here with
monkeypatch; in the product, one ``ModelFamily(...)`` line in ``catalogue.MODELS``) is all it
takes for the eager layer, KernelConfig's registry keys and ``dynamic=True``'s eps guard.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import fresh_compile, rel_l2
from torch import nn

from inductor_fusion import catalogue, layers, registry
from inductor_fusion.fusion_pass import _constant_attribute
from inductor_fusion.kernel_config import apply_kernel_config
from inductor_fusion.model_plans import fusable_modules
from inductor_fusion.patterns import norm_mlp


@pytest.mark.parametrize("family", catalogue.MODELS, ids=lambda f: f.name)
def test_rows_name_installed_transformers_modules(family):
    pattern = registry.get_family(family.pattern)
    assert set(family.modules) == set(pattern.kernel_layer_names)
    for dotted in family.model_classes:
        module_name, _, class_name = dotted.rpartition(".")
        module = importlib.import_module(module_name)
        assert isinstance(getattr(module, class_name), type), dotted
        for norm_name in family.norm_classes:
            norm_class = nn.LayerNorm if norm_name == "LayerNorm" else getattr(module, norm_name)
            norm = norm_class(8)
            # The eps attribute the eager layer and the backend read is where the class keeps it.
            assert isinstance(getattr(norm, family.eps_attribute), float), norm_name
            assert catalogue.NORM_FORMS[family.norm_form].kind == pattern.eager_norm


@pytest.mark.parametrize("name", registry.pattern_names())
def test_family_modules_provide_the_protocol(name):
    assert callable(registry.pattern_module(name).register)
    for hook in registry.OPTIONAL_HOOKS:
        found = registry.family_hook(name, hook)
        assert found is None or callable(found), (name, hook)
    with pytest.raises(ValueError, match="unknown family hook"):
        registry.family_hook(name, "prepare")


def test_every_norm_formula_has_a_search_function():
    assert set(catalogue.NORM_FORMS) == set(norm_mlp.NORMS)


class ToyRMSNorm(nn.Module):
    """Llama's RMSNorm formula, its eps under another name."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        self.norm_eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return self.weight * x.to(h.dtype)


class ToySwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.ffn_norm = ToyRMSNorm(hidden)
        self.ffn = ToySwiGLU(hidden, inter)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(self.ffn_norm(h))


class ToyModel(nn.Module):
    def __init__(self, layers: int = 2, hidden: int = 32, inter: int = 48) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock(hidden, inter) for _ in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


TOY = catalogue.ModelFamily(
    "toy",
    "rmsnorm_mlp",
    (f"{__name__}.ToyModel",),
    {"RMSNorm": "layers.*.ffn_norm", "MLP": "layers.*.ffn"},
    norm_classes=("ToyRMSNorm",),
    norm_form="llama_rms",
    eps_attribute="norm_eps",
)


@pytest.fixture
def toy_row(monkeypatch):
    monkeypatch.setattr(catalogue, "MODELS", (*catalogue.MODELS, TOY))


def _model() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel().eval()


def test_without_its_row_the_toy_family_is_unknown():
    model = _model()
    with pytest.raises(layers.EagerFusionError, match="ToyRMSNorm"):
        layers.region_spec(model.layers[0].ffn_norm, model.layers[0].ffn)
    assert fusable_modules(model) == {}
    assert not _constant_attribute().search("L['self'].layers[0].ffn_norm.norm_eps")


def test_one_row_makes_the_eager_layer_and_registry_keys_work(toy_row):
    model = _model()
    spec, eps = layers.region_spec(model.layers[0].ffn_norm, model.layers[0].ffn)
    assert (spec.norm, spec.activation, spec.gated, eps) == ("rms", "silu", True, 1e-6)
    assert fusable_modules(model) == dict(TOY.modules)
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(h)
        # The registry form of a key: the row says where the toy model keeps its modules.
        apply_kernel_config(model, {("RMSNorm", "MLP"): "inductor_fusion:rmsnorm_mlp:eager"})
        assert all(isinstance(layer.ffn_norm, layers.NormMLP) for layer in model.layers)
        assert rel_l2(model(h), expected) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("with_row", [True, False], ids=["row", "no_row"])
def test_one_row_makes_dynamic_true_guard_its_eps(monkeypatch, with_row):
    # Caches on: the second eps must neither reuse the first graph (the backend's guard on the
    # row's eps attribute) nor be served the first eps's graph by the FX graph cache. Without
    # the row nothing guards ``norm_eps``, so the regions stay Inductor's: never a stale eps.
    if with_row:
        monkeypatch.setattr(catalogue, "MODELS", (*catalogue.MODELS, TOY))
    model = _model()
    compiled = torch.compile(model, backend="inductor_fusion", dynamic=True)
    per_graph = len(model.layers) if with_row else 0
    with fresh_compile() as report, torch.no_grad():
        for step, eps in enumerate((0.25, 0.5), start=1):
            for layer in model.layers:
                layer.ffn_norm.norm_eps = eps
            h = torch.randn(2, 4 + step, 32)
            assert rel_l2(compiled(h), model(h)) < 1e-5, eps
            assert report.count("rmsnorm_mlp") == per_graph * step, report.summary()
