"""perf/tune.py without a GPU: its candidates, its choice and the table module it writes.

tune.py is a CUDA script built on the kernels' tuning interface (``launch_config.Blocks``,
``Config``, the launches of ``launch_plan``); it runs rarely and on a GPU, so a drift between the
two would otherwise surface only in the next tuning run. Here its launches run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU) and a fake clock replaces its CUDA-graph timer.
"""

import importlib
import os
import time
from pathlib import Path

import pytest
import torch

from inductor_fusion.triton_kernels import _rmsnorm_mlp_tuned as _tuned
from inductor_fusion.triton_kernels.launch_config import (
    DEFAULT_CONFIGS,
    Blocks,
    Config,
    pick_config,
)

PERF_DIR = Path(__file__).resolve().parent.parent / "perf"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")

HIDDEN, INTER, MAX_M = 64, 96, 128
TOKENS = (1, 40, 128)  # a GEMV-only count, one with GEMVs and pointer GEMMs, one with TMA


@pytest.fixture
def tune(monkeypatch):
    # tune.py runs as a script and imports its sibling perf_common by bare name.
    monkeypatch.syspath_prepend(str(PERF_DIR))
    return importlib.import_module("tune")


class FakeClock:
    """Stands in for ``tune.time_us``: runs every launch as the real one does (so the kernels
    really execute), then reports a made-up time."""

    def __init__(self, fail_calls=()):
        self.times: list[float | None] = []
        self.fail_calls = set(fail_calls)

    def __call__(self, fn, copies, target_us=2000.0):
        call = len(self.times)
        if call in self.fail_calls:
            self.times.append(None)
            raise RuntimeError("out of resource: shared memory")
        for i in range(copies):
            fn(i)
        # Not monotonic in the call order, so the fastest candidate is sometimes the first one
        # of its role and sometimes not.
        self.times.append(float(1 + (call * 37) % 101))
        return self.times[-1]


@pytest.fixture
def small_tune(tune, monkeypatch):
    """tune.py on CPU tensors with a few small candidates per role, in seconds."""
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    # The interpreter gets bf16 products wrong, which would make the error check meaningless.
    monkeypatch.setattr(tune, "DTYPE", torch.float16)
    monkeypatch.setattr(tune, "GATE_UP_GEMV", ((32, 32, 4, 2), (64, 64, 4, 2)))
    monkeypatch.setattr(tune, "DOWN_GEMV", ((32, 32, 4, 2, 2), (64, 64, 4, 2, 4)))
    monkeypatch.setattr(tune, "GATE_UP_TILES", ((32, 32, 32, 4, 2), (64, 64, 64, 4, 2)))
    monkeypatch.setattr(tune, "DOWN_TILES", ((32, 32, 32, 4, 2),))
    monkeypatch.setattr(tune, "DOWN_SPLIT_TILES", ((64, 32, 32, 4, 2),))
    monkeypatch.setattr(tune, "DOWN_SPLITS", (2, 3))
    clock = FakeClock()
    monkeypatch.setattr(tune, "time_us", clock)
    return tune, clock


def _gate_up_name(blocks: Blocks, prenorm: bool) -> str:
    return f"{blocks.key()}{'+prenorm' if prenorm else ''}"


def _fastest(times: dict) -> str:
    timed = {name: t for name, t in times.items() if isinstance(t, float)}
    return min(timed, key=timed.__getitem__)


def _check_record(tune, clock, record: dict, m: int, first_call: int) -> None:
    gate_up_names = [_gate_up_name(b, p) for b, p in tune.gate_up_candidates(m)]
    down_names = [b.key() for b in tune.down_candidates(m)]
    assert list(record["gate_up"]) == gate_up_names
    assert list(record["down"]) == down_names
    # Every candidate was timed once, in order, and recorded with the clock's own value.
    calls = clock.times[first_call:]
    assert list(record["gate_up"].values()) == calls[: len(gate_up_names)]
    assert list(record["down"].values()) == calls[len(gate_up_names) : -2]
    assert [record["op_us"], record["default_op_us"]] == calls[-2:]

    choice = record["choice"]
    gate_up, down = Blocks.parse(choice["gate_up"]), Blocks.parse(choice["down"])
    assert gate_up.key() == choice["gate_up"]
    assert down.key() == choice["down"]
    assert _gate_up_name(gate_up, choice["prenorm"]) == _fastest(record["gate_up"])
    assert choice["down"] == _fastest(record["down"])
    assert choice["gate_up_us"] == min(record["gate_up"].values())
    assert choice["down_us"] == min(record["down"].values())
    Config("choice", gate_up, down, choice["prenorm"])  # raises for an invalid combination

    # The shape is not tuned, so the comparison runs against the defaults' row for m.
    assert record["default"] == next(c.name for max_m, c in DEFAULT_CONFIGS if m <= max_m)
    errors = record["errors"]
    assert set(errors) == {"ours", "eager"}
    assert errors["ours"] <= 2 * errors["eager"] + 2.0**-11, errors


