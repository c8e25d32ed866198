"""Every ```python block of README.md and docs/*.md is executed by a test.

A block is executed here (a test below carries ``@executes(path, name)``), or by the test that
`ELSEWHERE` names (that test reads the block from the page and execs it), or it is marked
``<!-- needs: cuda -->`` / ``<!-- needs: torchrun -->`` above its fence; every block is compiled
here whatever it needs. A block that is none of these fails
`test_every_python_block_is_executed_or_accounted_for`, so a new snippet cannot slip in untested.
Blocks are named as `doc_snippets` says (``<!-- snippet: name -->``, else their heading).

Snippets that use names they do not define (``model``, ``ids``, ``data``, ``path_or_repo``,
``checkpoint``, ``MyModelForCausalLM``) run in a namespace that defines them: the 2-layer Llama of
docs/usage.md's first snippet, built from a config, and a checkpoint of it saved in tmp_path. The
report lines the snippets print in comments are compared with what they print.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from doc_snippets import ROOT, Block, blocks, doc_files, snippet
from tiny_models import fresh_compile
from transformers import LlamaConfig, LlamaForCausalLM

import inductor_fusion
from inductor_fusion import global_pass

pytestmark = pytest.mark.usefixtures("offline_hub_no_toggles")

# The model of docs/usage.md's first snippet (and of docs/kernel_config.md's and
# docs/eager_layer.md's): every snippet here runs on this shape, so Inductor's FX graph cache
# serves the graphs the first compile of a run made.
DOC_LLAMA = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
)
LAYERS = DOC_LLAMA["num_hidden_layers"]
KNOWN_NEEDS = {"cuda", "torchrun"}

# Blocks another test executes from the page: (path, name) -> (the test, the file of tests/ that
# reads the block with doc_snippets.snippet and execs it).
ELSEWHERE = {
    ("docs/eager_layer.md", "eager"): (
        "test_eager_layer::test_docs_snippet_runs_as_printed",
        "test_eager_layer.py",
    ),
    ("docs/eager_layer.md", "kernels-layer"): (
        "test_kernel_layer_repo::test_docs_snippet_builds_the_config",
        "test_kernel_layer_repo.py",
    ),
    ("docs/clients.md", "tensor-parallel"): (  # torchrun, 2 CPU ranks over gloo
        "test_tensor_parallel::test_two_ranks_fuse_every_layer_and_match_the_unsharded_model",
        "tp_worker.py",
    ),
}

EXECUTED_HERE: dict[tuple[str, str], str] = {}


def executes(*keys: tuple[str, str]) -> Callable:
    """Marks a test of this module as the one that executes these blocks."""

    def mark(test: Callable) -> Callable:
        for key in keys:
            EXECUTED_HERE[key] = test.__name__
        return test

    return mark


def doc_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**DOC_LLAMA, **overrides})).eval()


def doc_ids(seq: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, DOC_LLAMA["vocab_size"], (1, seq), generator=generator)


def run(block: Block, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    exec(block.compiled(), namespace)
    return namespace


def commented_output(block: Block, after: str = "print(") -> list[str]:
    """The comment lines that follow the block's last line containing `after`: the output the
    page shows for it."""
    lines = block.code.splitlines()
    start = max(i for i, line in enumerate(lines) if after in line)
    shown = []
    for line in lines[start + 1 :]:
        if not line.startswith("# "):
            break
        shown.append(line[2:])
    return shown


def without_cache_notes(text: str) -> list[str]:
    """A printed report's lines without what says whether Inductor's cache served the graph (the
    pages show a first compile; a rerun of the tests is served from the cache)."""
    text = re.sub(r" \(\d+ served from Inductor's cache\)", "", text)
    return [line.removesuffix(" (from cache)") for line in text.splitlines()]


def report_lines(report: inductor_fusion.FusionReport) -> list[str]:
    return without_cache_notes(str(report))


@contextlib.contextmanager
def undoes_installs() -> Iterator[None]:
    """Whatever a snippet install()s is uninstalled afterwards, even when it fails midway."""
    try:
        yield
    finally:
        while global_pass.is_installed():
            inductor_fusion.uninstall()


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    path = tmp_path / "checkpoint"
    doc_model().save_pretrained(path)
    return str(path)


# --- accounting -------------------------------------------------------------------------------


def test_every_python_block_is_executed_or_accounted_for() -> None:
    python = blocks("python")
    keys = [block.key for block in python]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicates, f"name these blocks apart with <!-- snippet: name -->: {duplicates}"
    unaccounted = [
        f"{block.path}:{block.line} ({block.name!r})"
        for block in python
        if block.key not in EXECUTED_HERE and block.key not in ELSEWHERE and not block.needs
    ]
    assert not unaccounted, (
        "python blocks no test executes: run them in tests/test_docs.py (@executes), list the "
        f"test that does in ELSEWHERE, or mark what they need (<!-- needs: cuda -->): {unaccounted}"
    )
    stale = sorted((set(EXECUTED_HERE) | set(ELSEWHERE)) - set(keys))
    assert not stale, f"entries naming no python block of the pages: {stale}"


def test_needs_tags_are_known() -> None:
    for block in blocks():
        unknown = set(block.needs) - KNOWN_NEEDS
        assert not unknown, f"{block.path}:{block.line}: unknown needs {unknown}"


@pytest.mark.parametrize("key", sorted(ELSEWHERE), ids="/".join)
def test_tests_named_elsewhere_exist_and_read_their_block(key: tuple[str, str]) -> None:
    test, reader = ELSEWHERE[key]
    module_name, function = test.split("::")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, function, None)), f"no test {test}"
    source = (Path(__file__).parent / reader).read_text()
    assert re.search(rf"snippet\(\s*\"{key[0]}\", \"{key[1]}\"\s*\)", source), (
        f"{reader} does not read {key} from the page"
    )


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: f"{b.path}:{b.line}")
def test_every_python_block_compiles(block: Block) -> None:
    block.compiled()


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):", text, re.M))


def test_bash_blocks_name_real_commands() -> None:
    from inductor_fusion.__main__ import COMMANDS

    targets, checked = make_targets(), 0
    for block in blocks():
        if block.lang not in ("bash", "sh", "shell"):
            continue
        for line in block.code.splitlines():
            where = f"{block.path}:{block.line}: {line.strip()}"
            for target in re.findall(r"(?:^|[;&|]\s*)make\s+([\w.-]+)", line):
                assert target in targets, f"{where}: no Makefile target {target!r}"
                checked += 1
            for module, command in re.findall(
                r"python -m (inductor_fusion[\w.]*)\s*([\w-]*)", line
            ):
                if module == "inductor_fusion":
                    assert command in COMMANDS, f"{where}: no subcommand {command!r}"
                else:
                    assert importlib.util.find_spec(module), f"{where}: no module {module}"
                checked += 1
    assert checked >= 5  # README's make demo / make test, usage.md's three explain lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a page."""
    found = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_relative_links_resolve() -> None:
    for page in doc_files():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                assert anchor in anchors(linked), f"{page.name}: no heading for {target}"


