"""What a served step costs beyond the component it runs, for N = 1..4 components.

    python -m benchmarks.step_overhead [--model tiny|bench] [--components 1,2,3,4]
                                       [--steps 8,48] [--reps 7] [--json PATH] [--smoke]

Per deployment (the model exported for N components, onnxruntime, served by a real
tritonserver started here), measured with single unary gRPC requests, one at a time:

* served ms per step: requests of the two step counts alternate (the machine's drift
  hits both alike); (median at the higher - median at the lower) / the step difference
  cancels the text encoder, the VAE and the per-request costs;
* each component alone: its ONNX file in onnxruntime (one thread, as the component model
  runs it) at the served batch, in this process while the server idles; and Triton's
  compute time per execution of that component model during the requests (the runtime
  plus the backend's own reading and writing of tensors);
* host CPU per step: the CPU time (user + system, from /proc) the server processes spent
  during the requests of each step count, differenced the same way: the engine (the
  decoupled ``asyncdiff_stream`` model), the unary ``asyncdiff`` forwarders, tritonserver
  itself and each component's stub;
* the ratio of served ms per step to the slowest component alone, and the host overhead
  per step: served minus the slowest component (on one component, the time nothing runs).

With ``--gpu-json`` (default: the committed H200 timings), the GPU projections of the README
are recomputed with the measured host overhead per step at N=1 as the cost model's
``host_cost`` (``asyncdiff.cost``): fp16, CUDA-graph component times, the time-balanced cut,
same-device copies as transfers, T = 50, w = 1.  The host here is this CPU machine's (no GPU
host has been measured), so these are what the GPU speedups become if a GPU host's
per-call overhead equals this one's.

Models: ``tiny`` is the embedded model (latent 16, calls of a few ms: the host's share
shows, and on 2 cores the components and the host compete for the CPU); ``bench`` the
speed benchmark's UNet (``benchmarks.bench_pipeline``, calls of ~0.1-0.5 s); ``gpu-like``
the tiny model's repository with every component model replaced by one that sleeps the
committed H200 time of that component (fp16, CUDA graphs, the SD 2.1 768² time-balanced
cut; N=1: the whole UNet) and answers zeros: the calls hold the host's CPU no more than a
GPU kernel would, so what the host adds to each step shows as it would beside a GPU
(the images are meaningless; only the timing counts).
Exports are kept under .cache/step_overhead. Writes the JSON only to ``--json`` (the
committed results are benchmarks/results/step_overhead_<model>.json) and prints a
markdown table. ``--smoke``: tiny, N=1,2, steps 2 and 6, 2 reps (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve.launcher import REPO_ROOT, TritonServer

CACHE = REPO_ROOT / ".cache" / "step_overhead"
GPU_JSON = REPO_ROOT / "benchmarks" / "results" / "gpu_nvidia-h200.json"
ENGINE, FORWARDER = "asyncdiff_stream", "asyncdiff"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Deployment:
    components: int
    served_ms_per_step: float
    component_ms: dict[str, float]  # onnxruntime alone, one thread, served batch
    triton_compute_ms: dict[str, float]  # Triton's compute per execution, during the requests
    cpu_ms_per_step: dict[str, float]  # engine, forwarder, tritonserver, each component
    request_ms: dict[str, list[float]] = field(default_factory=dict)  # per step count

    @property
    def slowest_ms(self) -> float:
        return max(self.component_ms.values())

    def to_json(self) -> dict:
        out = asdict(self)
        out["slowest_component_ms"] = self.slowest_ms
        out["served_over_slowest"] = self.served_ms_per_step / self.slowest_ms
        out["host_overhead_ms_per_step"] = self.served_ms_per_step - self.slowest_ms
        out["host_cpu_ms_per_step"] = sum(v for k, v in self.cpu_ms_per_step.items()
                                          if not k.startswith("unet_part_"))
        return out


SLEEPER = '''"""A component stand-in for benchmarks.step_overhead: sleeps, answers zeros."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.seconds = float(config["parameters"]["sleep_ms"]["string_value"]) / 1e3
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"]),
                         [int(d) for d in o["dims"]]) for o in config["output"]]

    def execute(self, requests):
        time.sleep(self.seconds)  # one "kernel" per execution, whatever its batch
        out = []
        for request in requests:
            rows = request.inputs()[0].as_numpy().shape[0]
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.zeros([rows, *dims], dtype)) for name, dtype, dims in self.outputs]))
        return out
