"""Clients that compile with backend="inductor" and cannot name ours: accelerate, generate() (the
Trainer: test_docs runs docs/clients.md's snippet and compares its losses with the eager Trainer's).

After ``inductor_fusion.install()`` each of them fuses. Inductor's caches are off in these tests: an
installed pass reports the graphs it runs on, and a cache hit runs none (see global_pass).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import pytest
import torch
from test_generate import Generated, assert_same_generation, every_layer, regions
from tiny_models import FP32_VS_EAGER, TINY, fresh_compile, tiny_model, token_ids
from transformers import CompileConfig

import inductor_fusion

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_hub_no_toggles")]

LAYERS = TINY["num_hidden_layers"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state (its dynamo plugin included), and TrainingArguments
    writes its compile settings into the environment (ACCELERATE_DYNAMO_*): each test starts
    clean and leaves nothing behind."""
    from accelerate.state import AcceleratorState

    environ = dict(os.environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(environ)


def test_accelerate_dynamo_backend_fuses() -> None:
    from accelerate import Accelerator

    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        eager = model(ids).logits
    with fresh_compile(caches=False) as report, inductor_fusion.installed():
        # docs/clients.md's accelerate snippet, as tested here (test_docs runs the page's too):
        accelerator = Accelerator(dynamo_backend="inductor", cpu=True)
        model = accelerator.prepare(model)
        with torch.no_grad():
            logits = model(ids).logits
        found = regions(report)
    assert found == every_layer(1), report.summary()
    torch.testing.assert_close(logits, eager, atol=FP32_VS_EAGER, rtol=0)


def treat_cpu_as_cuda(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> None:
    """On CUDA, generate() with a static cache compiles its decode step with its default
    CompileConfig (backend "inductor"); on the CPU it compiles only for a compile_config carrying
    `_compile_all_devices`. So that the test takes the CUDA path (no compile_config at all), the
    decision alone sees such a config; the compile then uses generate()'s default one."""
    decide = type(model)._valid_auto_compile_criteria

    def as_on_cuda(self, model_kwargs, generation_config):
        assert generation_config.compile_config is None
        config = copy.copy(generation_config)
        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True
        return decide(self, model_kwargs, config)

    monkeypatch.setattr(type(model), "_valid_auto_compile_criteria", as_on_cuda)


def test_generate_compiles_with_its_default_config_and_fuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The explicit-StaticCache form (``cache=`` / ``past_key_values=`` by version) runs in
    tests/test_docs.py, from docs/clients.md."""
    model, ids = tiny_model("llama"), token_ids(batch=1, seq=5)
    treat_cpu_as_cuda(monkeypatch, model)

    def run() -> Generated:
        with torch.no_grad():
            # docs/clients.md's generate snippets, as tested (no compile_config anywhere):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
                cache_implementation="static",
            )
        return Generated(out.sequences, torch.stack(out.logits))

    with fresh_compile(caches=False) as report:
        reference = run()
    assert len(report) == 0
    with fresh_compile(caches=False) as report, inductor_fusion.installed():
        ours = run()
        found = regions(report)
    graphs = report.count("rmsnorm_mlp") // LAYERS
    assert graphs >= 1 and found == every_layer(graphs), report.summary()
    assert_same_generation(ours, reference)
