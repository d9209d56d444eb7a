"""Throughput and latency under concurrency: one AsyncDiff deployment vs N=1 vs two N=1 replicas.

    python -m benchmarks.concurrency [--model tiny|bench] [--concurrency 1,2,4,8]
                                     [--interval-ms 3000] [--repository DIR --label N=2]
                                     [--baseline-repository DIR] [--out JSON]

perf_analyzer (the venv's, from tritonclient 2.51) sends ``asyncdiff`` requests over gRPC
at each concurrency, with inputs from a JSON file written here (PROMPT, SEED, STEPS
cycling over ten prompts). Each level is one fixed-length run: 3 time windows of
--interval-ms, stability check off, so a loaded 2-core host still finishes. Deployments,
one after the other, each on its own server(s) started here:

* ``under_test``: the repository under test (default: the model exported for N=2);
* ``n1``: the same model exported for N=1 (one component, no model parallelism);
* ``replicas``: two independent N=1 servers on this machine, which is what a user would
  deploy instead for throughput. Two perf_analyzer processes run at the same time, each
  at half the concurrency against its own server (at concurrency 1: one process, one
  replica idle); throughput is their sum, p50/p99 the worse of the two.

Models: ``tiny`` (the embedded tiny model, 8 steps, about 3 minutes in all: 187 s here, 3.5 min
in another run, both exports included) and ``bench``
(the speed benchmark's UNet, ``benchmarks.bench_pipeline``: random weights, SD 1.5 blocks
at 0.3x width, latent 32). ``python -m export --model sd15-full`` is the full-width UNet,
not this one, so the pipeline folder is built and exported here (N=2 and N=1 in about
50 s, kept under .cache/). A request of 2 steps takes 1.7 s at N=2, so its windows are
long (default 40 s at 4 steps): all 4 levels of all 3 deployments take about 25 minutes.
Writes benchmarks/out/concurrency_<model>.json (``--out benchmarks/results/...`` replaces a
committed run) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asyncdiff.contract import INPUT_BY_FIELD, MODEL_NAME
from client.perf.run_perf import PerfError, find_perf_analyzer, parse_csv, perf_env
from benchmarks import output_path
from serve.launcher import REPO_ROOT, RECOVERABLE_ARGS, TritonServer

CACHE = REPO_ROOT / ".cache" / "concurrency"
DEPLOYMENTS = ("under_test", "n1", "replicas")
PROMPTS = tuple(f"a handwritten digit {d}" for d in range(10))


@dataclass(frozen=True)
class Deployment:
    name: str  # one of DEPLOYMENTS
    label: str  # shown in the table
    repository: Path
    replicas: int = 1


@dataclass(frozen=True)
class Settings:
    model: str
    levels: tuple[int, ...]
    interval_ms: int
    steps: int
    deployments: tuple[Deployment, ...]
    out: Path


@dataclass
class Level:
    concurrency: int
    throughput: float  # inferences / s, summed over the replicas
    p50_ms: float  # the worst replica's
    p99_ms: float
    per_process: list[dict] = field(default_factory=list)  # each perf_analyzer's own figures


# ------------------------------------------------------------------ repositories

# The tiny model's exports hold 8 requests in flight (16 rows: --max-batch), the top level
# measured; export's default (4) would leave half of concurrency 8 in Triton's queue.
TINY_MAX_BATCH = 16


def export_tiny(components: int, out: Path) -> Path:
    """The tiny model exported for N=``components`` (onnxruntime, ``TINY_MAX_BATCH``), kept in
    ``out``."""
    if (out / MODEL_NAME / "config.pbtxt").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    log(f"exporting the tiny model for N={components} into {out}")
    subprocess.run([sys.executable, "-m", "export", "--model", "tiny", "--components",
                    str(components), "--backend", "onnxruntime", "--out", str(partial),
                    "--max-batch", str(TINY_MAX_BATCH),
                    "--overwrite", "--no-progress"], check=True, cwd=REPO_ROOT,
                   stdout=sys.stderr)  # stdout keeps the report
    partial.rename(out)  # last: an interrupted export is redone
    return out


def export_bench(components: int, out: Path, steps: int) -> Path:
    """The speed benchmark's pipeline exported for N=``components``, kept in ``out``."""
    from benchmarks import bench_pipeline as bp

    pipeline = bp.build(CACHE / "bench-pipeline")
    log(f"exporting the benchmark UNet for N={components} into {out} (reused when unchanged)")
    bp.export(pipeline, bp.Deployment(components), out, default_steps=steps, validate=False)
    return out