@_needs_interpreter
def test_tune_on_cpu_writes_a_usable_table(small_tune, monkeypatch):
    tune, clock = small_tune
    problem = tune.Problem(HIDDEN, INTER, MAX_M, l2_bytes=1)
    # The fewest weight copies: every candidate launches once per copy in the interpreter.
    assert problem.copies == 2
    records = []
    for m in TOKENS:
        first_call = len(clock.times)
        record = tune.tune_one(problem, m, deadline=time.monotonic() + 600)
        _check_record(tune, clock, record, m, first_call)
        records.append(record)
    winners = [
        list(r[role]).index(_fastest(r[role])) for r in records for role in ("gate_up", "down")
    ]
    # Otherwise "takes the first candidate" would pass the checks above too.
    assert any(winners)

    meta = {"gpu": "CPU (Triton interpreter)", "date": "today", "torch": "x", "triton": "y"}
    text = tune.module_text({(HIDDEN, INTER): records}, meta)
    namespace: dict = {}
    exec(compile(text, "_rmsnorm_mlp_tuned.py", "exec"), namespace)
    table = namespace["TUNED"]
    assert list(table) == [(HIDDEN, INTER)]
    rows = table[HIDDEN, INTER]
    assert [row[0] for row in rows] == [*TOKENS[:-1], 2**62]
    for (_, gate_up, down, prenorm), record in zip(rows, records, strict=True):
        assert (gate_up, down, prenorm) == tuple(
            record["choice"][k] for k in ("gate_up", "down", "prenorm")
        )
        assert Blocks.parse(gate_up).key() == gate_up
        assert Blocks.parse(down).key() == down

    # The op reads the written table: each measured M, and every M up to the next one, gets
    # the configuration chosen for it.
    monkeypatch.setattr(_tuned, "TUNED", table)
    expected = [
        *zip(TOKENS, records, strict=True),
        *((m + 1, record) for m, record in zip(TOKENS, records[1:], strict=False)),
        (10**6, records[-1]),
    ]
    for m, record in expected:
        config = pick_config(m, HIDDEN, INTER, torch.float16, interpret=False)
        choice = record["choice"]
        assert config.gate_up.key() == choice["gate_up"]
        assert config.down.key() == choice["down"]
        assert config.prenorm == choice["prenorm"]

    # A run cut short before the largest M it was asked for must not stretch its last choice
    # over every larger M: past the table, the defaults apply.
    short = tune.module_text({(HIDDEN, INTER): records}, meta, largest_m=10 * TOKENS[-1])
    namespace = {}
    exec(compile(short, "_rmsnorm_mlp_tuned.py", "exec"), namespace)
    monkeypatch.setattr(_tuned, "TUNED", namespace["TUNED"])
    assert namespace["TUNED"][HIDDEN, INTER][-1][0] == TOKENS[-1]
    past = pick_config(TOKENS[-1] + 1, HIDDEN, INTER, torch.float16, interpret=False)
    assert past == next(cfg for max_m, cfg in DEFAULT_CONFIGS if TOKENS[-1] + 1 <= max_m)


@_needs_interpreter
def test_failed_candidate_is_recorded_and_skipped(small_tune, monkeypatch):
    tune, _ = small_tune
    # Call 0 is the first gate/up candidate, the one the clock would make fastest.
    clock = FakeClock(fail_calls={0})
    monkeypatch.setattr(tune, "time_us", clock)
    # tune_one settles the GPU after a failure; there is none here.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    problem = tune.Problem(HIDDEN, INTER, MAX_M, l2_bytes=1)
    record = tune.tune_one(problem, 1, deadline=time.monotonic() + 600)
    failed = next(iter(record["gate_up"]))
    assert record["gate_up"][failed].startswith("failed: RuntimeError: out of resource")
    choice = _gate_up_name(Blocks.parse(record["choice"]["gate_up"]), record["choice"]["prenorm"])
    assert choice == _fastest(record["gate_up"]) != failed


