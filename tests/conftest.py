import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread by default: tiny models gain nothing from more, and oversubscribed cores (subprocess
# tests, a busy machine) slow them 10-40x. LCM_TEST_THREADS=2 for the fullsize tests.
torch.set_num_threads(int(os.environ.get("LCM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
