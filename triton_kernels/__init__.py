"""Fused Triton ops, one module per op: the public ``torch.library`` custom op, its plain-PyTorch
reference beside it, and the private ``@triton.jit`` code in an ``_*_jit`` module.

This package imports nothing on purpose: importing an op's module registers that op with
``torch.library``, and that should happen only when a pattern that needs the op is set up.
"""
