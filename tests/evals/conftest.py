import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The smoke runs are many small ops: on a shared 2-core CI machine extra intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
