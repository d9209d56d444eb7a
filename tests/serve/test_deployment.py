"""deployment.json and the tritonserver flags it turns into (CUDA memory pool per GPU)."""

from __future__ import annotations

import pytest

from serve import deployment
from serve.launcher import host_args

MIB = 1 << 20


def test_pool_is_twice_a_round_per_batched_request_never_below_the_default():
    # SD 2.1 at 768x768, N=3, fp16: ~66 MB across the cuts per round (batch 2, max batch 8).
    round_bytes = 66_000_000
    assert deployment.cuda_pool_bytes(round_bytes, 2, 8) == 504 * MIB  # 2 x 66 MB x 4, in MiB
    assert deployment.cuda_pool_bytes(round_bytes, 2, 3) == 252 * MIB  # ceil(3 / 2) = 2
    assert deployment.cuda_pool_bytes(90_112, 2, 8) == deployment.TRITON_DEFAULT_POOL_BYTES
    with pytest.raises(ValueError, match="1 <= batch <= max_batch, got 90112, 4, 2"):
        deployment.cuda_pool_bytes(90_112, 4, 2)


def test_server_args_give_each_gpu_of_the_repository_its_pool(tmp_path):
    info = deployment.write(tmp_path, (2, 3), 66_000_000, 2, 8)
    assert info["cuda_memory_pool_bytes"] == 504 * MIB
    assert deployment.read(tmp_path) == info
    assert deployment.server_args(tmp_path) == [
        f"--cuda-memory-pool-byte-size=2:{504 * MIB}", f"--cuda-memory-pool-byte-size=3:{504 * MIB}"]
    assert deployment.server_args(tmp_path, pool_mb=1024) == [
        f"--cuda-memory-pool-byte-size=2:{1024 * MIB}", f"--cuda-memory-pool-byte-size=3:{1024 * MIB}"]


def test_cpu_repositories_and_cpu_hosts_get_no_cuda_flags(tmp_path):
    assert deployment.server_args(tmp_path) == []  # no deployment.json: an older export
    deployment.write(tmp_path, None, 90_112, 2, 8)
    assert deployment.server_args(tmp_path, pool_mb=512) == []  # CPU instances only
    deployment.write(tmp_path, [0, 1], 90_112, 2, 8)
    cpu_host = host_args(tmp_path, gpu_visible=False, cuda_memory_pool_mb=512)
    assert cpu_host == ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]
    assert not any("cuda" in a for a in cpu_host)
    assert host_args(tmp_path, gpu_visible=True, cuda_memory_pool_mb=512) == [
        f"--cuda-memory-pool-byte-size=0:{512 * MIB}", f"--cuda-memory-pool-byte-size=1:{512 * MIB}"]


def test_cli_prints_the_flags(tmp_path, capsys):
    deployment.write(tmp_path, [1], 66_000_000, 2, 8)
    assert deployment.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"--cuda-memory-pool-byte-size=1:{504 * MIB}"
    assert deployment.main([str(tmp_path), "--cuda-memory-pool-mb", "-1"]) == 2
    assert "CUDA memory pool must be >= 0 bytes" in capsys.readouterr().err


def test_serve_cli_takes_the_pool_size_and_rejects_a_negative_one(capsys):
    from serve.__main__ import parse_args

    assert parse_args(["--model-repository", "r", "--cuda-memory-pool-mb", "512"]).cuda_memory_pool_mb == 512
    assert parse_args(["--model-repository", "r"]).cuda_memory_pool_mb is None  # the recommendation
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "r", "--cuda-memory-pool-mb", "-1"])
    assert "--cuda-memory-pool-mb must be >= 0, got -1" in capsys.readouterr().err