# --- executed here: no compile ----------------------------------------------------------------


@executes(("docs/usage.md", "explain"))
def test_explain_snippet_prints_what_it_shows(capsys: pytest.CaptureFixture[str]) -> None:
    block = snippet("docs/usage.md", "explain")
    run(block)
    printed = capsys.readouterr().out.splitlines()
    shown = [line for line in commented_output(block) if line != "..."]
    assert shown and [line for line in printed if line in shown] == shown


@executes(
    ("docs/kernel_config.md", "inline"),
    ("docs/kernel_config.md", "registry"),
    ("docs/kernel_config.md", "hub"),
)
def test_kernel_config_snippets_build_and_load(checkpoint: str) -> None:
    namespace = run(snippet("docs/kernel_config.md", "inline"), {"path_or_repo": checkpoint})
    compiled = namespace["model"]  # torch.compile compiles at the first call: none here
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    inline = namespace["kernel_config"]
    plan = inductor_fusion.model_plans.model_plan(compiled._orig_mod)
    assert plan is not None and "rmsnorm_mlp" in str(plan), plan
    assert isinstance(inline, inductor_fusion.KernelConfig)
    # The registry and hub snippets go on in the inline one's namespace (its imports).
    registry = run(snippet("docs/kernel_config.md", "registry"), namespace)["kernel_config"]
    assert isinstance(registry, inductor_fusion.KernelConfig)
    hub = run(snippet("docs/kernel_config.md", "hub"), namespace)["kernel_config"]
    assert "rotary_pos_emb" in hub.kernel_mapping