'''


def h200_component_ms(n: int) -> list[float]:
    """The committed H200 CUDA-graph times (ms) of SD 2.1's time-balanced N-way cut."""
    model = json.loads(GPU_JSON.read_text())["models"]["sd21-full"]
    if n == 1:
        return [model["unet"]["graph"]["median_ms"]]
    part = model["configs"][f"N{n}S1"]["partitions"]["time"]
    return [c["graph_ms"] or c["eager_ms"] for c in part["components"]]


def gpu_like(tiny: Path, n: int, out: Path) -> Path:
    """``tiny`` (the tiny model for N) with each component model sleeping its H200 time."""
    import shutil

    from export.triton_config import parse_config, to_pbtxt

    partial = out.with_name(out.name + ".partial")  # rebuilt each run: copying takes a moment
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(tiny, partial)
    for k, ms in enumerate(h200_component_ms(n)):
        folder = partial / f"unet_part_{k}"
        config = parse_config((folder / "config.pbtxt").read_text())
        config.backend = "python"
        del config.parameters["runtime"], config.parameters["artifact"]
        config.parameters["sleep_ms"].string_value = f"{ms:.4f}"
        (folder / "config.pbtxt").write_text(to_pbtxt(config))
        (folder / "1" / "model.onnx").unlink()
        (folder / "1" / "model.py").write_text(SLEEPER)
    partial.rename(out)
    return out


def export(model: str, n: int, workdir: Path) -> Path:
    """The model exported for N components (reused when present)."""
    if model == "gpu-like":
        return gpu_like(export("tiny", n, workdir), n, workdir / f"gpu-like-n{n}")
    out = workdir / f"{model}-n{n}"
    if model == "bench":
        from benchmarks import bench_pipeline as bp

        bp.export(bp.build(workdir / "bench-pipeline"), bp.Deployment(n), out, validate=False)
        return out
    if not _current(out):
        from export import cli

        if cli.main(["--model", "tiny", "--components", str(n), "--out", str(out),
                     "--no-progress", "--no-validate", "--overwrite"]) != 0:
            raise RuntimeError(f"exporting the tiny model for N={n} failed")
    return out


def _current(repo: Path) -> bool:
    """Whether ``repo`` holds an export this code serves (an older export's pipeline
    parameters may no longer be part of the contract)."""
    from asyncdiff.contract import PipelineParams
    from export.triton_config import parse_config

    config = repo / ENGINE / "config.pbtxt"
    if not config.is_file():
        return False
    params = parse_config(config.read_text()).parameters
    try:
        PipelineParams.from_parameters({k: v.string_value for k, v in params.items()})
    except ValueError:
        return False
    return True


def component_ms(repo: Path, rows: int = 2, reps: int = 200) -> dict[str, float]:
    """Median ms of each component's ONNX file in onnxruntime, one thread, ``rows`` rows (a
    sleeping stand-in: its sleep)."""
    import numpy as np
    import onnxruntime as ort

    from export.triton_config import parse_config

    out = {}
    for config in sorted(repo.glob("unet_part_*/config.pbtxt")):
        sleep = parse_config(config.read_text()).parameters.get("sleep_ms")
        if sleep is not None:
            out[config.parent.name] = float(sleep.string_value)
    for path in sorted(repo.glob("unet_part_*/1/model.onnx")):
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else rows for d in i.shape])
                 .astype(np.float16 if "float16" in i.type else np.float32)
                 for i in session.get_inputs()}
        for _ in range(max(3, reps // 20)):
            session.run(None, feeds)
        times = []
        deadline = time.perf_counter() + 20.0  # the bench UNet's calls are long
        for _ in range(reps):
            t = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and len(times) >= 5:
                break
        out[path.parent.parent.name] = statistics.median(times) * 1e3
    return out


def process_cpu(server: TritonServer) -> dict[str, float]:
    """CPU seconds so far of tritonserver and each stub, by role (instances summed)."""
    out = {"tritonserver": _cpu_s(server.pid)}
    for instance, pid in server.stub_processes().items():
        model = instance.rsplit("_", 2)[0]  # <model>_<group>_<index>
        role = {ENGINE: "engine", FORWARDER: "forwarder"}.get(model, model)
        out[role] = out.get(role, 0.0) + _cpu_s(pid)
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def compute_per_execution(url: str) -> dict[str, tuple[int, int]]:
    """(executions, compute ns) of each component model so far (Triton's statistics)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        if m["name"].startswith("unet_part_"):
            ns = sum(int(b.get(k, {}).get("ns", 0)) for b in m.get("batch_stats", [])
                     for k in ("compute_input", "compute_infer", "compute_output"))
            out[m["name"]] = (int(m.get("execution_count", 0)), ns)
    return out


def measure(repo: Path, n: int, steps: tuple[int, int], reps: int) -> Deployment:
    from client.infer import GenerationParams, generate

    lo, hi = steps
    with TritonServer(repo, log_file=repo.parent / f"{repo.name}.log") as server:
        url = server.grpc_url

        def request(k: int) -> float:
            t = time.perf_counter()
            generate(GenerationParams("a handwritten digit 3", seed=0, steps=k), "grpc", url)
            return time.perf_counter() - t

        for k in (lo, hi, lo, hi):  # first calls pay lazy set-up (sessions, threads)
            request(k)
        times = {lo: [], hi: []}
        cpu = {lo: {}, hi: {}}
        stats_before = compute_per_execution(url)
        for _ in range(reps):
            for k in (lo, hi):
                before = process_cpu(server)
                times[k].append(request(k))
                after = process_cpu(server)
                for role, s in after.items():
                    cpu[k][role] = cpu[k].get(role, 0.0) + s - before.get(role, 0.0)
        stats_after = compute_per_execution(url)
    components = component_ms(repo)
    per_step = (statistics.median(times[hi]) - statistics.median(times[lo])) / (hi - lo) * 1e3
    cpu_per_step = {role: (cpu[hi].get(role, 0.0) - cpu[lo].get(role, 0.0)) / (reps * (hi - lo)) * 1e3
                    for role in cpu[hi]}
    triton = {}
    for model, (execs, ns) in stats_after.items():
        e0, ns0 = stats_before.get(model, (0, 0))
        if execs > e0:
            triton[model] = (ns - ns0) / (execs - e0) / 1e6
    return Deployment(n, per_step, components, triton, cpu_per_step,
                      {str(k): [t * 1e3 for t in v] for k, v in times.items()})


def gpu_projections(gpu_json: Path, host_ms: float) -> dict:
    """Per model and config (N2S1, ...): the projected speedup of the committed GPU timings
    without host cost and with ``host_ms`` per call, on the time-balanced cut."""
    from asyncdiff.cost import project
    from asyncdiff.placement import Placement
    from asyncdiff.schedule import make_plan

    report = json.loads(gpu_json.read_text())
    steps, warmup = report["settings"]["steps"], report["settings"]["warmup"]
    out = {"source": gpu_json.name, "gpu": report.get("env", {}).get("gpu_name"),
           "host_ms": host_ms, "steps": steps, "warmup": warmup, "models": {}}
    for name, model in report["models"].items():
        unet_ms = model["unet"]["graph"]["median_ms"]
        rows = out["models"][name] = {"unet_graph_ms": unet_ms, "configs": {}}
        for cfg, entry in model["configs"].items():
            part = entry["partitions"].get("time") or entry["partitions"]["flops"]
            costs = [c["graph_ms"] or c["eager_ms"] for c in part["components"]]
            plan = make_plan(steps, entry["n"], entry["stride"], warmup)
            place = Placement(entry["n"], entry["stride"])
            comm = part["comm"]["d2d"]["ms"]
            free = project(plan, place, costs, comm, unet_ms)
            paid = project(plan, place, costs, comm, unet_ms, host_cost=host_ms)
            rows["configs"][cfg] = {
                "no_host": free.speedup,
                # served N=1 pays the host per step too
                "with_host_vs_served_n1": paid.speedup,
                # against the sequential UNet with no host in the way (in-process diffusers)
                "with_host_vs_in_process": free.sequential / paid.asynchronous,
                "max_component_ms": max(costs)}
    return out


def gpu_markdown(proj: dict) -> str:
    configs = list(next(iter(proj["models"].values()))["configs"])
    lines = [f"| {proj['gpu']}: no host / host {proj['host_ms']:.2f} ms per call vs served N=1 / "
             "vs in-process sequential | "
             + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for name, model in proj["models"].items():
        cells = [f"{c['no_host']:.2f}× / {c['with_host_vs_served_n1']:.2f}× / "
                 f"{c['with_host_vs_in_process']:.2f}×" for c in model["configs"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(model: str, results: list[Deployment]) -> str:
    lines = [f"| N ({model}) | served ms/step | slowest component alone (ms) | served / slowest "
             "| host overhead ms/step | host CPU ms/step (engine + forwarder + tritonserver) |",
             "|---|---|---|---|---|---|"]
    for d in results:
        j = d.to_json()
        c = d.cpu_ms_per_step
        lines.append(f"| {d.components} | {d.served_ms_per_step:.2f} | {d.slowest_ms:.2f} | "
                     f"{j['served_over_slowest']:.2f}x | {j['host_overhead_ms_per_step']:.2f} | "
                     f"{j['host_cpu_ms_per_step']:.2f} ({c.get('engine', 0):.2f} + "
                     f"{c.get('forwarder', 0):.2f} + {c.get('tritonserver', 0):.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "bench", "gpu-like"))
    p.add_argument("--components", default="1,2,3,4", help="comma-separated N (default 1,2,3,4)")
    p.add_argument("--steps", default=None, help="the two step counts (default 8,48; bench 2,6)")
    p.add_argument("--reps", type=int, default=None, help="requests per step count (default 7; bench 3)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, default=CACHE)
    p.add_argument("--smoke", action="store_true", help="tiny, N=1,2, steps 2,6, 2 reps")
    p.add_argument("--gpu-json", type=Path, default=GPU_JSON,
                   help="GPU component timings to project with the measured host overhead "
                   "(needs N=1 among --components; default: %(default)s)")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.components, a.steps, a.reps = "tiny", "1,2", "2,6", 2
    bench = a.model == "bench"
    steps = tuple(int(s) for s in (a.steps or ("2,6" if bench else "8,48")).split(","))
    if len(steps) != 2 or not 1 <= steps[0] < steps[1]:
        p.error(f"--steps needs two counts, the first >= 1 and below the second; got {a.steps}")
    reps = a.reps or (3 if bench else 7)
    ns = [int(n) for n in a.components.split(",")]
    if any(not 1 <= n <= 4 for n in ns):
        p.error(f"--components must be in 1..4, got {a.components}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in ns:
        results.append(measure(export(a.model, n, a.workdir), n, steps, reps))
        d = results[-1]
        print(f"N={n}: {d.served_ms_per_step:.2f} ms/step served, slowest component "
              f"{d.slowest_ms:.2f} ms ({d.served_ms_per_step / d.slowest_ms:.2f}x)", flush=True)
    table = markdown(a.model, results)
    print(table)
    report = {"model": a.model, "steps": list(steps), "reps": reps, "cpu_count": os.cpu_count(),
              "deployments": [d.to_json() for d in results], "markdown": table}
    n1 = next((d for d in results if d.components == 1), None)
    if n1 is not None and a.gpu_json and a.gpu_json.is_file():
        host = max(0.0, n1.to_json()["host_overhead_ms_per_step"])
        report["gpu_projections"] = gpu_projections(a.gpu_json, host)
        report["gpu_markdown"] = gpu_markdown(report["gpu_projections"])
        print(report["gpu_markdown"])
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
