"""``python -m inductor_fusion <command>``.

    python -m inductor_fusion explain MODEL [--json] [--dtype bfloat16] [--patterns ...] [--disable ...]
    python -m inductor_fusion kernel-repo [PATTERN]

MODEL is a local checkpoint folder (only its config.json is read), a config JSON file, or a
transformers model class or model type (``LlamaForCausalLM``, ``qwen3``), which gets a tiny
default config. The demo stays ``python -m inductor_fusion.demo``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# A tiny model for a bare class or model-type name: only keys the config has are set.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
)


# The dtypes a compile of ours handles (others explain nothing useful).
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def load_config(model: str) -> Any:
    """A transformers config from a checkpoint folder, a config JSON or a class/type name."""
    import transformers
    from transformers import AutoConfig

    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{model}: no config.json in this folder")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise UsageError(f"{model}: the config JSON has no model_type")
        return AutoConfig.for_model(**data)
    model_class = getattr(transformers, model, None)
    config_class = getattr(model_class, "config_class", None)
    if config_class is not None:
        config = config_class()
        config.architectures = [model]
    else:
        try:
            config = AutoConfig.for_model(model)
        except ValueError:
            raise UsageError(
                f"{model}: not a folder, a config JSON, a transformers model class or a model type"
            ) from None
    _make_tiny(config.get_text_config())
    return config


def _make_tiny(config: Any) -> None:
    """TINY_CONFIG's sizes on a default config (a composite model's text config: that is where
    its decoder layers are), and special token ids that fit the tiny vocabulary (Phi-3's default
    ``pad_token_id`` is 32000: the embedding would refuse it)."""
    defaults = config.to_dict()
    for key, value in TINY_CONFIG.items():
        if key in defaults:
            setattr(config, key, value)
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(value, int) and value >= vocab:
            setattr(config, key, vocab - 1)


def explain_main(argv: list[str]) -> int:
    import torch

    from inductor_fusion.config import parse_names
    from inductor_fusion.explainer import explain

    parser = argparse.ArgumentParser(
        prog="python -m inductor_fusion explain",
        description="What torch.compile with inductor_fusion would fuse, without compiling.",
    )
    parser.add_argument("model", help="checkpoint folder, config JSON, or model class/type name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--dtype", help="one of " + ", ".join(DTYPES) + " (default: the config's)")
    parser.add_argument("--patterns", help="comma-separated patterns, as the backend option")
    parser.add_argument("--disable", default="", help="comma-separated patterns to switch off")
    args = parser.parse_args(argv)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    for option in ("patterns", "disable"):
        value = getattr(args, option)
        if value is not None:
            try:  # the backend's own parsing: names, "all", "none", and its messages
                parse_names(value, source=f"--{option}", empty_text_ok=option == "disable")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    explanation = explain(
        load_config(args.model), patterns=args.patterns, disable=args.disable, dtype=dtype
    )
    print(explanation.to_json() if args.json else explanation)
    return 0


def kernel_repo_main(argv: list[str]) -> int:
    """Where our `kernels` layer repository is, and how a plain transformers.KernelConfig names it."""
    import importlib

    # The package exports the function kernel_layer, which hides the module of that name.
    kernel_layer = importlib.import_module("inductor_fusion.kernel_layer")

    parser = argparse.ArgumentParser(
        prog="python -m inductor_fusion kernel-repo",
        description="Our kernels layer repository: the LOCAL_KERNELS entry that loads it without "
        "the hub, and the KernelConfig value that names it.",
    )
    parser.add_argument("pattern", nargs="?", default="rmsnorm_mlp")
    args = parser.parse_args(argv)
    if args.pattern not in kernel_layer.KERNEL_LAYERS:
        raise UsageError(
            f"{args.pattern!r}: kernel layers exist for: {', '.join(kernel_layer.KERNEL_LAYERS)}"
        )
    entry = kernel_layer.local_kernels_entry(args.pattern)
    # Shell-ready: LOCAL_KERNELS entries are joined with ':'; an existing value is kept.
    print(f'export LOCAL_KERNELS="{entry}${{LOCAL_KERNELS:+:$LOCAL_KERNELS}}"')
    print(f"# KernelConfig value: {kernel_layer.hub_style_value(args.pattern)!r}")
    print(f"# with use_local_kernel=True instead: {kernel_layer.kernel_layer(args.pattern)!r}")
    return 0


COMMANDS = {"explain": explain_main, "kernel-repo": kernel_repo_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UsageError as exc:
        print(f"python -m inductor_fusion {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
