"""The BLS GPU path end to end: the tiny model served by a real tritonserver taken from a
carried archive, every UNet component on GPU 0, compared with the same model served on
the CPU.

Two stages, because the GPU host has neither the nvidia-pytriton wheel nor the exporter's
ONNX stack guaranteed:

* ``prepare`` (here, ``make gpu-check-prepare``): exports the tiny model twice, N=2,
  ``--backend torch``: ``cpu/`` (all on the CPU) and ``gpu/`` (``--gpus 0,0``: both
  components and the BLS's tensors on GPU 0; the text encoder and VAE, ONNX models on
  onnxruntime, which has no CUDA provider there, stay on the host CPU). The two share
  every weight file, so they go as hard links into one ``.triton/repositories.tar.xz``.
  The server archive is ``benchmarks.triton_archive``'s.
* ``run`` (the GPU host, from ``benchmarks/gpu_check.sh``): unpacks both archives, lays
  out the backend directory (the archive's python backend + this repository's
  Python-based backends), serves each repository in turn on a loopback port, sends the
  same request over HTTP/JSON (urllib), times it, compares the gpu deployment's latents
  (max abs) and image (PSNR) with the cpu one's and writes
  ``benchmarks/out/gpu_serve_<device>.json``. ``--device cpu`` serves only the cpu
  repository (the CI test of the archive and of this script).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from asyncdiff.contract import INPUT_BY_FIELD, MODEL_NAME, OUTPUTS
from benchmarks import triton_archive
from serve.launcher import HOST, ServerError, TritonServer

REPO_ROOT = Path(__file__).resolve().parents[1]
CARRY = REPO_ROOT / ".triton"
REPOSITORIES = "repositories.tar.xz"
DEPLOYMENTS = ("cpu", "gpu")
HOST_NETWORKS = ("text_encoder", "vae_decoder")  # ONNX on onnxruntime: no CUDA provider there
REQUEST = {"prompt": "a handwritten digit 7", "seed": 0, "steps": 8}
SERVER_START_S = 120.0
REQUEST_S = 60.0
# fp32 on both sides, but cuDNN convolutions on the GPU may run in TF32 (10-bit mantissa).
LATENTS_TOLERANCE = 2e-2


def server_archive_name(version: str) -> str:
    return f"tritonserver-py{version.replace('.', '')}.tar.xz"


# ---- prepare (the CPU machine with the exporter) ----------------------------------------

def export_args(deployment: str, out: Path) -> list[str]:
    args = [sys.executable, "-m", "export", "--model", "tiny", "--components", "2",
            "--backend", "torch", "--no-validate", "--no-progress", "--out", str(out)]
    return args + (["--gpus", "0,0"] if deployment == "gpu" else [])


def host_cpu_networks(repo: Path) -> None:
    """The ONNX networks of a GPU repository -> KIND_CPU instances."""
    from export.repository import read_configs
    from export.triton_config import mc, to_pbtxt

    for name, config in read_configs(repo).items():
        if name in HOST_NETWORKS:
            del config.instance_group[:]
            config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
            (repo / name / "config.pbtxt").write_text(to_pbtxt(config))


def link_duplicates(first: Path, second: Path) -> int:
    """Hard-link files of ``second`` identical to ``first``'s (tar then stores them once)."""
    linked = 0
    for path in sorted(p for p in second.rglob("*") if p.is_file()):
        twin = first / path.relative_to(second)
        if twin.is_file() and filecmp.cmp(twin, path, shallow=False):
            path.unlink()
            os.link(twin, path)
            linked += 1
    return linked