def default_repository(model: str, components: int, steps: int) -> Path:
    if model == "tiny":
        return export_tiny(components, CACHE / f"tiny-n{components}-b{TINY_MAX_BATCH}")
    return export_bench(components, CACHE / f"{model}-n{components}", steps)


# ------------------------------------------------------------------ perf_analyzer

def input_data(steps: int) -> dict:
    """perf_analyzer's --input-data: ten requests, each input of dims [1]."""
    names = {f: INPUT_BY_FIELD[f].name for f in ("prompt", "seed", "steps")}
    return {"data": [{names["prompt"]: [prompt], names["seed"]: [seed], names["steps"]: [steps]}
                     for seed, prompt in enumerate(PROMPTS)]}


def perf_command(binary: Path, url: str, data: Path, concurrency: int, interval_ms: int,
                 csv_path: Path) -> list[str]:
    return [str(binary), "-m", MODEL_NAME, "-u", url, "-i", "grpc", "--input-data", str(data),
            "--measurement-mode", "time_windows", "-p", str(interval_ms),
            "--concurrency-range", str(concurrency),
            # Fixed length: 3 windows and never "unstable" (fewer trials can never be stable).
            "--max-trials", "3", "--stability-percentage", "999", "-f", str(csv_path)]


def split_concurrency(concurrency: int, replicas: int) -> list[int]:
    """Concurrency of each replica's perf_analyzer (idle replicas left out): 8 -> [4, 4], 1 -> [1]."""
    shares = [concurrency // replicas + (1 if i < concurrency % replicas else 0) for i in range(replicas)]
    return [share for share in shares if share > 0]


def combine(concurrency: int, parts: list[dict]) -> Level:
    """Replicas measured at the same time: throughputs add up, latency is the worse one's."""
    return Level(concurrency=concurrency, throughput=sum(p["throughput"] for p in parts),
                 p50_ms=max(p["p50_ms"] for p in parts), p99_ms=max(p["p99_ms"] for p in parts),
                 per_process=parts)


def measure_level(binary: Path, env: dict, urls: list[str], data: Path, concurrency: int,
                  interval_ms: int, workdir: Path) -> Level:
    """One level: a perf_analyzer per busy replica, all running at once."""
    runs = []
    for i, (url, share) in enumerate(zip(urls, split_concurrency(concurrency, len(urls)))):
        csv_path = workdir / f"c{concurrency}-r{i}.csv"
        cmd = perf_command(binary, url, data, share, interval_ms, csv_path)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs.append((url, share, csv_path, proc))
    parts = []
    for url, share, csv_path, proc in runs:
        output, _ = proc.communicate()
        rows = parse_csv(csv_path.read_text()) if csv_path.is_file() else []
        if proc.returncode != 0 or not rows:
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise PerfError(f"perf_analyzer against {url} at concurrency {share} "
                            f"failed (exit {proc.returncode}):\n{tail}")
        row = rows[0]
        parts.append({"url": url, "concurrency": share, "throughput": row.throughput,
                      "p50_ms": row.p50_ms, "p99_ms": row.p99_ms})
    return combine(concurrency, parts)


# ------------------------------------------------------------------ servers

def warm_up(url: str, steps: int) -> None:
    """One request, so the first window does not pay for lazy initialisation."""
    from client.infer import GenerationParams, generate

    generate(GenerationParams(PROMPTS[0], seed=0, steps=steps), url=url, timeout=600)


@contextlib.contextmanager
def servers(dep: Deployment, logs: Path):
    """The deployment's servers, started one after the other from this thread (a server gets
    SIGTERM when the thread that started it ends, see serve.launcher)."""
    with contextlib.ExitStack() as stack:
        urls = []
        for i in range(dep.replicas):
            server = TritonServer(dep.repository, extra_args=list(RECOVERABLE_ARGS),
                                  startup_timeout=600, log_file=logs / f"{dep.name}-{i}.log")
            urls.append(stack.enter_context(server).grpc_url)
        yield urls


def run(settings: Settings) -> dict:
    binary = find_perf_analyzer()
    env = perf_env(binary)
    t0 = time.monotonic()
    report = {"model": settings.model, "steps": settings.steps, "interval_ms": settings.interval_ms,
              "windows_per_level": 3, "machine": {"cpus": os.cpu_count()}, "deployments": {}}
    with tempfile.TemporaryDirectory(prefix="asyncdiff-concurrency-") as tmp:
        work = Path(tmp)
        data = work / "input.json"
        data.write_text(json.dumps(input_data(settings.steps)))
        for dep in settings.deployments:  # one at a time: each gets both cores
            with servers(dep, CACHE / "logs") as urls:
                for url in urls:
                    warm_up(url, settings.steps)
                levels = []
                for c in settings.levels:
                    log(f"{dep.label}: concurrency {c} ({len(split_concurrency(c, len(urls)))} "
                        f"perf_analyzer, 3 x {settings.interval_ms} ms)")
                    levels.append(measure_level(binary, env, urls, data, c, settings.interval_ms, work))
            report["deployments"][dep.name] = {
                "label": dep.label, "repository": str(dep.repository), "replicas": dep.replicas,
                "levels": [asdict(lv) for lv in levels]}
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def markdown(report: dict) -> str:
    deps = report["deployments"]
    head = "| concurrency | " + " | ".join(
        f"{d['label']} infer/s | p50 ms | p99 ms" for d in deps.values()) + " |"
    rule = "|---|" + "---|---|---|" * len(deps)
    rows = [head, rule]
    levels = [lv["concurrency"] for lv in next(iter(deps.values()))["levels"]]
    for i, c in enumerate(levels):
        cells = []
        for d in deps.values():
            lv = d["levels"][i]
            cells.append(f"{lv['throughput']:.2f} | {lv['p50_ms']:.0f} | {lv['p99_ms']:.0f}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


log = logging.getLogger("benchmarks.concurrency").info  # main() sends it to stderr


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "bench"), default="tiny")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated (default: %(default)s)")
    p.add_argument("--interval-ms", type=int, default=None,
                   help="perf_analyzer window, 3 per level (default: 3000 tiny, 40000 bench)")
    p.add_argument("--steps", type=int, default=None, help="STEPS per request (default: 8 tiny, 4 bench)")
    p.add_argument("--repository", type=Path, help="repository under test (default: the model, N=2)")
    p.add_argument("--label", default=None, help="its name in the table (default: N=2, or the folder name)")
    p.add_argument("--baseline-repository", type=Path, help="the N=1 export (default: exported here)")
    p.add_argument("--deployments", default=",".join(DEPLOYMENTS),
                   help=f"subset of {','.join(DEPLOYMENTS)} (default: all)")
    p.add_argument("--out", type=Path, help="JSON (default: benchmarks/out/concurrency_<model>.json)")
    a = p.parse_args(argv)
    try:
        levels = tuple(int(c) for c in a.concurrency.split(",") if c.strip())
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {a.concurrency!r}")
    if not levels or min(levels) < 1:
        p.error("--concurrency needs integers >= 1")
    chosen = tuple(d for d in a.deployments.split(",") if d)
    if not chosen or set(chosen) - set(DEPLOYMENTS):
        p.error(f"--deployments: choose from {','.join(DEPLOYMENTS)}, got {a.deployments!r}")
    steps = a.steps or (8 if a.model == "tiny" else 4)
    interval = a.interval_ms or (3000 if a.model == "tiny" else 40000)
    under_test = a.repository
    if under_test is None and "under_test" in chosen:
        under_test = default_repository(a.model, 2, steps)
    label = a.label or ("N=2" if a.repository is None else a.repository.name)
    baseline = a.baseline_repository
    if baseline is None and {"n1", "replicas"} & set(chosen):
        baseline = default_repository(a.model, 1, steps)
    table = {"under_test": Deployment("under_test", label, under_test),
             "n1": Deployment("n1", "N=1", baseline),
             "replicas": Deployment("replicas", "2×N=1", baseline, replicas=2)}
    return Settings(model=a.model, levels=levels, interval_ms=interval, steps=steps,
                    deployments=tuple(table[d] for d in chosen),
                    out=a.out or output_path(f"concurrency_{a.model}.json"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,  # stdout keeps the report
                        format="[concurrency %(relativeCreated)8.0f ms] %(message)s")
    settings = parse_args(argv)
    try:
        report = run(settings)
    except PerfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report["command"] = "python -m benchmarks.concurrency " + " ".join(
        sys.argv[1:] if argv is None else argv)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(markdown(report))
    log(f"wrote {settings.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
