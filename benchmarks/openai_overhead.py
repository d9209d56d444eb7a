"""Latency the OpenAI-compatible images API adds over a direct gRPC request to Triton.

    python -m benchmarks.openai_overhead [--triton-url HOST:PORT] [--api-url http://HOST:PORT]
                                         [--requests 20] [--steps 8] [--out JSON]

K identical requests (one prompt, one seed) go out one at a time, alternating between the two
paths so that both see the same load on a shared host:

* ``api``: the official ``openai`` client -> ``POST /v1/images/generations`` -> ``serve.openai``
  (JSON, one gRPC call, PNG + base64) -> the client has the response (the PNG is not decoded);
* ``grpc``: tritonclient's gRPC client -> ``infer`` of the same model with the same inputs
  (IMAGE only, as the API asks), one reused channel.

Prints and writes (``--out``) the median and p90 of each and their difference. Without
``--triton-url`` it exports the tiny model for N=2 into a temporary folder and starts its own
tritonserver; without ``--api-url`` it starts ``python -m serve.openai`` in front of it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from asyncdiff.contract import INPUT_BY_FIELD, MODEL_NAME
from benchmarks import output_path
from serve.launcher import REPO_ROOT, RECOVERABLE_ARGS, TritonServer, free_port
from serve.openai import IMAGE_OUTPUT

PROMPT = "a handwritten digit 7"
SEED = 3
OUT = output_path("openai_overhead.json")


def log(message: str) -> None:
    print(f"[openai_overhead] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def own_triton(work: Path):
    """The tiny model exported for N=2 and served by a tritonserver started here."""
    repo = work / "tiny-n2"
    log(f"exporting the tiny model for N=2 into {repo}")
    subprocess.run([sys.executable, "-m", "export", "--model", "tiny", "--components", "2",
                    "--backend", "onnxruntime", "--out", str(repo), "--no-progress"],
                   check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    with TritonServer(repo, extra_args=list(RECOVERABLE_ARGS), startup_timeout=600,
                      log_file=work / "triton.log") as server:
        yield server.grpc_url


@contextlib.contextmanager
def own_api(triton_url: str, work: Path, ready_timeout_s: float = 60.0, args: list[str] | None = None):
    """``python -m serve.openai`` in front of ``triton_url`` (or with ``args``, on a free
    port all the same), in its own process as deployed."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--triton-url", triton_url, "--log-level", "warning"] if args is None else args
    with open(work / "api.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serve.openai", *args, "--port", str(port)],
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve.openai did not become ready:\n{(work / 'api.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stats(samples_s: list[float]) -> dict:
    ms = np.array(samples_s) * 1e3
    return {"median_ms": round(float(np.median(ms)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "min_ms": round(float(ms.min()), 2), "samples_ms": [round(float(v), 2) for v in ms]}


def measure(triton_url: str, api_url: str, requests: int, steps: int, warmup: int) -> dict:
    import openai
    import tritonclient.grpc as grpcclient

    fields = {"prompt": PROMPT, "seed": SEED, "steps": steps}
    api = openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=300)
    inputs = []
    for name, value in fields.items():
        f = INPUT_BY_FIELD[name]
        tensor = grpcclient.InferInput(f.name, [1], f.dtype)
        tensor.set_data_from_numpy(f.encode(value))
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(IMAGE_OUTPUT.name)]
    extensions = {k: v for k, v in fields.items() if k != "prompt"}
    timings: dict[str, list[float]] = {"api": [], "grpc": []}
    last = {}
    with grpcclient.InferenceServerClient(triton_url) as triton:
        def via_api():
            return api.images.generate(prompt=PROMPT, extra_body=extensions)

        def via_grpc():
            return triton.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=300)

        for i in range(warmup + requests):
            # Alternate which path goes first, so neither always follows the other.
            order = (("api", via_api), ("grpc", via_grpc))
            for name, call in order if i % 2 == 0 else reversed(order):
                t0 = time.perf_counter()
                last[name] = call()
                if i >= warmup:
                    timings[name].append(time.perf_counter() - t0)
    report = {name: stats(samples) for name, samples in timings.items()}
    # Both paths computed the same image (else the comparison would be meaningless).
    png = base64.b64decode(last["api"].data[0].b64_json)
    api_image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    grpc_image = last["grpc"].as_numpy(IMAGE_OUTPUT.name)
    report["images_equal"] = bool(np.array_equal(api_image, grpc_image.reshape(api_image.shape)))
    report["overhead_median_ms"] = round(report["api"]["median_ms"] - report["grpc"]["median_ms"], 2)
    report["overhead_p90_ms"] = round(report["api"]["p90_ms"] - report["grpc"]["p90_ms"], 2)
    return report


def run(args) -> dict:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncdiff-openai-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        triton_url = args.triton_url or stack.enter_context(own_triton(work))
        api_url = args.api_url or stack.enter_context(own_api(triton_url, work))
        log(f"{args.requests} requests each way (+{args.warmup} warm-up), {args.steps} steps, "
            f"Triton {triton_url}, API {api_url}")
        result = measure(triton_url, api_url, args.requests, args.steps, args.warmup)
    return {"model": MODEL_NAME, "prompt": PROMPT, "seed": SEED, "steps": args.steps,
            "requests": args.requests, "warmup_requests": args.warmup,
            "own_server": args.triton_url is None,
            "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
            **result, "seconds": round(time.monotonic() - t0, 1)}


def summary(report: dict) -> str:
    rows = [f"{report['requests']} identical requests, {report['steps']} steps, one at a time",
            "| path | median ms | p90 ms |", "|---|---|---|"]
    rows += [f"| {name} | {report[name]['median_ms']:.1f} | {report[name]['p90_ms']:.1f} |"
             for name in ("api", "grpc")]
    rows.append(f"overhead of the OpenAI API: {report['overhead_median_ms']:+.1f} ms median, "
                f"{report['overhead_p90_ms']:+.1f} ms p90; same image both ways: {report['images_equal']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openai_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-url", help="a running Triton's gRPC HOST:PORT (default: start one)")
    parser.add_argument("--api-url", help="a running serve.openai, http://HOST:PORT (default: start one)")
    parser.add_argument("--requests", type=int, default=20, help="K, per path (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first, per path")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.api_url and not args.triton_url:
        parser.error("--api-url needs --triton-url: the Triton that API calls")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