@executes(("docs/kernel_config.md", "register"))
def test_register_snippet_resolves_a_new_class() -> None:
    class MyModelForCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks = torch.nn.ModuleList(
                torch.nn.ModuleDict({"ffn_norm": torch.nn.RMSNorm(8), "ffn": torch.nn.Linear(8, 8)})
                for _ in range(2)
            )
            self.model = torch.nn.Module()
            self.model.decoder = torch.nn.Module()
            self.model.decoder.blocks = blocks

    model = MyModelForCausalLM()
    namespace = {"inductor_fusion": inductor_fusion, "MyModelForCausalLM": MyModelForCausalLM}
    namespace["model"] = model
    block = snippet("docs/kernel_config.md", "register")
    # The snippet's last line is an expression: evaluate it to see what the model resolves to.
    *body, last = block.code.strip().splitlines()
    exec(compile("\n".join(body), block.path, "exec"), namespace)
    resolved = eval(last.split("  #")[0], namespace)
    assert resolved == {
        "RMSNorm": "model.decoder.blocks.*.ffn_norm",
        "MLP": "model.decoder.blocks.*.ffn",
    }, resolved


@executes(("docs/training.md", "memory"))
def test_memory_mode_snippet_builds_both_forms() -> None:
    run(snippet("docs/training.md", "memory"), {"model": doc_model().train()})


@executes(("docs/training.md", "checkpoint"))
def test_checkpoint_snippet_sets_the_dynamo_flag() -> None:
    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    with torch._dynamo.config.patch(**{flag: False}):  # restored on exit
        run(snippet("docs/training.md", "checkpoint"))
        assert getattr(torch._dynamo.config, flag) is True


# --- executed here: model compiles -----------------------------------------------------------


@pytest.mark.slow
@executes(("docs/usage.md", "backend"), ("README.md", "Quickstart"))
def test_backend_and_quickstart_print_their_reports(capsys: pytest.CaptureFixture[str]) -> None:
    block = snippet("docs/usage.md", "backend")
    with fresh_compile() as report:
        namespace = run(block)
    printed = without_cache_notes(capsys.readouterr().out)
    assert printed == report_lines(report) == commented_output(block)
    assert report.count("rmsnorm_mlp") == LAYERS

    quickstart = snippet("README.md", "Quickstart")
    with fresh_compile() as report:
        run(quickstart, {"model": namespace["model"], "ids": doc_ids()})
    printed = capsys.readouterr().out
    shown = quickstart.code.split("print(inductor_fusion.get_report())  # ", 1)[1].split(" (")[0]
    assert report_lines(report)[0] == shown and printed.startswith(shown), printed


def printed_comment(block: Block) -> str:
    """What the comment of the block's last print() line says it prints (its first word)."""
    line = next(line for line in reversed(block.code.splitlines()) if line.startswith("print("))
    return line.split("  # ", 1)[1].split()[0]


