"""Shared test set-up.

TRITON_INTERPRET=1 must be set before triton is first imported, so that the Triton kernels run on
CPU tensors where no GPU is present.
"""

import os
import tempfile

import torch

# binslt check's verdict changes what backend='auto' takes: the tests never read the user's.
os.environ["BINSLT_CACHE_DIR"] = tempfile.mkdtemp(prefix="binslt-test-cache-")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
