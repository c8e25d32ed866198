import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Without a GPU, Triton kernels can still run on CPU tensors through Triton's interpreter, but
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported.
# conftest.py is imported before any test module, so setting it here (and only when unset, so a
# developer can still choose) covers every kernel the tests import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's C++ kernel cache skips a build when the .so already exists, so one truncated file left
# in the shared default dir (/tmp/torchinductor_<user>) by a killed process, or by another run
# compiling beside us, fails every later compile of that kernel with "file too short" (CI hit it
# once). The suite therefore compiles into a directory of its own, made fresh for each session and
# inherited by the subprocesses it starts; a caller that sets TORCHINDUCTOR_CACHE_DIR keeps theirs.
# Tests whose children must miss or hit the FX graph cache salt its key instead
# (`tiny_models.child_environ`), so they still reuse the C++ kernels built here.
# Under pytest-xdist (`make test` runs two workers) the workers inherit the controller's directory
# and share it: Inductor builds each kernel under a file lock in that directory (and writes its
# other cache entries atomically), so two workers needing one kernel build it once, where a
# directory per worker built every kernel the two share twice.
_SESSION_PREFIX = "inductor_fusion_tests_"
if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    _session_cache = tempfile.mkdtemp(prefix=_SESSION_PREFIX)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)


@pytest.fixture
def offline_hub_no_toggles(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access (tests must never download) and no process-wide pattern toggles (tests that
    count fused regions must not depend on the caller's environment)."""
    import huggingface_hub.constants

    from inductor_fusion.config import ENV_DISABLE, ENV_PATTERNS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported; set the value it consults too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(ENV_PATTERNS, raising=False)
    monkeypatch.delenv(ENV_DISABLE, raising=False)


# Serial seconds per file on a 2-core CPU machine (2026-12-07, loaded; only the order matters).
# `make test` runs files whole on two workers (--dist loadfile) in collection order
# (--no-loadscope-reorder): collecting the costliest first lets the short ones fill in at the end,
# instead of the longest file starting last while the other worker idles. A file missing here
# counts as short; a stale figure costs wall time, never a test.
_FILE_SECONDS = {
    "test_training.py": 800,
    "test_dynamic.py": 370,
    "test_kernel_rmsnorm_mlp.py": 320,
    "test_cache.py": 310,
    "test_explain.py": 280,
    "test_families.py": 190,
    "test_models.py": 190,
    "test_docs.py": 155,
    "test_perf_scripts.py": 145,
    "test_clients.py": 140,
    "test_lookalikes.py": 125,
    "test_gqa_attention.py": 105,
    "test_generate.py": 100,
    "test_eager_layer.py": 100,
    "test_kernel_config.py": 70,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # sorted() is stable: tests keep their order within a file.
    items[:] = sorted(items, key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))
