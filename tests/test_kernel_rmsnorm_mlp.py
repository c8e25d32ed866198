"""``inductor_fusion::rmsnorm_mlp``: the Triton launcher against Hugging Face's math; the op's contract.

Tolerance rule of the project: measured against the HF formula evaluated in float64 on the upcast
inputs, the kernel's relative L2 error may be at most twice that of the same-dtype eager HF modules
(LlamaRMSNorm + LlamaMLP + residual add), plus a small floor. Neither side of that comparison is
our own reference, so a drift of the reference cannot hide a drift of the kernels. Kernels run on
CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU); the
interpreter gets bf16 products wrong, so bf16 runs on CUDA only.
"""

import contextlib
import dataclasses
import itertools
import math
import os
import zlib

import pytest
import torch
from hf_region import hf_formula_fp64, hf_region
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from inductor_fusion.triton_kernels import _rmsnorm_mlp_tuned as _tuned
from inductor_fusion.triton_kernels import launch_plan
from inductor_fusion.triton_kernels.launch_config import (
    DEFAULT_CONFIGS,
    INTERPRET_CONFIG,
    NON_GATED,
    Blocks,
    Config,
    fp32_form,
    pick_config,
    tuned_configs,
)
from inductor_fusion.triton_kernels.rmsnorm_mlp import (
    rmsnorm_mlp_reference,
    rmsnorm_mlp_triton,
    supports,
)

OP = torch.ops.inductor_fusion.rmsnorm_mlp.default
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

_needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")
_needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, marks=_needs_interpreter, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, marks=_needs_interpreter, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, marks=_needs_cuda, id="cuda-fp32"),
    pytest.param("cuda", torch.float16, marks=_needs_cuda, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=_needs_cuda, id="cuda-bf16"),
]

# Floor on the relative error: one rounding of the output to the dtype (unit roundoff: 2**-11
# for fp16, 2**-8 for bf16). The output is stored in the dtype, so that error is unavoidable, and
# on tiny shapes (a few dozen products per output) eager's own error can by chance be far below
# it: seen on an H100 for fp16, M=1, H=23, I=16 (ours 9.5e-4, eager 4.0e-4).
ATOL = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# Configurations that reach kernel branches no default or tuned configuration does. Their tiles
# leave partial tiles and several K steps at the test sizes; the interpreter's time grows with
# the number of programs, so the launch that is not the point of an entry gets large tiles.
EDGE_CONFIGS = (
    # Norm in the pointer GEMM's K loop; GROUP_M=2 over 3 M tiles leaves a partial last group.
    Config.parse("edge-gemm-norm-in-loop", "gemm:16x32x32:w4s2g2", "gemm:16x32x64:w4s2g2"),
    # The pointer GEMM reading pre-normalised rows, and the unsplit TMA down with several K steps.
    Config.parse("edge-gemm-prenorm", "gemm:32x16x32:w4s2g8", "tma:32x16x32:w4s2g4", prenorm=True),
    # The unsplit down GEMV (the tuned ones split K, unless K fits in one block).
    Config.parse("edge-tma-gemv", "tma:16x32x32:w4s2g8", "gemv:16x32x32:w4s2", prenorm=True),
    # Three splits of 3, 3 and 1 K blocks at I=200: the last split is short.
    Config.parse("edge-tma-split3", "gemv:64x64x64:w4s2", "tma:16x64x32:w4s2g8k3"),
    # K=200 is not a multiple of BLOCK_K * SPLIT_K = 128: the masked split-K GEMV loop.
    Config.parse("edge-gemv-split4", "gemm:64x64x64:w4s2g8", "gemv:16x64x32:w4s2k4"),
)


def _key_shape(key: tuple) -> tuple[int, int]:
    return key[0], key[1]


def _key_gated(key: tuple) -> bool:
    """Table keys are (H, I) for a gated MLP, (H, I, "non-gated") for one up-projection."""
    assert len(key) == 2 or key[2:] == (NON_GATED,), key
    return len(key) == 2


