"""The eager fused layer (`inductor_fusion.layers`) and KernelConfig's ":eager" entries.

Tiny random Llama and Qwen3 checkpoints (norm weights perturbed) are saved once per module and
loaded offline. The op's CPU body is the PyTorch reference, which rounds as LlamaRMSNorm and
LlamaMLP do, so fused and unfused logits are compared with torch.equal in fp32.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from doc_snippets import snippet
from tiny_models import fp64_logits, rel_l2, tiny_model, token_ids
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import inductor_fusion
from inductor_fusion.kernel_config import KernelConfig, apply_kernel_config
from inductor_fusion.layers import EagerFusionError, FusedAway, NormMLP
from inductor_fusion.model_plans import model_plan

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

EAGER = "inductor_fusion:rmsnorm_mlp:eager"
NAMES = ("RMSNorm", "MLP")
INLINE = (("RMSNorm", "model.layers.*.post_attention_layernorm"), ("MLP", "model.layers.*.mlp"))
LAYER0 = (("RMSNorm", "model.layers.0.post_attention_layernorm"), ("MLP", "model.layers.0.mlp"))
OP = "inductor_fusion.rmsnorm_mlp.default"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("eager_checkpoints")
    paths = SimpleNamespace(llama=root / "llama", qwen3=root / "qwen3")
    tiny_model("llama").save_pretrained(paths.llama)
    tiny_model("qwen3").save_pretrained(paths.qwen3)
    return paths


def load(path: Path, kernel_config: object = None) -> torch.nn.Module:
    kwargs = {} if kernel_config is None else {"kernel_config": kernel_config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def logits_and_ops(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    with torch.no_grad(), CountOps() as counter:
        logits = model(ids).logits
    return logits, counter.ops[OP]


def traced_op_calls(model: torch.nn.Module, ids: torch.Tensor | None = None) -> int:
    """Calls of our op in the graphs a compile of ``model`` traces (run once on ``ids``, default
    `token_ids()`, no grad)."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(token_ids() if ids is None else ids)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    return targets.count(torch.ops.inductor_fusion.rmsnorm_mlp)


def fused_paths(model: torch.nn.Module) -> list[str]:
    """Paths of the swapped norms; asserts each MLP beside one is a FusedAway and no other is."""
    modules = dict(model.named_modules())
    norms = [path for path, module in modules.items() if isinstance(module, NormMLP)]
    away = [path for path, module in modules.items() if isinstance(module, FusedAway)]
    assert away == [path.rpartition(".")[0] + ".mlp" for path in norms], (norms, away)
    return norms


def swapped_layers(model: torch.nn.Module) -> list[int]:
    """Indices of the Llama decoder layers whose post-attention norm and MLP were swapped."""
    paths = fused_paths(model)
    assert all(p.endswith(".post_attention_layernorm") for p in paths), paths
    return [int(p.split(".")[2]) for p in paths]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("key", [NAMES, INLINE], ids=["registry", "inline"])
def test_from_pretrained_swaps_and_keeps_logits_and_keys(
    checkpoints: SimpleNamespace, family: str, key: tuple
) -> None:
    path = getattr(checkpoints, family)
    plain, fused = load(path), load(path, KernelConfig({key: EAGER}))
    assert swapped_layers(plain) == [] and swapped_layers(fused) == [0, 1]
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = token_ids()
    expected, plain_ops = logits_and_ops(plain, ids)
    logits, ops = logits_and_ops(fused, ids)
    assert (plain_ops, ops) == (0, 2)  # one op call per layer: the fused path ran
    assert torch.equal(logits, expected)


def test_apply_kernel_config_swaps_only_the_named_layer() -> None:
    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    plan = apply_kernel_config(model, {LAYER0: EAGER})
    assert plan.scopes == {"rmsnorm_mlp": (tuple(glob for _, glob in LAYER0),)}
    assert model_plan(model) is plan
    assert swapped_layers(model) == [0]
    logits, ops = logits_and_ops(model, token_ids())
    assert ops == 1
    assert torch.equal(logits, logits_and_ops(plain, token_ids())[0])
    # Applying again fuses nothing twice.
    apply_kernel_config(model, {LAYER0: EAGER})
    assert swapped_layers(model) == [0] and logits_and_ops(model, token_ids())[1] == 1


