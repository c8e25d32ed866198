"""Pattern families: one module each, plain-PyTorch search/replacement pairs plus their checks.

Modules here are imported lazily by `inductor_fusion.registry` the first time a family is needed.
"""
