"""docker/entrypoint.sh: the export it runs for the GPUs it sees (asyncdiff.placement decides).

The script runs for real under bash; only the commands a GPU container provides
(nvidia-smi, tritonserver) and the export itself are stand-ins that record
their arguments, so the test runs on a CPU machine without Docker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"

STUBS = {
    "nvidia-smi": 'for i in $(seq 0 $((FAKE_GPUS - 1))); do echo "GPU $i: Fake (UUID: GPU-$i)"; done',
    # `python3 -m export ...` records its arguments and creates --out; anything else is Python.
    "python3": f'''if [ "$1 $2" = "-m export" ]; then
    echo "export $*" >> "$CALLS"
    while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2"; shift; done
    exit 0
fi
exec {sys.executable} "$@"''',
    "tritonserver": 'echo "tritonserver $*" >> "$CALLS"',
}


@pytest.fixture
def run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)

    def run(gpus: int, **env: str):
        calls = tmp_path / "calls.txt"
        calls.unlink(missing_ok=True)
        full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
                "CALLS": str(calls), "FAKE_GPUS": str(gpus),
                "MODEL_REPOSITORY": str(tmp_path / "models"), **env}
        proc = subprocess.run(["bash", str(ENTRYPOINT), "--log-verbose=1"], env=full, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        lines = calls.read_text().splitlines() if calls.exists() else []
        return proc, lines

    return run


def test_stride_2_on_n_gpus_is_batched_stride(run):
    proc, calls = run(2, STRIDE="2")
    assert proc.returncode == 0, proc.stderr
    export, server = calls
    assert "--components 2 --stride 2 --gpus 0,1 --batched-stride --backend tensorrt" in export
    assert "--no-validate" in export  # no CPU parity checks at start unless VALIDATE=1
    assert server.startswith("tritonserver --model-repository=") and server.endswith("--log-verbose=1")


def test_n_plus_one_gpus_is_plain_stride_and_validate_is_opt_in(run):
    proc, calls = run(3, STRIDE="2", COMPONENTS="2", VALIDATE="1")
    assert proc.returncode == 0, proc.stderr
    assert "--components 2 --stride 2 --gpus 0,1,2 --backend" in calls[0]
    assert "--no-validate" not in calls[0]


def test_default_is_one_component_per_gpu(run):
    proc, calls = run(4)
    assert proc.returncode == 0, proc.stderr
    assert "--components 4 --stride 1 --gpus 0,1,2,3 --backend" in calls[0]


def test_impossible_placement_stops_before_export(run):
    proc, calls = run(2, STRIDE="2", BATCHED_STRIDE="no")
    assert proc.returncode == 2
    assert "N=2 S=2 needs 3 devices" in proc.stderr
    assert calls == []


def test_cuda_pool_flags_come_from_the_exported_repository(run, tmp_path):
    from serve import deployment

    repo = tmp_path / "models"
    repo.mkdir()
    (repo / ".asyncdiff-export").write_text("model=tiny --components 2 --stride 1 --gpus 0,1")
    deployment.write(repo, [0, 1], 66_000_000, 2, 8)  # as export writes it: 504 MiB per GPU
    proc, calls = run(2)
    assert proc.returncode == 0, proc.stderr
    (server,) = calls  # exported before: no export, straight to the server
    pool = 504 << 20
    assert server == (f"tritonserver --model-repository={repo} --model-control-mode=explicit "
                      f"--load-model=* --cuda-memory-pool-byte-size=0:{pool} "
                      f"--cuda-memory-pool-byte-size=1:{pool} --log-verbose=1")
    proc, calls = run(2, CUDA_MEMORY_POOL_MB="1024")
    assert proc.returncode == 0, proc.stderr
    assert f"--cuda-memory-pool-byte-size=1:{1024 << 20} --log-verbose=1" in calls[0]


def test_fresh_export_without_pool_info_passes_no_pool_flag(run):
    proc, calls = run(2)  # the stand-in export writes no deployment.json
    assert proc.returncode == 0, proc.stderr
    assert "cuda-memory-pool" not in calls[1]
