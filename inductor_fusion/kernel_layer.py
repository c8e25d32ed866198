"""Our fused norm -> MLP as a `kernels` layer, for transformers' own n-to-1 kernel fusion.

transformers can fuse a decoder layer's modules with a kernel *layer* loaded through the
``kernels`` library; `kernel_layer` gives the value that points such an entry at ours::

    kernel_config = transformers.KernelConfig(
        {
            (("RMSNorm", "model.layers.*.post_attention_layernorm"), ("MLP", "model.layers.*.mlp")):
                inductor_fusion.kernel_layer("rmsnorm_mlp"),
        },
        use_local_kernel=True,
    )
    model = AutoModelForCausalLM.from_pretrained(path, kernel_config=kernel_config)

What transformers does with the entry (``register_kernel_replacements_and_fusions``, the same code
in 5.17, 5.22 and 5.24), before it builds the model:

- it splits the value at its first colon into a folder and a layer name and loads the layer class
  with ``kernels.LocalLayerRepository(repo_path=folder, layer_name=name)``: a folder shipped in
  this package (``kernel_repos/<name>/build/torch-universal/``, `repository_path`);
- it takes ``<Layer>Layout`` from the layer class's module, and patches the decoder layer class so
  that its ``__init__`` puts ``<Layer>Layout(norm, mlp)`` in the norm's place and ``nn.Identity()``
  in the MLP's (children in the key's order: the norm first);
- it registers the layout class's ``conversion_mapping`` as the checkpoint conversion of the
  model type (appended to the existing one), so that the load renames checkpoint keys to where the
  layout keeps the parameters;
- after loading, ``set_use_kernels`` builds ``kernels`` repositories for the device and
  ``kernels.kernelize`` gives each layout the layer's forward. transformers refuses device
  ``cpu`` there (its kernel device list has no cpu), so the flow completes on CUDA only; and
  there, 5.17 to 5.24 hand their own rewrite of the entry, ``(value, {"version": 1, ...})``, to
  ``add_to_mapping_local``, which splits it as a string (AttributeError) unless the tuple is
  unwrapped to its string first (`inductor_fusion.KernelConfig` does; a strict xfail in
  tests/test_kernel_layer_repo.py pins the upstream bug).

Keys. The layout stands where the norm stood, and the MLP's place holds an ``nn.Identity`` that
cannot hold parameters, so the MLP's parameters have to move under the norm's path. The layout
*shares* the norm's parameter dict (``...post_attention_layernorm.weight`` stays) and holds the MLP
as its child ``mlp`` (``...mlp.gate_proj.weight`` becomes
``...post_attention_layernorm.mlp.gate_proj.weight``). Its ``conversion_mapping`` renames
``layers.<i>.mlp.`` to ``layers.<i>.post_attention_layernorm.mlp.`` on load, and
``save_pretrained`` (``save_original_format=True``, its default from 5.17 on) applies the rename
backwards, so checkpoints load and save in the usual format. The rename has to name the norm, and
one layout class has one mapping: models whose norm before the MLP has another name (Gemma2/3's
``pre_feedforward_layernorm``) would load without their MLP weights. Our ``":eager"`` config
values (`inductor_fusion.KernelConfig`) do the same swap keeping every key, whatever the names.

transformers keeps both the decoder layer patch and the conversion in process-wide registries that
it never resets, so a later ``from_pretrained`` of the same model type in the same process is
fused and renamed too, even without a kernel config. The layout therefore has a working forward of
its own (transformers would give a layout without one a forward that returns None), and computes
the right thing without ``kernelize``.

The computation is `inductor_fusion.layers.NormMLP`'s: one call of
``torch.ops.inductor_fusion.rmsnorm_mlp`` for ``mlp(norm(h))``, or the original modules where the
op cannot stand for them (autograd outside the training op's reach, autocast, mixed dtypes, a
projection that is no longer a plain ``nn.Linear``: see that module). The layer takes RMSNorms
only, as ``"inductor_fusion:rmsnorm_mlp"`` does.

A hub-style name, for a config that names no Python object (a JSON file, a serving config) and a
plain ``transformers.KernelConfig`` without `inductor_fusion.install()`: ``kernels`` (0.19)
resolves a repository id through the ``LOCAL_KERNELS`` environment variable
(``<org>/<name>=<folder>``) before it asks the hub, and skips the hub's publisher-trust check for
it. `local_kernels_entry` gives that assignment for our folder and `hub_style_value` the entry's
value (``"inductor-fusion/rmsnorm-mlp:RMSNormMLP"``); ``python -m inductor_fusion kernel-repo``
prints both. transformers needs the ``/`` of an ``org/name`` id there. Without the variable the
name goes to the hub, where no such repository exists: the error then is the hub's (a trust or
cache message), which is why `inductor_fusion.KernelConfig` and ``install()`` convert our own
``"inductor_fusion:<pattern>"`` values before transformers sees them.

Importing this module imports neither transformers, `kernels`, nor our op: transformers'
``WeightRenaming`` is built when transformers reads the mapping, and the op when a layout is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = [
    "HUB_STYLE_IDS",
    "KERNEL_LAYERS",
    "RMSNormMLP",
    "RMSNormMLPLayout",
    "hub_style_value",
    "kernel_layer",
    "local_kernels_entry",
    "repository_path",
]

# Pattern name -> the kernel layer class its repository exports.
KERNEL_LAYERS: Mapping[str, str] = {"rmsnorm_mlp": "RMSNormMLP"}

# Pattern name -> the repository id ``LOCAL_KERNELS`` maps to our folder (module docstring). Not a
# hub repository: the id only has to be an ``org/name`` that no hub kernel is published under.
HUB_STYLE_IDS: Mapping[str, str] = {"rmsnorm_mlp": "inductor-fusion/rmsnorm-mlp"}

# The norm the layout replaces in the models transformers' fusion targets (Llama, Mistral,
# Qwen2/3, Phi-3, Granite); the checkpoint rename must name it (module docstring).
NORM_NAME = "post_attention_layernorm"

_REPOSITORIES = Path(__file__).resolve().parent / "kernel_repos"


def repository_path(name: str = "rmsnorm_mlp") -> Path:
    """The `kernels` layer repository of pattern ``name`` shipped in this package."""
    if name not in KERNEL_LAYERS:
        raise ValueError(
            f"no kernel layer for {name!r}; kernel layers exist for: {', '.join(KERNEL_LAYERS)}"
        )
    path = _REPOSITORIES / name
    if not (path / "build" / "torch-universal" / "metadata.json").is_file():
        raise FileNotFoundError(
            f"the kernel layer repository {path} is missing or incomplete: this installation of "
            "inductor-fusion lacks its package data (build/torch-universal/metadata.json)"
        )
    return path


def kernel_layer(name: str = "rmsnorm_mlp") -> str:
    """``"<repository path>:<Layer>"``: the value of a ``transformers.KernelConfig`` entry (with
    ``use_local_kernel=True``) that fuses the entry's modules with our layer for ``name``.

    transformers 5.17 to 5.24 take a string here (a ``kernels`` repository object is refused),
    split it at the first colon, and require a ``/`` in it; with ``use_local_kernel=True`` the
    part before the colon is a folder, loaded offline."""
    path = repository_path(name)
    if ":" in str(path):
        raise ValueError(
            f"the kernel layer repository path {path} contains ':', which transformers takes for "
            "the separator of the layer name; install inductor-fusion under a path without one"
        )
    return f"{path}:{KERNEL_LAYERS[name]}"


def local_kernels_entry(name: str = "rmsnorm_mlp") -> str:
    """``"<id>=<folder>"``: one entry of the ``LOCAL_KERNELS`` variable (entries are joined with
    ``:``) that makes ``kernels`` load `hub_style_value`'s repository from this package."""
    folder = kernel_layer(name).rpartition(":")[0]  # checked: no ':' in the folder
    return f"{HUB_STYLE_IDS[name]}={folder}"


