"""Soak test: C concurrent clients against a real tritonserver for M minutes.

    python -m benchmarks.soak --minutes 10 --concurrency 8 [--model-repository DIR] [--steps 8]
                              [--out benchmarks/results/soak.json]

Starts tritonserver on the repository (default: the tiny model exported for N=2 into
.cache/soak/, once), warms it up, then runs C worker threads, each with its own gRPC
client, sending ``asyncdiff`` requests with varied prompts and seeds until the time is up.
Every response is checked (IMAGE uint8 of the warm-up image's shape). One worker repeats a
probe request with a fixed seed every --probe-every-s seconds; its IMAGE must be
byte-identical to the warm-up's answer, else it counts as an error.

Reports requests (every request answered in the timed window, failed ones included),
errors by kind, p50/p99 latency of the successful ones, throughput, and the RSS of every
server process (tritonserver and each python stub) after the warm-up and at the end.
The last line printed is ``soak: requests=<n> errors=<n> rss_growth_pct=<x>``, where x is
the growth of the summed RSS of all server processes. Exit code 1 when errors > 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asyncdiff.contract import MODEL_NAME
from client.infer import GenerationParams, build_request
from serve.launcher import REPO_ROOT, RECOVERABLE_ARGS, TritonServer

DEFAULT_REPOSITORY = REPO_ROOT / ".cache" / "soak" / "tiny-n2"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROBE = GenerationParams("a handwritten digit 4", seed=1234)
SERVER_PROCESS = "tritonserver"


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    concurrency: int
    model_repository: Path = DEFAULT_REPOSITORY
    steps: int = 8
    probe_every_s: float = 5.0
    request_timeout_s: float = 120.0
    out: Path | None = None


@dataclass
class Tally:
    """What the workers saw; one lock guards it all (a few hundred updates a second at most)."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first message of each kind
    probes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, latency_ms: float) -> None:
        with self.lock:
            self.latencies_ms.append(latency_ms)

    def error(self, kind: str, message: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.examples.setdefault(kind, message[:500])

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())


# ------------------------------------------------------------------ repository

def ensure_repository(repo: Path) -> Path:
    """The tiny model, N=2 on onnxruntime, exported into ``repo`` unless it is there already."""
    repo = Path(repo)
    if (repo / MODEL_NAME / "config.pbtxt").is_file():
        return repo
    partial = repo.with_name(repo.name + ".partial")
    log(f"exporting the tiny model (N=2) into {repo}")
    subprocess.run([sys.executable, "-m", "export", "--model", "tiny", "--components", "2",
                    "--backend", "onnxruntime", "--out", str(partial), "--overwrite",
                    "--no-progress"], check=True, cwd=REPO_ROOT)
    partial.rename(repo)  # last: an interrupted export is redone, never served half-written
    return repo


# ------------------------------------------------------------------ processes

def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def server_rss(server: TritonServer) -> dict[str, int]:
    """KiB of resident memory per server process: tritonserver and each stub by instance name."""
    pids = {SERVER_PROCESS: server.pid, **server.stub_processes()}
    sizes = {name: rss_kib(pid) for name, pid in pids.items() if pid is not None}
    return {name: kib for name, kib in sorted(sizes.items()) if kib is not None}


def growth_pct(start: dict[str, int], end: dict[str, int]) -> float:
    before, after = sum(start.values()), sum(end.values())
    return 100.0 * (after - before) / before if before else 0.0


# ------------------------------------------------------------------ requests

def varied(worker: int, index: int, steps: int) -> GenerationParams:
    digit = (worker * 7 + index) % 10
    prompt = (f"a handwritten digit {digit}" if index % 2 == 0 else f"the number {DIGITS[digit]}")
    return GenerationParams(prompt, seed=worker * 1_000_003 + index, steps=steps)


def send(client, params: GenerationParams, timeout_s: float) -> np.ndarray:
    inputs, outputs = build_request(params, "grpc")
    result = client.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=timeout_s)
    return result.as_numpy("IMAGE")


