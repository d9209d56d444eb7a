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


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """The tiny model exported for N=2, S=1 on onnxruntime, as `make demo` serves it, with a
    second size (24 wide) for the tests of per-request sizes."""
    from export import cli

    out = tmp_path_factory.mktemp("tiny-n2s1")
    assert cli.main(["--model", "tiny", "--components", "2", "--out", str(out), "--no-progress",
                     "--resolutions", "16x16,24x16"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_server(tiny_repo, tmp_path_factory):
    """A real tritonserver serving ``tiny_repo``; explicit model control so tests can reload models."""
    from serve.launcher import TritonServer

    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    with TritonServer(tiny_repo, log_file=log,
                      extra_args=["--model-control-mode=explicit", "--load-model=*"]) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_sdxl():
    """A tiny random-weight SDXL pipeline, built offline (tests/tiny_sdxl.py)."""
    from tests.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl()


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tiny_sdxl, tmp_path_factory):
    """``tiny_sdxl`` saved as a diffusers pipeline folder (what export reads)."""
    return _saved(tiny_sdxl, tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_flux():
    """A tiny random-weight FLUX.1-dev-like pipeline (guidance embedding), built offline
    (tests/tiny_flux.py)."""
    from tests.tiny_flux import build_tiny_flux

    return build_tiny_flux()


@pytest.fixture(scope="session")
def tiny_flux_folder(tiny_flux, tmp_path_factory):
    """``tiny_flux`` saved as a diffusers pipeline folder (what export reads)."""
    return _saved(tiny_flux, tmp_path_factory, "flux")


def _saved(pipe, tmp_path_factory, name):
    path = tmp_path_factory.mktemp(name) / "pipe"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_flux_repo(tiny_flux_folder, tmp_path_factory):
    """``tiny_flux_folder`` exported whole for N=1 at 32x32 px (onnxruntime, export's parity
    checks on): tests/export checks its contents, tests/backends serves it."""
    from export import cli

    out = tmp_path_factory.mktemp("flux-n1")
    assert cli.main(["--model", str(tiny_flux_folder), "--components", "1", "--out", str(out),
                     "--no-progress", "--height", "32", "--width", "32"]) == 0
    return out
