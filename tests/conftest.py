import os

import pytest
import torch

# Without a GPU, Triton kernels can still run on CPU tensors through Triton's interpreter, but
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported.
# conftest.py is imported before any test module, so setting it here (and only when unset, so a
# developer can still choose) covers every kernel the tests import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