def prepare(out: Path, deployments: tuple[str, ...] = DEPLOYMENTS) -> Path:
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for deployment in deployments:
            subprocess.run(export_args(deployment, work / deployment), cwd=REPO_ROOT, check=True,
                           timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if "gpu" in deployments:
            host_cpu_networks(work / "gpu")
            link_duplicates(work / "cpu", work / "gpu")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        with tarfile.open(tmp, "w:xz", preset=6) as tar:  # weights: -9 saves nothing
            for deployment in deployments:
                tar.add(work / deployment, deployment, filter=_reset_owner)
        os.replace(tmp, out)
    return out


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


# ---- run (any host with the carried archives) --------------------------------------------

def server_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(triton_archive.library_path(tree)
                                             + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    # The stub takes its sys.prefix from `python3` on PATH, and imports this repository
    # (and the carried wheels gpu_check.sh put on PYTHONPATH).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def lay_out(server_archive: Path, repositories: Path, work: Path) -> Path:
    """Unpack both archives into ``work`` and add this repository's Python-based backends."""
    tree = triton_archive.unpack(server_archive, work / "server")
    triton_archive.unpack(repositories, work / "repositories")
    for model_py in sorted((REPO_ROOT / "backends").glob("*/model.py")):
        target = tree / "backends" / model_py.parent.name / "model.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_py, target)
    return tree


def missing_libraries(tree: Path) -> list[str]:
    """Libraries the server or the stub cannot find with our LD_LIBRARY_PATH (``ldd``)."""
    env = server_env(tree)
    missing = []
    for binary in (tree / "bin" / "tritonserver", tree / triton_archive.PYTHON_BACKEND / triton_archive.STUB):
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True,
                             timeout=60).stdout
        missing += [line.split()[0] for line in out.splitlines() if "not found" in line]
    return sorted(set(missing))


def request_body() -> bytes:
    inputs = []
    for key, value in REQUEST.items():
        field = INPUT_BY_FIELD[key]
        inputs.append({"name": field.name, "datatype": field.dtype, "shape": [1], "data": [value]})
    outputs = [{"name": f.name, "parameters": {"binary_data": False}} for f in OUTPUTS]
    return json.dumps({"inputs": inputs, "outputs": outputs}).encode()


def infer(server: TritonServer) -> tuple[dict[str, np.ndarray], float]:
    """One request over HTTP/JSON: ({output name: array}, seconds)."""
    url = f"http://{HOST}:{server.http_port}/v2/models/{MODEL_NAME}/infer"
    req = urllib.request.Request(url, data=request_body(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_S) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        raise ServerError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    seconds = time.perf_counter() - start
    by_name = {f.name: f for f in OUTPUTS}
    arrays = {o["name"]: np.asarray(o["data"], dtype=by_name[o["name"]].numpy_dtype).reshape(o["shape"])
              for o in body["outputs"]}
    return arrays, seconds


def serve_one(tree: Path, repo: Path, requests: int, logs: Path) -> dict:
    """Start a server on ``repo``, one warm-up + ``requests`` timed requests, stop it."""
    server = TritonServer(repo, tree=tree, env=server_env(tree), workdir=logs,
                          startup_timeout=SERVER_START_S, log_file=logs / f"{repo.name}.log")
    record: dict = {"repository": repo.name}
    start = time.perf_counter()
    try:
        server.start()
        record["server_start_s"] = round(time.perf_counter() - start, 2)
        outputs, record["warmup_s"] = infer(server)
        record["latency_s"] = [round(infer(server)[1], 4) for _ in range(requests)]
        record["outputs"] = outputs
    except (ServerError, OSError, KeyError, ValueError) as e:
        record["error"] = f"{type(e).__name__}: {e}"
        record["log_tail"] = server.log_tail(60)
    finally:
        server.stop()
    return record


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """dB; None for identical images (infinite, and not JSON)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2)


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch
    return torch.cuda.get_device_name(0)


def run(device: str, requests: int, carry: Path, work: Path, save=lambda result: None) -> dict:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    server_archive = carry / server_archive_name(version)
    result: dict = {"device": device_name(device), "request": REQUEST, "python": version,
                    "server_archive": str(server_archive)}
    for path in (server_archive, carry / REPOSITORIES):
        if not path.is_file():
            result["error"] = f"{path} is missing: run `make gpu-check-prepare` (Python {version})"
            return result
    if int(np.__version__.split(".")[0]) >= 2:
        # Seen on an H200 (numpy 2.x): the 2.51 stub, built against numpy 1.x, makes arrays
        # with zero strides, so the first BYTES input (PROMPT) already arrives corrupted.
        result["error"] = (f"numpy {np.__version__}: Triton 2.51's Python backend stub needs "
                           "numpy < 2 in the interpreter it embeds")
        return result
    tree = lay_out(server_archive, carry / REPOSITORIES, work)
    missing = missing_libraries(tree)
    if missing:
        result["error"] = (f"the server or its Python {version} stub cannot load {missing}; a "
                           f"libpython{version}.so.1.0 comes from a shared-built Python {version} "
                           "(e.g. the distribution's libpython3.x package) or from an archive "
                           "built with --with-libpython")
        return result
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    runs, result["deployments"] = {}, {}
    for name in DEPLOYMENTS if device == "gpu" else ("cpu",):
        r = runs[name] = serve_one(tree, work / "repositories" / name, requests, logs)
        record = result["deployments"][name] = {k: v for k, v in r.items() if k != "outputs"}
        if "outputs" in r:
            record["image_shape"] = list(r["outputs"]["IMAGE"].shape)
            record["latents_shape"] = list(r["outputs"]["LATENTS"].shape)
            record["latents"] = r["outputs"]["LATENTS"].ravel().tolist()
        save(result)  # a stage killed by its time limit still leaves what it measured
    if all("outputs" in r for r in runs.values()) and "gpu" in runs:
        cpu, gpu = runs["cpu"]["outputs"], runs["gpu"]["outputs"]
        result["gpu_vs_cpu"] = {
            "latents_max_abs": float(np.abs(gpu["LATENTS"] - cpu["LATENTS"]).max()),
            "image_psnr_db": psnr(gpu["IMAGE"], cpu["IMAGE"]),
            "image_max_abs": int(np.abs(gpu["IMAGE"].astype(int) - cpu["IMAGE"].astype(int)).max())}
        result["gpu_vs_cpu"]["latents_tolerance"] = LATENTS_TOLERANCE
        if result["gpu_vs_cpu"]["latents_max_abs"] > LATENTS_TOLERANCE:
            result["error"] = f"gpu latents differ from cpu by more than {LATENTS_TOLERANCE}"
    return result


def summary(result: dict) -> list[str]:
    lines = [f"gpu_serve on {result['device']} (Python {result['python']}): "
             + ("FAILED: " + result["error"] if "error" in result else "served")]
    for name, r in result.get("deployments", {}).items():
        if "error" in r:
            lines.append(f"  {name}: FAILED {r['error'].splitlines()[0][:200]}")
        else:
            lat = r["latency_s"]
            lines.append(f"  {name}: start {r['server_start_s']} s, warm-up {r['warmup_s']:.2f} s, "
                         f"{len(lat)} requests median {sorted(lat)[len(lat) // 2]:.3f} s")
    if "gpu_vs_cpu" in result:
        c = result["gpu_vs_cpu"]
        lines.append(f"  gpu vs cpu: latents max abs {c['latents_max_abs']:.2e}, image PSNR "
                     f"{c['image_psnr_db'] or 'inf'} dB, image max abs {c['image_max_abs']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    pp = sub.add_parser("prepare", help="export the cpu and gpu repositories into one archive")
    pp.add_argument("--out", type=Path, default=CARRY / REPOSITORIES)
    pr = sub.add_parser("run", help="serve them from the carried server archive and compare")
    pr.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="cpu: serve only the cpu repository (no GPU needed)")
    pr.add_argument("--requests", type=int, default=3, help="timed requests after the warm-up")
    pr.add_argument("--carry", type=Path, default=CARRY, help="folder of the two archives")
    pr.add_argument("--out", type=Path, help="JSON (default benchmarks/out/gpu_serve_<device>.json)")
    a = p.parse_args(argv)
    if a.stage == "prepare":
        out = prepare(a.out)
        print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
        return 0
    if a.requests < 1:
        p.error(f"--requests must be >= 1, got {a.requests}")
    from benchmarks.gpu import default_out, write_json
    slug = default_out("cpu" if a.device == "cpu" else device_name("gpu")).name.removeprefix("gpu_")
    out = a.out or default_out(None).with_name(f"gpu_serve_{slug}")
    with tempfile.TemporaryDirectory(prefix="asyncdiff-serve-") as work:
        result = run(a.device, a.requests, a.carry, Path(work), lambda r: write_json(r, out))
    write_json(result, out)
    print(f"wrote {out}")
    print("\n".join(summary(result)))
    return 1 if "error" in result or any("error" in r for r in result.get("deployments", {}).values()) else 0


if __name__ == "__main__":
    sys.exit(main())