# Per family: the KernelConfig key names, the eager value and the norm each layer's MLP follows
# (Gemma2/3 fuse their pre-feedforward norm; the post-feedforward one stays a module).
_RMS = (NAMES, EAGER, "post_attention_layernorm")
_LAYER = (("LayerNorm", "MLP"), "inductor_fusion:layernorm_mlp:eager", "post_attention_layernorm")
EAGER_FAMILIES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite"), _RMS),
    **dict.fromkeys(("gemma2", "gemma3"), (NAMES, EAGER, "pre_feedforward_layernorm")),
    **dict.fromkeys(("gpt_neox", "starcoder2", "nemotron"), _LAYER),
}


# The tolerance rule's small absolute term, per dtype (relative L2 of logits).
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


# bf16 too: in fp32 the norm's cast back is exact, so fp32 alone cannot tell Gemma's rounding
# (weight multiplied in fp32, one cast) from Llama's (cast, then multiply).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(EAGER_FAMILIES))
def test_families_fuse_bit_for_bit(family: str, dtype: torch.dtype) -> None:
    names, value, norm_name = EAGER_FAMILIES[family]
    plain = tiny_model(family, dtype=dtype)
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {names: value})
    paths = fused_paths(model)
    assert [path.rpartition(".")[2] for path in paths] == [norm_name] * 2, paths
    logits, ops = logits_and_ops(model, token_ids())
    expected = logits_and_ops(plain, token_ids())[0]
    assert ops == 2
    if family != "phi3":
        assert torch.equal(logits, expected)
        return
    # Phi-3's one gate_up GEMM and our two half GEMMs (same operands) may sum in another order on
    # the CPU: held to the tolerance rule against fp64 instead of bit equality.
    truth = fp64_logits(plain, token_ids())
    assert rel_l2(logits, truth) <= 2 * rel_l2(expected, truth) + ATOL[dtype]


