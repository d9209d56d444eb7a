"""`python -m serve` and `make serve` on the mistakes a new user makes: busy ports, another N
than the existing repository, listening address flags after --; `make gpu-check`'s Python."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve import deployment
from serve.__main__ import banner, parse_args
from serve.launcher import REPO_ROOT, TritonServer, stub_shm_files


def make_env() -> dict[str, str]:
    """This environment without what would change make's behaviour here: the settings under
    test, and an outer make's flags (under `make test`: directory lines, -j, ...)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("COMPONENTS", "PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def test_second_serve_on_busy_ports_fails_fast_and_leaves_the_first_alone(tiny_server, tiny_repo):
    """One line, under a second, nothing loaded: the running server's log and /dev/shm are
    untouched (it used to load every model for ~9 s, wipe that log and leave 10 regions)."""
    log = Path(tiny_server.log_file)
    log_before, shm_before = log.read_bytes(), stub_shm_files()
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "serve", "--model-repository", str(tiny_repo),
         "--http-port", str(tiny_server.http_port), "--grpc-port", str(tiny_server.grpc_port),
         "--metrics-port", str(tiny_server.metrics_port), "--log-file", str(log)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert second.returncode == 1 and not second.stdout
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"port http {tiny_server.http_port}, grpc {tiny_server.grpc_port}, metrics "
        f"{tiny_server.metrics_port} already in use on 127.0.0.1"), second.stderr
    assert elapsed < 10, elapsed  # an interpreter start; no model is loaded
    assert log.read_bytes().startswith(log_before)
    assert stub_shm_files() == shm_before
    assert tiny_server.is_running()


def test_make_serve_refuses_another_n_than_the_repository(tiny_repo):
    config = tiny_repo / "asyncdiff" / "config.pbtxt"
    mtime = config.stat().st_mtime_ns
    run = subprocess.run(["make", "-s", "serve", f"REPO={tiny_repo}", "COMPONENTS=3"], cwd=REPO_ROOT,
                         env=make_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"error: {tiny_repo} holds an N=2 export, not the N=3 asked for" in run.stderr
    assert config.stat().st_mtime_ns == mtime  # not re-exported
    assert deployment.components(tiny_repo) == 2
    deployment.check_components(tiny_repo, 2)
    deployment.check_components(tiny_repo, None)


def test_make_checks_n_only_when_components_is_given():
    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO_ROOT,
                              env=make_env(), capture_output=True, text=True, check=True,
                              timeout=60).stdout

    assert "--components" not in dry("serve", "REPO=tests").splitlines()[-1]
    assert dry("serve", "REPO=tests", "COMPONENTS=3").splitlines()[-1].endswith("--components 3")
    # gpu-check: the CPU smoke run uses this project's venv, the GPU run the host's python3.
    assert 'PYTHON="${PYTHON:-.venv/bin/python}"' in dry("gpu-check", "GPU_CHECK_ARGS=--device cpu --quick")
    assert 'PYTHON="${PYTHON:-python3}"' in dry("gpu-check")


@pytest.mark.parametrize("flag", ["--http-address=0.0.0.0", "--grpc-port=9001", "--metrics-address"])
def test_address_and_port_flags_after_dashes_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "r", "--", flag])
    assert "is set by this launcher: use --" in capsys.readouterr().err


def test_host_reaches_every_endpoint_and_the_banner(tmp_path):
    server = TritonServer(tmp_path, http_port=1, grpc_port=2, metrics_port=3, host="0.0.0.0",
                          log_file=tmp_path / "log")
    args = server._args(tmp_path)
    for kind, port in (("http", 1), ("grpc", 2), ("metrics", 3)):
        assert f"--{kind}-address=0.0.0.0" in args and f"--{kind}-port={port}" in args
    assert server.grpc_url == "127.0.0.1:2"  # where a client on this machine connects
    assert banner(server).splitlines() == [
        "HTTP    0.0.0.0:1", "gRPC    0.0.0.0:2", "metrics http://0.0.0.0:3/metrics",
        "        (every interface, 127.0.0.1 from this machine)", f"log     {tmp_path / 'log'}"]
    assert parse_args(["--model-repository", "r"]).host == "127.0.0.1"