def hub_style_value(name: str = "rmsnorm_mlp") -> str:
    """``"<id>:<Layer>"``: the value of a plain ``transformers.KernelConfig`` entry (no
    ``use_local_kernel``) that loads our layer for ``name`` once `local_kernels_entry` is in
    ``LOCAL_KERNELS``."""
    repository_path(name)  # the same errors as kernel_layer for a name without a layer
    return f"{HUB_STYLE_IDS[name]}:{KERNEL_LAYERS[name]}"


class _MLPUnderNorm:
    """The layout's ``conversion_mapping``: checkpoint keys ``layers.<i>.mlp.*`` load at
    ``layers.<i>.<norm>.mlp.*``, and are saved back under their own name.

    transformers reads the mapping with ``list(...)``; transforms are built then, so that this
    module does not import transformers, and each read gets objects of its own (transformers
    keeps them in a process-wide registry). The source is anchored on ``layers.<i>.`` so that a
    key that already has the norm in it is left alone: a load may apply the rename more than once,
    as every fused ``from_pretrained`` appends it to the registry again."""

    def __init__(self, norm: str) -> None:
        self.norm = norm

    def __iter__(self) -> Iterator[Any]:
        from transformers.core_model_loading import WeightRenaming

        # The target is a replacement string (``\1``: the layer index), not a pattern; reversed
        # for saving, it becomes the pattern and the source the replacement.
        yield WeightRenaming(
            source_patterns=r"layers\.(\d+)\.mlp\.",
            target_patterns=rf"layers.\1.{self.norm}.mlp.",
        )

    def __repr__(self) -> str:
        return f"layers.<i>.mlp.* -> layers.<i>.{self.norm}.mlp.*"