@contextlib.contextmanager
def fresh_client_state() -> Iterator[None]:
    """accelerate's process-wide state and the environment TrainingArguments writes
    (ACCELERATE_DYNAMO_*) are as they were before the snippet ran."""
    from accelerate.state import AcceleratorState

    environ = dict(os.environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.slow
@executes(("docs/clients.md", "install"), ("docs/clients.md", "installed"))
def test_install_snippets_fuse_plain_torch_compile(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = {"model": doc_model(), "ids": doc_ids()}
    for name in ("install", "installed"):  # "installed" goes on in the namespace of "install"
        block = snippet("docs/clients.md", name)
        with fresh_compile(), undoes_installs():
            run(block, namespace)
        assert not global_pass.is_installed()
        assert capsys.readouterr().out.split() == [printed_comment(block)] == [str(LAYERS)]


@pytest.mark.slow
@executes(("docs/clients.md", "accelerate"))
def test_accelerate_snippet_fuses() -> None:
    with fresh_client_state(), fresh_compile() as report, undoes_installs():
        run(snippet("docs/clients.md", "accelerate"), {"model": doc_model(), "ids": doc_ids()})
    assert report.count("rmsnorm_mlp") == LAYERS, report.summary()


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, samples: int = 8) -> None:
        self.ids = torch.cat([doc_ids() + i for i in range(samples)]) % DOC_LLAMA["vocab_size"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.slow
@executes(("docs/clients.md", "trainer"))
def test_trainer_snippet_fuses_evaluation_and_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's Trainer snippet fuses every layer in evaluation and in training, and its
    training loss (the mean over its steps, each after the updates before it) is the eager
    Trainer's up to fp32 rounding: the same arguments without compile, on a copy of the model.
    (train() starts a new log, so the evaluation loss the snippet discards is not compared;
    compiled inference logits are checked against eager throughout the suite.)"""
    from transformers import Trainer, TrainingArguments

    monkeypatch.chdir(tmp_path)  # the snippet's output_dir="out"
    model, data = doc_model().train(), TokenDataset()
    eager_model = copy.deepcopy(model)
    namespace = {"model": model, "data": data}
    with fresh_client_state(), fresh_compile() as report, undoes_installs():
        run(snippet("docs/clients.md", "trainer"), namespace)
    variants = [region.variant for region in report if region.pattern == "rmsnorm_mlp"]
    # evaluate(): every layer, inference graph; train(): every layer again, training graph.
    assert variants.count("fp32_3d_residual_left") == LAYERS, report.summary()
    assert variants.count("train_fp32_3d_residual_left") == LAYERS, report.summary()
    with fresh_client_state():
        eager = Trainer(
            model=eager_model,
            args=TrainingArguments(output_dir="eager"),
            train_dataset=data,
            eval_dataset=data,
        )
        eager.train()

    def train_loss(trainer) -> float:
        (loss,) = [
            entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry
        ]
        return loss

    assert train_loss(namespace["trainer"]) == pytest.approx(train_loss(eager), rel=1e-5)


@pytest.mark.slow
@executes(("docs/clients.md", "use-cache"))
def test_generate_snippets_fuse_and_the_use_cache_pitfall(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generate() snippets need CUDA as written (transformers compiles generate's decode step
    only there); test_clients' substitute makes the CPU take the CUDA path. With use_cache=False
    left in the generation config nothing compiles; the page's fix makes both snippets fuse."""
    from test_clients import treat_cpu_as_cuda

    model = doc_model()
    treat_cpu_as_cuda(monkeypatch, model)
    # 32 prompt tokens + 32 new: the explicit cache's 64, so both forms compile the same shapes.
    namespace = {"model": model, "ids": doc_ids(seq=32)}
    generate, static = (
        snippet("docs/clients.md", "generate"),
        snippet("docs/clients.md", "static-cache"),
    )
    model.generation_config.use_cache = False  # as training leaves it
    with fresh_compile() as report, undoes_installs(), torch.no_grad():
        run(generate, namespace)
    assert len(report) == 0, report.summary()  # nothing compiled
    run(snippet("docs/clients.md", "use-cache"), namespace)
    for block in (generate, static):
        with fresh_compile() as report, undoes_installs(), torch.no_grad():
            if block is static:
                inductor_fusion.install()  # the page's static-cache snippet follows generate's
            run(block, namespace)
        assert report.count("rmsnorm_mlp") == LAYERS, (block.name, report.summary())
        assert namespace["out"].shape == (1, 64)


@pytest.mark.slow
@executes(("docs/kernel_config.md", "offline"))
def test_offline_kernel_config_snippet_prints_its_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    block = snippet("docs/kernel_config.md", "offline")
    with fresh_compile() as report:
        run(block)
    printed = without_cache_notes(capsys.readouterr().out)
    assert printed == report_lines(report) == commented_output(block)


@pytest.mark.slow
@executes(("docs/training.md", "train"))
def test_training_snippet_fuses_every_layer() -> None:
    block = snippet("docs/training.md", "train")
    with fresh_compile() as report:
        run(block, {"model": doc_model(), "ids": doc_ids()})
    assert [region.variant for region in report] == ["train_fp32_3d_residual_left"] * LAYERS, (
        report.summary()
    )
    assert printed_comment(block) == "rmsnorm_mlp[train_fp32_3d_residual_left]"
