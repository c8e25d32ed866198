import os

import torch

# Without a GPU, Triton kernels can still run on CPU tensors through Triton's interpreter, but
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported.
# conftest.py is imported before any test module, so setting it here (and only when unset, so a
# developer can still choose) covers every kernel the tests import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
