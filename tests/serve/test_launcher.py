"""A real tritonserver serving a tiny ONNX conv through the asyncdiff_component backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from export.triton_config import component_model_config, tensor, write_model
from serve.launcher import REPO_ROOT, ServerError, free_port

MAX_BATCH = 8


class ConvRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def export_onnx(path: Path) -> Path:
    torch.manual_seed(0)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but stable
        torch.onnx.export(ConvRelu().eval(), (torch.randn(1, 3, 8, 8),), str(path),
                          opset_version=17, dynamo=False,
                          input_names=["INPUT"], output_names=["OUTPUT"],
                          dynamic_axes={"INPUT": axes, "OUTPUT": axes})
    return path


def conv_config(name: str, input_dims):
    # A long queue delay makes the dynamic batcher merge the concurrent test requests.
    return component_model_config(
        name, [tensor("INPUT", np.float32, input_dims)], [tensor("OUTPUT", np.float32, [4, -1, -1])],
        runtime="onnxruntime", artifact="model.onnx", max_batch_size=MAX_BATCH,
        max_queue_delay_us=200_000)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return export_onnx(tmp_path_factory.mktemp("onnx") / "conv.onnx")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, onnx_file) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "conv", conv_config("conv", [3, -1, -1]), {"model.onnx": onnx_file})
    # conv_loose leaves the channel count to the backend to check.
    write_model(repo, "conv_loose", conv_config("conv_loose", [-1, -1, -1]), {"model.onnx": onnx_file})
    return repo


@pytest.fixture(scope="module")
def server(start_triton, repo):
    return start_triton(repo)


@pytest.fixture(scope="module")
def reference(onnx_file):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["OUTPUT"], {"INPUT": x})[0]


# Clients are always closed: an idle keep-alive HTTP connection holds up the
# server's shutdown for its whole exit timeout, after which it kills the stubs.
def http_infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with httpclient.InferenceServerClient(url) as client:
        return client.infer(model, [inp]).as_numpy("OUTPUT")


def grpc_infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer(model, [inp]).as_numpy("OUTPUT")


def http_ready(url: str) -> bool:
    with httpclient.InferenceServerClient(url) as client:
        return client.is_server_ready()


def conv_stats(url: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the conv model so far."""
    with httpclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics("conv")["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def sample(seed: int, batch: int, height=8, width=8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width), np.float32)


def test_ready_over_http_and_grpc(server):
    assert server.is_running()
    assert http_ready(server.http_url)
    with grpcclient.InferenceServerClient(server.grpc_url) as grpc:
        assert grpc.is_server_ready()
        assert grpc.is_model_ready("conv") and grpc.is_model_ready("conv_loose")


@pytest.mark.parametrize("infer", [http_infer, grpc_infer], ids=["http", "grpc"])
def test_infer_matches_local_onnxruntime(server, reference, infer):
    x = sample(1, batch=2)
    url = server.http_url if infer is http_infer else server.grpc_url
    out = infer(url, "conv", x)
    assert out.shape == (2, 4, 8, 8)
    assert np.max(np.abs(out - reference(x))) <= 1e-6


def test_concurrent_requests_are_batched_and_split_back(server, reference):
    before = conv_stats(server.http_url)
    # Different batch sizes catch an off-by-one split; one odd spatial size
    # cannot be stacked with the others and must come back intact as well.
    inputs = [sample(10, 1), sample(11, 2), sample(12, 1, 6, 10), sample(13, 3)]
    with ThreadPoolExecutor(len(inputs)) as pool:
        outputs = list(pool.map(lambda x: grpc_infer(server.grpc_url, "conv", x), inputs))
    for x, out in zip(inputs, outputs):
        assert out.shape == (x.shape[0], 4, *x.shape[2:])
        assert np.max(np.abs(out - reference(x))) <= 1e-6
    after = conv_stats(server.http_url)
    samples, executions = after[0] - before[0], after[1] - before[1]
    assert samples == sum(x.shape[0] for x in inputs)
    assert executions < len(inputs), "the dynamic batcher merged nothing"


def test_wrong_shape_is_rejected_and_server_stays_ready(server):
    with pytest.raises(InferenceServerException, match=r"INPUT.*[Ee]xpected"):
        http_infer(server.http_url, "conv", np.zeros((1, 5, 8, 8), np.float32))
    assert http_ready(server.http_url)


def test_backend_rejects_only_the_malformed_request(server, reference):
    # conv_loose lets any channel count past the server; the backend checks
    # it against the ONNX file, so one bad request must not fail the good one.
    good, bad = sample(20, 2), np.zeros((1, 5, 8, 8), np.float32)
    with ThreadPoolExecutor(2) as pool:
        good_out = pool.submit(grpc_infer, server.grpc_url, "conv_loose", good)
        bad_out = pool.submit(grpc_infer, server.grpc_url, "conv_loose", bad)
        with pytest.raises(InferenceServerException, match=r"input 'INPUT' has shape \[1, 5, 8, 8\]"):
            bad_out.result()
        assert np.max(np.abs(good_out.result() - reference(good))) <= 1e-6
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_model_ready("conv_loose")


def test_broken_model_fails_fast_with_log_tail(start_triton, tmp_path, onnx_file):
    config = conv_config("broken", [3, -1, -1])
    config.parameters["runtime"].string_value = "tensorflow"
    write_model(tmp_path, "broken", config, {"model.onnx": onnx_file})
    with pytest.raises(ServerError, match="parameter 'runtime'"):
        start_triton(tmp_path, extra_args=["--model-control-mode=explicit", "--load-model=broken"])


def process_group(pgid: int) -> list[int]:
    """PIDs in a process group; the server leads its own, shared with its stubs."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # (comm) may contain spaces
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def test_cli_stops_server_and_stubs_on_sigterm(repo):
    ports = {name: free_port() for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")}
    cli = subprocess.Popen(
        [sys.executable, "-m", "serve", "--model-repository", str(repo),
         "--", "--model-control-mode=explicit", "--load-model=conv"],
        cwd=REPO_ROOT, env={**os.environ, **{k: str(v) for k, v in ports.items()}},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert cli.stdout.readline().strip() == f"HTTP    127.0.0.1:{ports['HTTP_PORT']}"
        assert http_ready(f"127.0.0.1:{ports['HTTP_PORT']}")
        (server_pid,) = children(cli.pid)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 0
    finally:
        cli.kill()
        cli.stdout.close()
    assert not process_group(server_pid)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def test_stop_leaves_no_server_or_stub_processes(server):
    """Runs last in this module: it stops the shared server."""
    pid = server.pid
    assert len(process_group(pid)) == 3, "expected the server and one stub per model"
    server.stop()
    assert not server.is_running()
    assert not process_group(pid)