class RMSNormMLP(nn.Module):
    """The kernel layer: ``kernels.kernelize`` gives its forward to each `RMSNormMLPLayout`.

    Stateless, as ``kernels`` requires of a layer (no ``__init__``, no members but ``forward``
    and the mode flags); its forward runs bound to the layout."""

    # The op has a fake implementation and runs under torch.compile; NormMLP runs the original
    # modules (or the training op) where autograd records the region.
    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self._norm_mlp.forward(hidden_states)


class RMSNormMLPLayout(nn.Module):
    """``mlp(norm(h))`` in the norm's place, built by transformers from ``(norm, mlp)``.

    Keeps the norm's parameters at the norm's path (the same dict object) and the MLP as its child
    ``mlp``; computes through `inductor_fusion.layers.NormMLP`, which it holds unregistered (that
    module shares the same dicts, so registering it would list every parameter twice)."""

    conversion_mapping = _MLPUnderNorm(NORM_NAME)

    def __init__(self, norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        # Here, not at module level: the op's module imports Triton (~0.5 s).
        from inductor_fusion.layers import EagerFusionError, NormMLP

        fused = NormMLP(norm, mlp)
        if fused.spec.norm != "rms":
            raise EagerFusionError(
                f"{type(self).__name__}: the norm is a {type(norm).__name__}; this layer fuses "
                "RMSNorms (a LayerNorm region is layernorm_mlp's)"
            )
        # NormMLP's dicts are the norm's own: the norm's keys stay, and a parameter assigned by a
        # load, `.to()` or `load_state_dict(assign=True)` reaches the op.
        self._parameters = fused._parameters
        self._buffers = fused._buffers
        self.mlp = mlp
        self.__dict__["_norm_mlp"] = fused

    def train(self, mode: bool = True) -> RMSNormMLPLayout:
        # The unregistered NormMLP is out of reach of model.train()/eval(); it reads its mode.
        super().train(mode)
        self._norm_mlp.train(mode)
        return self

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self._norm_mlp.forward(hidden_states)

    def extra_repr(self) -> str:
        return self._norm_mlp.extra_repr()