@pytest.mark.parametrize(
    "key", [("MLP",), (("MLP", "model.layers.*.mlp"),)], ids=["registry", "inline"]
)
def test_olmo2_mlp_alone_takes_the_mlps_place(key: tuple) -> None:
    """OLMo-2 has no norm in front of its MLP: the layer stands in the MLP's place, computing the
    MLP alone, every key where it was."""
    plain = tiny_model("olmo2")
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {key: "inductor_fusion:mlp_postnorm:eager"})
    assert all(type(layer.mlp) is NormMLP for layer in model.model.layers)
    assert not any(isinstance(m, FusedAway) for m in model.modules())
    assert model.model.layers[0].mlp.spec.norm == "none"
    assert list(model.state_dict()) == list(plain.state_dict())
    logits, ops = logits_and_ops(model, token_ids())
    assert ops == 2 and torch.equal(logits, logits_and_ops(plain, token_ids())[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the modules again, the same numbers
        logits, ops = logits_and_ops(model, token_ids())
        assert ops == 0 and torch.equal(logits, logits_and_ops(plain, token_ids())[0])


def test_phi3_gate_up_halves_are_views_of_the_one_weight() -> None:
    model = tiny_model("phi3")
    weight = model.model.layers[0].mlp.gate_up_proj.weight
    apply_kernel_config(model, {NAMES: EAGER})
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) == OP:
                seen.append(args[2:4])
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        model(token_ids())
    gate, up = seen[0]
    inter = weight.shape[0] // 2
    assert gate.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert torch.equal(gate, weight[:inter]) and torch.equal(up, weight[inter:])


@pytest.mark.parametrize(
    ("family", "value", "message"),
    [
        ("gpt_neox", EAGER, r"is a LayerNorm, which rmsnorm_mlp does not fuse; use "
         r"'inductor_fusion:layernorm_mlp:eager'"),
        ("llama", "inductor_fusion:layernorm_mlp:eager", r"is a LlamaRMSNorm, which "
         r"layernorm_mlp does not fuse; use 'inductor_fusion:rmsnorm_mlp:eager'"),
    ],
)  # fmt: skip
def test_an_entry_fuses_only_its_own_familys_norm(family: str, value: str, message: str) -> None:
    """An eager entry swaps what the same entry fuses under torch.compile, nothing else."""
    model = tiny_model(family)
    prefix = "gpt_neox" if family == "gpt_neox" else "model"
    names = ("RMSNorm", "MLP") if "rmsnorm" in value else ("LayerNorm", "MLP")
    globs = (f"{prefix}.layers.*.post_attention_layernorm", f"{prefix}.layers.*.mlp")
    key = tuple(zip(names, globs, strict=True))
    with pytest.raises(EagerFusionError, match=message):
        apply_kernel_config(model, {key: value})
    assert fused_paths(model) == []


def test_live_dropout_and_autocast_run_the_modules() -> None:
    """Starcoder2's MLP drops out its output in training mode, and autocast picks dtypes per op:
    the layer then runs the original modules (no op call), and computes what they compute."""
    plain = tiny_model("starcoder2", residual_dropout=0.5)
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {("LayerNorm", "MLP"): "inductor_fusion:layernorm_mlp:eager"})
    assert len(fused_paths(model)) == 2
    ids = token_ids()
    for each in (model, plain):
        each.train()
    torch.manual_seed(0)
    logits, ops = logits_and_ops(model, ids)
    torch.manual_seed(0)
    assert ops == 0 and torch.equal(logits, logits_and_ops(plain, ids)[0])
    for each in (model, plain):
        each.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, ops = logits_and_ops(model, ids)
        expected = logits_and_ops(plain, ids)[0]
    assert ops == 0 and torch.equal(logits, expected)
    assert logits_and_ops(model, ids)[1] == 2  # eval, no autocast: the op again


def test_inference_mode_and_deepcopy_use_the_fused_path() -> None:
    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {NAMES: EAGER})
    expected = logits_and_ops(plain, token_ids())[0]
    with torch.inference_mode(), CountOps() as counter:
        assert torch.equal(model(token_ids()).logits, expected)
    assert counter.ops[OP] == 2
    clone = copy.deepcopy(model)
    fused = clone.model.layers[0].post_attention_layernorm
    assert fused.norm.weight is fused.weight  # the copy shares within itself...
    assert fused.weight is not model.model.layers[0].post_attention_layernorm.weight  # ...only
    assert fused.mlp.gate_proj is clone.model.layers[0].mlp.gate_proj
    assert list(clone.state_dict()) == list(plain.state_dict())
    logits, ops = logits_and_ops(clone, token_ids())
    assert ops == 2 and torch.equal(logits, expected)


def test_parameters_are_shared_not_copied() -> None:
    model = tiny_model("llama")
    norm = model.model.layers[0].post_attention_layernorm
    gate = model.model.layers[0].mlp.gate_proj
    apply_kernel_config(model, {NAMES: EAGER})
    layer = model.model.layers[0]
    assert layer.post_attention_layernorm.weight is norm.weight
    assert layer.mlp.gate_proj is gate and layer.post_attention_layernorm.mlp.gate_proj is gate
    # A conversion or an assigning load is seen by the fused forward and the unfused fallback.
    plain = tiny_model("llama").double()
    model.double()
    new_norm = torch.nn.Parameter(torch.full_like(norm.weight, 0.75, dtype=torch.float64))
    for m in (model, plain):
        m.load_state_dict({"model.layers.1.post_attention_layernorm.weight": new_norm}, False, True)
    fused = model.model.layers[1].post_attention_layernorm
    assert fused.weight.dtype == torch.float64 and torch.equal(fused.weight, new_norm)
    assert fused.norm.weight is fused.weight  # the fallback's module holds the assigned tensor
    logits, ops = logits_and_ops(model, token_ids())
    assert ops == 2 and torch.equal(logits, logits_and_ops(plain, token_ids())[0])