def _distinct_configs() -> dict[str, Config]:
    """Every launch configuration the op can pick on a GPU for a gated region, plus the edge
    ones, each once."""
    found: dict[tuple, Config] = {}
    # Gated rows only: the non-gated ones' tiles may not fit a gated region in shared memory,
    # and test_kernel_families runs them on a non-gated family.
    tuned = (
        tuned_configs(*_key_shape(key), torch.bfloat16, device)
        for device, table in _tuned.TUNED_BY_DEVICE.items()
        for key in table
        if _key_gated(key)
    )
    for table in (DEFAULT_CONFIGS, *tuned):
        for _, config in table:
            found.setdefault((config.gate_up, config.down, config.prenorm), config)
    for config in EDGE_CONFIGS:
        assert (config.gate_up, config.down, config.prenorm) not in found, config.name
        found[config.gate_up, config.down, config.prenorm] = config
    return {config.name: config for config in found.values()}


CONFIGS = _distinct_configs()


def _launch_config(name: str | None, device: str, dtype: torch.dtype) -> Config | None:
    if name is None:
        return None
    config = CONFIGS[name]
    # The interpreter has no shared-memory limit, so CPU runs keep the 16-bit tiles; on a GPU,
    # fp32 tiles as large as those would not fit.
    if device == "cuda" and dtype == torch.float32:
        return fp32_form(config)
    return config


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]  # leading dims of hidden: (M,) or (B, S)
    hidden_size: int
    inter_size: int
    eps: float
    bias: bool
    residual: bool
    layout: str  # "contiguous", "padded" (row stride > H) or "transposed" (inner stride != 1)
    scale: float  # of hidden: the norm must undo it
    config: str | None  # a key of CONFIGS to force; None: whatever pick_config picks
    seed: int


@dataclasses.dataclass
class Inputs:
    args: tuple[torch.Tensor, ...]  # hidden, norm_weight, gate_weight, up_weight, down_weight
    kwargs: dict[str, torch.Tensor | None]  # gate_bias, up_bias, down_bias, residual


