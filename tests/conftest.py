import pytest
import torch

# pytest-timeout's limit for a test marked `slow` (its fixtures' setup included); the others keep the
# default of pyproject.toml (300 s). Both hold on a busy 2-core machine: the slowest test took 75 s
# there with the load average at 7.
SLOW_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_intra_op_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy 2-core machine the
    OpenMP workers spin against other processes (a 20-step training loop went from 0.2 s to 17 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