def test_save_and_load_round_trip(checkpoints: SimpleNamespace, tmp_path: Path) -> None:
    fused = load(checkpoints.llama, KernelConfig({NAMES: EAGER}))
    expected = logits_and_ops(load(checkpoints.llama), token_ids())[0]
    fused.save_pretrained(tmp_path)
    plain_again = load(tmp_path)
    fused_again = load(tmp_path, KernelConfig({INLINE: EAGER}))
    assert swapped_layers(plain_again) == [] and swapped_layers(fused_again) == [0, 1]
    for model in (plain_again, fused_again):
        assert torch.equal(logits_and_ops(model, token_ids())[0], expected)


TRAIN_OP = "inductor_fusion.rmsnorm_mlp_train.default"
TRAIN_BACKWARD_OP = "inductor_fusion.rmsnorm_mlp_train_backward.default"


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict, Counter]:
    with CountOps() as counter:
        model(ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}, counter.ops


@pytest.mark.parametrize(
    ("family", "fused"),
    [("llama", True), ("qwen3", True), ("gemma", False), ("starcoder2", False)],
)
def test_training_step_gradients_within_tolerance(family: str, fused: bool) -> None:
    """Llama's row trains through the training op (its backward ours); other rows run the
    original modules. Every parameter's gradient within the tolerance rule vs fp64."""
    plain = tiny_model(family).train()
    model = copy.deepcopy(plain)
    names = ("LayerNorm", "MLP") if family == "starcoder2" else NAMES
    value = EAGER.replace("rmsnorm", "layernorm") if family == "starcoder2" else EAGER
    apply_kernel_config(model, {names: value})
    ids = token_ids()
    expected, plain_ops = _grads(plain, ids)
    grads, ops = _grads(model, ids)
    truth, _ = _grads(copy.deepcopy(plain).double(), ids)
    assert (ops[TRAIN_OP], ops[OP], plain_ops[TRAIN_OP]) == ((2 if fused else 0), 0, 0)
    if fused:
        assert ops[TRAIN_BACKWARD_OP] == 2  # our backward computed the gradients
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        if not fused:
            assert torch.equal(grads[name], grad), name  # the same modules ran
            continue
        eager_err = rel_l2(grad, truth[name])
        assert rel_l2(grads[name], truth[name]) <= 2 * eager_err + 1e-6, name
    # After an optimizer step the fused path (no grad) reads the updated weights.
    for m in (plain, model):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    expected_logits = logits_and_ops(plain.eval(), ids)[0]
    logits, ops = logits_and_ops(model.eval(), ids)
    assert ops == 2
    if not fused:
        assert torch.equal(logits, expected_logits)
    else:  # the weights moved by gradients equal within rounding, not bit for bit
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)


