"""Every patch we make to transformers' classes, in one place.

Two wrappers around ``PreTrainedModel`` methods, each put in place only when asked (never at
import) and at most once (the wrapper carries `MARK`):

- ``set_use_kernels`` (`install_load_hook`), when our first KernelConfig is built: it applies our
  entries to the model ``from_pretrained`` loaded.
- ``from_pretrained`` (`install_from_pretrained_hook`, undone by `uninstall_from_pretrained_hook`),
  while `inductor_fusion.install()` is in effect: a plain ``transformers.KernelConfig`` naming
  our patterns becomes ours before transformers reads it.

Why hooks at all (transformers 5.17 to 5.24). Given ``kernel_config``, ``from_pretrained`` turns
``use_kernels`` on, hands ``kernel_config.kernel_mapping`` to the hub loader before the model is
built (``register_kernel_replacements_and_fusions``), then calls
``model.set_use_kernels(True, kernel_config)`` on the loaded model, which requires ``kernels`` in a
narrow version range, sanitizes the mapping and kernelizes. Our KernelConfig is a
``transformers.KernelConfig`` whose ``kernel_mapping`` holds only transformers' entries, so ours
never reach the loader; ours are kept aside and applied to the built model in ``set_use_kernels``
(`install_load_hook` says why no method of the config object can do it).

Our KernelConfig class and what to do with it come in as arguments: `inductor_fusion.kernel_config`
installs the load hook when it builds a config, so this module must not import it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from inductor_fusion.fusion_entries import split_kernel_mapping

if TYPE_CHECKING:
    from inductor_fusion.kernel_config import FusionKernelConfigMixin

MARK = "_inductor_fusion_hook"

_lock = threading.Lock()
# Method name -> what PreTrainedModel's own __dict__ held there before our wrapper (None: the
# method was inherited), for `_unwrap`.
_replaced: dict[str, Any] = {}


def _wrap(name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Puts ``make(original)`` at ``PreTrainedModel.<name>`` unless our wrapper is there already
    (a classmethod stays one). False if transformers has no such method."""
    from transformers import modeling_utils

    model_class = modeling_utils.PreTrainedModel
    with _lock:
        current = inspect.getattr_static(model_class, name, None)
        if current is None:
            return False
        is_classmethod = isinstance(current, classmethod)
        original = current.__func__ if is_classmethod else current
        if getattr(original, MARK, False):
            return True
        wrapper = functools.wraps(original)(make(original))
        setattr(wrapper, MARK, True)
        _replaced[name] = model_class.__dict__.get(name)
        setattr(model_class, name, classmethod(wrapper) if is_classmethod else wrapper)
    return True


def _unwrap(name: str) -> None:
    """Puts back what `_wrap` replaced at ``PreTrainedModel.<name>``, if it did."""
    with _lock:
        if name not in _replaced:
            return
        from transformers import modeling_utils

        model_class = modeling_utils.PreTrainedModel
        previous = _replaced.pop(name)
        if previous is None:
            delattr(model_class, name)
        else:
            setattr(model_class, name, previous)


def install_load_hook(
    ours: type[FusionKernelConfigMixin], apply: Callable[[torch.nn.Module, Any], object]
) -> None:
    """Wraps ``PreTrainedModel.set_use_kernels`` so that ``apply(model, config)`` runs for a
    config that is an instance of ``ours``.

    Why a wrapper, when the config object could hook ``sanitize_kernel_mapping(model)``: in
    transformers 5.17 and 5.24, ``set_use_kernels`` (1) raises unless ``kernels`` is installed in
    the exact range that transformers release wants (5.17: >=0.16,<0.17; 5.24: >=0.18.2,<0.19),
    before it calls any method of the config, although our fusions need no ``kernels`` at all;
    and (2) always ends in ``kernelize``, which for a config holding only ours would apply
    transformers' default hub mapping and replace the very forwards our patterns match.

    The wrapper passes every call whose ``kernel_config`` is not ours to the original untouched.
    For ours it applies ours, then calls the original only if transformers' entries remain.
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def set_use_kernels(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            config = bound.arguments.get("kernel_config")
            if not isinstance(config, ours) or not bound.arguments.get("use_kernels"):
                return original(self, *args, **kwargs)
            # Ours first: a bad entry fails before any hub kernel is applied.
            apply(self, config)
            if config.kernel_mapping:
                # transformers' entries, in whatever form its loader left them: its business.
                return original(self, *args, **kwargs)
            # Nothing of transformers' to apply: keep the config visible as transformers would,
            # and do not kernelize (the model's forwards stay exactly as written).
            self.kernel_config = config
            return None

        return set_use_kernels

    if not _wrap("set_use_kernels", make):
        raise RuntimeError(
            "inductor_fusion.KernelConfig: this transformers version has no "
            "PreTrainedModel.set_use_kernels to hook into from_pretrained; load the model "
            "without kernel_config and call inductor_fusion.apply_kernel_config(model, cfg)"
        )


def install_from_pretrained_hook(
    ours: type[FusionKernelConfigMixin], convert: Callable[[Any], FusionKernelConfigMixin]
) -> None:
    """Wraps ``PreTrainedModel.from_pretrained`` so that a ``kernel_config`` that is not an
    instance of ``ours`` but whose mapping names our patterns is passed on as ``convert(it)``.

    ``convert`` makes a new object (the caller's is not modified), so our entries never reach
    transformers' hub loader, which runs before the model is built: no later hook could stop it.
    Nothing happens without transformers (a dependency, but ``install()`` must not need it).
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
            kernel_config = kwargs.get("kernel_config")
            if kernel_config is not None and _plain_config_with_ours(kernel_config, ours):
                kwargs["kernel_config"] = convert(kernel_config)
            return original(cls, *args, **kwargs)

        return from_pretrained

    if importlib.util.find_spec("transformers") is not None:
        _wrap("from_pretrained", make)


def uninstall_from_pretrained_hook() -> None:
    _unwrap("from_pretrained")


def _plain_config_with_ours(kernel_config: Any, ours: type) -> bool:
    if isinstance(kernel_config, ours):
        return False
    mapping = getattr(kernel_config, "kernel_mapping", None)
    if not isinstance(mapping, Mapping):
        return False
    _, entries = split_kernel_mapping(mapping)
    return bool(entries)
