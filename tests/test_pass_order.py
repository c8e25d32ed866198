"""A pass the user installed where ours goes runs before ours, on the graph it was written for.

docs/usage.md promises it for both of our install points (``joint_custom_pre_pass`` and
``post_grad_custom_pre_pass``), whether the user's pass was set globally or in ``options``.
Counting calls cannot tell the order; these tests can:

- The user's pass rewrites a region our pattern cannot match (``x * x`` for ``x.pow(2)``) into
  one it can. Ours fuses it at the user's stage only if it ran after the rewrite: run first, it
  would find nothing there (and at the post-grad point, nothing at all).
- At the joint point, where ours would replace a plain region, the user's pass records the graph
  it sees: the unfused region, with its three matmuls and no call to our op.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from tiny_models import Region, fresh_compile, region_hidden
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import inductor_fusion.triton_kernels.rmsnorm_mlp  # noqa: F401  (registers the op counted below)
from inductor_fusion.fusion_pass import STAGES

pytestmark = pytest.mark.slow

OURS = torch.ops.inductor_fusion.rmsnorm_mlp.default
aten = torch.ops.aten


class _SquareByMulNorm(LlamaRMSNorm):
    """LlamaRMSNorm squaring by ``x * x``: the same function, a graph our pattern does not match."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = (hidden_states * hidden_states).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _UserPass(CustomGraphPass):
    """Records what each call saw; with ``rewrite``, turns ``mul(x, x)`` into ``pow(x, 2)``."""

    def __init__(self, *, rewrite: bool) -> None:
        self.rewrite = rewrite
        self.seen: list[dict[str, int]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        def count(target: object) -> int:
            return len(graph.find_nodes(op="call_function", target=target))

        squares = [
            n
            for n in graph.find_nodes(op="call_function", target=aten.mul.Tensor)
            if n.args[0] is n.args[1]
        ]
        self.seen.append(
            {
                "ours": count(OURS),
                "mm": count(aten.mm.default),
                "rsqrt": count(aten.rsqrt.default),
                "squares": len(squares),
            }
        )
        if self.rewrite:
            for node in squares:
                with graph.inserting_before(node):
                    power = graph.call_function(aten.pow.Tensor_Scalar, (node.args[0], 2))
                power.meta.update(node.meta)
                node.replace_all_uses_with(power)
                graph.erase_node(node)

    def uuid(self) -> str:
        return f"test-user-pass-rewrite={self.rewrite}"


def _compile(region: Region, h: torch.Tensor, *, stage: str, where: str, user: _UserPass, caplog):
    """Compiles with ``user`` installed at ``stage`` (globally or in options); the report and the
    stages named by our "fused" INFO lines."""
    key = STAGES[stage]
    options = {key: user} if where == "options" else None
    patch = torch._inductor.config.patch({key: user}) if where == "global" else None
    with (
        caplog.at_level(logging.INFO, logger="inductor_fusion"),
        patch or contextlib.nullcontext(),
        # Caches off: these tests watch the passes run, and a cache hit runs none of them.
        fresh_compile(caches=False) as report,
        torch.no_grad(),
    ):
        out = torch.compile(region, backend="inductor_fusion", options=options)(h)
    fused_in = [
        r.getMessage().rsplit("(", 1)[1].removesuffix(" graph)")
        for r in caplog.records
        if r.getMessage().startswith("inductor_fusion: fused ")
    ]
    with torch.no_grad():
        # CPU: the fused op is the HF math, so the compiled region equals eager.
        assert torch.equal(out, region(h))
    return report, fused_in


@pytest.mark.parametrize("where", ["global", "options"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_user_pass_runs_first_and_ours_fuses_its_output(stage, where, caplog):
    region = Region(bias=False, residual="left")
    norm = _SquareByMulNorm(80, eps=region.post_attention_layernorm.variance_epsilon)
    norm.load_state_dict(region.post_attention_layernorm.state_dict())
    region.post_attention_layernorm = norm
    user = _UserPass(rewrite=True)
    report, fused_in = _compile(
        region, region_hidden(3, torch.float32), stage=stage, where=where, user=user, caplog=caplog
    )
    # The user's pass saw the graph as the model wrote it, our op nowhere yet.
    assert user.seen and user.seen[0]["squares"] == 1 and user.seen[0]["ours"] == 0, user.seen
    assert report.count("rmsnorm_mlp") == 1
    # Fused by our pass at the user's stage, i.e. right after the user's rewrite.
    assert fused_in == [stage]


@pytest.mark.parametrize("where", ["global", "options"])
def test_user_joint_pass_sees_the_unfused_region(where, caplog):
    user = _UserPass(rewrite=False)
    report, fused_in = _compile(
        Region(bias=False, residual="left"),
        region_hidden(3, torch.float32),
        stage="joint",
        where=where,
        user=user,
        caplog=caplog,
    )
    assert user.seen[0] == {"ours": 0, "mm": 3, "rsqrt": 1, "squares": 0}, user.seen
    assert report.count("rmsnorm_mlp") == 1
    assert fused_in == ["joint"]