def test_norm_kept_in_fp32_runs_the_modules_with_one_line_per_layer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Gemma's norm returns the input's dtype whatever its weight's, so a bf16 model whose norms
    stay fp32 (transformers' _keep_in_fp32_modules) runs; the op takes one dtype, so the layer
    runs the modules, saying so once per layer however many calls."""
    plain = tiny_model("gemma", dtype=torch.bfloat16)
    for layer in plain.model.layers:
        layer.post_attention_layernorm.weight.data = layer.post_attention_layernorm.weight.float()
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {NAMES: EAGER})
    ids = token_ids()
    with caplog.at_level("INFO", logger="inductor_fusion"):
        for _ in range(2):
            logits, ops = logits_and_ops(model, ids)
            assert ops == 0 and torch.equal(logits, logits_and_ops(plain, ids)[0])
    lines = [r.getMessage() for r in caplog.records if "runs its modules" in r.getMessage()]
    assert len(lines) == 2 and all("bfloat16" in line and "float32" in line for line in lines)


def test_cuda_training_waits_for_the_shared_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the eager layer trains through our op only once FUSED_TRAINING_ON_CUDA is on, the
    switch the compiled training path reads too (tensors are fake: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from inductor_fusion.layers import _projections
    from inductor_fusion.triton_kernels import rmsnorm_mlp_train

    model = tiny_model("llama")
    apply_kernel_config(model, {NAMES: EAGER})
    layer = model.model.layers[0].post_attention_layernorm
    projections = _projections(layer.mlp, layer.layout)
    with FakeTensorMode():
        cuda, cpu = torch.empty(3, 80, device="cuda"), torch.empty(3, 80)
    assert not rmsnorm_mlp_train.FUSED_TRAINING_ON_CUDA
    assert (layer._trains_fused(cuda, projections), layer._trains_fused(cpu, projections)) == (
        False,
        True,
    )
    monkeypatch.setattr(rmsnorm_mlp_train, "FUSED_TRAINING_ON_CUDA", True)
    assert layer._trains_fused(cuda, projections)


def test_lora_adapters_added_after_the_swap_are_not_dropped() -> None:
    from peft import LoraConfig, get_peft_model

    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {NAMES: EAGER})
    adapted = []
    for m in (plain, model):
        torch.manual_seed(0)  # init_lora_weights=False: random, nonzero adapters, equal in both
        lora = LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=4)
        adapted.append(get_peft_model(m, replace(lora, init_lora_weights=False)).eval())
    assert swapped_layers(model) == [0, 1]
    expected, _ = logits_and_ops(adapted[0], token_ids())
    logits, ops = logits_and_ops(adapted[1], token_ids())
    assert ops == 0 and torch.equal(logits, expected)


def test_torch_compile_on_top_fuses_nothing_twice(checkpoints: SimpleNamespace) -> None:
    model = load(checkpoints.llama, KernelConfig({NAMES: EAGER}))
    expected = logits_and_ops(model, token_ids())[0]
    assert traced_op_calls(model) == 2

    torch._dynamo.reset()
    inductor_fusion.reset_report()
    with torch.no_grad():
        logits = torch.compile(model, backend="inductor_fusion")(token_ids()).logits
    assert inductor_fusion.get_report().count("rmsnorm_mlp") == 0
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    plain = tiny_model("llama").train()
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {NAMES: EAGER})
    ids = token_ids()
    torch._dynamo.reset()
    torch.compile(model, backend="inductor_fusion")(ids, labels=ids).loss.backward()
    plain(ids, labels=ids).loss.backward()
    # Compiled against eager: Inductor's fp32 code may round differently, not by more.
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_glob_matching_nothing_warns_and_swaps_nothing() -> None:
    model = tiny_model("llama")
    key = (("RMSNorm", "model.layers.*.post_attention_layernorm"), ("MLP", "model.blocks.*.mlp"))
    with pytest.warns(UserWarning, match=r"MLP glob 'model.blocks.\*.mlp' matches no module"):
        apply_kernel_config(model, {key: EAGER})
    assert swapped_layers(model) == []


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            (
                ("RMSNorm", "model.layers.*.post_attention_layernorm"),
                ("MLP", "model.layers.*.self_attn"),
            ),
            r"the MLP at model.layers.0.post_attention_layernorm -> model.layers.0.self_attn "
            r"\(LlamaAttention\) lacks the nn.Linear projections of a supported MLP \(one of: "
            r"gate_proj, up_proj, down_proj; gate_up_proj, down_proj;",
        ),
        (
            (("RMSNorm", "model.layers.*.self_attn"), ("MLP", "model.layers.*.mlp")),
            r"the norm at model.layers.0.self_attn -> model.layers.0.mlp is a LlamaAttention; "
            r"expected one of",
        ),
        (
            (("RMSNorm", "model.layers.*_layernorm"), ("MLP", "model.layers.*.mlp")),
            r"the MLP model.layers.0.mlp pairs with both model.layers.0.input_layernorm and "
            r"model.layers.0.post_attention_layernorm",
        ),
    ],
    ids=["mlp_lacks_children", "norm_is_not_a_norm", "two_norms_one_mlp"],
)
@pytest.mark.filterwarnings("ignore:.*never pair")  # the plan's own warning, before the error
def test_wrong_modules_fail_naming_them_and_change_nothing(key: tuple, message: str) -> None:
    model = tiny_model("llama")
    before = list(model.named_modules())
    with pytest.raises(ValueError, match=message):
        apply_kernel_config(model, {key: EAGER})
    assert list(model.named_modules()) == before


class _DoubledLinear(torch.nn.Module):
    """Stands for an adapter wrapped around a projection before the swap (not an nn.Linear)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.base_layer(x)


def test_wrapped_projection_fails_rather_than_pass_for_another_mlp() -> None:
    """A Llama MLP whose gate_proj is wrapped still has up_proj and down_proj, Nemotron's
    non-gated layout: it must be refused, naming the wrapper, not fused as down(act(up(x)))."""
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    mlp.gate_proj = _DoubledLinear(mlp.gate_proj)
    before = list(model.named_modules())
    with pytest.raises(
        EagerFusionError, match=r"not plain nn.Linear: gate_proj \(_DoubledLinear\)"
    ):
        apply_kernel_config(model, {NAMES: EAGER})
    assert list(model.named_modules()) == before


def test_hooked_modules_fail_rather_than_lose_their_hooks() -> None:
    model = tiny_model("llama")
    model.model.layers[1].mlp.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(
        EagerFusionError, match=r"the MLP at .*model.layers.1.mlp \(LlamaMLP\) has forward hooks"
    ):
        apply_kernel_config(model, {NAMES: EAGER})
    assert swapped_layers(model) == []


def test_unsupported_activation_fails_naming_it_before_any_swap() -> None:
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = torch.nn.ReLU()  # layer 0 would fuse, layer 1 cannot
    with pytest.raises(
        EagerFusionError,
        match=r"the MLP at model.layers.1.post_attention_layernorm -> model.layers.1.mlp "
        r"\(LlamaMLP\) has act_fn ReLU; supported: SiLU, GELU, GELUTanh, ReLUSquared",
    ):
        apply_kernel_config(model, {NAMES: EAGER})
    assert swapped_layers(model) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inductor_fusion:gqa_decode:eager", r"gqa_decode has no eager layer"),
        ("inductor_fusion:rmsnorm_mlp:eagerly", r"'inductor_fusion:<pattern>:eager'"),
    ],
)
def test_bad_eager_values_fail_at_construction(value: str, message: str) -> None:
    key = ("Attention",) if "gqa" in value else NAMES
    with pytest.raises(ValueError, match=message):
        KernelConfig({key: value})


