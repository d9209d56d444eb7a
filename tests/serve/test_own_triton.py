"""The recipe of docs/serving-on-triton.md, followed on the CPU server of the nvidia-pytriton wheel.

A stock Triton has a backend directory holding the python backend (``python/``:
libtriton_python.so, triton_python_backend_utils.py, the stub) and no AsyncDiff backend,
so an exported repository fails with "unable to find backend library for backend
'asyncdiff_pipeline'". The test builds such a directory from the wheel's stock python
backend, adds exactly what the doc says (one ``model.py`` per AsyncDiff backend), points
``--backend-directory`` at it and generates an image through tritonclient.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from asyncdiff.contract import MODEL_NAME
from serve.launcher import PROJECT_BACKENDS, ServerError, wheel_server_tree

# What the doc tells you to copy: source in this repository -> path under the backend directory.
RECIPE = {PROJECT_BACKENDS / name / "model.py": f"{name}/model.py"
          for name in ("asyncdiff_pipeline", "asyncdiff_unary", "asyncdiff_component")}


def stock_backend_directory(root):
    """A stock server's backend directory: the python backend and its stub, nothing else."""
    tree = wheel_server_tree()
    shutil.copytree(tree / "backends" / "python", root / "python",
                    ignore=shutil.ignore_patterns("__pycache__"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(tree / "python_backend_stubs" / version / "triton_python_backend_stub",
                 root / "python")
    return root


def test_stock_backend_directory_cannot_serve_the_repository(start_triton, tiny_repo, tmp_path):
    backends = stock_backend_directory(tmp_path / "backends")
    with pytest.raises(ServerError, match="unable to find backend library for backend "
                                          "'asyncdiff_pipeline'"):
        start_triton(tiny_repo, backend_directory=backends, startup_timeout=60)


def test_recipe_serves_an_image(start_triton, tiny_repo, tmp_path):
    backends = stock_backend_directory(tmp_path / "backends")
    for source, target in RECIPE.items():
        (backends / target).parent.mkdir(parents=True)
        shutil.copy2(source, backends / target)
    server = start_triton(tiny_repo, backend_directory=backends)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"a handwritten digit 7"], dtype=object))
        steps = grpcclient.InferInput("STEPS", [1], "INT32")
        steps.set_data_from_numpy(np.array([3], dtype=np.int32))
        image = client.infer(MODEL_NAME, [prompt, steps], client_timeout=300).as_numpy("IMAGE")
    assert image.shape == (1, 16, 16, 3) and image.dtype == np.uint8
    assert image.std() > 0  # a picture, not a constant fill
    assert f"--backend-directory={backends}" in " ".join(server._args(server.workdir))
