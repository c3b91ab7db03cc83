import pytest
import torch

from hf_whiflash import load_target


@pytest.fixture(scope="session")
def smollm2():
    """The real default target (SmolLM2-135M-Instruct, fp32, CPU) and its tokenizer."""
    torch.set_num_threads(2)
    return load_target()


@pytest.fixture(scope="session")
def target(smollm2):
    return smollm2[0]


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
