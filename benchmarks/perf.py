"""perf_analyzer on the benchmark pipeline: N=1 vs N=2 deployments side by side.

    python -m benchmarks.perf [--json benchmarks/results/perf.json] [--interval-ms 6000]

Exports the pipeline of ``benchmarks.bench_pipeline`` for N=1 and N=2 (S=1,
onnxruntime; reused from ``--workdir`` when already there), serves both, and
runs ``client.perf.run_perf`` (perf_analyzer over gRPC, 3 time windows per
level, the prompts of client.perf.run_perf.PERF_REQUESTS: 10 steps each) at concurrency
1, 2 and 4 on each, one deployment after the other.  Reports throughput and
p50/p99 latency, and each UNet component's server-side queue/compute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench_pipeline as bp
from benchmarks.speed import log, machine_info

DEPLOYMENTS = {"n1": bp.Deployment(1), "n2s1": bp.Deployment(2)}


def composing(dep: bp.Deployment) -> str:
    parts = [f"unet_part_{k}" for k in range(dep.components)]
    return ",".join(["text_encoder", *parts, "vae_decoder"])


def measure(server, dep: bp.Deployment, levels: str, interval_ms: int, out: Path) -> dict:
    """One run_perf invocation (its own parsing and JSON) against ``server``."""
    from client.perf import run_perf

    argv = ["--url", server.grpc_url, "--concurrency", levels, "--measurement-interval",
            str(interval_ms), "--bls-composing-models", composing(dep), "--json", str(out)]
    if run_perf.main(argv) != 0:
        raise RuntimeError(f"run_perf failed for {dep.name}")
    return json.loads(out.read_text())


def side_by_side(results: dict) -> str:
    names = list(results)
    head = f"{'concurrency':>11} " + " ".join(
        f"{n + ' infer/s':>13} {n + ' p50 ms':>12} {n + ' p99 ms':>12}" for n in names)
    rows = [head]
    levels = [lv["concurrency"] for lv in results[names[0]]["levels"]]
    for i, c in enumerate(levels):
        cells = []
        for n in names:
            lv = results[n]["levels"][i]
            cells.append(f"{lv['throughput']:>13.3f} {lv['p50_ms']:>12.1f} {lv['p99_ms']:>12.1f}")
        rows.append(f"{c:>11} " + " ".join(cells))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--interval-ms", type=int, default=6000, help="perf_analyzer window (3 per level)")
    p.add_argument("--workdir", help="keep/reuse the pipeline and exports here (default: temp dir)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    report = {"command": "python -m benchmarks.perf " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "pipeline_unet": bp.unet_config(),
              "interval_ms": a.interval_ms, "deployments": {}}
    with tempfile.TemporaryDirectory(prefix="asyncdiff-perf-") as tmp:
        work = Path(a.workdir or tmp)
        pipeline = bp.build(work / "pipeline")
        for dep in DEPLOYMENTS.values():
            bp.export(pipeline, dep, work / dep.name, validate=False)  # parity: tests/export
            log(f"perf: {dep.name} exported")
        results = {}
        for key, dep in DEPLOYMENTS.items():  # one server at a time: perf_analyzer loads the CPU
            with bp.serve_all({key: work / dep.name}) as servers:
                log(f"perf: measuring {key}")
                results[key] = measure(servers[key], dep, a.concurrency, a.interval_ms,
                                       Path(tmp) / f"{key}.json")
            report["deployments"][key] = {"deployment": dep.__dict__, **results[key]}
    print(side_by_side(results))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t0
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.json} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
