"""Per-model fusion plans (the KernelConfig shim builds them; the backend looks them up).

A plan travels with the model object: `attach_plan` stores it on the model and indexes it by the
model's parameters, because what a torch.compile backend receives is a graph and its example
inputs — with Dynamo lifting parameters to graph inputs, those are the model's own tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from inductor_fusion.config import FusionPlan

PLAN_ATTRIBUTE = "_inductor_fusion_plan"

# id(parameter) -> (weak reference to it, plan). Keyed by id because tensors compare elementwise;
# the weak reference both checks the id was not recycled and drops the entry with the tensor.
_PLANS_BY_PARAM: dict[int, tuple[weakref.ref[torch.Tensor], FusionPlan]] = {}


def attach_plan(model: torch.nn.Module, plan: FusionPlan) -> None:
    """Makes ``plan`` the one our backend applies when it compiles ``model``."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    for param in model.parameters():
        key = id(param)
        _PLANS_BY_PARAM[key] = (weakref.ref(param, lambda _, key=key: _PLANS_BY_PARAM.pop(key, None)), plan)


def model_plan(model: torch.nn.Module) -> FusionPlan | None:
    return getattr(model, PLAN_ATTRIBUTE, None)


def find_model_plan(example_inputs: Sequence[Any]) -> FusionPlan | None:
    """The plan of the model whose parameters feed this graph, if one was attached."""
    for value in example_inputs:
        entry = _PLANS_BY_PARAM.get(id(value)) if isinstance(value, torch.Tensor) else None
        if entry is not None and entry[0]() is value:
            return entry[1]
    return None
