import pytest
import torch

from unsloth_ext._extension import STATE

HAS_CUDA_KERNELS = STATE.loaded and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and the compiled extension")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA_KERNELS:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