def test_docs_snippet_runs_as_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/eager_layer.md's snippet, executed from the page itself."""
    block = snippet("docs/eager_layer.md", "eager")
    code = block.code
    exec(block.compiled(), {})
    printed = capsys.readouterr().out.split()
    promised = re.findall(r"print\(.*\)  # (\S+)", code)
    assert printed == promised == ["NormMLP", "FusedAway", "True", "True"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_eager_layer_within_tolerance() -> None:
    plain = tiny_model("llama", torch.bfloat16, device="cuda")
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {NAMES: EAGER})
    ids = token_ids(device="cuda")
    with torch.no_grad():
        fused, eager = model(ids).logits, plain(ids).logits
    from tiny_models import assert_within_tolerance

    assert_within_tolerance(fused, eager, fp64_logits(plain, ids))


def test_direct_devices_skip_the_dispatcher_with_the_same_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA the layer calls the op's implementation itself (no dispatcher: no autograd or
    tracing is involved there). Here the CPU stands in: the same logits, and no op call seen by
    a dispatch mode; inside a compile the op is still traced as an op."""
    import inductor_fusion.layers as layers

    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    apply_kernel_config(model, {NAMES: EAGER})
    expected, ops = logits_and_ops(model, token_ids())
    assert ops == 2
    monkeypatch.setattr(layers, "DIRECT_DEVICES", ("cpu",))
    logits, ops = logits_and_ops(model, token_ids())
    assert ops == 0 and torch.equal(logits, expected)
    assert traced_op_calls(model) == 2
