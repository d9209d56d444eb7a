"""Measure the ``asyncdiff`` model with perf_analyzer at a few concurrencies.

    python -m client.perf.run_perf                        # gRPC, concurrency 1,2,4
    python -m client.perf.run_perf --concurrency 1,8 --json perf.json \\
        --bls-composing-models text_encoder,unet_part_0,unet_part_1,vae_decoder

The requests cycle through ten prompts (``PERF_REQUESTS``; --input-data takes
another perf_analyzer JSON file). Each concurrency is one fixed-length perf_analyzer run (time windows, 3 trials,
stability check off), so a slow or noisy CPU host still finishes. Prints
throughput and p50/p99 latency per concurrency; with --bls-composing-models
also each component's server-side figures, which perf_analyzer reports only
on stdout (not in its CSV).

perf_analyzer is the one from tritonclient 2.51.0 (venv bin). It links
libb64.so.0d and libcudart.so.12; this script resolves both without apt by
symlinking into a private folder (see ``library_dir``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

from asyncdiff.contract import INPUT_BY_FIELD, MODEL_NAME, Request
from client.infer import PROTOCOLS, default_url

PERF_REQUESTS = tuple(Request(f"a handwritten digit {d}", seed=d, steps=10) for d in range(10))
PERF_FIELDS = ("prompt", "seed", "steps")  # the inputs sent; the model's defaults apply to the rest
APT_HINT = "apt-get install -y libb64-0d"


class PerfError(RuntimeError):
    """perf_analyzer is missing, cannot load, or failed."""


@dataclass
class ComponentStats:
    model: str
    inference_count: int
    avg_latency_ms: float
    queue_ms: float | None = None
    compute_infer_ms: float | None = None


@dataclass
class LevelStats:
    concurrency: int
    throughput: float  # inferences / s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float | None = None
    components: list[ComponentStats] = field(default_factory=list)


# ---------------------------------------------------------------- environment

def find_perf_analyzer() -> Path:
    # The venv's own binary first: it matches the 2.51 server; a newer one on
    # PATH may need a newer glibc than the host has.
    local = Path(sys.executable).parent / "perf_analyzer"
    found = local if local.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise PerfError("perf_analyzer not found; install tritonclient[grpc,http]==2.51.0 in this venv")
    return Path(found)


def _package_dir(name: str) -> Path | None:
    try:
        spec = find_spec(name)
    except ModuleNotFoundError:
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def library_dir(base: Path | None = None) -> Path:
    """A folder of ``libb64.so.0d`` / ``libcudart.so.12`` symlinks for LD_LIBRARY_PATH.

    Sources: nvidia-cuda-runtime-cu12's libcudart.so.12, else the hashed copies
    the nvidia-pytriton wheel bundles (it ships libb64 too). A missing source
    is skipped: the system may still have the library (``perf_env`` checks).
    """
    base = base or Path(tempfile.gettempdir()) / f"asyncdiff-perf-libs-{os.getuid()}"
    base.mkdir(parents=True, exist_ok=True)
    cuda_rt = _package_dir("nvidia.cuda_runtime")
    bundled = (_package_dir("pytriton") or Path("/nonexistent")).parent / "nvidia_pytriton.libs"
    candidates = {
        "libcudart.so.12": [cuda_rt / "lib" / "libcudart.so.12"] if cuda_rt else [],
        "libb64.so.0d": [],
    }
    if bundled.is_dir():
        candidates["libcudart.so.12"] += sorted(bundled.glob("libcudart-*.so.12*"))
        candidates["libb64.so.0d"] += sorted(bundled.glob("libb64-*.so.0d"))
    for soname, sources in candidates.items():
        source = next((s for s in sources if s.is_file()), None)
        if source is None:
            continue
        link = base / soname
        if link.is_symlink() or link.exists():
            if link.resolve() == source.resolve():
                continue
            link.unlink()
        link.symlink_to(source)
    return base


def perf_env(binary: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which ``binary`` loads; raises PerfError naming missing libraries."""
    env = dict(os.environ if env is None else env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(library_dir())] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    ldd = shutil.which("ldd")
    if ldd:
        out = subprocess.run([ldd, str(binary)], env=env, capture_output=True, text=True).stdout
        missing = sorted({line.split()[0] for line in out.splitlines() if "not found" in line})
        if missing:
            hint = f" (libb64.so.0d: `{APT_HINT}`)" if "libb64.so.0d" in missing else ""
            raise PerfError(f"{binary} cannot load {', '.join(missing)}{hint}; "
                            "libcudart.so.12 comes from the nvidia-cuda-runtime-cu12 wheel")
    return env


def input_data(requests=PERF_REQUESTS, only=PERF_FIELDS) -> dict:
    """perf_analyzer's --input-data: {"data": [{input name: [value]}, ...]}, dims [1] each."""
    return {"data": [{INPUT_BY_FIELD[n].name: [getattr(r, n)] for n in only} for r in requests]}


# -------------------------------------------------------------------- parsing

def parse_csv(text: str) -> list[LevelStats]:
    """Rows of perf_analyzer's ``-f`` CSV (latencies in microseconds) -> LevelStats."""
    levels = []
    for row in csv.DictReader(io.StringIO(text)):
        def ms(key: str) -> float:
            return float(row[key]) / 1000.0

        levels.append(LevelStats(
            concurrency=int(row["Concurrency"]), throughput=float(row["Inferences/Second"]),
            p50_ms=ms("p50 latency"), p90_ms=ms("p90 latency"), p95_ms=ms("p95 latency"),
            p99_ms=ms("p99 latency"),
            avg_ms=ms("Avg latency") if row.get("Avg latency") else None))  # --verbose-csv only
    return levels