def test_spent_budget_skips_everything(tune, monkeypatch):
    monkeypatch.setattr(tune, "DEVICE", "cpu")

    def no_clock(fn, copies, target_us=2000.0):
        raise AssertionError("nothing may be timed once the budget is spent")

    monkeypatch.setattr(tune, "time_us", no_clock)
    problem = tune.Problem(HIDDEN, INTER, MAX_M, l2_bytes=1)
    record = tune.tune_one(problem, 1, deadline=time.monotonic() - 1)
    assert set(record["gate_up"].values()) == {"skipped (budget)"}
    # Without a choice, main() leaves this M out of the table.
    assert "choice" not in record


def test_candidates_are_valid(tune):
    """The real candidate lists: every entry a configuration the launcher accepts and runs as
    named, for every token count main() tunes."""
    any_gate_up = Blocks("gemv", 16, 32, 32, 4, 2)
    for m, gated in ((m, g) for m in tune.TOKENS for g in (True, False)):
        gate_up, down = tune.gate_up_candidates(m, gated), tune.down_candidates(m)
        assert gate_up and down
        for blocks, prenorm in gate_up:
            Config("candidate", blocks, down[0], prenorm)  # raises for an invalid combination
            assert Blocks.parse(blocks.key()) == blocks
            assert min(blocks.block_m, blocks.block_n, blocks.block_k) >= 16
            assert blocks.split_k == 1  # no gate/up kernel splits K
        for blocks in down:
            Config("candidate", any_gate_up, blocks, False)
            assert Blocks.parse(blocks.key()) == blocks
            assert min(blocks.block_m, blocks.block_n, blocks.block_k) >= 16
            # The pointer GEMM ignores split_k: it would be timed as the unsplit kernel.
            assert blocks.split_k == 1 or blocks.kind in ("gemv", "tma")
        # tune_one keys the timings by these names; a duplicate would drop a candidate.
        names = [_gate_up_name(b, p) for b, p in gate_up]
        assert len(set(names)) == len(names)
        assert len({b.key() for b in down}) == len(down)


@_needs_interpreter
@pytest.mark.parametrize("kind", ["neox", "gemma"])
def test_family_kind_is_tuned_and_read_back_under_its_key(small_tune, monkeypatch, kind):
    """A family kind's launches compute that family's region (the error check compares the
    tuned op with the reference of the same spec), and its rows land where the op looks them up:
    (H, I) for a gated MLP, (H, I, "non-gated") for one up-projection, which a gated region of
    the same shape does not read."""
    tune, _ = small_tune
    problem = tune.Problem(HIDDEN, INTER, MAX_M, l2_bytes=1, kind=kind)
    gated = kind != "neox"
    assert problem.spec.gated is gated
    assert (problem.up[0] is None) is not gated
    assert (problem.norm_b is not None) is (kind == "neox")
    record = tune.tune_one(problem, 1, deadline=time.monotonic() + 600)
    errors = record["errors"]
    assert errors["ours"] <= 2 * errors["eager"] + 2.0**-11, errors
    if not gated:  # the wide non-gated rows were candidates
        assert any(k.startswith("gemv:16x256x") for k in record["gate_up"])

    meta = {"gpu": "CPU (Triton interpreter)", "date": "today", "torch": "x", "triton": "y"}
    namespace: dict = {}
    exec(compile(tune.module_text({problem.key: [record]}, meta), "t.py", "exec"), namespace)
    table = namespace["TUNED"]
    assert list(table) == [(HIDDEN, INTER) if gated else (HIDDEN, INTER, "non-gated")]
    monkeypatch.setattr(_tuned, "TUNED", table)
    mine = pick_config(1, HIDDEN, INTER, torch.float16, interpret=False, gated=gated)
    other = pick_config(1, HIDDEN, INTER, torch.float16, interpret=False, gated=not gated)
    assert mine.gate_up.key() == record["choice"]["gate_up"]
    assert mine.down.key() == record["choice"]["down"]
    assert other == next(cfg for max_m, cfg in DEFAULT_CONFIGS if max_m >= 1)
