import os

import pytest
import torch

# Tests are small; one thread per process keeps them fast and stable on shared 2-core machines.
torch.set_num_threads(int(os.environ.get("NORMMATTERS_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
