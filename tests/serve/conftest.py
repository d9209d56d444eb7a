"""Start real tritonservers for tests; every server is stopped at session end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serve.launcher import TritonServer


@pytest.fixture(scope="session")
def start_triton(tmp_path_factory) -> Iterator[Callable[..., TritonServer]]:
    """Factory: ``start_triton(repo, **TritonServer options)`` -> a ready server on free ports."""
    servers: list[TritonServer] = []

    def start(model_repository: Path, **options) -> TritonServer:
        options.setdefault("log_file", tmp_path_factory.mktemp("tritonserver") / "server.log")
        server = TritonServer(Path(model_repository), **options)
        servers.append(server)  # registered first: a failed start still gets stopped
        return server.start()

    yield start
    for server in servers:
        server.stop()