def _strided_copy(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` with equal values but the given memory layout."""
    if layout == "padded":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 7, dtype=t.dtype, device=t.device)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def make_inputs(case: Case, device: str, dtype: torch.dtype) -> Inputs:
    """Realistic scales: hidden ~ N(0, scale^2), Linear weights ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(case.seed)
    h, i = case.hidden_size, case.inter_size

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    hidden = randn(*case.lead, h, std=case.scale)
    norm_weight = 1.0 + 0.1 * randn(h)
    weights = [randn(i, h, std=h**-0.5), randn(i, h, std=h**-0.5), randn(h, i, std=i**-0.5)]
    biases = [0.1 * randn(i), 0.1 * randn(i), 0.1 * randn(h)] if case.bias else [None] * 3
    residual = randn(*case.lead, h) if case.residual else None

    def put(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    hidden, residual = put(hidden), put(residual)
    weights = [put(w) for w in weights]
    if case.layout != "contiguous":
        hidden = _strided_copy(hidden, case.layout)
        residual = None if residual is None else _strided_copy(residual, case.layout)
        # nn.Linear weights that are views of transposed storage: read in place through strides.
        weights = [_strided_copy(w, "transposed") for w in weights]
    return Inputs(
        args=(hidden, put(norm_weight), *weights),
        kwargs=dict(
            zip(("gate_bias", "up_bias", "down_bias"), map(put, biases), strict=True),
            residual=residual,
        ),
    )


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).norm() / expected.norm()).item()


@contextlib.contextmanager
def _nan_filled_empty():
    """Make ``torch.empty`` return NaN-filled memory, so an element the kernels skip shows up."""
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


def check_against_reference(case: Case, device: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(case, device, dtype)
    with _nan_filled_empty():
        ours = rmsnorm_mlp_triton(
            *inputs.args,
            **inputs.kwargs,
            eps=case.eps,
            config=_launch_config(case.config, device, dtype),
        )
    hidden = inputs.args[0]
    assert ours.shape == hidden.shape
    assert ours.dtype == dtype
    assert ours.device == hidden.device
    assert ours.is_contiguous()
    assert torch.isfinite(ours).all(), "non-finite output: an element was not written"

    # Truth: the HF formula in float64; eager: the HF modules in the test dtype, reading the
    # same (possibly strided) tensors.
    ref64 = hf_formula_fp64(*inputs.args, **inputs.kwargs, eps=case.eps)
    eager = hf_region(*inputs.args, **inputs.kwargs, eps=case.eps)
    err, eager_err = _rel_err(ours, ref64), _rel_err(eager, ref64)
    assert err <= 2 * eager_err + ATOL[dtype], (
        f"relative error {err:.3e} vs eager {eager_err:.3e} (allowed 2x + {ATOL[dtype]:.0e}) for {case}"
    )


@st.composite
def cases(draw) -> Case:
    if draw(st.booleans()):
        lead = (draw(st.integers(1, 70)),)
    else:
        lead = (draw(st.integers(1, 3)), draw(st.integers(1, 23)))
    return Case(
        lead=lead,
        hidden_size=draw(st.integers(16, 160)),
        inter_size=draw(st.integers(16, 300)),
        eps=draw(st.sampled_from((1e-6, 1e-5, 0.1, 1.0))),
        bias=draw(st.booleans()),
        residual=draw(st.booleans()),
        layout=draw(st.sampled_from(("contiguous", "padded", "transposed"))),
        # 0.05: a mean square of 2.5e-3, which eps 0.1 and 1.0 dominate (eps bugs show).
        scale=draw(st.sampled_from((1.0, 0.25, 16.0, 0.05))),
        config=draw(st.sampled_from((None, *CONFIGS))),
        seed=draw(st.integers(0, 2**16)),
    )


M1_CASE = Case(
    lead=(1,),
    hidden_size=100,
    inter_size=257,
    eps=1e-6,
    bias=True,
    residual=True,
    layout="contiguous",
    scale=1.0,
    config=None,
    seed=0,
)


# On a GPU every new combination of flags, config and size divisibility is a Triton compile
# (about a second each); the interpreter compiles nothing, so it affords more examples: 120, about
# half a minute per dtype on a 2-core machine, within the suite's 30-minute budget.
MAX_EXAMPLES = 12 if torch.cuda.is_available() else 120


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@settings(derandomize=True, database=None, max_examples=MAX_EXAMPLES, deadline=None)
@given(case=cases())
@example(case=M1_CASE)
@example(case=dataclasses.replace(M1_CASE, lead=(1, 1), bias=False, residual=False, eps=0.1))
def test_triton_matches_reference(device, dtype, case):
    check_against_reference(case, device, dtype)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_branch(device, dtype, config):
    """Each configuration twice: ragged sizes (partial M, N and K tiles, TMA where the layout
    allows it), then sizes every block divides (the EVEN_K loops) on a layout TMA cannot read."""
    ragged = dataclasses.replace(
        M1_CASE,
        lead=(37,),
        hidden_size=136,
        inter_size=200,
        config=config,
        seed=zlib.crc32(config.encode()) % 2**16,
    )
    check_against_reference(ragged, device, dtype)
    # 128 and 256 are multiples of every BLOCK_K in CONFIGS, and of BLOCK_K * SPLIT_K once the
    # launcher has capped SPLIT_K at the number of K blocks.
    even = dataclasses.replace(ragged, hidden_size=128, inter_size=256, layout="padded")
    # The padded layout reads its weights through transposed strides, which TMA cannot: the TMA
    # configurations must take their pointer-kernel fallback and still be right.
    weights = make_inputs(even, device, dtype).args[2:]
    assert not any(launch_plan._tma_ok(w) for w in weights)
    check_against_reference(even, device, dtype)


# A shape perf/tune.py has not measured, so pick_config falls back to DEFAULT_CONFIGS.
UNTUNED = (1000, 3000)
# name -> (shape, gated, rows, GPU model the table is for; None: the default table, the H100's).
TABLES = {
    "default": (UNTUNED, True, DEFAULT_CONFIGS, None),
    **{
        f"{device}-{'x'.join(map(str, key))}": (
            _key_shape(key),
            _key_gated(key),
            tuned_configs(*_key_shape(key), torch.bfloat16, device, _key_gated(key)),
            device,
        )
        for device, table in _tuned.TUNED_BY_DEVICE.items()
        for key in table
    },
}


def _all_blocks() -> set[Blocks]:
    configs = [c for _, _, table, _ in TABLES.values() for _, c in table]
    configs += [*CONFIGS.values(), INTERPRET_CONFIG]
    configs += [fp32_form(c) for c in configs]
    return {blocks for c in configs for blocks in (c.gate_up, c.down)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table", TABLES)
def test_pick_config_follows_table(table, dtype):
    """Each row applies up to its max_m and the next one from max_m + 1."""
    (h, i), gated, rows, device = TABLES[table]
    assert all(UNTUNED not in t for t in _tuned.TUNED_BY_DEVICE.values())
    bounds = [max_m for max_m, _ in rows]
    assert bounds == sorted(set(bounds))

    def pick(m):
        return pick_config(m, h, i, dtype, interpret=False, device_name=device, gated=gated)

    if table != "default" and (h, i) not in _tuned.TUNED_BY_DEVICE[device] and gated is False:
        # Non-gated rows are the non-gated MLP's alone: a gated one of that shape has defaults.
        other = pick_config(1, h, i, dtype, interpret=False, device_name=device)
        assert other == next(c for max_m, c in DEFAULT_CONFIGS if max_m >= 1)

    assert pick(1) == rows[0][1]
    for (max_m, config), (_, next_config) in itertools.pairwise(rows):
        assert pick(max_m) == config
        assert pick(max_m + 1) == next_config
    if bounds[-1] == 2**62:  # the last row takes any M
        assert pick(2**62) == rows[-1][1]
    else:  # a table tuned up to some M: past it, the defaults
        default = next(c for max_m, c in DEFAULT_CONFIGS if bounds[-1] + 1 <= max_m)
        assert pick(bounds[-1] + 1) == default


def test_gpu_models_without_a_table_take_the_h100s():
    h100 = _tuned.TUNED_BY_DEVICE["NVIDIA H100 80GB HBM3"]
    for h, i in h100:
        for m in (1, 16, 64, 4096):
            expected = pick_config(m, h, i, torch.bfloat16, False, "NVIDIA H100 80GB HBM3")
            assert pick_config(m, h, i, torch.bfloat16, False, "Some Future GPU") == expected
            assert pick_config(m, h, i, torch.bfloat16, False) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [UNTUNED, *_tuned.TUNED])
def test_interpreter_config(shape, dtype):
    # The interpreter runs every program in Python: one small configuration, whatever the case.
    for m in (1, 64, 4096):
        assert pick_config(m, *shape, dtype, interpret=True).name == "interpret"


@pytest.mark.parametrize("shape", [UNTUNED, *_tuned.TUNED])
def test_fp32_uses_shrunk_defaults(shape):
    """fp32 tiles take twice the shared memory of 16-bit ones, and the tuning measured 16-bit
    runs only: fp32 takes the shrunk defaults whether or not the shape was tuned."""
    assert tuned_configs(*shape, torch.float32) is None
    for max_m, default in DEFAULT_CONFIGS:
        for m in (max_m, max_m - 1):
            config = pick_config(m, *shape, torch.float32, interpret=False)
            assert config == fp32_form(default)
            for blocks in (config.gate_up, config.down):
                if blocks.kind == "gemv":
                    assert blocks.block_k >= 32
                else:
                    assert blocks.block_k == 32
                assert blocks.num_stages <= 3


def test_every_block_is_valid_and_round_trips():
    for blocks in _all_blocks():
        assert blocks.kind in ("gemv", "gemm", "tma")
        # tl.dot needs every block dimension >= 16.
        assert min(blocks.block_m, blocks.block_n, blocks.block_k) >= 16
        assert blocks.split_k >= 1
        assert Blocks.parse(blocks.key()) == blocks
    for _, _, table, _ in TABLES.values():
        for _, config in table:
            # The launchers ignore split_k where no kernel splits K: such a table entry would
            # not run the configuration it names.
            assert config.gate_up.split_k == 1
            assert config.down.split_k == 1 or config.down.kind in ("gemv", "tma")
    for rows in (r for t in _tuned.TUNED_BY_DEVICE.values() for r in t.values()):
        for _, gate_up, down, _ in rows:
            # Stored strings are canonical, so a diff of the table shows real changes only.
            assert Blocks.parse(gate_up).key() == gate_up
            assert Blocks.parse(down).key() == down


def test_config_rejects_invalid_combinations():
    gemv = Blocks.parse("gemv:16x32x32:w4s2")
    tma = Blocks.parse("tma:16x32x32:w4s2g8")
    with pytest.raises(ValueError, match="pre-pass"):
        Config("gemv-prenorm", gemv, gemv, prenorm=True)
    with pytest.raises(ValueError, match="TMA"):
        Config("tma-in-loop", tma, gemv, prenorm=False)
    assert Config("ok", tma, tma, prenorm=True).prenorm


# (config, I): at I=200 the last split is short; at I=160 (4 splits of 64) and I=104 (3 splits
# of 64) the last split starts past K and has no K block at all, yet still has to arrive.
SPLIT_K_CASES = [
    ("edge-gemv-split4", 200),
    ("edge-gemv-split4", 160),
    ("edge-tma-split3", 200),
    ("edge-tma-split3", 104),
]


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize(("config", "inter_size"), SPLIT_K_CASES)
def test_split_k_is_deterministic_and_resets_counters(device, dtype, config, inter_size):
    """The split-K partial sums meet in a fixed order whichever program arrives last, and the
    last one zeroes its arrival counter for the next call (and for CUDA-graph replays)."""
    case = dataclasses.replace(
        M1_CASE, lead=(37,), hidden_size=136, inter_size=inter_size, config=config
    )
    check_against_reference(case, device, dtype)
    inputs = make_inputs(case, device, dtype)
    forced = _launch_config(config, device, dtype)
    # The split must survive the launcher's drop of empty splits, and the TMA down
    # must not fall back to the unsplit pointer kernel.
    assert min(forced.down.split_k, math.ceil(inter_size / forced.down.block_k)) > 1
    assert forced.down.kind != "tma" or launch_plan._tma_ok(*inputs.args[2:])

    def run():
        return rmsnorm_mlp_triton(*inputs.args, **inputs.kwargs, eps=case.eps, config=forced)

    first = run()
    # NaN-filled workspace the second time: the sum may read only partials this call wrote.
    with _nan_filled_empty():
        second = run()
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(first.view(bits), second.view(bits))
    assert torch.isfinite(first).all()


OPCHECK_CASES = {
    "2d-plain": dataclasses.replace(M1_CASE, lead=(5,), bias=False, residual=False),
    "3d-all-optionals": dataclasses.replace(M1_CASE, lead=(2, 3)),
    "3d-bias-only": dataclasses.replace(M1_CASE, lead=(2, 3), residual=False),
    "m1-residual-only": dataclasses.replace(M1_CASE, bias=False),
}


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(name):
    inputs = make_inputs(OPCHECK_CASES[name], "cpu", torch.float32)
    torch.library.opcheck(OP, (*inputs.args, *inputs.kwargs.values(), 1e-5))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_op_is_the_reference(bias, residual):
    # On the CPU the op's body is the reference, which computes exactly what the HF modules do
    # (tests/test_fidelity.py checks that over many shapes); here the op's own plumbing (argument
    # order, optional tensors) against the HF modules, bit for bit.
    case = dataclasses.replace(M1_CASE, lead=(2, 7), bias=bias, residual=residual, eps=0.1)
    inputs = make_inputs(case, "cpu", torch.float16)
    out = OP(*inputs.args, *inputs.kwargs.values(), case.eps)
    assert torch.equal(out, rmsnorm_mlp_reference(*inputs.args, **inputs.kwargs, eps=case.eps))
    assert torch.equal(out, hf_region(*inputs.args, **inputs.kwargs, eps=case.eps))


@pytest.mark.parametrize("lead", [(5,), (1,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_impl(lead, dtype):
    with FakeTensorMode():
        inputs = make_inputs(dataclasses.replace(M1_CASE, lead=lead), "cpu", dtype)
        out = OP(*inputs.args, *inputs.kwargs.values(), 1e-6)
    assert out.shape == (*lead, M1_CASE.hidden_size)
    assert out.dtype == dtype
    assert out.is_contiguous()


# (what, index into the op's tensor arguments, bad value, expected message); the good inputs
# have H=100, I=257 and hidden [2, 3, 100] in fp32.
MISMATCHES = [
    ("norm_weight", 1, torch.ones(99), "norm_weight must have shape"),
    ("gate_weight", 2, torch.ones(257), "gate_weight must be 2-D"),
    ("up_weight", 3, torch.ones(256, 100), "up_weight must have shape"),
    ("down_weight", 4, torch.ones(257, 100), "down_weight must have shape"),
    ("gate_bias", 5, torch.ones(100), "gate_bias must have shape"),
    ("down_bias", 7, torch.ones(257), "down_bias must have shape"),
    ("residual", 8, torch.ones(6, 100), "residual must have shape"),
    ("weight_dtype", 3, torch.ones(257, 100, dtype=torch.float16), "up_weight has dtype"),
    ("bias_dtype", 6, torch.ones(257, dtype=torch.float16), "up_bias has dtype"),
]


@pytest.mark.parametrize(
    ("what", "index", "bad", "message"), MISMATCHES, ids=[m[0] for m in MISMATCHES]
)
@pytest.mark.parametrize("entry", ["op", "fake", "launcher"])
def test_mismatch_raises_clear_error(what, index, bad, message, entry):
    inputs = make_inputs(dataclasses.replace(M1_CASE, lead=(2, 3)), "cpu", torch.float32)
    args = [*inputs.args, *inputs.kwargs.values()]
    args[index] = bad
    with contextlib.ExitStack() as stack:
        if entry == "fake":
            mode = stack.enter_context(FakeTensorMode())
            args = [None if a is None else mode.from_tensor(a) for a in args]
        with pytest.raises(ValueError, match=message):
            if entry == "launcher":
                names = ("gate_bias", "up_bias", "down_bias", "residual")
                rmsnorm_mlp_triton(*args[:5], **dict(zip(names, args[5:], strict=True)), eps=1e-6)
            else:
                OP(*args, 1e-6)


def test_supports():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert supports(dtype, "cuda", 4096, 14336) is None
    assert "float64" in supports(torch.float64, "cuda", 4096, 14336)
    assert "CUDA" in supports(torch.float16, "cpu", 4096, 14336)
    assert supports(torch.float16, "cuda", 0, 14336) is not None


def test_empty_input():
    inputs = make_inputs(dataclasses.replace(M1_CASE, lead=(0, 3)), "cpu", torch.float32)
    out = rmsnorm_mlp_triton(*inputs.args, **inputs.kwargs, eps=1e-6)
    assert out.shape == (0, 3, M1_CASE.hidden_size)


def test_cuda_kernel_is_registered():
    """Checked without a GPU too: CUDA tensors dispatch to the Triton launcher, Meta to the fake."""
    for key in ("CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(OP.name(), key)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_op_runs_triton(dtype):
    """On CUDA the op is the Triton launcher, bit for bit (same configuration, same kernels)."""
    inputs = make_inputs(dataclasses.replace(M1_CASE, lead=(3, 11)), "cuda", dtype)
    out = OP(*inputs.args, *inputs.kwargs.values(), 1e-5)
    expected = rmsnorm_mlp_triton(*inputs.args, **inputs.kwargs, eps=1e-5)
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_op_falls_back_for_unsupported_dtype():
    inputs = make_inputs(dataclasses.replace(M1_CASE, lead=(3, 11)), "cuda", torch.float64)
    out = OP(*inputs.args, *inputs.kwargs.values(), 1e-5)
    expected = rmsnorm_mlp_reference(*inputs.args, **inputs.kwargs, eps=1e-5)
    assert torch.equal(out, expected)


@_needs_interpreter
@pytest.mark.parametrize("kind", ["gemv", "gemm", "tma"])
def test_gate_up_launch_zeroes_split_k_counters(kind):
    """The down launch's counters arrive as a fresh, unzeroed buffer; the gate/up launch before
    it zeroes them (no memset launch, no persistent buffer inside a CUDA-graph pool)."""
    case = dataclasses.replace(M1_CASE, lead=(5,), hidden_size=64, inter_size=96)
    inputs = make_inputs(case, "cpu", torch.float32)
    x, norm_weight, gate_weight, up_weight, _ = inputs.args
    blocks = Blocks.parse(f"{kind}:16x32x32:w4s2" + ("" if kind == "gemv" else "g8"))
    inter = torch.empty(5, 96)
    locks = torch.full((2500,), 7, dtype=torch.int32)  # more than one 1024-wide zeroing step
    launch_plan.gate_up_launch(
        blocks, x, norm_weight, gate_weight, up_weight, None, None, inter, 1e-5, "ieee",
        norm_in_loop=kind != "tma", zero_locks=locks,
    ).run()  # fmt: skip
    assert not locks.any()
