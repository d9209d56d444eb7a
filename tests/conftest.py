import os

import pytest

# Deterministic, single-threaded numerics on the 2-core CI machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_unets():
    """Random-weight UNets shaped like SD 1.5, SD 2.1 and SDXL, narrowed for the CPU."""
    from asyncdiff.configs import load_unet

    return {name: load_unet(name) for name in ("sd15", "sd21", "sdxl")}