def error_kind(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    code = status() if callable(status) else None
    return f"server:{code}" if code else type(exc).__name__


@dataclass(frozen=True)
class Reference:
    shape: tuple[int, ...]
    probe: bytes


class Worker(threading.Thread):
    def __init__(self, index: int, url: str, cfg: SoakConfig, ref: Reference, tally: Tally,
                 deadline: float):
        super().__init__(name=f"soak-{index}", daemon=True)
        self.index, self.url, self.cfg, self.ref = index, url, cfg, ref
        self.tally, self.deadline = tally, deadline

    def run(self) -> None:
        import tritonclient.grpc as grpcclient

        probe = GenerationParams(PROBE.prompt, seed=PROBE.seed, steps=self.cfg.steps)
        next_probe = time.monotonic() + self.cfg.probe_every_s
        with grpcclient.InferenceServerClient(self.url) as client:
            n = 0
            while time.monotonic() < self.deadline:
                is_probe = self.index == 0 and time.monotonic() >= next_probe
                params = probe if is_probe else varied(self.index, n, self.cfg.steps)
                if is_probe:
                    next_probe += self.cfg.probe_every_s
                n += 1
                started = time.perf_counter()
                try:
                    image = send(client, params, self.cfg.request_timeout_s)
                except Exception as exc:  # every failure is a counted result, not a crash
                    self.tally.error(error_kind(exc), str(exc))
                    continue
                latency_ms = 1000.0 * (time.perf_counter() - started)
                problem = self.check(image, is_probe)
                if problem:
                    self.tally.error(*problem)
                else:
                    self.tally.ok(latency_ms)

    def check(self, image: np.ndarray | None, is_probe: bool) -> tuple[str, str] | None:
        if image is None:
            return "missing_image", "no IMAGE in the response"
        if image.dtype != np.uint8:
            return "image_dtype", f"IMAGE dtype {image.dtype}, expected uint8"
        if image.shape != self.ref.shape:
            return "image_shape", f"IMAGE shape {image.shape}, expected {self.ref.shape}"
        if is_probe:
            with self.tally.lock:
                self.tally.probes += 1
            if image.tobytes() != self.ref.probe:
                return "probe_mismatch", f"probe seed {PROBE.seed}: IMAGE differs from the first answer"
        return None


# ------------------------------------------------------------------ the run

def warm_up(url: str, cfg: SoakConfig) -> Reference:
    """The probe's reference image, then one request per worker at once (loads every path)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        probe = GenerationParams(PROBE.prompt, seed=PROBE.seed, steps=cfg.steps)
        image = send(client, probe, cfg.request_timeout_s)
    if image.dtype != np.uint8 or image.shape[:1] != (1,) or image.ndim != 4 or image.shape[3] != 3:
        raise RuntimeError(f"warm-up IMAGE is {image.dtype} {image.shape}; expected uint8 "
                           "[1, H, W, 3]")
    ref = Reference(shape=tuple(image.shape), probe=image.tobytes())
    errors: list[Exception] = []

    def one(worker: int) -> None:
        try:
            with grpcclient.InferenceServerClient(url) as client:
                send(client, varied(worker, 0, cfg.steps), cfg.request_timeout_s)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"warm-up request failed: {errors[0]}")
    return ref


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(cfg: SoakConfig) -> dict:
    repo = ensure_repository(cfg.model_repository)
    log_file = REPO_ROOT / ".cache" / "soak" / "logs" / f"server-{os.getpid()}.log"
    with TritonServer(repo, log_file=log_file, extra_args=list(RECOVERABLE_ARGS)) as server:
        log(f"server ready on {server.grpc_url} (log {server.log_file}); warming up")
        ref = warm_up(server.grpc_url, cfg)
        rss_start = server_rss(server)
        tally = Tally()
        started = time.monotonic()
        deadline = started + 60.0 * cfg.minutes
        workers = [Worker(i, server.grpc_url, cfg, ref, tally, deadline)
                   for i in range(cfg.concurrency)]
        for w in workers:
            w.start()
        timeline = [{"t_s": 0.0, "rss_kib": sum(rss_start.values()), "requests": 0}]
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(10.0, left))
            timeline.append({"t_s": round(time.monotonic() - started, 1),
                             "rss_kib": sum(server_rss(server).values()),
                             "requests": tally.requests})
        for w in workers:
            w.join()  # each finishes its request in flight
        elapsed = time.monotonic() - started
        rss_end = server_rss(server)
        if not server.is_running():
            tally.error("server_exited", server.log_tail())
        lost = sorted(set(rss_start) - set(rss_end))
        if lost:
            tally.error("process_lost", f"server processes gone by the end: {lost}")
    lat = tally.latencies_ms
    return {
        "config": {**asdict(cfg), "model_repository": str(repo), "out": str(cfg.out)},
        "seconds": round(elapsed, 2),
        "requests": tally.requests,
        "ok": len(lat),
        "errors": sum(tally.errors.values()),
        "errors_by_kind": dict(tally.errors),
        "error_examples": tally.examples,
        "probes": tally.probes,
        "throughput_rps": len(lat) / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                       "mean": statistics.fmean(lat) if lat else None,
                       "max": max(lat) if lat else None},
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_end,
        "rss_growth_pct": growth_pct(rss_start, rss_end),
        "rss_timeline": timeline,
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
    }


def summary(report: dict) -> str:
    lat = report["latency_ms"]
    fmt = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [
        f"{report['requests']} requests in {report['seconds']:.0f} s at concurrency "
        f"{report['config']['concurrency']}: {report['throughput_rps']:.2f} ok/s, "
        f"p50 {fmt(lat['p50'])} ms, p99 {fmt(lat['p99'])} ms, {report['probes']} probes",
        f"errors: {report['errors_by_kind'] or 'none'}",
        f"{'process':<24} {'RSS start MiB':>14} {'RSS end MiB':>12}",
    ]
    for name in sorted(set(report["rss_kib_start"]) | set(report["rss_kib_end"])):
        start, end = report["rss_kib_start"].get(name), report["rss_kib_end"].get(name)
        lines.append(f"{name:<24} {_mib(start):>14} {_mib(end):>12}")
    lines.append(f"soak: requests={report['requests']} errors={report['errors']} "
                 f"rss_growth_pct={report['rss_growth_pct']:.2f}")
    return "\n".join(lines)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


log = logging.getLogger("benchmarks.soak").info  # main() sends it to stderr


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="length of the timed run (fractions ok)")
    p.add_argument("--concurrency", type=int, required=True, help="client threads")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="served repository (default: the tiny N=2 export in %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="STEPS of every request")
    p.add_argument("--probe-every-s", type=float, default=5.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--out", type=Path, help="write the JSON report here")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.concurrency < 1 or a.steps < 1 or a.probe_every_s <= 0:
        p.error("--minutes and --probe-every-s must be > 0, --concurrency and --steps >= 1")
    return SoakConfig(minutes=a.minutes, concurrency=a.concurrency,
                      model_repository=a.model_repository, steps=a.steps,
                      probe_every_s=a.probe_every_s, request_timeout_s=a.request_timeout_s,
                      out=a.out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,  # stdout keeps the report
                        format="[soak %(relativeCreated)8.0f ms] %(message)s")
    cfg = parse_args(argv)
    report = run(cfg)
    if cfg.out:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(report, indent=1) + "\n")
        log(f"wrote {cfg.out}")
    print(summary(report), flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
