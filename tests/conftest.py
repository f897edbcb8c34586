import os

import pytest
import torch
from hypothesis import settings

# Small example counts keep CI (2 cores) fast; SSMKIT_HYPOTHESIS=thorough runs more.
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=False)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("SSMKIT_HYPOTHESIS", "ci"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per xdist worker: the workers already use every core.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
