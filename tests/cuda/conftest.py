"""Device selection for the CUDA checks (`pytest -m cuda tests/cuda`).

Every test here is marked `cuda` and takes the `device` fixture: a CUDA device when `torch.cuda.is_available()`,
otherwise the test is skipped with the reason printed. `TRL_TIP_TEST_DEVICE=cpu` (or `cuda:1`, ...) forces a device,
so the test logic itself can be checked on a machine without a GPU.
"""

import os

import pytest
import torch


DEVICE_ENV = "TRL_TIP_TEST_DEVICE"
NO_CUDA_REASON = (
    "no CUDA device: torch.cuda.is_available() is False (set TRL_TIP_TEST_DEVICE=cpu to run these checks on CPU)"
)


def test_device() -> torch.device | None:
    """The device the CUDA checks run on, or None when they must be skipped."""
    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else None


test_device.__test__ = False  # a helper, not a test


@pytest.fixture
def device():
    chosen = test_device()
    if chosen is None:
        pytest.skip(NO_CUDA_REASON)
    if chosen.type == "cuda":
        # cuBLAS may not trade float32 precision for speed here: the float32 tolerances assume true fp32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return chosen