_LEVEL = re.compile(r"^Request concurrency: (\d+)", re.M)
_COMPONENT = re.compile(
    r"^\s+(?P<model>[\w.\-]+), version: \S*\n"
    r"\s+Inference count: (?P<count>\d+)\n"
    r"(?:\s+.*\n)*?"
    r"\s+Avg request latency: (?P<avg>\d+) usec(?P<detail>.*)$", re.M)


def parse_composing(stdout: str) -> dict[int, list[ComponentStats]]:
    """Per-concurrency composing-model figures from perf_analyzer's stdout."""
    result: dict[int, list[ComponentStats]] = {}
    marks = list(_LEVEL.finditer(stdout))
    for i, mark in enumerate(marks):
        block = stdout[mark.end(): marks[i + 1].start() if i + 1 < len(marks) else len(stdout)]
        _, sep, composing = block.partition("Composing models:")
        if not sep:
            continue
        stats = []
        for m in _COMPONENT.finditer(composing):
            queue = re.search(r"queue (\d+) usec", m["detail"])
            infer = re.search(r"compute infer (\d+) usec", m["detail"])
            stats.append(ComponentStats(
                model=m["model"], inference_count=int(m["count"]),
                avg_latency_ms=int(m["avg"]) / 1000.0,
                queue_ms=int(queue[1]) / 1000.0 if queue else None,
                compute_infer_ms=int(infer[1]) / 1000.0 if infer else None))
        result[int(mark[1])] = stats
    return result


# ---------------------------------------------------------------------- run

def perf_command(binary: Path, args: argparse.Namespace, concurrency: int, csv_path: Path) -> list[str]:
    cmd = [str(binary), "-m", args.model, "-u", args.url, "-i", args.protocol,
           "--input-data", str(args.input_data),
           "--measurement-mode", "time_windows",
           "--measurement-interval", str(args.measurement_interval),
           "--concurrency-range", str(concurrency),
           # Fixed length: 3 windows, never "unstable" (1 trial always fails the check).
           "--max-trials", "3", "--stability-percentage", "999",
           "-f", str(csv_path), "--verbose-csv"]
    if args.bls_composing_models:
        cmd += ["--bls-composing-models", args.bls_composing_models]
    return cmd + args.extra


def run_level(binary: Path, env: dict[str, str], args: argparse.Namespace,
              concurrency: int, workdir: Path) -> LevelStats:
    csv_path = workdir / f"perf-c{concurrency}.csv"
    cmd = perf_command(binary, args, concurrency, csv_path)
    if args.verbose:
        print("+ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if args.verbose:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0 or not csv_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise PerfError(f"perf_analyzer failed at concurrency {concurrency} "
                        f"(exit {proc.returncode}):\n{tail}")
    levels = parse_csv(csv_path.read_text())
    if not levels:
        raise PerfError(f"perf_analyzer wrote no rows to {csv_path}")
    level = levels[0]
    level.components = parse_composing(proc.stdout).get(concurrency, [])
    return level


def format_table(levels: list[LevelStats]) -> str:
    lines = [f"{'concurrency':>11} {'infer/s':>9} {'p50 ms':>9} {'p99 ms':>9}"]
    for lv in levels:
        lines.append(f"{lv.concurrency:>11} {lv.throughput:>9.3f} {lv.p50_ms:>9.1f} {lv.p99_ms:>9.1f}")
        for c in lv.components:
            lines.append(f"{'':>11}   {c.model}: {c.inference_count} calls, avg {c.avg_latency_ms:.2f} ms"
                         + (f" (queue {c.queue_ms:.2f}, infer {c.compute_infer_ms:.2f})"
                            if c.queue_ms is not None and c.compute_infer_ms is not None else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.perf.run_perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="host:port (default: 127.0.0.1:$GRPC_PORT or 8001; "
                                 "$HTTP_PORT or 8000 with --protocol http)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--concurrency", default="1,2,4", help="comma-separated (default: %(default)s)")
    p.add_argument("--input-data", type=Path, help="perf_analyzer JSON (default: PERF_REQUESTS)")
    p.add_argument("--measurement-interval", type=int, default=5000,
                   help="ms per window; must span several requests (default: %(default)s)")
    p.add_argument("--bls-composing-models", help="e.g. unet_part_0,unet_part_1")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, help="keep perf_analyzer's CSVs here")
    p.add_argument("-v", "--verbose", action="store_true", help="echo commands and perf_analyzer output")
    p.add_argument("extra", nargs="*", metavar="-- PERF_ANALYZER_ARG", help="passed through")
    args = p.parse_args(argv)
    try:
        args.concurrency_levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency_levels or min(args.concurrency_levels) < 1:
        p.error("--concurrency needs integers >= 1")
    args.url = args.url or default_url(args.protocol)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.input_data is not None and not args.input_data.is_file():
            raise PerfError(f"input data {args.input_data} not found")
        binary = find_perf_analyzer()
        env = perf_env(binary)
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            if args.input_data is None:
                args.input_data = workdir / "prompts.json"
                args.input_data.write_text(json.dumps(input_data()))
            levels = []
            for concurrency in args.concurrency_levels:
                print(f"concurrency {concurrency}: measuring 3 x {args.measurement_interval} ms ...",
                      file=sys.stderr, flush=True)
                levels.append(run_level(binary, env, args, concurrency, workdir))
    except PerfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(levels))
    if args.json:
        report = {"model": args.model, "url": args.url, "protocol": args.protocol,
                  "measurement_interval_ms": args.measurement_interval,
                  "levels": [asdict(lv) for lv in levels]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
