"""The Hugging Face modules we know, in one place: norm classes and the attribute holding their
eps, MLP layouts, activation modules, the model classes KernelConfig's registry keys resolve on,
and the child names models give these modules.

A model family whose decoder layer writes a form the pattern table already fuses (a norm formula
of `NORM_FORMS`, an MLP of `MLP_LAYOUTS`) is one `ModelFamily` row here, plus its test. From the
row, the eager layer knows the norm class and where its eps is, the backend specialises that eps
under ``dynamic=True``, KernelConfig's ``("RMSNorm", "MLP")`` keys resolve on the model class and
its heads, and the explainer finds the modules. A new *formula* (another norm, activation or
residual form) is a row of the pattern table (`patterns.norm_mlp`) and of the kernels' spec.

A leaf: plain data and the standard library only. Readers call the functions below each time
rather than copying the rows at import, so a row added at runtime is seen everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class NormForm:
    """A norm's formula, as the op's `RegionSpec` norm axes spell it."""

    kind: str  # "rms", "layer" or "none"
    weight_offset: float = 0.0  # the weight is used as ``w + offset`` (Gemma, Nemotron)
    weight_fp32: bool = False  # the weight multiplies in fp32, before the cast back
    bias: bool = False


NORM_FORMS: Mapping[str, NormForm] = {
    "llama_rms": NormForm("rms"),  # w * (x * rsqrt(mean(x^2) + eps)).to(dtype)
    "gemma_rms": NormForm("rms", weight_offset=1.0, weight_fp32=True),  # (x * (1 + w)).to(dtype)
    "layer": NormForm("layer", weight_fp32=True, bias=True),  # F.layer_norm(h, (H,), w, b, eps)
    "layer_1p": NormForm("layer", weight_offset=1.0, weight_fp32=True, bias=True),  # w + 1
    "none": NormForm("none"),
}


@dataclass(frozen=True)
class MLPLayout:
    """Where an MLP module keeps its projections and activation, and how they combine."""

    gate: str  # the projection the activation reads (the only one of a non-gated MLP)
    up: str | None  # gated with separate projections: the one multiplied in
    down: str
    act: str  # the activation module's attribute
    fused_gate_up: bool = False  # one projection whose output halves are gate, then up

    @property
    def gated(self) -> bool:
        return self.up is not None or self.fused_gate_up

    @property
    def children(self) -> tuple[str, ...]:
        return tuple(name for name in (self.gate, self.up, self.down) if name)


# Tried in order; the first whose projections are all present wins. Nemotron's (up_proj, down_proj)
# comes after Llama's so that a gated MLP is never taken for a non-gated one.
MLP_LAYOUTS: tuple[MLPLayout, ...] = (
    MLPLayout("gate_proj", "up_proj", "down_proj", "act_fn"),  # Llama, Gemma, Granite, ...
    MLPLayout("gate_up_proj", None, "down_proj", "activation_fn", fused_gate_up=True),  # Phi-3
    MLPLayout("dense_h_to_4h", None, "dense_4h_to_h", "act"),  # GPT-NeoX
    MLPLayout("c_fc", None, "c_proj", "act"),  # Starcoder2
    MLPLayout("up_proj", None, "down_proj", "act_fn"),  # Nemotron
)

# Activation modules by class name (torch's nn.SiLU, transformers' others) -> the op's activation
# names. transformers' GELU classes count only where they run F.gelu (`layers` checks; built with
# their Python formula they round differently).
ACTIVATION_CLASSES: Mapping[str, str] = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLUSquaredActivation": "relu2",
}

# Child names of a decoder layer, for models no row describes (the explainer's guesses).
MLP_CHILD_NAMES = ("mlp", "feed_forward", "ffn")
ATTENTION_CHILD_NAMES = ("self_attn", "attention", "attn", "self_attention")
# The norm feeding the MLP, most specific first (Gemma2/3 have both of the first two).
NORM_CHILD_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm", "ln_2")
# A norm on the MLP's output, before the add: with no norm in front it is OLMo-2's form.
POST_NORM_CHILD_NAMES = ("post_feedforward_layernorm",)
# Float attributes read as a norm's eps in modules no row names (nn.LayerNorm's, and others').
OTHER_EPS_ATTRIBUTES = ("eps", "epsilon")


@dataclass(frozen=True)
class ModelFamily:
    """One Hugging Face model family: its base model classes and the modules of its region."""

    name: str
    pattern: str  # the pattern family (`registry.FAMILIES`) that fuses its norm -> MLP region
    # Dotted names of its base models (no transformers import needed to name them); heads
    # (…ForCausalLM) inherit the modules under their ``base_model_prefix``.
    model_classes: tuple[str, ...]
    # KernelConfig layer name -> module glob under the base model.
    modules: Mapping[str, str]
    norm_classes: tuple[str, ...] = ()  # class names of the norm the region starts with
    norm_form: str = "none"  # a key of NORM_FORMS
    eps_attribute: str | None = None  # the norm's attribute holding its eps
    # Float attributes of the decoder layer the patterns take as constants (Granite's scale).
    scalars: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.norm_form not in NORM_FORMS:
            raise ValueError(f"{self.name}: unknown norm form {self.norm_form!r}")
        if bool(self.norm_classes) != (self.eps_attribute is not None):
            raise ValueError(f"{self.name}: a norm class needs its eps attribute, and only it")


def _transformers(module: str, cls: str) -> str:
    return f"transformers.models.{module}.modeling_{module}.{cls}"


def _rms(
    name: str,
    prefix: str,
    *,
    norm: str = "post_attention_layernorm",
    model: str = "Model",
    gemma: bool = False,
    scalars: tuple[str, ...] = (),
) -> ModelFamily:
    """A Llama-style row: ``<prefix>RMSNorm`` -> gated MLP, in ``layers.*``."""
    return ModelFamily(
        name,
        "rmsnorm_mlp",
        (_transformers(name, f"{prefix}{model}"),),
        {"RMSNorm": f"layers.*.{norm}", "MLP": "layers.*.mlp"},
        norm_classes=(f"{prefix}RMSNorm",),
        norm_form="gemma_rms" if gemma else "llama_rms",
        eps_attribute="eps" if gemma else "variance_epsilon",
        scalars=scalars,
    )


def _layer(
    name: str, prefix: str, norm_class: str = "LayerNorm", form: str = "layer"
) -> ModelFamily:
    """A LayerNorm row: the norm -> non-gated MLP, in ``layers.*``."""
    return ModelFamily(
        name,
        "layernorm_mlp",
        (_transformers(name, f"{prefix}Model"),),
        {"LayerNorm": "layers.*.post_attention_layernorm", "MLP": "layers.*.mlp"},
        norm_classes=(norm_class,),
        norm_form=form,
        eps_attribute="eps",
    )


MODELS: tuple[ModelFamily, ...] = (
    _rms("llama", "Llama"),
    _rms("mistral", "Mistral"),
    _rms("qwen2", "Qwen2"),
    _rms("qwen3", "Qwen3"),
    _rms("phi3", "Phi3"),
    _rms("granite", "Granite", scalars=("residual_multiplier",)),
    _rms("gemma", "Gemma", gemma=True),
    # A second norm follows their MLP; the region fused is the pre-feedforward norm -> MLP.
    _rms("gemma2", "Gemma2", norm="pre_feedforward_layernorm", gemma=True),
    _rms("gemma3", "Gemma3", norm="pre_feedforward_layernorm", model="TextModel", gemma=True),
    _layer("gpt_neox", "GPTNeoX"),
    _layer("starcoder2", "Starcoder2"),
    _layer("nemotron", "Nemotron", "NemotronLayerNorm1P", form="layer_1p"),
    # The MLP's output goes through a norm before the add: the MLP fuses alone (`mlp_postnorm`).
    ModelFamily(
        "olmo2", "mlp_postnorm", (_transformers("olmo2", "Olmo2Model"),), {"MLP": "layers.*.mlp"}
    ),
)


def norm_class(class_name: str) -> tuple[str, NormForm] | None:
    """(eps attribute, formula) of a norm class the rows name, by class name; None if unknown."""
    for family in MODELS:
        if class_name in family.norm_classes:
            return family.eps_attribute or "", NORM_FORMS[family.norm_form]
    return None


def norm_class_names() -> tuple[str, ...]:
    return tuple(sorted({name for family in MODELS for name in family.norm_classes}))


def pattern_of_norm(class_name: str) -> str | None:
    """The pattern family that fuses regions starting with this norm class, if a row names it."""
    return next((f.pattern for f in MODELS if class_name in f.norm_classes), None)


def eps_attributes() -> tuple[str, ...]:
    """Every attribute name that holds a norm's eps, the rows' and `OTHER_EPS_ATTRIBUTES`."""
    named = {f.eps_attribute for f in MODELS if f.eps_attribute}
    return tuple(sorted(named | set(OTHER_EPS_ATTRIBUTES)))


def scalar_attributes() -> tuple[str, ...]:
    """Decoder-layer float attributes the patterns take as constants, besides eps."""
    return tuple(sorted({name for f in MODELS for name in f.scalars}))


def default_fusable() -> dict[str, dict[str, str]]:
    """Model class dotted name -> KernelConfig layer name -> module glob, from the rows."""
    return {cls: dict(f.modules) for f in MODELS for cls in f.model_classes}
